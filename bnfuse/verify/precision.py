"""The precision a model computes each output in: the lowest float type on its path.

An fp16 network whose last op casts to float32 (common in mixed-precision
exports) computes in fp16, and its outputs carry fp16's error whatever their
type says; judging them by float32's tolerance cries wolf. So the tolerance
comes from the lowest-precision float type among everything an output depends
on: the graph inputs, initializers and Constant values it reads, and the
targets of the Casts on the way.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import TensorProto

# Lower rank: fewer significant bits (what decides the error a type can tell apart).
_RANK: dict[int, int] = {
    TensorProto.FLOAT8E4M3FN: 0, TensorProto.FLOAT8E4M3FNUZ: 0, TensorProto.FLOAT8E5M2: 0,
    TensorProto.FLOAT8E5M2FNUZ: 0, TensorProto.BFLOAT16: 1, TensorProto.FLOAT16: 2,
    TensorProto.FLOAT: 3, TensorProto.DOUBLE: 4,
}  # fmt: skip
_NAMES: dict[int, str] = {
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.FLOAT16: "float16",
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
}


def onnx_compute_dtypes(proto: onnx.ModelProto) -> dict[str, str]:
    """For each graph output, the name of the lowest float type on its path ('' if none)."""
    graph = proto.graph
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
    leaf: dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    leaf.update({t.name: t.data_type for t in graph.initializer})
    result = {}
    for output in graph.output:
        lowest: int | None = None
        seen: set[str] = set()
        stack = [output.name]
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            types = [leaf[name]] if name in leaf else []
            node = producer.get(name)
            if node is not None:
                types += _node_types(node)
                stack.extend(node.input)
            for t in types:
                if t in _RANK and (lowest is None or _RANK[t] < _RANK[lowest]):
                    lowest = t
        result[output.name] = _NAMES.get(lowest, "") if lowest is not None else ""
    return result


def _node_types(node: onnx.NodeProto) -> list[int]:
    types = []
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to":
            types.append(attr.i)
        if attr.HasField("t"):
            types.append(attr.t.data_type)
    return types


def torch_compute_dtype(model: Any) -> str:
    """The lowest float type among a torch model's parameters and buffers ('' if none)."""
    import torch

    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    found = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    for dtype in order:
        if dtype in found:
            return str(dtype).replace("torch.", "")
    return ""


def lower(a: str, b: str) -> str:
    """The lower precision of two dtype names ('' counts as unknown)."""
    order = ["bfloat16", "float16", "float32", "float64"]
    known = [d for d in (a, b) if d in order]
    return min(known, key=order.index) if known else (a or b)
