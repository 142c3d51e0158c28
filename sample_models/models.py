"""Small ONNX models built in code, for the tests and the sample files.

Every builder is deterministic (seeded) and returns an ``onnx.ModelProto``.
The BatchNorm statistics are random, as after training, so a fold that gets
an axis or a formula wrong changes the outputs visibly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The IR version each opset shipped with (onnx.helper.VERSION_TABLE), so old
# opsets get old IR versions, as their exporters wrote them.
IR_FOR_OPSET = {7: 3, 8: 3, 9: 4, 11: 6, 13: 7, 14: 7, 15: 8, 17: 8, 18: 8, 21: 10}

ONNX_TYPE = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


def bn_params(
    channels: int, dtype: Any, rng: np.random.Generator, prefix: str = "bn"
) -> list[onnx.TensorProto]:
    """gamma, beta, mean, var as trained-looking random tensors."""
    arrays = {
        f"{prefix}.scale": rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels),
        f"{prefix}.bias": rng.normal(0, 1, channels),
        f"{prefix}.mean": rng.normal(0, 1, channels),
        f"{prefix}.var": rng.uniform(0.2, 2.0, channels),
    }
    return [numpy_helper.from_array(a.astype(dtype), n) for n, a in arrays.items()]


def bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-3, **attrs: Any) -> onnx.NodeProto:
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node(
        "BatchNormalization", [x, *names], [y], name=f"{prefix}", epsilon=eps, **attrs
    )


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto],
    opset: int,
    *,
    initializers_as_inputs: bool = False,
    name: str = "bnfuse_sample",
) -> onnx.ModelProto:
    graph_inputs = list(inputs)
    if initializers_as_inputs:
        graph_inputs += [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers
        ]
    graph = helper.make_graph(list(nodes), name, graph_inputs, list(outputs), list(initializers))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_FOR_OPSET[opset],
        producer_name="bnfuse-samples",
    )
    # Exporters record shapes; so do we (graph outputs and intermediate value_info).
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def layer_bn(
    op: str = "Conv",
    *,
    dims: int = 2,
    groups: int = 1,
    bias: bool = True,
    dtype: Any = np.float32,
    bn_dtype: Any = None,
    opset: int = 15,
    cin: int = 4,
    cout: int = 8,
    conv_attrs: dict[str, Any] | None = None,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c_shape: tuple[int, ...] | None = (8,),
    add_bias: str | None = None,
    bn_attrs: dict[str, Any] | None = None,
    initializers_as_inputs: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> op -> BatchNormalization -> Relu -> y.

    op is Conv / ConvTranspose (``dims``, ``groups``, ``bias``, ``conv_attrs``),
    Gemm (``trans_a``, ``trans_b``, ``alpha``, ``beta``, ``c_shape``; C is
    omitted when ``bias`` is False) or MatMul (``add_bias`` None, "right" for
    Add(y, b) or "left" for Add(b, y)). ``bn_dtype`` gives the BN parameters
    another dtype (opset 15 allows it).
    """
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    elem = ONNX_TYPE[dt]
    bn_dt = np.dtype(bn_dtype) if bn_dtype is not None else dt
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if op in ("Conv", "ConvTranspose"):
        k = [3] * dims
        x_shape = [2, cin, *[7, 6, 5][:dims]]
        w_shape = [cout, cin // groups, *k] if op == "Conv" else [cin, cout // groups, *k]
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(dt), "layer.W"))
        ins = ["x", "layer.W"]
        if bias:
            inits.append(numpy_helper.from_array(rng.normal(0, 1, cout).astype(dt), "layer.B"))
            ins.append("layer.B")
        attrs = {"group": groups, **(conv_attrs or {})}
        nodes.append(helper.make_node(op, ins, ["h"], name="layer", **attrs))
        channels = cout
    elif op == "Gemm":
        m, kk, n = 3, 5, cout
        x_shape = [kk, m] if trans_a else [m, kk]
        w_shape = [n, kk] if trans_b else [kk, n]
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(dt), "layer.W"))
        ins = ["x", "layer.W"]
        if bias and c_shape is not None:
            c = rng.normal(0, 1, c_shape).astype(dt)
            inits.append(numpy_helper.from_array(c, "layer.C"))
            ins.append("layer.C")
        attrs = {"transA": trans_a, "transB": trans_b}
        if alpha is not None:
            attrs["alpha"] = alpha
        if beta is not None:
            attrs["beta"] = beta
        nodes.append(helper.make_node("Gemm", ins, ["h"], name="layer", **attrs))
        channels = n
    elif op == "MatMul":
        x_shape = [3, 5]
        w = rng.normal(0, 0.5, (5, cout)).astype(dt)
        inits.append(numpy_helper.from_array(w, "layer.W"))
        mm_out = "mm" if add_bias else "h"
        nodes.append(helper.make_node("MatMul", ["x", "layer.W"], [mm_out], name="layer"))
        if add_bias:
            inits.append(numpy_helper.from_array(rng.normal(0, 1, cout).astype(dt), "layer.B"))
            pair = [mm_out, "layer.B"] if add_bias == "right" else ["layer.B", mm_out]
            nodes.append(helper.make_node("Add", pair, ["h"], name="layer_bias"))
        channels = cout
    else:
        raise ValueError(op)
    inits += bn_params(channels, bn_dt, rng)
    nodes.append(bn_node("h", "z", **(bn_attrs or {})))
    nodes.append(helper.make_node("Relu", ["z"], ["y"], name="relu"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, None)],
        inits,
        opset,
        initializers_as_inputs=initializers_as_inputs,
    )


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One random array per non-initializer graph input (all shapes static here)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds
