"""The direct path (bnfuse.onnx.direct) against the full one (io.load -> match -> rewrite ->
io.save): on every model it takes, the same report and the same bytes; every model it
must not take goes to the full path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfuse
from bnfuse import Skip
from bnfuse.errors import InputError
from bnfuse.onnx import direct, light
from bnfuse.result import FuseResult
from sample_models import models

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
ALL_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.onnx"))
# Sample models the direct path must take: plain Conv/ConvTranspose + BN graphs, a SiLU-like
# Mul by a computed factor, models without a BatchNorm, and exported networks.
TAKEN = [
    "conv2d_bn.onnx",
    "conv1d_nobias_bn.onnx",
    "conv3d_bn.onnx",
    "conv_bn_fp16.onnx",
    "conv_bn_fp64.onnx",
    "conv_fp16_bn_fp32_params.onnx",
    "conv_depthwise_bn.onnx",
    "convtranspose_g4_nobias_bn.onnx",
    "skip_conv_mul_runtime.onnx",
    "skip_bn_after_concat.onnx",
    "torch_densenet_opset17.onnx",
    "layernorm_untouched.onnx",
    "torch_mobilenet_opset17.onnx",
    "torch_resnet_opset17.onnx",
    "torch_dcgan_generator_opset17.onnx",
]


def full_path(src: Path, out: Path | None, monkeypatch: pytest.MonkeyPatch) -> FuseResult:
    with monkeypatch.context() as patch:
        patch.setattr(direct, "fuse", lambda *args, **kwargs: None)
        return bnfuse.fuse(src, out)


def assert_same_as_full_path(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = bnfuse.fuse(src, tmp_path / "direct.onnx")
    full = full_path(src, tmp_path / "full.onnx", monkeypatch)
    assert quick.candidates == full.candidates  # names, reasons, health: all of it
    assert (quick.ops_before, quick.ops_after) == (full.ops_before, full.ops_after)
    assert (tmp_path / "direct.onnx").read_bytes() == (tmp_path / "full.onnx").read_bytes()


def takes(src: Path) -> bool:
    return direct.fuse(src, light.whole_file_limit()) is not None


DIRECT_SAMPLES = [name for name in ALL_SAMPLES if takes(SAMPLES / name)]


def test_plain_models_take_the_direct_path() -> None:
    assert set(TAKEN) <= set(DIRECT_SAMPLES)


@pytest.mark.parametrize("name", DIRECT_SAMPLES)
def test_every_sample_it_takes_comes_out_as_from_the_full_path(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_same_as_full_path(SAMPLES / name, tmp_path, monkeypatch)


def test_a_long_chain_with_value_info_comes_out_as_from_the_full_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 1x1 Conv -> BN pairs, a shape recorded for every value (as onnx's shape
    inference writes them)."""
    model = models.deep_chain(depth=200)
    model = onnx.shape_inference.infer_shapes(model)
    src = tmp_path / "chain.onnx"
    onnx.save(model, src)
    assert takes(src) and len(model.graph.value_info) > 200
    assert_same_as_full_path(src, tmp_path, monkeypatch)


def test_a_dry_run_reports_what_a_run_folds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = SAMPLES / "torch_mobilenet_opset17.onnx"
    dry = bnfuse.fuse(src, dry_run=True)
    assert dry.dry_run and not dry.outputs
    assert dry.candidates == full_path(src, None, monkeypatch).candidates
    assert len(dry.folded) == 11


def _with(model: onnx.ModelProto, change: str) -> onnx.ModelProto:
    graph = model.graph
    if change == "shape_reader":  # Shape(conv output) beside the BatchNorm
        conv = next(n for n in graph.node if n.op_type == "Conv")
        graph.node.append(helper.make_node("Shape", [conv.output[0]], ["s"], name="shape"))
        graph.output.append(helper.make_tensor_value_info("s", TensorProto.INT64, [4]))
    elif change == "typed_fields":  # a weight in float_data, not raw_data
        weight = next(t for t in graph.initializer if t.name == "layer.W")
        array = numpy_helper.to_array(weight)
        weight.ClearField("raw_data")
        weight.float_data.extend(array.reshape(-1).tolist())
    elif change == "bn_param_from_constant":
        model = models.with_constant_nodes(model, {"bn.mean"})
    elif change == "function":
        identity = helper.make_node("Identity", ["a"], ["b"])
        model.functions.append(
            helper.make_function(
                "local", "f", ["a"], ["b"], [identity], [helper.make_opsetid("", 15)]
            )
        )
    elif change == "value_info_for_an_initializer":
        graph.value_info.append(
            helper.make_tensor_value_info("layer.W", TensorProto.FLOAT, [8, 4, 3, 3])
        )
    return model


