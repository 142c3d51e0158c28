"""The one ONNX engine (bnfuse.onnx.graph -> match -> rewrite -> io): what it writes is
the input less what the fold took out, whatever the model's names, size or structure.

Each check here is against the input file itself, not against another code path: the
nodes and fields the fold did not touch come out as they went in, byte for byte; a
fused model fuses to itself; a model without node names comes out as the named one
does, less the names; the folded weights are the float64 formula rounded once.
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
from bnfuse.onnx import wire
from sample_models import models

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
ALL_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.onnx"))


def _bn_after_bn() -> onnx.ModelProto:
    """Conv -> BN -> BN: the second folds once the first has (a second round of matching)."""
    model = models.layer_bn("Conv")
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    second = models.bn_node(relu.input[0], "bn2_out", prefix="bn2")
    relu.input[0] = "bn2_out"
    graph.node.insert(2, second)
    rng = np.random.default_rng(3)
    graph.initializer.extend(models.bn_params(8, np.float32, rng, prefix="bn2"))
    return model


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


# Built models beyond the samples: what once took a second code path.
BUILT = {
    "bn_after_bn": _bn_after_bn,
    "bn_then_conv": lambda: models.bn_then_conv(),
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
    "shape_reader": lambda: _with(models.layer_bn("Conv"), "shape_reader"),
    "typed_fields": lambda: _with(models.layer_bn("Conv"), "typed_fields"),
    "value_info_for_an_initializer": lambda: _with(
        models.layer_bn("Conv"), "value_info_for_an_initializer"
    ),
    "model_local_function": lambda: _with(models.layer_bn("Conv"), "function"),
    "ir_version_3": lambda: models.layer_bn("Conv", opset=8, initializers_as_inputs=True),
    "bn_on_graph_input": lambda: models.bn_on_graph_input(),
    "bn_after_concat": lambda: models.bn_after_concat(),
}


def _source(case: str, tmp_path: Path) -> Path:
    if case in BUILT:
        model = BUILT[case]()
        if case == "ir_version_3":
            model.ir_version = 3
        src = tmp_path / f"{case}.onnx"
        onnx.save(model, src)
        return src
    return SAMPLES / case


CASES = [*ALL_SAMPLES, *sorted(BUILT)]


def _check_nodes(src: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Every output node is an input node as it was; or one whose inputs or outputs were
    renamed (a Shape reader of a layer's output); or a layer that took a fold, a bias Add
    it gained, or a node holding a subgraph that folded."""
    before = {n.SerializeToString() for n in src.graph.node}
    wiring = {_unwired(n) for n in src.graph.node}
    for node in out.graph.node:
        if node.SerializeToString() in before or _unwired(node) in wiring:
            continue
        assert node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "If", "Loop"), (
            node
        )


def _unread_initializers(model: onnx.ModelProto) -> set[str]:
    read = {i for g in _graphs(model.graph) for n in g.node for i in n.input}
    read |= {o.name for g in _graphs(model.graph) for o in g.output}
    return {t.name for g in _graphs(model.graph) for t in g.initializer} - read


def _unwired(node: onnx.NodeProto) -> bytes:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.ClearField("input")
    copy.ClearField("output")
    return copy.SerializeToString()


@pytest.mark.parametrize("case", CASES)
def test_the_output_is_the_input_less_the_fold(case: str, tmp_path: Path) -> None:
    """Model fields, opsets, graph inputs and outputs and untouched nodes come out as they
    went in; value_info names only values the output has; nothing new but the folds'."""
    src_path = _source(case, tmp_path)
    result = bnfuse.fuse(src_path, tmp_path / "f.onnx")
    src, out = onnx.load(src_path), onnx.load(tmp_path / "f.onnx")
    for field in ("ir_version", "producer_name", "producer_version", "domain", "doc_string"):
        assert getattr(out, field) == getattr(src, field), field
    assert list(out.opset_import) == list(src.opset_import)
    assert list(out.metadata_props) == list(src.metadata_props)
    assert list(out.functions) == list(src.functions)
    assert list(out.graph.output) == list(src.graph.output)
    if src.ir_version >= 4:
        assert list(out.graph.input) == list(src.graph.input)
    if not result.folded:
        assert out.SerializeToString() == src.SerializeToString()
        return
    _check_nodes(src, out)
    assert _unread_initializers(out) <= _unread_initializers(src)  # what a fold frees goes
    names = {o for n in out.graph.node for o in n.output} | {t.name for t in out.graph.initializer}
    assert {v.name for v in out.graph.value_info} <= names
    src_infos = {v.name: v for v in src.graph.value_info}
    for info in out.graph.value_info:  # each one the input's own (perhaps renamed)
        assert any(info.type == other.type for other in src_infos.values()), info.name
    onnx.checker.check_model(out)


