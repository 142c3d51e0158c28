"""Apply the matcher's plans to the model's protobuf.

For each plan: compute the folded bias and set up the folded weight
(bnfuse.fold, float64, rounded once; the weight is computed when the file is
written, one layer at a time, see _folded_weight), put them in place, and
splice the BatchNorm out so that the layer (or its bias Add) now produces the
BN's output under the BN's output name; graph outputs and downstream names
do not change.

A weight or bias initializer used only by this layer is replaced in place and
keeps its name. One used elsewhere too (a shared weight), a Constant node, or
an overridable value gets a new initializer, and the original stays for its
other users. Values that end up unused (BN parameters, replaced weights, the
Constant/Identity nodes that produced them) are removed, with their
value_info; nothing else in the model is touched: the fused file is the input
file, less what the fold took out.

The edits go to the NodeProtos and TensorProtos themselves, and to the index
(bnfuse.onnx.graph) as far as later plans of the same round read it: the uses
of each value. Nodes and initializers that go are taken out of their repeated
fields once, at the end of the round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from bnfuse import fold
from bnfuse.fold import Array
from bnfuse.onnx.constants import OVERRIDABLE_SINCE_IR
from bnfuse.onnx.graph import Graph, Model, Node, Value
from bnfuse.onnx.light import type_code
from bnfuse.onnx.match import BEFORE, Plan
from bnfuse.onnx.ops import FreshNames, op_name
from bnfuse.onnx.proto import AttributeProto, NodeProto, TensorProto, ValueInfoProto
from bnfuse.onnx.tensors import Compute


def op_counts(model: Model) -> Counter[str]:
    counts: Counter[str] = Counter()
    for graph in model.graphs():
        for node in graph.proto.node:
            counts[op_name(node)] += 1
    return counts


def _folded_weight(plan: Plan) -> Compute:
    """The folded weight, computed when it is read (written, mostly).

    A model's weights are folded one at a time as the file is written, so
    memory holds one folded layer, not all of them. The matcher has already
    checked that the result fits the dtype (fold.check_fits).
    """
    site = plan.site

    def compute() -> Array:
        if plan.direction == BEFORE:
            w = fold.fold_weight_into_following(site.weight, plan.affine.scale, site.groups)
            folded = fold.round_to(w, plan.dtype)
        else:
            scale = plan.affine.scale
            folded = fold.fold_weight_rounded(
                site.weight, scale, site.axis, site.groups, plan.dtype
            )
        site.release()
        return folded

    return compute


def _names(model: Model) -> FreshNames:
    """New names that clash with no value or node in the model."""
    taken: set[str] = set()
    for graph in model.graphs():
        taken.update(graph.local)  # inputs, initializers, node outputs
        taken.update(n.name for n in graph.proto.node if n.name)
    return FreshNames(taken)


class FoldBatchNorms:
    """Rewrite ``model`` in place according to ``plans`` (from match.find)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._names = _names(model)
        self._maybe_dead: list[Value] = []
        # The NodeProtos, TensorProtos and ValueInfoProtos that go, by id (held, so that no id
        # is reused by a new message before the sweep).
        self._doomed: dict[int, Any] = {}
        self._inserted: dict[int, list[Any]] = {}  # NodeProto id -> nodes to put after it
        self._reindex = False  # a node that held a subgraph went

    def apply(self, plans: Iterable[Plan]) -> int:
        count = 0
        for plan in plans:
            self._apply_one(plan)
            count += 1
        for value in self._maybe_dead:
            self._drop_if_dead(value)
        self._maybe_dead.clear()
        self._sweep()
        if self._inserted or self._reindex:  # else the edits kept the index as it is
            self.model.reindex()
        return count

    def _apply_one(self, plan: Plan) -> None:
        site, folded = plan.site, plan.bn
        graph = folded.graph
        layer = site.layer
        if plan.direction == BEFORE:
            bias = fold.fold_bias_into_following(
                site.weight, site.bias, plan.affine.shift, site.groups
            )
        else:
            bias = fold.fold_bias(site.bias, plan.affine)
        # The bias first: its old value may be a sub-expression reading the weight
        # (Shape(W) -> Expand), which must be gone before the weight can change in place.
        bias_array = fold.round_to(bias, plan.dtype)
        tail = site.tail
        if layer.op_type == "MatMul" and site.bias_index is None:
            tail = self._insert_bias_add(graph, layer, bias_array)
            if site.chain:  # the shape-only nodes now read the biased output
                self._set_input(site.chain[0], 0, tail.outputs[0])
        else:
            index = 2 if site.bias_index is None else site.bias_index
            old_bias = self._set_const(
                tail, index, bias_array, bias_array.shape, plan.dtype, "bias"
            )
            if old_bias is not None:
                self._drop_if_dead(old_bias)
        weight = _folded_weight(plan)
        self._set_const(layer, 1, weight, site.weight.shape, plan.dtype, "weight")
        if layer.op_type == "Gemm" and layer.attributes.get_float("beta", 1.0) != 1.0:
            for attr in layer.proto.attribute:  # C was folded already multiplied by beta
                if attr.name == "beta":
                    attr.f = 1.0
        data = folded.inputs[0]
        if folded.op_type in ("Mul", "Add") and folded.inputs[0] is not tail.outputs[0]:
            data = folded.inputs[1]  # the layer's output may be either operand
        self._maybe_dead.extend(v for v in folded.inputs if v is not None and v is not data)
        if plan.direction == BEFORE:
            assert data is not None
            self._set_input(layer, 0, data)
            self._remove(folded)
        else:
            end = site.chain[-1].outputs[0] if site.chain else tail.outputs[0]
            self._splice_out(graph, folded, end)

    # --- Values and their uses --------------------------------------------------------
    # Each edit goes to the NodeProtos and to the index's dictionaries together, so that
    # later plans of the round read the uses as they are now.

    def _set_input(self, node: Node, index: int, value: Value) -> None:
        """``node`` reads ``value`` at ``index``."""
        while len(node.proto.input) <= index:
            node.proto.input.append("")
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None:
            _unread(old, node, index)
        node.proto.input[index] = value.name
        value.graph.readers.setdefault(value.name, []).append((node.graph, node.proto, index))
        node.forget()

    def _set_const(
        self,
        node: Node,
        index: int,
        array: Array | Compute,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        what: str,
    ) -> Value | None:
        """Put ``array`` (of ``shape``) at ``node.inputs[index]``; returns the value it
        replaced, if any."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and old.name and self._owned_by(old, node):
            self._fill(old.init, old.name, array, dtype, shape)
            return None
        base = old.name if old is not None and old.name else f"{node.name or node.op_type}.{what}"
        value = self._new_initializer(node.graph, array, dtype, shape, f"{base}_bnfused")
        self._set_input(node, index, value)
        if old is not None:
            self._maybe_dead.append(old)
        return old

    def _fill(
        self, tensor: Any, name: str, array: Array | Compute, dtype: np.dtype[Any], dims: Any
    ) -> None:
        """``tensor`` as a header (name, dims, element type); its data is ``array``,
        written from it (a rewritten initializer keeps no old field)."""
        tensor.Clear()
        tensor.name = name
        tensor.dims.extend(int(d) for d in dims)
        code = type_code(np.dtype(dtype))
        assert code is not None
        tensor.data_type = code
        self.model.arrays.fold(tensor, array)

    def _owned_by(self, value: Value, node: Node) -> bool:
        """An initializer only ``node`` reads, which no caller can override."""
        if value.init is None or value.graph is not node.graph:
            return False
        if value.is_graph_input() and self.model.ir_version >= OVERRIDABLE_SINCE_IR:
            return False
        return not value.is_graph_output() and len(value.uses()) == 1

    def _new_initializer(
        self, graph: Graph, array: Array | Compute, dtype: np.dtype[Any], dims: Any, base: str
    ) -> Value:
        name = self._names.fresh(base)
        tensor = graph.proto.initializer.add()
        self._fill(tensor, name, array, dtype, dims)
        graph.inits[name] = tensor
        graph.local.add(name)
        if self.model.ir_version < OVERRIDABLE_SINCE_IR and graph is self.model.graph:
            info = graph.proto.input.add()  # IR < 4: every initializer is also an input
            info.CopyFrom(_tensor_info(tensor))
            graph.input_info[name] = info
        return graph.value(name)

    def _insert_bias_add(self, graph: Graph, matmul: Node, bias: Array) -> Node:
        """An Add of the bias after a MatMul that had none; into the graph at the sweep."""
        base = matmul.name or "MatMul"
        value = self._new_initializer(graph, bias, bias.dtype, bias.shape, f"{base}.bias")
        proto = NodeProto(op_type="Add", name=self._names.fresh(f"{base}/bias_add"))
        out = self._names.fresh(f"{matmul.outputs[0].name}_biased")
        proto.output.append(out)
        self._inserted.setdefault(id(matmul.proto), []).append(proto)
        graph.producer[out] = (proto, 0)
        graph.local.add(out)
        add = graph.node(proto)
        self._set_input(add, 0, matmul.outputs[0])
        self._set_input(add, 1, value)
        return add

    def _splice_out(self, graph: Graph, bn: Node, replacement: Value) -> None:
        """Remove ``bn``; ``replacement`` takes over its output's name, value_info and uses."""
        name, old = bn.outputs[0].name, replacement.name
        self._remove(bn, outputs_go=False)
        readers = graph.readers.pop(old, [])
        for reader_graph, proto, index in readers:  # Shape readers of the layer's output, say
            proto.input[index] = name
            reader_graph.node(proto).forget()
        graph.readers.setdefault(name, []).extend(readers)
        made = graph.producer.pop(old)
        made[0].output[made[1]] = name
        graph.producer[name] = made
        graph.node(made[0]).forget()
        graph.local.discard(old)
        info = graph.value_info.pop(old, None)  # a node output's record (outputs are apart)
        if info is not None:
            if name in graph.value_info or name in graph.output_info:
                self._doom(info)
            else:
                info.name = name  # the layer's record now names the BN's output
                graph.value_info[name] = info
        graph.rename(old, name)

    def _remove(self, node: Node, *, outputs_go: bool = True) -> None:
        """Take ``node`` out: its inputs lose this reader; its outputs, and their
        value_info, go with it unless another node takes them over."""
        self._doom(node.proto)
        self._reindex |= any(a.type in _GRAPH_TYPES for a in node.proto.attribute)
        for index, value in enumerate(node.inputs):
            if value is not None:
                _unread(value, node, index)
        graph = node.graph
        for name in node.proto.output[0 if outputs_go else 1 :]:  # the first may live on
            if name and name not in graph.output_count:
                graph.producer.pop(name, None)
                graph.local.discard(name)
                info = graph.value_info.pop(name, None)
                if info is not None:
                    self._doom(info)

    def _doom(self, message: Any) -> None:
        self._doomed[id(message)] = message

    def _drop_if_dead(self, value: Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        graph, name = value.graph, value.name
        if name in graph.inits:
            if name in graph.input_info:
                if self.model.ir_version >= OVERRIDABLE_SINCE_IR:
                    return  # a real input of the model: not ours to remove
                self._doom(graph.input_info.pop(name))
            self._doom(graph.inits.pop(name))
            graph.local.discard(name)
            info = graph.value_info.pop(name, None)
            if info is not None:
                self._doom(info)
            return
        producer = value.producer()
        if producer is None or id(producer.proto) in self._doomed:
            return
        if any(o.uses() or o.is_graph_output() for o in producer.outputs if o.name):
            return
        inputs = [v for v in producer.inputs if v is not None]
        self._remove(producer)
        for inp in inputs:
            self._drop_if_dead(inp)

    def _sweep(self) -> None:
        """Take the doomed nodes, initializers and value_infos out of their repeated
        fields, and put the inserted nodes in, once per graph."""
        for graph in self.model.graphs():
            proto = graph.proto
            for field in (proto.initializer, proto.input, proto.value_info, proto.node):
                _delete(field, self._doomed)
            if self._inserted:
                places = [i for i, n in enumerate(proto.node) if id(n) in self._inserted]
                for index in reversed(places):  # from the end: the places stay right
                    for offset, new in enumerate(self._inserted[id(proto.node[index])]):
                        proto.node.insert(index + 1 + offset, new)


_GRAPH_TYPES = (AttributeProto.GRAPH, AttributeProto.GRAPHS)


def _unread(value: Value, node: Node, index: int) -> None:
    """``node`` no longer reads ``value`` at ``index``."""
    readers = value.graph.readers.get(value.name)
    if readers:
        readers[:] = [r for r in readers if not (r[1] is node.proto and r[2] == index)]


def _delete(repeated: Any, doomed: dict[int, Any]) -> None:
    """Remove the items ``doomed`` names from a repeated field, keeping the others' order."""
    for index in reversed([i for i, item in enumerate(repeated) if id(item) in doomed]):
        del repeated[index]


def _tensor_info(tensor: TensorProto) -> Any:
    """A value_info for an initializer: its type and shape."""
    info = ValueInfoProto(name=tensor.name)
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = tensor.data_type
    tensor_type.shape.SetInParent()  # a scalar has a shape, with no dims
    for dim in tensor.dims:
        tensor_type.shape.dim.add().dim_value = dim
    return info