def _bn_after_bn() -> onnx.ModelProto:
    """Conv -> BN -> BN: the second folds once the first has (match.find's second round)."""
    model = models.layer_bn("Conv")
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    second = models.bn_node(relu.input[0], "bn2_out", prefix="bn2")
    relu.input[0] = "bn2_out"
    graph.node.insert(2, second)
    rng = np.random.default_rng(3)
    graph.initializer.extend(models.bn_params(8, np.float32, rng, prefix="bn2"))
    return model


NOT_TAKEN = {
    "bn_after_bn": _bn_after_bn,
    "bn_then_conv": lambda: models.bn_then_conv(),
    # what decides, or reports, beyond plain Conv -> BN: the full path's matcher
    "training_mode_bn": lambda: models.training_mode_bn(),
    "fp16_overflow_skip": lambda: models.fp16_overflow(),
    "gemm_bn": lambda: models.layer_bn("Gemm", trans_b=1),
    "matmul_bn": lambda: models.layer_bn("MatMul"),
    "conv_mul_by_a_constant": lambda: models.layer_scale_shift("Conv", add_shape=None),
    "if_subgraphs": lambda: models.if_branches(),
    "bn_param_from_constant": lambda: _with(models.layer_bn("Conv"), "bn_param_from_constant"),
    "overridable_param": lambda: models.with_params_as_inputs(
        models.layer_bn("Conv"), {"bn.mean"}, keep_initializer=True
    ),
    # what the direct path would have to rename, merge or convert
    "shape_reader": lambda: _with(models.layer_bn("Conv"), "shape_reader"),
    "typed_fields": lambda: _with(models.layer_bn("Conv"), "typed_fields"),
    "value_info_for_an_initializer": lambda: _with(
        models.layer_bn("Conv"), "value_info_for_an_initializer"
    ),
    "model_local_function": lambda: _with(models.layer_bn("Conv"), "function"),
    "ir_version_3": lambda: models.layer_bn("Conv", opset=8, initializers_as_inputs=True),
}