@pytest.mark.parametrize("case", CASES)
def test_a_fused_model_fuses_to_itself(case: str, tmp_path: Path) -> None:
    src = _source(case, tmp_path)
    bnfuse.fuse(src, tmp_path / "once.onnx")
    again = bnfuse.fuse(tmp_path / "once.onnx", tmp_path / "twice.onnx")
    assert not again.folded
    assert (tmp_path / "twice.onnx").read_bytes() == (tmp_path / "once.onnx").read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_a_model_without_node_names_comes_out_as_the_named_one_less_the_names(
    case: str, tmp_path: Path
) -> None:
    """ONNX names are optional (onnx.helper writes none): the same decisions and sentences
    (each node named by its first output), and the same bytes once the names are gone."""
    named_src = _source(case, tmp_path)
    model = onnx.load(named_src)
    for graph in _graphs(model.graph):
        for node in graph.node:
            node.name = ""
    src = tmp_path / "unnamed.onnx"
    onnx.save(model, src)
    named = bnfuse.fuse(named_src, tmp_path / "named_out.onnx")
    unnamed = bnfuse.fuse(src, tmp_path / "unnamed_out.onnx")
    assert [(c.skip, c.into, c.layer_op) for c in unnamed.candidates] == [
        (c.skip, c.into, c.layer_op) for c in named.candidates
    ]
    assert (named.ops_before, named.ops_after) == (unnamed.ops_before, unnamed.ops_after)
    outputs = {o for g in _graphs(model.graph) for n in g.node for o in n.output[:1]}
    assert {c.node for c in unnamed.candidates} <= outputs | {
        c.node for c in named.candidates if c.graph.startswith("function")
    }
    # The same nodes and the same weights; a new initializer's name (a bias a layer gains)
    # is made from its layer's name, so names are left out of the comparison.
    assert _content(tmp_path / "named_out.onnx") == _content(tmp_path / "unnamed_out.onnx")


def _content(path: Path) -> list[object]:
    model = onnx.load(path)
    content: list[object] = []
    for graph in _graphs(model.graph):
        content += [(n.op_type, [a.SerializeToString() for a in n.attribute if not a.g.node])
                    for n in graph.node]  # fmt: skip
        content += [(t.dims, t.data_type, t.raw_data) for t in graph.initializer]
    return content


def _graphs(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(sub)


def test_a_dry_run_reports_what_a_run_folds(tmp_path: Path) -> None:
    src = SAMPLES / "torch_mobilenet_opset17.onnx"
    dry = bnfuse.fuse(src, dry_run=True)
    assert dry.dry_run and not dry.outputs
    assert dry.candidates == bnfuse.fuse(src, tmp_path / "f.onnx").candidates
    assert len(dry.folded) == 11


def test_a_skipped_batchnorm_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(models.training_mode_bn(), src)
    result = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert [c.skip for c in result.candidates] == [Skip.TRAINING_MODE]


@pytest.mark.parametrize("case", ["bn_on_graph_input", "bn_after_concat"])
def test_a_batchnorm_after_no_layer_is_reported(case: str, tmp_path: Path) -> None:
    src = _saved(getattr(models, case)(), tmp_path / "m.onnx")
    assert Skip.NO_LAYER in [c.skip for c in bnfuse.fuse(src, dry_run=True).candidates]


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("fault", ["truncated", "short_raw_data", "opset_too_new"])
def test_a_faulty_model_gets_one_sentence(tmp_path: Path, fault: str) -> None:
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
    with pytest.raises(InputError) as raised:
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert str(raised.value).startswith(f"{src}: ")
    assert not (tmp_path / "f.onnx").exists()


def _with_unknown_field(model: onnx.ModelProto, where: str) -> bytes:
    """The model's bytes with a field this onnx does not define, in the model or its graph (as a
    newer onnx's model reads here): number 99 on the model, reserved number 3 on the graph."""
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
def test_fields_onnx_does_not_know_are_not_carried(where: str, tmp_path: Path) -> None:
    """A field this onnx does not define cannot be checked, so it is not written."""
    src = tmp_path / "m.onnx"
    model = models.layer_bn("Conv")
    src.write_bytes(_with_unknown_field(model, where))
    bnfuse.fuse(src, tmp_path / "f.onnx")
    bnfuse.fuse(_saved(model, tmp_path / "plain.onnx"), tmp_path / "g.onnx")
    assert (tmp_path / "f.onnx").read_bytes() == (tmp_path / "g.onnx").read_bytes()


def test_the_folded_weights_are_the_exact_fold_rounded_once(tmp_path: Path) -> None:
    """The float64 formula, rounded to fp16 once."""
    src = tmp_path / "m.onnx"
    model = models.layer_bn("Conv", dtype=np.float16, cin=8, cout=16)
    onnx.save(model, src)
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
def test_exported_networks_fold_and_refold_to_themselves(name: str, tmp_path: Path) -> None:
    """torch.onnx exports of networks built in code."""
    pytest.importorskip("torch")
    from sample_models.torch_nets import NETS, build, export_onnx

    spec = next(s for s in NETS if s.name == name)
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(export_onnx(build(spec), spec.input_shape, 17))
    first = bnfuse.fuse(src, tmp_path / "once.onnx")
    assert first.folded and first.ops_after["BatchNormalization"] == len(first.skipped)
    again = bnfuse.fuse(tmp_path / "once.onnx", tmp_path / "twice.onnx")
    assert not again.folded
    assert (tmp_path / "twice.onnx").read_bytes() == (tmp_path / "once.onnx").read_bytes()


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
