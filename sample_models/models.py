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
IR_FOR_OPSET = {6: 3, 7: 3, 8: 3, 9: 4, 11: 6, 13: 7, 14: 7, 15: 8, 17: 8, 18: 8, 21: 10}

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
    spatial: tuple[int, ...] = (7, 6, 5),
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
        x_shape = [2, cin, *spatial[:dims]]
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


# --- Variants and the nasty cases -------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def with_extra_output(
    model: onnx.ModelProto, node: onnx.NodeProto | None, name: str
) -> onnx.ModelProto:
    """A copy of ``model`` with an extra node and ``name`` as an extra graph output."""
    m = _copy(model)
    if node is not None:
        m.graph.node.append(node)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return onnx.shape_inference.infer_shapes(m)


def with_params_as_inputs(
    model: onnx.ModelProto, names: set[str], *, keep_initializer: bool
) -> onnx.ModelProto:
    """Listed initializers become graph inputs (kept as initializers too, or not)."""
    m = _copy(model)
    for t in list(m.graph.initializer):
        if t.name in names:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            if not keep_initializer:
                m.graph.initializer.remove(t)
    return m


def with_constant_nodes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Listed initializers become Constant nodes."""
    m = _copy(model)
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


def with_identity_alias(model: onnx.ModelProto) -> onnx.ModelProto:
    """The BN reads its variance through Identity, as the TorchScript exporter writes it."""
    m = _copy(model)
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            node.input[4] = "var_alias"
    m.graph.node.insert(0, helper.make_node("Identity", ["bn.var"], ["var_alias"], name="alias"))
    return m


def with_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    m = _copy(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
    return m


def _conv_then(
    nodes_after: list[onnx.NodeProto],
    extra_inits: list[onnx.TensorProto],
    opset: int,
    *,
    x_shape: tuple[int, ...] = (2, 4, 6, 6),
    w_shape: tuple[int, ...] = (8, 4, 3, 3),
    outputs: Sequence[str] = ("y",),
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, w_shape).astype(np.float32)
    return make_model(
        [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), *nodes_after],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(w, "W"), *extra_inits],
        opset,
    )


def training_mode_bn() -> onnx.ModelProto:
    """Conv -> BN with training_mode=1 (three outputs, as the spec requires)."""
    bn = helper.make_node(
        "BatchNormalization",
        ["h", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
        ["y", "new_mean", "new_var"],
        name="bn",
        training_mode=1,
    )
    return _conv_then([bn], bn_params(8, np.float32, np.random.default_rng(1)), 15)


def shared_weight() -> onnx.ModelProto:
    """conv_a(x, W) -> BN -> ya and conv_b(x, W) -> yb: one weight, two convs."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a"),
        bn_node("a", "ya"),
        helper.make_node("Conv", ["x", "W"], ["yb"], name="conv_b"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb")],
        [numpy_helper.from_array(w, "W"), *bn_params(8, np.float32, rng)],
        15,
    )


def fp16_overflow() -> onnx.ModelProto:
    """fp16 Conv whose weight 40000 in channel 5, times gamma/sigma ~ 3, passes 65504."""
    model = layer_bn("Conv", dtype=np.float16)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layer.W"))
    w = w.copy()
    w[5, 0, 0, 0] = 40000
    model = with_initializer(model, "layer.W", w)
    return with_initializer(model, "bn.var", np.full(8, 0.1, np.float16))


PER_SAMPLE_NORMS = {
    # op: (opset, attributes, scale shape)
    "LayerNormalization": (17, {"axis": 1}, [8, 4, 4]),
    "GroupNormalization": (21, {"num_groups": 2}, [8]),
    "InstanceNormalization": (15, {}, [8]),
}


def per_sample_norm(norm: str) -> onnx.ModelProto:
    """Conv -> LayerNorm / GroupNorm / InstanceNorm: never folded."""
    opset, attrs, scale_shape = PER_SAMPLE_NORMS[norm]
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.1, scale_shape).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 0.1, scale_shape).astype(np.float32), "b"),
    ]
    model = _conv_then(
        [helper.make_node(norm, ["h", "g", "b"], ["y"], name="norm", **attrs)], inits, opset
    )
    # onnx has no shape inference for GroupNormalization-21; the shape is the input's.
    out = model.graph.output[0].type
    if not out.tensor_type.HasField("shape"):
        out.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 8, 4, 4]))
    return model


