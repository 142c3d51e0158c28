"""The nasty cases: what must not fold (with the reason), and what folds only with care."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfuse
from bnfuse import Skip
from sample_models.models import bn_node, bn_params, layer_bn, make_model, random_feeds
from tests.helpers import assert_same_outputs, fuse_proto, initializer, op_types, run_reference


def add_output(model: onnx.ModelProto, node: onnx.NodeProto | None, name: str) -> onnx.ModelProto:
    """A copy of ``model`` with an extra node and ``name`` as an extra graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if node is not None:
        m.graph.node.append(node)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return onnx.shape_inference.infer_shapes(m)


def fuse_expect_skip(model: onnx.ModelProto, tmp_path: Path, skip: Skip, words: str) -> None:
    """The only BN is skipped for ``skip``; the model still computes the same."""
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is skip, cand
    assert cand.reason is not None and words in cand.reason, cand.reason
    assert op_types(fused).count("BatchNormalization") == 1
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 0.0)


def test_training_mode_bn_is_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["h", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["y", "new_mean", "new_var"],
            name="bn",
            training_mode=1,
        ),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "W"),
            *bn_params(8, np.float32, rng),
        ],
        15,
    )
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.TRAINING_MODE and "training_mode=1" in (cand.reason or "")
    assert op_types(fused).count("BatchNormalization") == 1


def test_conv_output_with_two_consumers_is_skipped(tmp_path: Path) -> None:
    model = add_output(
        layer_bn("Conv"), helper.make_node("Sigmoid", ["h"], ["side"], name="side"), "side"
    )
    fuse_expect_skip(model, tmp_path, Skip.OTHER_CONSUMERS, "also read by 1 other node(s) (side)")


def test_conv_output_that_is_a_graph_output_is_skipped(tmp_path: Path) -> None:
    model = add_output(layer_bn("Conv"), None, "h")
    fuse_expect_skip(
        model, tmp_path, Skip.GRAPH_OUTPUT, "'h' of Conv 'layer' is also a graph output"
    )


def _params_as_inputs(
    model: onnx.ModelProto, names: set[str], keep_initializer: bool
) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in list(m.graph.initializer):
        if t.name in names:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            if not keep_initializer:
                m.graph.initializer.remove(t)
    return m


def test_bn_parameters_given_as_graph_inputs_are_skipped(tmp_path: Path) -> None:
    model = _params_as_inputs(layer_bn("Conv"), {"bn.mean", "bn.var"}, keep_initializer=False)
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.NOT_CONSTANT
    assert cand.reason == "BatchNorm mean: 'bn.mean' is a graph input, not a constant"
    assert op_types(fused).count("BatchNormalization") == 1


def test_overridable_initializer_is_skipped(tmp_path: Path) -> None:
    """IR >= 4: an initializer also listed as an input can be fed at run time."""
    model = _params_as_inputs(layer_bn("Conv"), {"bn.scale"}, keep_initializer=True)
    fuse_expect_skip(model, tmp_path, Skip.OVERRIDABLE, "caller can override it")


def test_conv_weight_given_as_graph_input_is_skipped(tmp_path: Path) -> None:
    model = _params_as_inputs(layer_bn("Conv"), {"layer.W"}, keep_initializer=False)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    (cand,) = bnfuse.fuse(src, tmp_path / "o.onnx").candidates
    assert cand.skip is Skip.NOT_CONSTANT
    assert cand.reason == "Conv 'layer' weight: 'layer.W' is a graph input, not a constant"


def test_shared_weight_is_copied_and_other_conv_unchanged(tmp_path: Path) -> None:
    """conv_a(x, W) -> BN and conv_b(x, W) with no BN: only conv_a's copy changes."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a"),
        bn_node("a", "ya"),
        helper.make_node("Conv", ["x", "W"], ["yb"], name="conv_b"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb")],
        [numpy_helper.from_array(w, "W"), *bn_params(8, np.float32, rng)],
        15,
    )
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
    model = layer_bn("Conv", dtype=np.float16)
    for t in model.graph.initializer:
        if t.name == "layer.W":
            w = numpy_helper.to_array(t).copy()
            w[5, 0, 0, 0] = 40000
            t.CopyFrom(numpy_helper.from_array(w, t.name))
        if t.name == "bn.var":
            t.CopyFrom(numpy_helper.from_array(np.full(8, 0.1, np.float16), t.name))
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.NOT_FINITE
    assert "channel 5" in (cand.reason or "") and "FLOAT16" in (cand.reason or "")
    assert op_types(fused).count("BatchNormalization") == 1
    w_out = initializer(fused, "layer.W")
    assert np.all(np.isfinite(w_out)) and w_out[5, 0, 0, 0] == 40000


@pytest.mark.parametrize(
    ("norm", "opset", "extra_inits"),
    [
        ("LayerNormalization", 17, {"axis": 1}),
        ("GroupNormalization", 21, {"num_groups": 2}),
        ("InstanceNormalization", 15, {}),
    ],
)
def test_per_sample_norms_are_untouched(
    norm: str, opset: int, extra_inits: dict[str, int], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    if norm == "LayerNormalization":
        scale_shape: list[int] = [8, 4, 4]
    else:
        scale_shape = [8]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(rng.normal(1, 0.1, scale_shape).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, scale_shape).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node(norm, ["h", "g", "b"], ["y"], name="norm", **extra_inits),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        opset,
    )
    fused, result, _ = fuse_proto(model, tmp_path)
    assert result.candidates == []
    assert result.ops_after == result.ops_before
    assert fused.graph.node == model.graph.node
    assert fused.graph.initializer == model.graph.initializer


def test_bn_after_concat_is_skipped_with_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node("Concat", ["x", "h"], ["cat"], name="concat", axis=1),
        bn_node("cat", "y"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "W"),
            *bn_params(8, np.float32, rng),
        ],
        15,
    )
    fuse_expect_skip(
        model,
        tmp_path,
        Skip.NO_LAYER,
        "comes from Concat 'concat', which has no weight to fold into",
    )


def test_bn_on_graph_input_is_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = make_model(
        [bn_node("x", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        bn_params(4, np.float32, rng),
        15,
    )
    fuse_expect_skip(model, tmp_path, Skip.NO_LAYER, "graph input")


def test_matmul_on_3d_input_is_skipped(tmp_path: Path) -> None:
    """[B, T, K] @ [K, N]: BN normalises axis 1 (T), not the MatMul's N."""
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("h", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(5, 6)).astype(np.float32), "W"),
            *bn_params(6, np.float32, rng),
        ],
        15,
    )
    fuse_expect_skip(model, tmp_path, Skip.SHAPE_MISMATCH, "output is 3-D")


def test_matmul_of_unknown_rank_is_skipped(tmp_path: Path) -> None:
    model = layer_bn("MatMul")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    (cand,) = bnfuse.fuse(src, dry_run=True).candidates
    assert cand.skip is Skip.SHAPE_MISMATCH and "rank" in (cand.reason or "")


def test_negative_variance_is_skipped(tmp_path: Path) -> None:
    model = layer_bn("Conv")
    for t in model.graph.initializer:
        if t.name == "bn.var":
            v = numpy_helper.to_array(t).copy()
            v[2] = -1.0
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    (cand,) = bnfuse.fuse(src, dry_run=True).candidates
    assert cand.skip is Skip.BAD_PARAMETERS and "channel 2" in (cand.reason or "")


def _to_constant_nodes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = []
    for t in list(m.graph.initializer):
        if t.name in names:
            consts.append(
                helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
            )
            m.graph.initializer.remove(t)
    for i, node in enumerate(consts):
        m.graph.node.insert(i, node)
    return m


def test_parameters_from_constant_nodes_fold_and_constants_are_removed(tmp_path: Path) -> None:
    names = {"layer.W", "layer.B", "bn.scale", "bn.bias", "bn.mean", "bn.var"}
    model = _to_constant_nodes(layer_bn("Conv"), names)
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True]
    assert op_types(fused) == ["Conv", "Relu"]
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


def test_identity_of_initializer_as_parameter(tmp_path: Path) -> None:
    """The TorchScript exporter writes running_var = Identity(weight) when they are equal."""
    model = layer_bn("Conv")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.input[4] = "var_alias"
    model.graph.node.insert(
        0, helper.make_node("Identity", ["bn.var"], ["var_alias"], name="alias")
    )
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True]
    assert op_types(fused) == ["Conv", "Relu"]
    assert not any(t.name.startswith("bn.") for t in fused.graph.initializer)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


def _branch(name: str, seed: int) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    rng = np.random.default_rng(seed)
    prefix = f"{name}_bn"
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), f"{name}_W"),
        *bn_params(8, np.float32, rng, prefix=prefix),
    ]
    nodes = [
        helper.make_node("Conv", ["x", f"{name}_W"], [f"{name}_h"], name=f"{name}_conv"),
        bn_node(f"{name}_h", f"{name}_y", prefix=prefix),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
        inits,
    )
    return graph, inits


def test_bn_inside_if_branches_folds(tmp_path: Path) -> None:
    then_g, _ = _branch("then", 1)
    else_g, _ = _branch("else", 2)
    model = make_model(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g
            )
        ],
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
        15,
    )
    fused, result, _ = fuse_proto(model, tmp_path)
    assert sorted(c.graph for c in result.folded) == ["else", "then"]
    assert result.ops_after["BatchNormalization"] == 0 and result.ops_after["Conv"] == 2
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)