@pytest.mark.parametrize("case", sorted(NOT_TAKEN))
def test_what_it_does_not_take_goes_the_full_path(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = NOT_TAKEN[case]()
    if case == "ir_version_3":
        model.ir_version = 3
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert not takes(src)
    result = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert result.candidates == full_path(src, tmp_path / "g.onnx", monkeypatch).candidates
    assert (tmp_path / "f.onnx").read_bytes() == (tmp_path / "g.onnx").read_bytes()


def test_external_data_goes_the_full_path(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(
        models.layer_bn("Conv", cin=16, cout=16),
        src,
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    assert not takes(src)
    result = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert result.outputs == [tmp_path / "f.onnx", tmp_path / "f.onnx.data"]


def test_a_skipped_batchnorm_is_reported_by_the_full_path(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(models.training_mode_bn(), src)
    result = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert [c.skip for c in result.candidates] == [Skip.TRAINING_MODE]


@pytest.mark.parametrize("case", ["bn_on_graph_input", "bn_after_concat"])
def test_a_batchnorm_after_no_layer_is_reported_as_by_the_full_path(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(getattr(models, case)(), src)
    assert takes(src)
    assert_same_as_full_path(src, tmp_path, monkeypatch)
    assert Skip.NO_LAYER in [c.skip for c in bnfuse.fuse(src, dry_run=True).candidates]


@pytest.mark.parametrize("fault", ["truncated", "short_raw_data", "opset_too_new"])
def test_a_faulty_model_gets_the_full_paths_error(tmp_path: Path, fault: str) -> None:
    model = models.layer_bn("Conv")
    src = tmp_path / "m.onnx"
    if fault == "short_raw_data":
        weight = next(t for t in model.graph.initializer if t.name == "layer.W")
        weight.raw_data = weight.raw_data[:-4]
    elif fault == "opset_too_new":
        model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    onnx.save(model, src)
    if fault == "truncated":
        src.write_bytes(src.read_bytes()[:-100])
    assert not takes(src)
    with pytest.raises(InputError) as raised:
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert str(raised.value).startswith(f"{src}: ")
    assert not (tmp_path / "f.onnx").exists()


def _with_unknown_field(model: onnx.ModelProto, where: str) -> bytes:
    """The model's bytes with a field this onnx does not define, in the model or its graph (as a
    newer onnx's model reads here): number 99 on the model, reserved number 3 on the graph."""
    from bnfuse.onnx import wire

    if where == "model":
        return model.SerializeToString() + wire.encode_varint(99 << 3) + wire.encode_varint(7)
    graph = model.graph.SerializeToString() + wire.encode_varint(3 << 3) + wire.encode_varint(5)
    outer = onnx.ModelProto()
    outer.CopyFrom(model)
    outer.ClearField("graph")
    head = outer.SerializeToString()
    cut = wire.split_at(head, 7)
    return head[:cut] + wire.len_prefix(7, len(graph)) + graph + head[cut:]


@pytest.mark.parametrize("where", ["model", "graph"])
def test_fields_onnx_does_not_know_are_dropped_as_by_the_full_path(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx-ir drops a field onnx does not define; the direct path must write what it writes."""
    src = tmp_path / "m.onnx"
    src.write_bytes(_with_unknown_field(models.layer_bn("Conv"), where))
    assert takes(src)
    assert_same_as_full_path(src, tmp_path, monkeypatch)


def test_the_folded_weights_are_the_exact_fold_rounded_once(tmp_path: Path) -> None:
    """Independent of both paths: the float64 formula, rounded to fp16 once."""
    src = tmp_path / "m.onnx"
    model = models.layer_bn("Conv", dtype=np.float16, cin=8, cout=16)
    onnx.save(model, src)
    assert takes(src)
    bnfuse.fuse(src, tmp_path / "f.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    eps = next(a.f for a in model.graph.node[1].attribute if a.name == "epsilon")
    gamma, beta, mean, var = (stored[f"bn.{p}"].astype(np.float64) for p in ("scale", "bias", "mean", "var"))  # fmt: skip
    scale = gamma / np.sqrt(var + np.float64(eps))
    weight = (stored["layer.W"].astype(np.float64) * scale[:, None, None, None]).astype(np.float16)
    bias = ((stored["layer.B"].astype(np.float64) - mean) * scale + beta).astype(np.float16)
    fused = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "f.onnx").graph.initializer}  # fmt: skip
    assert np.array_equal(fused["layer.W"].view(np.uint16), weight.view(np.uint16))
    assert np.array_equal(fused["layer.B"].view(np.uint16), bias.view(np.uint16))


@pytest.mark.parametrize(
    "name", ["resnet", "mobilenet", "dcgan_generator", "conv1d_audio", "densenet", "bn1d_mlp"]
)
def test_exported_networks_come_out_as_from_the_full_path(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.onnx exports of networks built in code; the BatchNorm1d MLP (Gemm) takes the
    full path, DenseNet's BatchNorms after a Concat are reported as the full path does."""
    pytest.importorskip("torch")
    from sample_models.torch_nets import NETS, build, export_onnx

    spec = next(s for s in NETS if s.name == name)
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(export_onnx(build(spec), spec.input_shape, 17))
    assert takes(src) == (name != "bn1d_mlp")
    assert_same_as_full_path(src, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", DIRECT_SAMPLES)
def test_a_model_without_node_names_takes_the_same_path_and_comes_out_the_same(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX names are optional (onnx.helper writes none): such a model is no slower, and
    its report names each node by its first output, on either path."""
    model = onnx.load(SAMPLES / name)
    for node in model.graph.node:
        node.name = ""
    src = tmp_path / "unnamed.onnx"
    onnx.save(model, src)
    assert takes(src)
    assert_same_as_full_path(src, tmp_path, monkeypatch)
    named = {c.node for c in bnfuse.fuse(src, dry_run=True).candidates}
    outputs = {o for n in model.graph.node for o in n.output[:1]}
    assert named <= outputs, named


def test_fresh_names_for_many_unnamed_layers_stay_linear() -> None:
    """10,000 unnamed Convs without bias each get a new bias named from "Conv.B": the
    names are those of counting from 1, found without counting from 1 each time."""
    import time

    from bnfuse.onnx.ops import FreshNames

    names = FreshNames(["Conv.B_bnfused", "Conv.B_bnfused_3", "other"])
    start = time.perf_counter()
    got = [names.fresh("Conv.B_bnfused") for _ in range(20_000)]
    elapsed = time.perf_counter() - start
    assert got[:3] == ["Conv.B_bnfused_2", "Conv.B_bnfused_4", "Conv.B_bnfused_5"]
    assert len(set(got)) == 20_000 and got[-1] == "Conv.B_bnfused_20002"
    assert elapsed < 0.5, f"{elapsed:.2f} s"  # quadratic took minutes