def bn_after_concat() -> onnx.ModelProto:
    """Conv, then Concat(x, conv) -> BN (DenseNet's shape): no single layer to fold into."""
    nodes = [
        helper.make_node("Concat", ["x", "h"], ["cat"], name="concat", axis=1),
        bn_node("cat", "y"),
    ]
    return _conv_then(
        nodes, bn_params(8, np.float32, np.random.default_rng(1)), 15, w_shape=(4, 4, 1, 1)
    )


def bn_on_graph_input() -> onnx.ModelProto:
    return make_model(
        [bn_node("x", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        bn_params(4, np.float32, np.random.default_rng(1)),
        15,
    )


def matmul_3d() -> onnx.ModelProto:
    """[B, T, K] @ [K, N] -> BN: BN normalises axis 1 (T), not the MatMul's N."""
    rng = np.random.default_rng(2)
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("h", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(5, 6)).astype(np.float32), "W"),
            *bn_params(6, np.float32, rng),
        ],
        15,
    )


def _conv_bn_subgraph(
    name: str,
    seed: int,
    graph_inputs: Sequence[onnx.ValueInfoProto] = (),
    extra_outputs: Sequence[onnx.ValueInfoProto] = (),
    extra_nodes: Sequence[onnx.NodeProto] = (),
) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    prefix = f"{name}_bn"
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), f"{name}_W"),
        *bn_params(4, np.float32, rng, prefix=prefix),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", f"{name}_W"], [f"{name}_h"], name=f"{name}_conv", pads=[1, 1, 1, 1]
        ),
        bn_node(f"{name}_h", f"{name}_y", prefix=prefix),
        *extra_nodes,
    ]
    outputs = [*extra_outputs, helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)]
    return helper.make_graph(nodes, name, list(graph_inputs), outputs, inits)


