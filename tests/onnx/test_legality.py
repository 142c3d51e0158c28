"""The nasty cases: what must not fold (with the reason), and what folds only with care."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import helper

import bnfuse
from bnfuse import Skip
from bnfuse.result import FuseResult
from sample_models.models import (
    PER_SAMPLE_NORMS,
    bn_after_concat,
    bn_on_graph_input,
    fp16_overflow,
    if_branches,
    layer_bn,
    loop_body,
    matmul_3d,
    per_sample_norm,
    random_feeds,
    shared_weight,
    training_mode_bn,
    with_constant_nodes,
    with_extra_output,
    with_identity_alias,
    with_initializer,
    with_params_as_inputs,
)
from tests.helpers import assert_same_outputs, fuse_proto, initializer, op_types, run_reference


def dry_run(model: onnx.ModelProto, tmp_path: Path) -> FuseResult:
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    return bnfuse.fuse(src, dry_run=True)


def fuse_expect_skip(model: onnx.ModelProto, tmp_path: Path, skip: Skip, words: str) -> None:
    """The only BN is skipped for ``skip``; the written model computes exactly the same."""
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is skip, cand
    assert cand.reason is not None and words in cand.reason, cand.reason
    assert op_types(fused).count("BatchNormalization") == 1
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 0.0)


def test_training_mode_bn_is_skipped(tmp_path: Path) -> None:
    fused, result, _ = fuse_proto(training_mode_bn(), tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.TRAINING_MODE and "training_mode=1" in (cand.reason or "")
    assert op_types(fused).count("BatchNormalization") == 1


def test_conv_output_with_two_consumers_is_skipped(tmp_path: Path) -> None:
    side = helper.make_node("Sigmoid", ["h"], ["side"], name="side")
    model = with_extra_output(layer_bn("Conv"), side, "side")
    fuse_expect_skip(model, tmp_path, Skip.OTHER_CONSUMERS, "also read by 1 other node(s) (side)")


def test_conv_output_that_is_a_graph_output_is_skipped(tmp_path: Path) -> None:
    model = with_extra_output(layer_bn("Conv"), None, "h")
    fuse_expect_skip(
        model, tmp_path, Skip.GRAPH_OUTPUT, "'h' of Conv 'layer' is also a graph output"
    )


def test_bn_parameters_given_as_graph_inputs_are_skipped(tmp_path: Path) -> None:
    model = with_params_as_inputs(layer_bn("Conv"), {"bn.mean", "bn.var"}, keep_initializer=False)
    (cand,) = dry_run(model, tmp_path).candidates
    assert cand.skip is Skip.NOT_CONSTANT
    assert cand.reason == "BatchNorm mean: 'bn.mean' is a graph input, not a constant"


def test_overridable_initializer_is_skipped(tmp_path: Path) -> None:
    """IR >= 4: an initializer also listed as an input can be fed at run time."""
    model = with_params_as_inputs(layer_bn("Conv"), {"bn.scale"}, keep_initializer=True)
    fuse_expect_skip(model, tmp_path, Skip.OVERRIDABLE, "caller can override it")


def test_conv_weight_given_as_graph_input_is_skipped(tmp_path: Path) -> None:
    model = with_params_as_inputs(layer_bn("Conv"), {"layer.W"}, keep_initializer=False)
    (cand,) = dry_run(model, tmp_path).candidates
    assert cand.skip is Skip.NOT_CONSTANT
    assert cand.reason == "Conv 'layer' weight: 'layer.W' is a graph input, not a constant"


def test_shared_weight_is_copied_and_other_conv_unchanged(tmp_path: Path) -> None:
    """conv_a(x, W) -> BN and conv_b(x, W) with no BN: only conv_a's copy changes."""
    model = shared_weight()
    w = initializer(model, "W")
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True]
    convs = {n.name: n for n in fused.graph.node if n.op_type == "Conv"}
    assert convs["conv_b"].input[1] == "W"
    np.testing.assert_array_equal(initializer(fused, "W"), w)
    assert convs["conv_a"].input[1] == "W_bnfused"
    feeds = random_feeds(model)
    before, after = run_reference(model, feeds), run_reference(fused, feeds)
    assert_same_outputs(before, after, 1e-5)
    np.testing.assert_array_equal(before[1], after[1])  # conv_b: bit-identical


