"""Checks on the ModelProto before it is indexed: what runtimes read differently.

- A name given to two initializers (onnxruntime uses the first, other readers
  the last, so the fused model could compute something else), or a subgraph
  initializer that shadows a name of an enclosing graph.
- Sparse initializers, which bnfuse does not read (a fold into one cannot be
  written back).
- Tensors of an element type ONNX does not define, and tensors whose values
  sit in a typed field their type does not use (an FLOAT16 tensor in
  ``float_data``): each gets its own sentence instead of a library's assertion.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfuse.errors import InputError
from bnfuse.onnx.proto import ModelProto, TensorProto

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

# The typed field each element type keeps its values in, when not in raw_data.
_INT32_TYPES = {
    TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
    TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16,
    TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ, TensorProto.INT4, TensorProto.UINT4,
}  # fmt: skip
_FIELDS = {
    "float_data": {TensorProto.FLOAT, TensorProto.COMPLEX64},
    "int32_data": _INT32_TYPES,
    "int64_data": {TensorProto.INT64},
    "double_data": {TensorProto.DOUBLE, TensorProto.COMPLEX128},
    "uint64_data": {TensorProto.UINT32, TensorProto.UINT64},
    "string_data": {TensorProto.STRING},
}
_KNOWN_TYPES = set(TensorProto.DataType.values())
# The TensorProto fields that hold values in place of raw_data.
TYPED_FIELDS = tuple(_FIELDS)


def check_model(proto: ModelProto, path: Path) -> None:
    """Raise InputError for the first thing bnfuse would read wrongly or not at all."""
    _check_graph(proto.graph, path, outer=set())
    for function in proto.functions:
        for node in function.node:
            _check_node_tensors(node, path)


def _check_graph(graph: GraphProto, path: Path, outer: set[str]) -> None:
    where = f"graph '{graph.name}'" if graph.name else "the graph"
    if len(graph.sparse_initializer):
        name = graph.sparse_initializer[0].values.name
        raise InputError(
            f"{path}: {where} holds sparse initializers ('{name}'), which bnfuse cannot read "
            "or carry into its output",
            hint="store them dense first, e.g. with onnx.numpy_helper.from_array",
        )
    seen: set[str] = set()
    for tensor in graph.initializer:
        if tensor.name in seen:
            raise InputError(
                f"{path}: {where} has two initializers named '{tensor.name}'; runtimes "
                "disagree on which one counts, so bnfuse refuses the model"
            )
        if tensor.name in outer:
            raise InputError(
                f"{path}: the initializer '{tensor.name}' of subgraph {where} shadows a name "
                "of an enclosing graph; runtimes disagree on which one counts"
            )
        seen.add(tensor.name)
        _check_tensor(tensor, path)
    names = set(outer) | seen | {v.name for v in graph.input}
    for node in graph.node:
        _check_node_tensors(node, path)
        for attr in node.attribute:
            for sub in subgraphs(attr):
                _check_graph(sub, path, names)
        names.update(node.output)


def subgraphs(attr: Any) -> Iterator[GraphProto]:
    """The GraphProtos an attribute holds (If's branches, Loop's and Scan's bodies)."""
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """The graph, then every subgraph in it, depth first in node order."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in subgraphs(attr):
                yield from all_graphs(sub)


def all_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in subgraphs(attr):
                yield from all_tensors(sub)


def _check_node_tensors(node: NodeProto, path: Path) -> None:
    for attr in node.attribute:
        if attr.HasField("t"):
            _check_tensor(attr.t, path, f"the tensor of node '{node.name or node.op_type}'")
        for tensor in attr.tensors:
            _check_tensor(tensor, path, f"a tensor of node '{node.name or node.op_type}'")


def _check_tensor(tensor: TensorProto, path: Path, what: str = "") -> None:
    label = what or f"initializer '{tensor.name}'"
    if tensor.data_type not in _KNOWN_TYPES or tensor.data_type == TensorProto.UNDEFINED:
        raise InputError(
            f"{path}: {label} has element type {tensor.data_type}, which is no ONNX type"
        )
    for field, types in _FIELDS.items():
        if tensor.data_type not in types and len(getattr(tensor, field)):
            type_name = TensorProto.DataType.Name(tensor.data_type)
            raise InputError(
                f"{path}: {label} is {type_name} but keeps its values in {field}, which "
                f"ONNX does not use for {type_name}",
                hint="store the values in raw_data, as onnx.numpy_helper.from_array does",
            )
