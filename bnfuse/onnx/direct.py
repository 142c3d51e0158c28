"""The direct path: a plain model folded on its own protobuf, without onnx-ir.

Most models bnfuse meets are one flat graph in which each BatchNorm follows a
Conv or ConvTranspose, with every weight an inline initializer. For those,
building onnx-ir's graph and serialising it again costs more than everything
else in the run: on a graph of 3,000 nodes, 0.4 s to build and 0.3 s to
serialise, where protobuf parses and serialises the same file in 0.02 s. Here
the parsed ModelProto is indexed by name, each fold is decided by
bnfuse.legality as on every other path and computed by bnfuse.fold, and the
ModelProto is edited in place; the folded weights stay in their arrays and
are written from them, the rest of the model serialised piece by piece
around them (``save``). Fields this onnx does not define are dropped, as
onnx-ir drops them; the onnx package itself is never imported
(bnfuse.onnx.proto).

``fuse`` takes a model only where it is sure to do what the full path
(io.load -> match.find -> rewrite -> io.save) does:

- one file under light.LIGHT_FROM, parsed whole; no external data, no subgraph,
  no model-local function, no sparse initializer;
- every initializer held as raw data that fills its shape, none also a graph
  input; node outputs named once each, and read only after they are computed;
- every BatchNorm either folds (legality.decide) into the Conv or
  ConvTranspose right before it, or follows no layer at all (a Concat, a graph
  input: reported as skipped), its parameters initializers;
- no Mul or Add by a constant after a layer, and no Add after one at all
  besides residual ones; a Mul by a computed factor (SiLU's ``x * sigmoid(x)``)
  is reported as the full path reports it.

For anything else, a model with any fault included, it returns None and the
full path runs, and says what is wrong. What it writes is byte for byte what
the full path writes, down to onnx-ir's writer's habits (a value_info for
every initializer, opset imports with their domain spelt out);
tests/onnx/test_direct.py holds it to that on every model it takes.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bnfuse import fold, legality, outputs
from bnfuse.onnx import validate, wire
from bnfuse.onnx.light import numpy_dtype, raw_array
from bnfuse.onnx.ops import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    LAYER_OPS,
    MAX_DEPTH,
    SCALE_SHIFT_LAYERS,
    SHAPE_OPS,
    FreshNames,
    batch_statistics,
    default_opset,
    evaluates,
    is_batchnorm,
    node_name,
    op_name,
)
from bnfuse.onnx.proto import AttributeProto, ModelProto, TensorProto, ValueInfoProto, knows_opset
from bnfuse.result import Candidate, Skip

T = TypeVar("T")

_LAYERS = ("Conv", "ConvTranspose")
_ALL_INPUTS = ("Add", "Sub", "Mul", "Div", "Concat")  # evaluators that need every input
_RANK_HINT = "run onnx shape inference first"
# BatchNorm attributes and the values that keep it an inference BatchNorm.
_BN_PLAIN = {"training_mode": 0, "is_test": 1, "spatial": 1}


class _NotDirect(Exception):
    """The model needs the full path."""


@dataclass
class Fused:
    """The fused ModelProto and what the full path would report of it.

    The folded weights are not in the message: ``weights`` holds them by initializer
    name, each written from its array by ``save`` (copying them into the message, then
    serialising it whole, took longer than the fold itself on a 24 MB model).
    """

    proto: Any  # ModelProto
    candidates: list[Candidate]
    ops_before: Counter[str]
    ops_after: Counter[str]
    weights: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)


def fuse(path: Path, size_limit: int, *, rewrite: bool = True) -> Fused | None:
    """The model at ``path`` folded (``rewrite=False``: only what would fold, as for a
    dry run), or None where the full path must do it."""
    try:
        if path.suffix.lower() != ".onnx" or path.stat().st_size >= size_limit:
            return None
        proto = ModelProto.FromString(path.read_bytes())
        proto.DiscardUnknownFields()  # fields this onnx does not define: onnx-ir drops them too
        return _Direct(proto, path).fuse(rewrite)
    except _NotDirect:
        return None
    except MemoryError:
        raise
    except Exception:  # protobuf's DecodeError, a fault in the model: the full path says it
        return None


def save(fused: Fused, output: Path, *, force: bool = False) -> list[Path]:
    """Write the fused model by bnfuse.outputs' rules (staged, then published whole).

    Once only: the message gives up its initializers on the way (_serialized).
    """

    def write(tmpdir: Path) -> outputs.Staged:
        staged = tmpdir / output.name
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            for piece in _serialized(fused):
                outputs.write_all(fd, piece)
        finally:
            os.close(fd)
        return [(staged, output)]

    outputs.write_file(output, write, force=force)
    return [output]


def _serialized(fused: Fused) -> list[bytes | memoryview]:
    """The model's bytes as ``SerializeToString`` lays them out, in pieces.

    Each initializer is serialised on its own, a folded weight from its array:
    its message holds name, dims and type (fields 8, 1, 2), and its raw_data
    (field 9) comes last. wire.around_initializers puts the graph and the model
    around them (and takes them out of the message), as for the full path's
    inline writer (bnfuse.onnx.io._write_inline).
    """
    proto = fused.proto
    pieces: list[bytes | memoryview] = []
    for tensor in proto.graph.initializer:
        head = tensor.SerializeToString()
        array = fused.weights.get(tensor.name)
        if array is None:
            pieces += [wire.len_prefix(5, len(head)), head]
            continue
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data  # little-endian
        raw = wire.len_prefix(9, len(data))
        pieces += [wire.len_prefix(5, len(head) + len(raw) + len(data)), head, raw, data]
    return wire.around_initializers(proto, pieces, len)


@dataclass
class _Plan:
    bn: Any  # onnx.NodeProto
    layer: Any
    facts: legality.Layer
    decided: legality.Fold
    layer_output: str  # the layer's own output name, before it takes the BatchNorm's


@dataclass
class _Direct:
    proto: Any
    path: Path
    inits: dict[str, Any] = field(default_factory=dict)  # name -> TensorProto, in order
    producer: dict[str, Any] = field(default_factory=dict)
    readers: dict[str, list[Any]] = field(default_factory=dict)  # one entry per input slot
    outputs: set[str] = field(default_factory=set)
    arrays: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    weights: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)  # folded, by name
    opset: int | None = None  # of the default domain (set by _check)

    def fuse(self, rewrite: bool = True) -> Fused:
        self._index()
        self._check()
        graph = self.proto.graph
        name = graph.name or "main"
        ops_before = Counter(op_name(n) for n in graph.node)
        plans, folded = [], []
        for node in graph.node:  # match.find's first round: every BatchNorm after a layer folds
            if is_batchnorm(node) and self._after_layer(node, self.producer):
                plan, candidate = self._batchnorm(node, name)
                plans.append(plan)
                folded.append(candidate)
        skipped = self._second_round(plans, name)
        if rewrite:
            self._rewrite(plans)
        ops_after = ops_before - Counter({"BatchNormalization": len(plans)})
        return Fused(self.proto, folded + skipped, ops_before, ops_after, self.weights)

    def _after_layer(self, bn: Any, producer: dict[str, Any]) -> bool:
        """True for a BatchNorm right after a Conv/ConvTranspose; False for one after no
        layer at all (a Concat, a Relu, a graph input); anything else is the full path's."""
        _require(len(bn.input) >= 1 and bool(bn.input[0]))
        node = producer.get(bn.input[0])
        if node is None:
            return False
        _require(node.domain in DEFAULT_DOMAINS and node.op_type not in SHAPE_OPS)
        _require(node.op_type in _LAYERS or node.op_type not in LAYER_OPS)
        return bool(node.op_type in _LAYERS)

    # --- What the model must be -------------------------------------------------------

    def _check(self) -> None:
        model = self.proto
        graph = model.graph
        default = default_opset({o.domain: o.version for o in model.opset_import})
        _require(model.ir_version >= 4 and default is not None and knows_opset(default))
        self.opset = default
        _require(not model.functions and not model.training_info)
        validate.check_model(model, self.path)  # raises: the full path says it better
        folds_read = self._fold_inputs()
        for tensor in graph.initializer:
            _require(tensor.data_location != TensorProto.EXTERNAL)
            _require(not tensor.external_data)
            self.inits[tensor.name] = tensor
            array = _need(raw_array(tensor))  # every one must read as the full path reads it
            if tensor.name in folds_read:  # the others' copies go at once, to be reused
                self.arrays[tensor.name] = array
        _require(len(self.inits) == len(graph.initializer))
        inputs = {v.name for v in graph.input}
        _require(not inputs & self.inits.keys())  # an initializer a caller may override
        known = inputs | self.inits.keys()
        for node in graph.node:
            for attr in node.attribute:
                _require(attr.type not in (AttributeProto.GRAPH, AttributeProto.GRAPHS))
                _require(not attr.HasField("t") or not attr.t.external_data)
                _require(all(not t.external_data for t in attr.tensors))
            _require(all(i in known for i in node.input if i))
            for out in node.output:
                _require(out not in known)
                if out:
                    known.add(out)
        _require(all(v.name in known for v in graph.output) and not graph.quantization_annotation)
        infos = [v.name for v in graph.value_info]  # onnx-ir keeps those of node outputs only
        _require(len(set(infos)) == len(infos) and set(infos) <= known - inputs - self.inits.keys())

    def _fold_inputs(self) -> set[str]:
        """What a fold may read: each BatchNorm's parameters, its layer's weight and bias."""
        names: set[str] = set()
        for node in self.proto.graph.node:
            if is_batchnorm(node):
                names.update(node.input[1:])
                layer = self.producer.get(node.input[0]) if node.input else None
                if layer is not None and layer.op_type in _LAYERS:
                    names.update(layer.input[1:3])
        return names

    def _index(self) -> None:
        graph = self.proto.graph
        self.outputs = {v.name for v in graph.output}
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)

    # --- BatchNorm -> Conv / ConvTranspose ----------------------------------------------

    def _batchnorm(self, bn: Any, graph_name: str) -> tuple[_Plan, Candidate]:
        norm = self._norm(bn)
        layer = _need(self.producer.get(bn.input[0]))
        _require(layer.op_type in _LAYERS and layer.domain in DEFAULT_DOMAINS)
        out = layer.output[0]
        _require(self.readers.get(out) == [bn])  # read by the BatchNorm alone, not even a Shape
        facts = self._layer(layer)
        use = legality.Use(
            value=f"the output '{out}' of {layer.op_type} '{node_name(layer)}'",
            graph_output=out in self.outputs,
        )
        decided = legality.decide(norm, facts, [use])
        if not isinstance(decided, legality.Fold):
            raise _NotDirect  # a skip: the full path words it (and tries the following Conv)
        candidate = Candidate(
            node=node_name(bn),
            graph=graph_name,
            layer=node_name(layer),
            layer_op=layer.op_type,
            consumers=tuple(r.name or r.op_type for r in self.readers.get(bn.output[0], [])),
            health=legality.health(norm, facts, decided),
        )
        return _Plan(bn, layer, facts, decided, out), candidate

    def _norm(self, bn: Any) -> legality.Norm:
        """An inference BatchNorm's facts, its parameters initializers (as match._norm)."""
        _require(len(bn.input) == 5 and all(bn.input))
        eps = 1e-5
        for attr in bn.attribute:
            if attr.name == "epsilon":
                _require(attr.type == AttributeProto.FLOAT)
                eps = attr.f
            elif attr.name in _BN_PLAIN:
                _require(attr.type == AttributeProto.INT and attr.i == _BN_PLAIN[attr.name])
            else:
                _require(attr.name in ("momentum", "consumed_inputs"))
        _require(all(not self.readers.get(o) and o not in self.outputs for o in bn.output[1:]))
        # the attributes above are the inference values where set; the opset decides the rest
        is_test = 1 if any(a.name == "is_test" for a in bn.attribute) else None
        outputs = sum(1 for o in bn.output if o)
        mode = batch_statistics(self.opset, training_mode=0, is_test=is_test, outputs=outputs)
        _require(mode is None)
        gamma, beta, mean, var = (_need(self.arrays.get(name)) for name in bn.input[1:])
        _require(all(fold.is_float(p) for p in (gamma, beta, mean, var)))
        return legality.Norm(params=legality.Params(gamma, beta, mean, var, eps))

    def _layer(self, layer: Any) -> legality.Layer:
        """A Conv's or ConvTranspose's facts, its weight and bias initializers (as
        match._conv_site and match._layer)."""
        _require(len(layer.input) >= 2)
        weight = _need(self.arrays.get(layer.input[1]))
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        bias = _need(self.arrays.get(layer.input[2])) if has_bias else None
        _require(weight.ndim >= 3)
        groups = _int_attr(layer, "group", 1) if layer.op_type == "ConvTranspose" else 1
        _require(groups >= 1 and weight.shape[0] % groups == 0)
        cout = weight.shape[0] if layer.op_type == "Conv" else weight.shape[1] * groups
        _require(bias is None or bias.shape == (cout,))
        data_type = self.inits[layer.input[1]].data_type
        return legality.Layer(
            label=f"{layer.op_type} '{node_name(layer)}'",
            weight=weight,
            bias=bias,
            axis=0 if layer.op_type == "Conv" else 1,
            groups=groups,
            rank_hint=_RANK_HINT,
            dtype=numpy_dtype(data_type) if data_type in FLOAT_TYPES else None,
            dtype_name=TensorProto.DataType.Name(data_type),
        )

    # --- Mul / Add after a layer, once the BatchNorms are gone -------------------------

    def _second_round(self, plans: list[_Plan], graph_name: str) -> list[Candidate]:
        """What match.find reports of the folded graph, in its order: each BatchNorm left
        (after no layer) and each Mul by a factor computed at run time, skipped."""
        producer = dict(self.producer)
        for plan in plans:
            producer[plan.bn.output[0]] = plan.layer
        folded = {id(plan.bn) for plan in plans}
        skipped = []
        for node in self.proto.graph.node:
            if id(node) in folded or node.domain not in DEFAULT_DOMAINS:
                continue
            if is_batchnorm(node):
                _require(not self._after_layer(node, producer))  # it would fold in round two
                skipped.append(self._no_layer(node, producer, graph_name))
            elif node.op_type in ("Mul", "Add"):
                candidate = self._scale_shift(node, producer, graph_name)
                if candidate is not None:
                    skipped.append(candidate)
        return skipped

    def _no_layer(self, bn: Any, producer: dict[str, Any], graph_name: str) -> Candidate:
        """A BatchNorm after no layer, reported as match._match_bn reports it."""
        norm = self._norm(bn)
        readers = self.readers.get(bn.output[0], [])
        following = (
            len(readers) == 1
            and readers[0].op_type == "Conv"
            and readers[0].domain in DEFAULT_DOMAINS
        )
        _require(not following)  # the following Conv is the full path's
        source = producer.get(bn.input[0])
        refusal = (
            legality.Refusal(Skip.NO_LAYER, "its input is a graph input, not a layer's output")
            if source is None
            else legality.no_layer(f"{source.op_type} '{node_name(source)}'")
        )
        decided = legality.decide(norm, refusal, ())
        _require(decided == refusal)
        return Candidate(
            node=node_name(bn),
            graph=graph_name,
            layer=node_name(source) if source is not None else None,
            layer_op=source.op_type if source is not None else None,
            consumers=tuple(r.name or r.op_type for r in readers),
            skip=refusal.skip,
            reason=refusal.reason,
            health=legality.health(norm, refusal, decided),
        )

    def _scale_shift(
        self, node: Any, producer: dict[str, Any], graph_name: str
    ) -> Candidate | None:
        """A Mul or Add after a layer, as match._match_scale_shift finds it: None for a
        residual Add, a skip for a Mul by a computed factor; the rest is the full path's."""
        layer, other = _layer_operand(node, producer)
        if layer is None:
            return None
        _require(len(node.input) == 2 and all(node.input))
        if node.op_type == "Add":
            _require(self._surely_computed(other, producer, 0, {}))
            return None  # Add(layer, something computed): a residual connection
        why = self._computed(other, producer)
        label = f"{node.op_type} '{node_name(node)}'"
        return Candidate(
            node=node_name(node),
            graph=graph_name,
            layer=node_name(layer),
            layer_op=layer.op_type,
            op=node.op_type,
            skip=Skip.NOT_CONSTANT,
            reason=f"the other factor of {label} is computed at run time: {why}",
        )

    def _computed(self, name: str, producer: dict[str, Any]) -> str:
        """Why ``name`` is no constant, in constants.constant_array's words; a value that
        may be a constant is for the full path to evaluate."""
        if name not in producer:
            _require(name in {v.name for v in self.proto.graph.input})
            return f"'{name}' is a graph input, not a constant"
        node = producer[name]
        _require(not evaluates(node))
        return f"'{name}' is computed by {op_name(node)} '{node_name(node)}', not a constant"

    def _surely_computed(
        self, name: str, producer: dict[str, Any], depth: int, memo: dict[str, bool]
    ) -> bool:
        """Whether constants.constant_array would find ``name`` no constant, whatever the
        shapes; False where it might be one (the full path then evaluates it)."""
        if name in self.inits:
            return False
        node = producer.get(name)
        if node is None or not evaluates(node) or depth >= MAX_DEPTH or name != node.output[0]:
            return True  # a graph input, a computed value, or one constant_array gives up on
        if name not in memo:
            memo[name] = False  # Shape, Constant: perhaps constants
            if node.op_type in _ALL_INPUTS:
                reads = [i for i in node.input if i]
            elif node.op_type not in ("Shape", "Constant") and node.input and node.input[0]:
                reads = [node.input[0]]  # the data: required by every other evaluator
            else:
                reads = []
            memo[name] = any(self._surely_computed(i, producer, depth + 1, memo) for i in reads)
        return memo[name]

    # --- The rewrite, as bnfuse.onnx.rewrite.FoldBatchNorms does it ---------------------

    def _rewrite(self, plans: list[_Plan]) -> None:
        graph = self.proto.graph
        names = _names(graph)
        uses: Counter[str] = Counter(i for n in graph.node for i in n.input if i)
        maybe_dead: list[str] = []

        def set_input(node: Any, index: int, array: Any, data_type: int, what: str) -> str | None:
            """As FoldBatchNorms._set_const: an initializer only ``node`` reads is rewritten
            where it stands, under its name; otherwise a new one goes after the others."""
            old = node.input[index] if index < len(node.input) and node.input[index] else None
            if old is not None and old in self.inits and uses[old] == 1 and old not in self.outputs:
                self._fill(self.inits[old], old, array, data_type)
                return None
            base = old if old is not None else f"{node.name or node.op_type}.{what}"
            name = names.fresh(f"{base}_bnfused")
            self._fill(graph.initializer.add(), name, array, data_type)
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = name
            uses[name] += 1
            if old is not None:
                uses[old] -= 1
                maybe_dead.append(old)
            return old

        dead: set[str] = set()

        def drop_if_dead(name: str) -> None:
            if uses[name] == 0 and name not in self.outputs and name in self.inits:
                dead.add(name)

        for plan in plans:
            layer, facts, data_type = (
                plan.layer,
                plan.facts,
                self.inits[plan.layer.input[1]].data_type,
            )
            affine, dtype = plan.decided.affine, plan.decided.dtype
            bias = fold.round_to(fold.fold_bias(facts.bias, affine), dtype)
            old_bias = set_input(layer, 2, bias, data_type, "bias")
            if old_bias is not None:
                drop_if_dead(old_bias)
            weight = fold.fold_weight_rounded(
                facts.weight, affine.scale, facts.axis, facts.groups, dtype
            )
            set_input(layer, 1, weight, data_type, "weight")
            for name in plan.bn.input:
                uses[name] -= 1
            maybe_dead.extend(plan.bn.input[1:])
            layer.output[0] = plan.bn.output[0]  # the layer takes over the BatchNorm's output
        for name in maybe_dead:
            drop_if_dead(name)
        _delete(graph.initializer, lambda t: t.name in dead)
        folded = {id(plan.bn) for plan in plans}
        _delete(graph.node, lambda n: id(n) in folded)
        infos = self._infos(plans)
        inputs = {v.name for v in graph.input}
        value_info = [_init_info(t) for t in graph.initializer if t.name not in inputs]
        for node in graph.node:
            value_info += [_copy(infos[o]) for o in node.output if o in infos]
        del graph.value_info[:]
        graph.value_info.extend(value_info)
        _as_onnx_ir_writes(self.proto)

    def _fill(self, tensor: Any, name: str, array: np.ndarray[Any, Any], data_type: int) -> None:
        """``tensor`` as onnx-ir writes an in-memory tensor: a name, dims, the element type and
        the raw little-endian bytes, nothing else (a rewritten initializer keeps no old
        field). The bytes stay in ``array`` until saved (_serialized)."""
        tensor.Clear()
        tensor.name = name
        tensor.dims.extend(array.shape)
        tensor.data_type = data_type
        self.weights[name] = array

    def _infos(self, plans: list[_Plan]) -> dict[str, Any]:
        """The value_info of node outputs after the fold, as onnx-ir writes them: the
        BatchNorm's output keeps its own, which the layer's output takes over."""
        infos = {v.name: v for v in self.proto.graph.value_info}
        for plan in plans:
            layer = infos.pop(plan.layer_output, None)
            if layer is not None:  # onnx-ir would merge the two: only the BN's counts here
                mine = infos.get(plan.bn.output[0])
                _require(mine is not None and _complete(mine) and _plain(layer) and _plain(mine))
        return {name: info for name, info in infos.items() if name not in self.outputs}


