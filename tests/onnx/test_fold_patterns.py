"""Each supported layer -> BatchNormalization pattern, folded and checked.

Every case asserts: the BN is gone and the node count dropped as expected;
the fused model passes the full ONNX checker; its outputs equal the unfused
model's (onnxruntime, optimisations off) within a dtype-appropriate fraction
of the output range; and the fused weight equals an independent float64
fold, channel by channel, rounded once to the layer's dtype (exactly).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from sample_models.models import layer_bn, random_feeds
from tests.helpers import (
    assert_same_outputs,
    consumer_input,
    fuse_proto,
    initializer,
    op_types,
    run_reference,
)

DTYPES = {"fp32": np.float32, "fp16": np.float16, "fp64": np.float64}
# Allowed max error as a fraction of the output range. fp16: the unfused model
# rounds the layer output to fp16 before the BN; the fused one does not.
REL_TOL = {"fp32": 1e-5, "fp16": 5e-3, "fp64": 1e-12}
EPS = 1e-3  # the builders' BN epsilon


def expected_channel_slices(op: str, weight: np.ndarray, channels: int, **kw: Any) -> list[Any]:
    """For each output channel, the index of the weight elements that feed it."""
    if op == "Conv":
        return [np.s_[c] for c in range(channels)]
    if op == "ConvTranspose":
        groups = kw["groups"]
        per_group, cin_g = channels // groups, weight.shape[0] // groups
        return [
            np.s_[(c // per_group) * cin_g : (c // per_group + 1) * cin_g, c % per_group]
            for c in range(channels)
        ]
    if op == "Gemm" and kw.get("trans_b"):
        return [np.s_[c, :] for c in range(channels)]
    return [np.s_[:, c] for c in range(channels)]  # Gemm transB=0, MatMul


def independent_fold(model: onnx.ModelProto, op: str, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """W' and b' computed the slow, obvious way in float64, rounded once."""
    w = initializer(model, "layer.W")
    g, b, mu, var = (
        initializer(model, f"bn.{k}").astype(np.float64) for k in ("scale", "bias", "mean", "var")
    )
    eps = float(np.float32(EPS))
    s = g / np.sqrt(var + eps)
    w_new = np.empty(w.shape, dtype=np.float64)
    for c, idx in enumerate(expected_channel_slices(op, w, len(s), **kw)):
        w_new[idx] = w[idx].astype(np.float64) * s[c]
    names = {t.name for t in model.graph.initializer}
    bias_name = "layer.C" if op == "Gemm" else "layer.B"
    if bias_name in names:
        bias = initializer(model, bias_name).astype(np.float64) * kw.get("beta", 1.0)
    else:
        bias = np.zeros(len(s))
    b_new = (bias - mu) * s + b
    return w_new.astype(w.dtype), b_new.astype(w.dtype)


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def check_fold(
    model: onnx.ModelProto, tmp_path: Any, dtype: str, op: str, **kw: Any
) -> onnx.ModelProto:
    fused, result, _ = fuse_proto(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True], result.candidates
    assert "BatchNormalization" not in op_types(fused)
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), REL_TOL[dtype])
    want_w, want_b = independent_fold(model, op, **kw)
    layer_op = "MatMul" if op == "MatMul" else op
    got_w = initializer(fused, consumer_input(fused, layer_op, 1))
    assert got_w.dtype == want_w.dtype
    np.testing.assert_array_equal(got_w, want_w)
    bias_node = "Add" if op == "MatMul" else layer_op
    bias_index = 0 if kw.get("add_bias") == "left" else (1 if op == "MatMul" else 2)
    got_b = initializer(fused, consumer_input(fused, bias_node, bias_index))
    np.testing.assert_array_equal(
        np.broadcast_to(got_b, np.broadcast_shapes(got_b.shape, want_b.shape)),
        np.broadcast_to(want_b, np.broadcast_shapes(got_b.shape, want_b.shape)),
    )
    # Names and types of the graph's inputs and outputs survive.
    assert data_inputs(fused) == data_inputs(model)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    assert [o.type for o in fused.graph.output] == [o.type for o in model.graph.output]
    return fused


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_bn(dims: int, groups: int, bias: bool, dtype: str, opset: int, tmp_path: Any) -> None:
    model = layer_bn("Conv", dims=dims, groups=groups, bias=bias, dtype=DTYPES[dtype], opset=opset)
    fused = check_fold(model, tmp_path, dtype, "Conv")
    assert op_types(fused) == ["Conv", "Relu"]


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 2, 0, 1], "strides": [2, 1], "dilations": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER"},
        {"auto_pad": "VALID", "dilations": [2, 1]},
    ],
    ids=["pads-strides-dilations", "same_upper", "same_lower", "valid"],
)
def test_conv_bn_padding_variants(attrs: dict[str, Any], tmp_path: Any) -> None:
    model = layer_bn("Conv", groups=2, conv_attrs=attrs)
    check_fold(model, tmp_path, "fp32", "Conv")


@pytest.mark.parametrize("opset", [9, 15])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "g4"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_convtranspose_bn(
    dims: int, groups: int, bias: bool, dtype: str, opset: int, tmp_path: Any
) -> None:
    model = layer_bn(
        "ConvTranspose",
        dims=dims,
        groups=groups,
        bias=bias,
        dtype=DTYPES[dtype],
        opset=opset,
        conv_attrs={"strides": [2] * dims},
    )
    fused = check_fold(model, tmp_path, dtype, "ConvTranspose", groups=groups)
    assert op_types(fused) == ["ConvTranspose", "Relu"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "c_shape",
    [(8,), (1, 8), (), (3, 8), (3, 1), None],
    ids=["C8", "C1x8", "Cscalar", "C3x8", "C3x1", "noC"],
)
@pytest.mark.parametrize("trans_b", [0, 1], ids=["B", "Bt"])
@pytest.mark.parametrize("trans_a", [0, 1], ids=["A", "At"])
def test_gemm_bn(
    trans_a: int, trans_b: int, c_shape: tuple[int, ...] | None, dtype: str, tmp_path: Any
) -> None:
    model = layer_bn(
        "Gemm",
        trans_a=trans_a,
        trans_b=trans_b,
        alpha=0.7,
        beta=1.3,
        c_shape=c_shape,
        bias=c_shape is not None,
        dtype=DTYPES[dtype],
        opset=13,
    )
    fused = check_fold(
        model,
        tmp_path,
        dtype,
        "Gemm",
        trans_b=trans_b,
        beta=float(np.float32(1.3)) if c_shape is not None else 1.0,
    )
    (gemm,) = [n for n in fused.graph.node if n.op_type == "Gemm"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("beta", 1.0) == 1.0 and attrs["alpha"] == pytest.approx(0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "add_bias", [None, "right", "left"], ids=["matmul", "matmul-add", "add-matmul"]
)
def test_matmul_bn(add_bias: str | None, dtype: str, tmp_path: Any) -> None:
    model = layer_bn("MatMul", add_bias=add_bias, dtype=DTYPES[dtype], opset=15)
    fused = check_fold(model, tmp_path, dtype, "MatMul", add_bias=add_bias)
    assert op_types(fused) == ["MatMul", "Add", "Relu"]


def test_mixed_fp16_layer_fp32_bn_params(tmp_path: Any) -> None:
    """fp16 conv, fp32 BN parameters (opset 15): folds into fp16, rounded once."""
    model = layer_bn("Conv", dtype=np.float16, bn_dtype=np.float32, opset=15)
    fused = check_fold(model, tmp_path, "fp16", "Conv")
    assert initializer(fused, "layer.W").dtype == np.float16
    assert initializer(fused, "layer.B").dtype == np.float16


def test_ir3_opset8_initializers_as_inputs(tmp_path: Any) -> None:
    """IR 3 (initializers must be inputs, and are constants there): BN-7 folds."""
    model = layer_bn("Conv", opset=8, initializers_as_inputs=True)
    fused = check_fold(model, tmp_path, "fp32", "Conv")
    inits = {t.name for t in fused.graph.initializer}
    inputs = {i.name for i in fused.graph.input}
    assert inits <= inputs and not any(n.startswith("bn.") for n in inputs)
