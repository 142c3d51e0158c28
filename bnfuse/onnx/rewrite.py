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
from bnfuse.onnx.graph import Graph, Model, Node, Usage, Value
from bnfuse.onnx.light import type_code
from bnfuse.onnx.match import BEFORE, Plan
from bnfuse.onnx.ops import FreshNames, op_name
from bnfuse.onnx.proto import NodeProto, TensorProto, ValueInfoProto
from bnfuse.onnx.tensors import Compute


def op_counts(model: Model) -> Counter[str]:
    counts: Counter[str] = Counter()
    for graph in model.graphs():
        for node in graph.nodes:
            counts[op_name(node.proto)] += 1
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
        taken.update(v.name for v in graph.inputs if v.name)
        taken.update(graph.initializers)
        for node in graph.nodes:
            if node.name:
                taken.add(node.name)
            taken.update(v.name for v in node.outputs if v.name)
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

    def apply(self, plans: Iterable[Plan]) -> int:
        count = 0
        for plan in plans:
            self._apply_one(plan)
            count += 1
        for value in self._maybe_dead:
            self._drop_if_dead(value)
        self._maybe_dead.clear()
        self._sweep()
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

    def _set_input(self, node: Node, index: int, value: Value) -> None:
        """``node`` reads ``value`` at ``index`` (the NodeProto and the uses alike)."""
        while len(node.inputs) <= index:
            node.inputs.append(None)
            node.proto.input.append("")
        old = node.inputs[index]
        if old is not None:
            old.usages[:] = [u for u in old.usages if not (u.node is node and u.idx == index)]
        node.inputs[index] = value
        node.proto.input[index] = value.name
        value.usages.append(Usage(node, index))

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
            assert old.init is not None
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
        value = Value(name, graph)
        value.init = tensor
        graph.values[name] = graph.initializers[name] = value
        if self.model.ir_version < OVERRIDABLE_SINCE_IR and graph is self.model.graph:
            info = graph.proto.input.add()  # IR < 4: every initializer is also an input
            info.CopyFrom(_tensor_info(tensor))
            value.input, value.info = True, info
        return value

    def _insert_bias_add(self, graph: Graph, matmul: Node, bias: Array) -> Node:
        base = matmul.name or "MatMul"
        value = self._new_initializer(graph, bias, bias.dtype, bias.shape, f"{base}.bias")
        proto = NodeProto(op_type="Add", name=self._names.fresh(f"{base}/bias_add"))
        proto.output.append(self._names.fresh(f"{matmul.outputs[0].name}_biased"))
        self._inserted.setdefault(id(matmul.proto), []).append(proto)
        add = Node(proto, graph)
        out = Value(proto.output[0], graph)
        out.node = add
        add.outputs.append(out)
        graph.values[out.name] = out
        graph.nodes.insert(graph.nodes.index(matmul) + 1, add)
        self._set_input(add, 0, matmul.outputs[0])
        self._set_input(add, 1, value)
        return add

    def _splice_out(self, graph: Graph, bn: Node, replacement: Value) -> None:
        """Remove ``bn``; ``replacement`` takes over its output's name, value_info and uses."""
        out = bn.outputs[0]
        name, old_name = out.name, replacement.name
        for usage in list(replacement.usages):  # Shape readers of the layer's output, say
            if usage.node is not bn:
                usage.node.proto.input[usage.idx] = name
        self._remove(bn, outputs_go=False)
        assert replacement.node is not None
        replacement.node.proto.output[replacement.index] = name
        infos = {id(v): v for v in graph.proto.value_info}
        if replacement.info is not None and id(replacement.info) in infos:
            if out.info is None:
                replacement.info.name = name  # the layer's record now names the BN's output
            else:
                self._doom(replacement.info)
        graph.values.pop(old_name, None)
        replacement.name = name
        replacement.usages += out.usages
        for usage in out.usages:
            usage.node.inputs[usage.idx] = replacement
        replacement.outputs += out.outputs
        replacement.info = out.info or replacement.info
        graph.values[name] = replacement

    def _remove(self, node: Node, *, outputs_go: bool = True) -> None:
        """Take ``node`` out: its inputs lose this reader; its outputs' value_info goes
        with it, unless another node takes them over."""
        self._doom(node.proto)
        for value in node.inputs:
            if value is not None:
                value.usages[:] = [u for u in value.usages if u.node is not node]
        for value in node.outputs if outputs_go else ():
            if value.info is not None and not value.is_graph_output():
                self._doom(value.info)

    def _doom(self, message: Any) -> None:
        self._doomed[id(message)] = message

    def _drop_if_dead(self, value: Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        graph = value.graph
        if value.init is not None and graph is not None:
            if value.is_graph_input():
                if self.model.ir_version >= OVERRIDABLE_SINCE_IR:
                    return  # a real input of the model: not ours to remove
                self._doom(value.info)
                value.input = False
            if graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
                self._doom(value.init)
                if value.info is not None:
                    self._doom(value.info)
            return
        producer = value.producer()
        if producer is None or id(producer.proto) in self._doomed:
            return
        if any(o.uses() or o.is_graph_output() for o in producer.outputs):
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
            for field in (proto.initializer, proto.input, proto.value_info):
                _delete(field, self._doomed)
            _delete(proto.node, self._doomed)
            if self._inserted:
                places = [i for i, n in enumerate(proto.node) if id(n) in self._inserted]
                for index in reversed(places):  # from the end: the places stay right
                    for offset, new in enumerate(self._inserted[id(proto.node[index])]):
                        proto.node.insert(index + 1 + offset, new)


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