def _delete(repeated: Any, doomed: Any) -> None:
    """Remove the items ``doomed`` picks from a repeated field, keeping the others' order."""
    for index in reversed([i for i, item in enumerate(repeated) if doomed(item)]):
        del repeated[index]


def _names(graph: Any) -> FreshNames:
    """rewrite._names on the ModelProto: new names that clash with nothing in it."""
    taken = {v.name for v in graph.input if v.name} | {t.name for t in graph.initializer}
    for node in graph.node:
        if node.name:
            taken.add(node.name)
        taken.update(o for o in node.output if o)
    return FreshNames(taken)


def _require(condition: bool) -> None:
    if not condition:
        raise _NotDirect


def _need(value: T | None) -> T:
    if value is None:
        raise _NotDirect
    return value


def _int_attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            _require(attr.type == AttributeProto.INT)
            return int(attr.i)
    return default


def _layer_operand(node: Any, producer: dict[str, Any]) -> tuple[Any, str]:
    """The layer an operand of ``node`` comes from, and the other operand's name."""
    for index in (0, 1):
        name = node.input[index] if index < len(node.input) else ""
        layer = producer.get(name) if name else None
        if (
            layer is not None
            and layer.op_type in SCALE_SHIFT_LAYERS
            and layer.domain in DEFAULT_DOMAINS
        ):
            other = node.input[1 - index] if len(node.input) > 1 - index else ""
            return layer, other
    return None, ""


