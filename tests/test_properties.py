"""Property tests (hypothesis): random legal Conv/ConvTranspose + BN fold to equal outputs,
and random corruptions of a valid model never end in an uncaught exception."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfuse.cli import main
from sample_models.models import layer_bn, random_feeds
from tests.helpers import assert_same_outputs, fuse_proto, run_reference


@st.composite
def conv_configs(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    dims = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    attrs: dict[str, Any] = {"strides": [draw(st.integers(1, 2)) for _ in range(dims)]}
    if op == "Conv":
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(dims)]
        attrs["pads"] = [draw(st.integers(0, 1)) for _ in range(2 * dims)]
    return {
        "op": op,
        "dims": dims,
        "groups": groups,
        "cin": cin,
        "cout": cout,
        "bias": draw(st.booleans()),
        "conv_attrs": attrs,
        "spatial": (8, 7, 6),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_random_legal_conv_bn_folds_to_equal_outputs(config: dict[str, Any]) -> None:
    model = layer_bn(**config)
    with tempfile.TemporaryDirectory() as tmp:
        fused, result, _ = fuse_proto(model, Path(tmp))
    assert [c.fusable for c in result.candidates] == [True], result.candidates
    assert all(n.op_type != "BatchNormalization" for n in fused.graph.node)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), 1e-5)


VALID = layer_bn("Conv").SerializeToString()


@st.composite
def corruptions(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:
        i, j = sorted(draw(st.integers(0, len(data))) for _ in range(2))
        data[i:j] = draw(st.binary(max_size=32))
    return bytes(data)


def _run(src: Path, out: Path, verify: bool) -> tuple[int, str]:
    """The command on ``src``: its exit code and its stderr."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        main([str(src), "-o", str(out), "-q", *([] if verify else ["--no-verify"])])
    code = exc.value.code
    return (code if isinstance(code, int) else 0), err.getvalue()


def _assert_no_crash(code: int, err: str) -> None:
    """Exit 0 or 1 with nothing on stderr, or exit 2 with one diagnosed line.

    Every exception ends in exit 2, so the exit code alone cannot tell a
    crash from a refusal: a crash is the generic line that points to --debug.
    """
    assert code in (0, 1, 2), code
    if code in (0, 1):
        assert err == "", err
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfuse: error: "), err
    assert "--debug" not in lines[0], f"a crash, not a diagnosis: {lines[0]}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruptions(), st.booleans())
def test_corrupted_model_never_crashes(data: bytes, verify: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        code, err = _run(src, out, verify)
        _assert_no_crash(code, err)
        assert src.read_bytes() == data
        if code == 2:
            assert not out.exists()


def test_corruption_strategy_produces_varied_inputs() -> None:
    """The fuzz input is not always the valid model (else the property is empty)."""
    seen = set()

    @settings(max_examples=30, deadline=None)
    @given(corruptions())
    def collect(data: bytes) -> None:
        seen.add(data == VALID)

    collect()
    assert False in seen  # corrupted bytes were produced
    assert onnx.load_from_string(VALID).graph.node  # and the starting point is a real model


@st.composite
def structural_mutations(draw: st.DrawFn) -> onnx.ModelProto:
    """A valid model with one field changed: names, attributes, dtypes, shapes, nodes."""
    model = layer_bn(draw(st.sampled_from(["Conv", "Gemm", "MatMul", "ConvTranspose"])))
    graph = model.graph
    kind = draw(
        st.sampled_from(
            [
                "drop_node",
                "rename_input",
                "attr",
                "drop_init",
                "init_dtype",
                "init_shape",
                "opset",
                "swap",
            ]
        )
    )
    if kind == "drop_node":
        del graph.node[draw(st.integers(0, len(graph.node) - 1))]
    elif kind == "rename_input":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
                st.sampled_from(["", "x", "y", "zz", "layer.W"])
            )
    elif kind == "attr":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        name = draw(
            st.sampled_from(["group", "epsilon", "training_mode", "transB", "spatial", "axis"])
        )
        value = draw(st.sampled_from([0, 1, 2, 3, -1, 1e-30, 7]))
        node.attribute.append(onnx.helper.make_attribute(name, value))
    elif kind == "drop_init":
        del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    elif kind == "init_dtype":
        graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))].data_type = draw(
            st.sampled_from(
                [onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, onnx.TensorProto.STRING]
            )
        )
    elif kind == "init_shape":
        t = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        if t.dims:
            t.dims[0] = draw(st.integers(0, 9))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.integers(1, 40))
    else:
        nodes = list(graph.node)
        i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del graph.node[:]
        graph.node.extend(nodes)
    return model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structural_mutations(), st.booleans())
def test_mutated_model_never_crashes(model: onnx.ModelProto, verify: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "out.onnx"
        data = model.SerializeToString()
        src.write_bytes(data)
        code, err = _run(src, out, verify)
        _assert_no_crash(code, err)
        assert src.read_bytes() == data
        if code == 2:
            assert not out.exists()
