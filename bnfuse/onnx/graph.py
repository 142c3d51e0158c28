"""The graph bnfuse matches and rewrites: an index over the ModelProto itself.

Every ONNX model goes through this one view, whatever its size, names or
structure: the matcher (bnfuse.onnx.match) reads it, the rewrite
(bnfuse.onnx.rewrite) edits the protobuf through it, and the writer
(bnfuse.onnx.io) serialises the protobuf. A Value is a name in a graph's
scope, with its producer, its readers (in subgraphs too) and, for an
initializer, its tensor; a Node wraps its NodeProto. Building the index costs
a few microseconds a node, where building onnx-ir's graph cost a hundred
(0.4 s on a 3,000-node graph) and serialising it again as much: that is why
there is no onnx-ir here.

Names follow ONNX's scoping rules: a subgraph sees its own inputs,
initializers and node outputs, then those of the graphs around it defined
before the node that holds it. The weights' arrays come from
bnfuse.onnx.tensors (views of the message or of a mapped file, or a folded
array waiting to be written).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bnfuse.fold import Array
from bnfuse.onnx.proto import AttributeProto, TensorProto


@dataclass(frozen=True)
class Usage:
    node: Node
    idx: int


class Value:
    """A name in a graph: a graph input, an initializer or a node's output."""

    __slots__ = ("graph", "index", "info", "init", "input", "name", "node", "outputs", "usages")

    def __init__(self, name: str, graph: Graph | None) -> None:
        self.name = name
        self.graph = graph  # the graph that defines it; None: no graph does (dangling)
        self.node: Node | None = None
        self.index = 0
        self.usages: list[Usage] = []
        self.init: TensorProto | None = None
        self.info: Any = None  # ValueInfoProto: its graph input, output or value_info entry
        self.input = False
        self.outputs = 0  # how many graphs list it as an output

    def __repr__(self) -> str:
        return f"Value({self.name!r})"

    def producer(self) -> Node | None:
        return self.node

    def uses(self) -> list[Usage]:
        return self.usages

    def is_graph_input(self) -> bool:
        return self.input

    def is_graph_output(self) -> bool:
        return self.outputs > 0

    def is_initializer(self) -> bool:
        return self.init is not None

    @property
    def shape(self) -> tuple[int | None, ...] | None:
        """Its dims as recorded (an unknown or symbolic one is None); an initializer's
        from its tensor."""
        info = self.info
        if info is not None and info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                return tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
                )
        if self.init is not None:
            return tuple(int(d) for d in self.init.dims)
        return None

    @property
    def dtype(self) -> int | None:
        """Its ONNX element type (TensorProto.DataType), where known."""
        if self.init is not None:
            return int(self.init.data_type)
        info = self.info
        if info is not None and info.type.HasField("tensor_type"):
            return int(info.type.tensor_type.elem_type) or None
        return None


class Attributes:
    """A node's attributes by name; one of the wrong type raises TypeError."""

    __slots__ = ("_by_name",)

    def __init__(self, node: Any) -> None:
        self._by_name = {a.name: a for a in node.attribute}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def _get(self, name: str, kind: int) -> Any:
        attr = self._by_name.get(name)
        if attr is not None and attr.type != kind:
            raise TypeError(
                f"attribute '{name}' is {AttributeProto.AttributeType.Name(attr.type)}, "
                f"expected {AttributeProto.AttributeType.Name(kind)}"
            )
        return attr

    def get_int(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, AttributeProto.INT)
        return int(attr.i) if attr is not None else default

    def get_float(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, AttributeProto.FLOAT)
        return float(attr.f) if attr is not None else default

    def get_ints(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, AttributeProto.INTS)
        return [int(i) for i in attr.ints] if attr is not None else default

    def get_floats(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, AttributeProto.FLOATS)
        return [float(f) for f in attr.floats] if attr is not None else default

    def get_string(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, AttributeProto.STRING)
        return attr.s.decode("utf-8", "replace") if attr is not None else default

    def get_tensor(self, name: str) -> Any:
        """The TensorProto of a TENSOR attribute (a Constant's value), or None."""
        attr = self._get(name, AttributeProto.TENSOR)
        return attr.t if attr is not None else None