def _init_info(tensor: TensorProto) -> Any:
    """The value_info onnx-ir writes for an initializer: its type and shape."""
    info = ValueInfoProto(name=tensor.name)
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = tensor.data_type
    tensor_type.shape.SetInParent()  # a scalar has a shape, with no dims
    for dim in tensor.dims:
        tensor_type.shape.dim.add().dim_value = dim
    return info


def _complete(info: Any) -> bool:
    """A tensor type with an element type and a shape (what replaces the layer's own)."""
    return bool(
        info.type.HasField("tensor_type")
        and info.type.tensor_type.elem_type
        and info.type.tensor_type.HasField("shape")
    )


def _plain(info: Any) -> bool:
    return not info.doc_string and not info.metadata_props


def _copy(message: Any) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _as_onnx_ir_writes(model: Any) -> None:
    """The fields onnx-ir's writer sets differently from what it read: opset imports
    with their domain spelt out, once each; empty strings (the model's, the graph's and
    each node's) and versions left out."""
    opsets = {o.domain: o.version for o in model.opset_import}
    del model.opset_import[:]
    for domain, version in opsets.items():
        model.opset_import.add(domain=domain, version=version)
    for message, fields in (
        (model, ("producer_name", "producer_version", "domain", "model_version", "doc_string")),
        (model.graph, ("name", "doc_string")),
    ):
        for name in fields:
            if message.HasField(name) and not getattr(message, name):
                message.ClearField(name)
    for node in model.graph.node:  # a name set to "" (an unnamed node) is written as none
        for name in ("name", "domain", "doc_string"):
            if not getattr(node, name) and node.HasField(name):
                node.ClearField(name)