def test_fp16_fold_that_would_overflow_is_skipped(tmp_path: Path) -> None:
    """A weight of 40000 scaled by ~3 exceeds fp16's 65504: refuse, don't write inf."""
    fused, result, _ = fuse_proto(fp16_overflow(), tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.NOT_FINITE
    assert "channel 5" in (cand.reason or "") and "FLOAT16" in (cand.reason or "")
    assert op_types(fused).count("BatchNormalization") == 1
    w_out = initializer(fused, "layer.W")
    assert np.all(np.isfinite(w_out)) and w_out[5, 0, 0, 0] == 40000


@pytest.mark.parametrize("norm", PER_SAMPLE_NORMS)
def test_per_sample_norms_are_untouched(norm: str, tmp_path: Path) -> None:
    model = per_sample_norm(norm)
    fused, result, _ = fuse_proto(model, tmp_path)
    assert result.candidates == []
    assert result.ops_after == result.ops_before
    assert fused.graph.node == model.graph.node
    assert fused.graph.initializer == model.graph.initializer


def test_bn_after_concat_is_skipped_with_reason(tmp_path: Path) -> None:
    fuse_expect_skip(
        bn_after_concat(),
        tmp_path,
        Skip.NO_LAYER,
        "comes from Concat 'concat', which has no weight to fold into",
    )


def test_bn_on_graph_input_is_skipped(tmp_path: Path) -> None:
    fuse_expect_skip(bn_on_graph_input(), tmp_path, Skip.NO_LAYER, "graph input")


def test_matmul_on_3d_input_is_skipped(tmp_path: Path) -> None:
    """[B, T, K] @ [K, N]: BN normalises axis 1 (T), not the MatMul's N."""
    fuse_expect_skip(
        matmul_3d(), tmp_path, Skip.SHAPE_MISMATCH, "is 3-D: BatchNorm normalises axis 1"
    )


def test_matmul_of_unknown_rank_is_skipped(tmp_path: Path) -> None:
    model = layer_bn("MatMul")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    (cand,) = dry_run(model, tmp_path).candidates
    assert cand.skip is Skip.SHAPE_MISMATCH and "rank" in (cand.reason or "")


def test_negative_variance_is_skipped(tmp_path: Path) -> None:
    var = np.array([1, 1, -1, 1, 1, 1, 1, 1], dtype=np.float32)
    model = with_initializer(layer_bn("Conv"), "bn.var", var)
    (cand,) = dry_run(model, tmp_path).candidates
    assert cand.skip is Skip.BAD_PARAMETERS and "channel 2" in (cand.reason or "")


def test_parameters_from_constant_nodes_fold_and_constants_are_removed(tmp_path: Path) -> None:
    names = {"layer.W", "layer.B", "bn.scale", "bn.bias", "bn.mean", "bn.var"}
    model = with_constant_nodes(layer_bn("Conv"), names)
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True]
    assert op_types(fused) == ["Conv", "Relu"]
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


def test_identity_of_initializer_as_parameter(tmp_path: Path) -> None:
    """The TorchScript exporter writes running_var = Identity(weight) when they are equal."""
    model = with_identity_alias(layer_bn("Conv"))
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True]
    assert op_types(fused) == ["Conv", "Relu"]
    assert not any(t.name.startswith("bn.") for t in fused.graph.initializer)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


def test_bn_inside_if_branches_folds(tmp_path: Path) -> None:
    model = if_branches()
    fused, result, _ = fuse_proto(model, tmp_path)
    assert sorted(c.graph for c in result.folded) == ["else", "then"]
    assert result.ops_after["BatchNormalization"] == 0 and result.ops_after["Conv"] == 2
    onnx.checker.check_model(fused, full_check=True)
    x = random_feeds(model)["x"]
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


def test_bn_inside_loop_body_folds(tmp_path: Path) -> None:
    model = loop_body()
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [(c.graph, c.fusable) for c in result.candidates] == [("body", True)]
    assert result.ops_after["BatchNormalization"] == 0
    onnx.checker.check_model(fused, full_check=True)
    feeds = {"trips": np.array(3, dtype=np.int64), "x": random_feeds(model)["x"]}
    before, after = run_reference(model, feeds), run_reference(fused, feeds)
    assert before[0].shape == (3, 1, 4, 6, 6)
    assert_same_outputs(before, after, 1e-5)


def test_bn_in_subgraph_on_outer_conv_is_skipped(tmp_path: Path) -> None:
    """Conv in the main graph, its only reader a BN inside an If branch: not folded."""
    from onnx import TensorProto

    from sample_models.models import bn_node, bn_params, make_model

    then_g = helper.make_graph(
        [bn_node("h", "t_y")],
        "then",
        [],
        [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, None)],
        bn_params(8, np.float32, np.random.default_rng(0)),
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_y"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, None)],
    )
    w = np.random.default_rng(1).normal(size=(8, 4, 3, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "W")],
        15,
    )
    (cand,) = dry_run(model, tmp_path).candidates
    assert cand.skip is Skip.UNSUPPORTED and "enclosing graph" in (cand.reason or "")


def _conv_bn_in_a_function() -> onnx.ModelProto:
    """main: y = local.ConvBn(x, W, scale, bias, mean, var); the BN lives in the function."""
    base = layer_bn("Conv", bias=False)
    params = [t.name for t in base.graph.initializer]  # layer.W, bn.scale, bn.bias, ...
    inner = [f"p{i}" for i in range(len(params))]
    function = helper.make_function(
        "local",
        "ConvBn",
        ["x", *inner],
        ["y"],
        [
            helper.make_node("Conv", ["x", inner[0]], ["h"], name="conv"),
            helper.make_node("BatchNormalization", ["h", *inner[1:5]], ["y"], name="bn"),
        ],
        opset_imports=[helper.make_opsetid("", 15)],
    )
    call = helper.make_node("ConvBn", ["x", *params], ["y"], domain="local", name="call")
    graph = helper.make_graph(
        [call],
        "main",
        list(base.graph.input),
        list(base.graph.output),
        list(base.graph.initializer),
    )
    return helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)],
        ir_version=8,
    )


def test_bn_inside_a_model_local_function_is_reported_not_folded(tmp_path: Path) -> None:
    model = _conv_bn_in_a_function()
    onnx.checker.check_model(model, full_check=True)
    fused, result, _ = fuse_proto(model, tmp_path)
    assert not result.folded
    [skipped] = result.skipped
    assert skipped.skip is Skip.UNSUPPORTED and skipped.graph == "function local::ConvBn"
    assert "inline them first" in (skipped.reason or "")
    assert [n.op_type for n in fused.functions[0].node] == ["Conv", "BatchNormalization"]
    # The hint works: inlined, the same BatchNorm folds, and the outputs agree.
    inlined = onnx.inliner.inline_local_functions(model)
    fused_inlined, result_inlined, _ = fuse_proto(inlined, tmp_path, "inlined")
    assert len(result_inlined.folded) == 1 and "BatchNormalization" not in op_types(fused_inlined)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused_inlined, feeds), 1e-5)