def if_branches() -> onnx.ModelProto:
    """If(cond) with a Conv -> BN in each branch, both reading the outer x."""
    return make_model(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                name="if",
                then_branch=_conv_bn_subgraph("then", 1),
                else_branch=_conv_bn_subgraph("else", 2),
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


def loop_body() -> onnx.ModelProto:
    """Loop running a Conv -> BN on the outer x each iteration (a scan output)."""
    body = _conv_bn_subgraph(
        "body",
        3,
        graph_inputs=[
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        extra_outputs=[helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
        extra_nodes=[helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
    )
    return make_model(
        [helper.make_node("Loop", ["trips", ""], ["ys"], name="loop", body=body)],
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, None)],
        [],
        15,
    )


def conv_chain(*, dynamic_batch: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> 3 x (Conv -> BN -> Relu) -> GlobalAveragePool -> Flatten -> Gemm: class scores.

    Layers are named conv1..conv3 and bn1..bn3 (the BNs' outputs: bn1_out...).
    """
    rng = np.random.default_rng(seed)
    channels = [3, 8, 8, 16]
    nodes, inits = [], []
    prev = "x"
    for i in range(1, 4):
        cin, cout = channels[i - 1], channels[i]
        w = rng.normal(0, 0.4, (cout, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{i}.W"))
        inits += bn_params(cout, np.float32, rng, prefix=f"bn{i}")
        nodes += [
            helper.make_node(
                "Conv", [prev, f"conv{i}.W"], [f"conv{i}_out"], name=f"conv{i}", pads=[1, 1, 1, 1]
            ),
            bn_node(f"conv{i}_out", f"bn{i}_out", prefix=f"bn{i}"),
            helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}_out"], name=f"relu{i}"),
        ]
        prev = f"relu{i}_out"
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 16)).astype(np.float32), "fc.W"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.B"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    batch: int | str = "N" if dynamic_batch else 4
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
        13,
    )


# --- Beyond BN after a layer (issue 5 patterns) -------------------------------------


def deep_chain(
    depth: int = 40,
    channels: int = 16,
    dtype: Any = np.float32,
    *,
    cast_to_float32: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> depth x (1x1 Conv -> BN), no activations: outputs reach ~3e3 at depth 40.

    Rounding errors grow with depth and with the values carried, so the
    fusion's error here is of the size of onnxruntime's own optimised vs
    unoptimised difference. ``cast_to_float32``: a final Cast to float32, as
    mixed-precision exports end (the model still computes in ``dtype``).
    """
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = rng.normal(0, 1 / np.sqrt(channels), (channels, channels, 1, 1)).astype(dtype)
        inits.append(numpy_helper.from_array(w, f"conv{i}.W"))
        inits += bn_params(channels, dtype, rng, prefix=f"bn{i}")
        nodes += [
            helper.make_node("Conv", [prev, f"conv{i}.W"], [f"conv{i}_out"], name=f"conv{i}"),
            bn_node(f"conv{i}_out", f"bn{i}_out", prefix=f"bn{i}"),
        ]
        prev = f"bn{i}_out"
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    out_elem = TensorProto.FLOAT if cast_to_float32 else elem
    last = "Cast" if cast_to_float32 else "Identity"
    attrs = {"to": TensorProto.FLOAT} if cast_to_float32 else {}
    nodes.append(helper.make_node(last, [prev], ["y"], name="out", **attrs))
    shape = [1, channels, 16, 16]
    graph = helper.make_graph(
        nodes, "deep_chain", [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", out_elem, shape)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def bn_then_conv(
    *,
    pads: list[int] | None = None,
    groups: int = 1,
    auto_pad: str | None = None,
    kernel: int = 3,
    dtype: Any = np.float32,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> BN -> Conv (BN first, e.g. input normalisation); pads/auto_pad as given."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    cin, cout = 4, 8
    w = rng.normal(0, 0.5, (cout, cin // groups, kernel, kernel)).astype(dt)
    attrs: dict[str, Any] = {"group": groups}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    nodes = [
        bn_node("x", "n"),
        helper.make_node("Conv", ["n", "W", "B"], ["h"], name="conv", **attrs),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    inits = [
        *bn_params(cin, dt, rng),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(rng.normal(0, 1, cout).astype(dt), "B"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", ONNX_TYPE[dt], [2, cin, 7, 7])],
        [helper.make_tensor_value_info("y", ONNX_TYPE[dt], None)],
        inits,
        15,
    )


def layer_scale_shift(
    op: str = "Conv",
    *,
    mul_shape: tuple[int, ...] | None = (8, 1, 1),
    add_shape: tuple[int, ...] | None = (1, 8, 1, 1),
    mul_first: bool = True,
    mul_runtime: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> Conv / ConvTranspose / Gemm -> Mul(const) -> Add(const) -> Relu.

    ``None`` leaves the step out; ``mul_runtime`` multiplies by a graph input instead.
    """
    rng = np.random.default_rng(seed)
    # 10x10 input, 3x3 kernel: an 8x8 output whose last axis has the channels' length, so a
    # [C]-shaped constant is valid ONNX and silently broadcasts along the wrong axis.
    base = layer_bn(op, seed=seed, c_shape=(8,), spatial=(10, 10))
    nodes = [n for n in base.graph.node if n.op_type not in ("BatchNormalization", "Relu")]
    inits = [t for t in base.graph.initializer if not t.name.startswith("bn.")]
    inputs = list(base.graph.input[:1])
    steps: list[tuple[str, tuple[int, ...] | None]] = [("Mul", mul_shape), ("Add", add_shape)]
    if not mul_first:
        steps.reverse()
    prev = "h"
    for i, (kind, shape) in enumerate(steps):
        if shape is None:
            continue
        name = f"{kind.lower()}_const"
        if kind == "Mul" and mul_runtime:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        else:
            low, high = (0.5, 2.0) if kind == "Mul" else (-1.0, 1.0)
            value = rng.uniform(low, high, shape) * (
                rng.choice([-1, 1], shape) if kind == "Mul" else 1
            )
            inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        out = f"s{i}"
        nodes.append(helper.make_node(kind, [prev, name], [out], name=kind.lower()))
        prev = out
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    return make_model(
        nodes,
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        15,
    )
