"""Apply the matcher's plans to the graph.

For each plan: compute the folded bias and set up the folded weight
(bnfuse.fold, float64, rounded once; the weight is computed when the file is
written, one layer at a time, see _folded_weight), put them in place, and splice the BatchNorm out so that the
layer (or its bias Add) now produces the BN's output under the BN's output
name; graph outputs and downstream names do not change.

A weight or bias initializer used only by this layer is replaced in place and
keeps its name. One used elsewhere too (a shared weight), a Constant node, or
an overridable value gets a new initializer, and the original stays for its
other users. Values that end up unused (BN parameters, replaced weights, the
Constant/Identity nodes that produced them) are removed; nothing else in the
model is touched.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable

import onnx_ir as ir

from bnfuse import fold
from bnfuse.fold import Array
from bnfuse.onnx.constants import OVERRIDABLE_SINCE_IR
from bnfuse.onnx.match import BEFORE, Plan
from bnfuse.onnx.ops import FreshNames, op_name


def op_counts(model: ir.Model) -> Counter[str]:
    counts: Counter[str] = Counter()
    for graph in model.graphs():
        for node in graph:
            counts[op_name(node)] += 1
    return counts


MakeTensor = Callable[[str], ir.TensorProtocol]  # given the tensor's name


def _eager(array: Array) -> MakeTensor:
    return lambda name: ir.Tensor(array, name=name)


def _folded_weight(plan: Plan, name: str) -> ir.TensorProtocol:
    """The folded weight, computed when it is read (written, mostly) and not kept.

    A model's weights are folded one at a time as the file is written, so
    memory holds one folded layer, not all of them. The matcher has already
    checked that the result fits the dtype (fold.check_fits).
    """
    site = plan.site

    def compute() -> ir.TensorProtocol:
        if plan.direction == BEFORE:
            w = fold.fold_weight_into_following(site.weight, plan.affine.scale, site.groups)
            folded = fold.round_to(w, plan.dtype)
        else:
            scale = plan.affine.scale
            folded = fold.fold_weight_rounded(
                site.weight, scale, site.axis, site.groups, plan.dtype
            )
        site.release()
        return ir.Tensor(folded, name=name)

    return ir.LazyTensor(
        compute,
        dtype=ir.DataType.from_numpy(plan.dtype),
        shape=ir.Shape(site.weight.shape),
        name=name,
    )


def _names(model: ir.Model) -> FreshNames:
    """New names that clash with no value or node in the model."""
    taken: set[str] = set()
    for graph in model.graphs():
        taken.update(v.name for v in graph.inputs if v.name)
        taken.update(graph.initializers)
        for node in graph:
            if node.name:
                taken.add(node.name)
            taken.update(v.name for v in node.outputs if v.name)
    return FreshNames(taken)


class FoldBatchNorms:
    """Rewrite ``model`` in place according to ``plans`` (from match.find)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._names = _names(model)
        self._maybe_dead: list[ir.Value] = []

    def apply(self, plans: Iterable[Plan]) -> int:
        count = 0
        for plan in plans:
            self._apply_one(plan)
            count += 1
        for value in self._maybe_dead:
            self._drop_if_dead(value)
        self._maybe_dead.clear()
        return count

    def _apply_one(self, plan: Plan) -> None:
        site, folded = plan.site, plan.bn
        graph = folded.graph
        assert graph is not None and isinstance(graph, ir.Graph)
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
                site.chain[0].replace_input_with(0, tail.outputs[0])
        else:
            index = 2 if site.bias_index is None else site.bias_index
            old_bias = self._set_const(graph, tail, index, _eager(bias_array), "bias")
            if old_bias is not None:
                self._drop_if_dead(old_bias)
        self._set_const(graph, layer, 1, functools.partial(_folded_weight, plan), "weight")
        if layer.op_type == "Gemm" and layer.attributes.get_float("beta", 1.0) != 1.0:
            # C was folded already multiplied by beta.
            layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        data = folded.inputs[0]
        if folded.op_type in ("Mul", "Add") and folded.inputs[0] is not tail.outputs[0]:
            data = folded.inputs[1]  # the layer's output may be either operand
        self._maybe_dead.extend(v for v in folded.inputs if v is not None and v is not data)
        if plan.direction == BEFORE:
            assert data is not None
            layer.replace_input_with(0, data)
            graph.remove(folded, safe=True)
        else:
            end = site.chain[-1].outputs[0] if site.chain else tail.outputs[0]
            self._splice_out(graph, folded, end)

    def _insert_bias_add(self, graph: ir.Graph, matmul: ir.Node, bias: Array) -> ir.Node:
        value = self._new_initializer(graph, _eager(bias), f"{matmul.name or 'MatMul'}.bias")
        add = ir.Node(
            "",
            "Add",
            [matmul.outputs[0], value],
            name=self._names.fresh(f"{matmul.name or 'MatMul'}/bias_add"),
        )
        add.outputs[0].name = self._names.fresh(f"{matmul.outputs[0].name}_biased")
        graph.insert_after(matmul, add)
        return add

    def _set_const(
        self, graph: ir.Graph, node: ir.Node, index: int, make: MakeTensor, what: str
    ) -> ir.Value | None:
        """Put ``make(name)`` at ``node.inputs[index]``; returns the value it replaced, if any."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and old.name and self._owned_by(old, node):
            tensor = make(old.name)
            old.const_value = tensor
            old.shape = ir.Shape(tensor.shape.numpy())
            return None
        base = old.name if old is not None and old.name else f"{node.name or node.op_type}.{what}"
        value = self._new_initializer(graph, make, f"{base}_bnfused")
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
        if old is not None:
            self._maybe_dead.append(old)
        return old

    def _owned_by(self, value: ir.Value, node: ir.Node) -> bool:
        """An initializer only ``node`` reads, which no caller can override."""
        if not value.is_initializer() or value.graph is not node.graph:
            return False
        if value.is_graph_input() and self.model.ir_version >= OVERRIDABLE_SINCE_IR:
            return False
        return not value.is_graph_output() and len(value.uses()) == 1

    def _new_initializer(self, graph: ir.Graph, make: MakeTensor, base: str) -> ir.Value:
        name = self._names.fresh(base)
        tensor = make(name)
        value = ir.Value(
            name=name,
            shape=ir.Shape(tensor.shape.numpy()),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        graph.register_initializer(value)
        if self.model.ir_version < OVERRIDABLE_SINCE_IR and graph is self.model.graph:
            graph.inputs.append(value)  # IR < 4: every initializer is also an input
        return value

    @staticmethod
    def _splice_out(graph: ir.Graph, bn: ir.Node, replacement: ir.Value) -> None:
        """Remove ``bn``; ``replacement`` takes over its output's name, type and uses."""
        out = bn.outputs[0]
        name, type_, shape = out.name, out.type, out.shape
        out.replace_all_uses_with(replacement, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        out.name = None
        replacement.name = name
        if type_ is not None:
            replacement.type = type_
        if shape is not None:
            replacement.shape = shape

    def _drop_if_dead(self, value: ir.Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        if value.is_initializer():
            graph = value.graph
            assert graph is not None and isinstance(graph, ir.Graph)
            if value.is_graph_input():
                if self.model.ir_version >= OVERRIDABLE_SINCE_IR:
                    return  # a real input of the model: not ours to remove
                graph.inputs.remove(value)
            assert value.name is not None
            if graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
            return
        producer = value.producer()
        if producer is None or producer.graph is None:
            return
        if any(o.uses() or o.is_graph_output() for o in producer.outputs):
            return
        inputs = [v for v in producer.inputs if v is not None]
        producer.graph.remove(producer, safe=True)
        for inp in inputs:
            self._drop_if_dead(inp)