class Node:
    __slots__ = ("_attributes", "graph", "inputs", "outputs", "proto")

    def __init__(self, proto: Any, graph: Graph) -> None:
        self.proto = proto
        self.graph = graph
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self._attributes: Attributes | None = None

    def __repr__(self) -> str:
        return f"Node({self.op_type} {self.name!r})"

    @property
    def op_type(self) -> str:
        return str(self.proto.op_type)

    @property
    def domain(self) -> str:
        return str(self.proto.domain)

    @property
    def name(self) -> str:
        return str(self.proto.name)

    @property
    def attributes(self) -> Attributes:
        if self._attributes is None:
            self._attributes = Attributes(self.proto)
        return self._attributes

    def subgraphs(self) -> Iterator[Any]:
        """The GraphProtos in its attributes, in order."""
        for attr in self.proto.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == AttributeProto.GRAPHS:
                yield from attr.graphs


class Graph:
    """A GraphProto indexed: its values by name, its nodes in order, its subgraphs."""

    def __init__(self, proto: Any, model: Model, scope: list[dict[str, Value]]) -> None:
        self.proto = proto
        self.model = model
        self.name = str(proto.name)
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.subgraphs: list[Graph] = []  # directly held by its nodes, in order
        self.initializers: dict[str, Value] = {}
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        own = self.values
        infos = {info.name: info for info in proto.value_info}
        for info in proto.input:
            value = Value(info.name, self)
            own[info.name] = value
            value.input, value.info = True, info
            self.inputs.append(value)
        for tensor in proto.initializer:
            known = own.get(tensor.name)
            value = known if known is not None else Value(tensor.name, self)
            own[tensor.name] = value
            value.init = tensor
            if not value.input:
                value.info = infos.get(tensor.name)
            self.initializers[tensor.name] = value
        chain = [own, *scope]
        for node_proto in proto.node:
            node = Node(node_proto, self)
            for index, name in enumerate(node_proto.input):
                if not name:
                    node.inputs.append(None)
                    continue
                found = _lookup(chain, name)
                if found is None:  # dangling: io's checks refuse it
                    found = own[name] = Value(name, None)
                found.usages.append(Usage(node, index))
                node.inputs.append(found)
            for sub in node.subgraphs():
                self.subgraphs.append(Graph(sub, model, chain))
            for index, name in enumerate(node_proto.output):
                value = Value(name, self)
                value.node, value.index = node, index
                if name:
                    own[name] = value
                    value.info = infos.get(name)
                node.outputs.append(value)
            self.nodes.append(node)
        for info in proto.output:
            listed = _lookup(chain, info.name)
            if listed is None:
                listed = own[info.name] = Value(info.name, None)
            listed.outputs += 1
            if listed.graph is self and listed.info is None:
                listed.info = info
            self.outputs.append(listed)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))

    def all_graphs(self) -> Iterator[Graph]:
        """This graph, then every subgraph in it, depth first in node order."""
        yield self
        for sub in self.subgraphs:
            yield from sub.all_graphs()


def _lookup(chain: list[dict[str, Value]], name: str) -> Value | None:
    for scope in chain:
        value = scope.get(name)
        if value is not None:
            return value
    return None


class Model:
    """A ModelProto and its graphs, indexed; ``arrays`` gives each initializer's array."""

    def __init__(self, proto: Any, arrays: Any) -> None:
        self.proto = proto
        self.arrays = arrays  # bnfuse.onnx.tensors.Arrays
        self.reindex()

    def reindex(self) -> None:
        self.graph = Graph(self.proto.graph, self, [])

    @property
    def ir_version(self) -> int:
        return int(self.proto.ir_version)

    @property
    def opset_imports(self) -> dict[str, int]:
        return {o.domain: int(o.version) for o in self.proto.opset_import}

    def graphs(self) -> Iterator[Graph]:
        return self.graph.all_graphs()

    def array(self, value: Value) -> Array:
        """An initializer's array."""
        assert value.init is not None
        array: Array = self.arrays.of(value.init)
        return array
