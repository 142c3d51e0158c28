"""Find what can fold into a linear layer, and decide whether it may.

The matcher never mutates the model. It returns a Match per candidate (in the
main graph and in every If/Loop/Scan subgraph): a Candidate for the report
and, when the fold is legal, a Plan the rewrite applies. Candidates:

  BatchNormalization -> into the layer that produces its input (preferred), or
                        else into the Conv that consumes its output, where that
                        Conv reads no padding (padding would see the BN's shift)
  Mul / Add by a constant after Conv / ConvTranspose / Gemm, where the constant
                        broadcasts along the channel axis only ([C,1,1],
                        [1,C,1,1], scalars; a [C] constant on NCHW broadcasts
                        along the last axis and is refused)

The layer a fold lands in (its "site": Conv, ConvTranspose, Gemm, MatMul,
MatMul + Add) is read by bnfuse.onnx.sites; the shapes around shape-only
nodes come from bnfuse.onnx.shapes.

This module reads the facts (bnfuse.legality's Norm, Layer, Use) out of the
graph; bnfuse.legality decides, with the same rules and sentences as the
PyTorch paths. What only ONNX has is checked here: constants behind
Constant/Identity chains and overridable initializers, subgraph boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bnfuse import fold, legality
from bnfuse.errors import ModelError
from bnfuse.fold import Affine, Array
from bnfuse.legality import Refusal
from bnfuse.onnx import shapes, sites, validate
from bnfuse.onnx.constants import NotConstant, constant_array
from bnfuse.onnx.graph import Model, Node, Value
from bnfuse.onnx.light import numpy_dtype, type_name
from bnfuse.onnx.ops import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    LAYER_OPS,
    SCALE_SHIFT_LAYERS,
    SHAPE_OPS,
    batch_statistics,
    default_opset,
    is_batchnorm,
    node_name,
)
from bnfuse.result import Candidate, Skip

AFTER, BEFORE = "after", "before"  # the folded node follows the layer / precedes it


@dataclass(frozen=True)
class Plan:
    bn: Node  # the node folded away: a BatchNormalization, Mul or Add
    site: sites.Site
    affine: Affine
    dtype: np.dtype[np.generic]
    direction: str = AFTER
    peak: float | None = None  # max |folded weight|, for the health report


@dataclass(frozen=True)
class Match:
    candidate: Candidate
    plan: Plan | None = None


def find(model: Model) -> list[Match]:
    """Every candidate in the model, in graph order (subgraphs after their parent)."""
    with shapes.inferring(model):
        return _find(model)


_CANDIDATE_OPS = ("BatchNormalization", "Mul", "Add")


def _find(model: Model) -> list[Match]:
    matches = []
    opset = default_opset(dict(model.opset_imports))
    for graph in model.graphs():
        graph_name = graph.name or "main"
        for proto in graph.proto.node:  # a Node only for a candidate: most nodes are none
            op = proto.op_type
            if op not in _CANDIDATE_OPS or proto.domain not in DEFAULT_DOMAINS:
                continue
            node = graph.node(proto)
            try:
                if op == "BatchNormalization":
                    matches.append(_match_bn(node, graph_name, model.ir_version, opset))
                else:
                    match = _match_scale_shift(node, graph_name, model.ir_version)
                    if match is not None:
                        matches.append(match)
            except TypeError as exc:  # an attribute of the wrong type (graph.Attributes)
                raise ModelError(f"node '{node.name}' ({node.op_type}) is invalid: {exc}") from exc
    matches += _in_functions(model)
    return matches


def _in_functions(model: Model) -> list[Match]:
    """BatchNorms inside model-local functions: reported, never folded.

    A function's weights are its inputs, bound anew at each call site, so
    there is no one constant to fold into; inlining the function first would
    make them foldable.
    """
    matches = []
    for function in model.proto.functions:
        where = f"{function.domain}::{function.name}" if function.domain else function.name
        nodes = list(_all_nodes(function.node))
        producers = {o: n for n in nodes for o in n.output if o}
        for node in nodes:
            if is_batchnorm(node):
                producer = producers.get(node.input[0]) if node.input else None
                candidate = Candidate(
                    node=_name(node),
                    graph=f"function {where}",
                    layer=_name(producer) if producer is not None else None,
                    layer_op=producer.op_type if producer is not None else None,
                    skip=Skip.UNSUPPORTED,
                    reason=(
                        f"it is inside the model-local function '{where}', whose weights are "
                        "bound at each call; bnfuse does not rewrite functions (inline them "
                        "first, e.g. with onnx.inliner.inline_local_functions)"
                    ),
                )
                matches.append(Match(candidate))
    return matches


def _all_nodes(nodes: Any) -> Iterator[Any]:
    """NodeProtos and those of their subgraphs, depth first."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            for graph in validate.subgraphs(attr):
                yield from _all_nodes(graph.node)


_name = node_name


def _match_bn(bn: Node, graph_name: str, ir_version: int, opset: int | None) -> Match:
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    norm = _norm(bn, ir_version, opset)
    site = _site_before(bn, producer, ir_version)
    source = (
        site.tail if isinstance(site, sites.Site) and site.chain else producer
    )  # not a shape op
    layer = _layer(site, ir_version) if isinstance(site, sites.Site) else site
    decided = legality.decide(norm, layer, _uses(site, bn) if isinstance(site, sites.Site) else ())
    candidate = Candidate(
        node=_name(bn),
        graph=graph_name,
        layer=_name(source) if source is not None else None,
        layer_op=source.op_type if source is not None else None,
        consumers=_consumers(bn),
        health=legality.health(norm, layer, decided),
    )
    if isinstance(site, sites.Site):
        site.release()  # read for its peak; folded when written
    if isinstance(decided, legality.Fold):
        assert isinstance(site, sites.Site)
        return Match(candidate, _plan(bn, site, decided))
    follower = _following_conv(bn)
    if follower is not None and decided.skip not in (Skip.TRAINING_MODE, Skip.STATS_OUTPUTS):
        into = replace(
            candidate, layer=_name(follower), layer_op=follower.op_type, into="following"
        )
        forward = _following(bn, follower, ir_version)
        conv = forward if isinstance(forward, Refusal) else forward[0]
        ahead = legality.decide_following(norm, conv)
        if isinstance(forward, tuple):
            forward[1].release()
        if isinstance(ahead, legality.Fold):
            assert isinstance(forward, tuple)
            into = replace(into, health=legality.health(norm, layer, ahead))
            return Match(into, _plan(bn, forward[1], ahead, direction=BEFORE))
        reason = f"{decided.reason}; nor can it fold into the following Conv: {ahead.reason}"
        return Match(replace(candidate, skip=decided.skip, reason=reason))
    return Match(replace(candidate, skip=decided.skip, reason=decided.reason))


def _plan(node: Node, site: sites.Site, decided: legality.Fold, direction: str = AFTER) -> Plan:
    return Plan(
        bn=node, site=site, affine=decided.affine, dtype=decided.dtype, direction=direction,
        peak=decided.peak,
    )  # fmt: skip


def _norm(bn: Node, ir_version: int, opset: int | None) -> legality.Norm:
    """The facts about a BatchNormalization node."""
    training = batch_statistics(
        opset,
        training_mode=bn.attributes.get_int("training_mode", 0),
        is_test=bn.attributes.get_int("is_test", None),
        outputs=sum(1 for v in bn.outputs if v.name),
    )
    used = [v.name for v in bn.outputs[1:] if v.uses() or v.is_graph_output()]
    spatial = bn.attributes.get_int("spatial", 1) != 1
    return legality.Norm(
        params=_bn_params(bn, ir_version),
        batch_statistics=training,
        stats_output=used[0] if used else None,
        variant="spatial=0 (per-element statistics, opset 7/8)" if spatial else None,
    )


def _site_before(bn: Node, producer: Node | None, ir_version: int) -> sites.Site | Refusal:
    """The layer whose output the BatchNorm reads (through shape-only nodes, if any),
    with constant weights, in its graph."""
    if producer is None:
        return Refusal(Skip.NO_LAYER, "its input is a graph input, not a layer's output")
    chain, origin, too_far = _shape_chain(producer)
    if too_far is not None:
        return too_far
    site = sites.site(origin, ir_version)
    if isinstance(site, Refusal):
        return site
    if any(n.graph is not bn.graph for n in (site.layer, site.tail, *chain)):
        return Refusal(
            Skip.UNSUPPORTED,
            f"{site.layer.op_type} '{_name(site.layer)}' is in an enclosing graph, outside the "
            "subgraph that holds the BatchNorm",
        )
    return replace(site, chain=chain) if chain else site


def _shape_chain(
    producer: Node,
) -> tuple[tuple[Node, ...], Node, Refusal | None]:
    """Shape-only nodes back from ``producer`` to a layer (legality.chain_back)."""
    chain, origin, too_far = legality.chain_back(
        producer, _step_input, lambda n: n.op_type in LAYER_OPS
    )
    return tuple(chain), origin, too_far


def _step_input(node: Node) -> Node | None:
    """The node a shape-only node reads; None for any other node."""
    if node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    first = node.inputs[0]
    return first.producer() if first is not None else None


def _uses(site: sites.Site, folded: Node) -> list[legality.Use]:
    """The values from the layer to the folded node: the layer's output, its bias Add's,
    and each shape-only node's; each must be read by the next node only."""
    nodes = [site.layer, *([site.tail] if site.tail is not site.layer else []), *site.chain]
    return [_use(node, reader) for node, reader in zip(nodes, [*nodes[1:], folded], strict=True)]


# Readers of a value's shape only: folding changes no shape, so they are no other reader.
_SHAPE_READS = legality.METADATA_READS["onnx"]


def _use(node: Node, reader: Node) -> legality.Use:
    """``node``'s output, and who reads its values besides ``reader``."""
    out = node.outputs[0]
    others = [
        u.node
        for u in out.uses()
        if u.node is not reader
        and not (u.node.op_type in _SHAPE_READS and u.node.domain in ("", "ai.onnx"))
    ]
    return legality.Use(
        value=f"the output '{out.name}' of {node.op_type} '{_name(node)}'",
        others=tuple(r.name or r.op_type for r in others),
        graph_output=out.is_graph_output(),
    )


def _steps(site: sites.Site, ir_version: int) -> tuple[legality.Step, ...]:
    """The chain's nodes as legality steps, with the shapes around each.

    A shape the model does not record (no shape inference was run) is worked out
    here from the one before it, for the ops of the chain and the layer.
    """
    if not site.chain:
        return ()
    steps: list[legality.Step] = []
    dims = shapes.value_dims(site.tail.outputs[0]) or _layer_dims(site)
    for node in site.chain:
        label = f"{node.op_type} '{_name(node)}'"
        after = shapes.value_dims(node.outputs[0]) or shapes.shape_op_dims(node, dims, ir_version)
        if node.op_type == "Transpose":
            rank = len(dims) if dims is not None else _known_rank(node.outputs[0])
            default = list(range(rank))[::-1] if rank is not None else None
            perm = node.attributes.get_ints("perm", default)
            steps.append(legality.Permute(label, tuple(perm) if perm is not None else None))
        else:
            steps.append(legality.Reshape(label, dims, after))
        dims = after
    return tuple(steps)


def _layer_dims(site: sites.Site) -> shapes.Dims | None:
    """The output shape of a MatMul [..., K] @ [K, N] or a Gemm, from its input's."""
    x = shapes.value_dims(site.layer.inputs[0])
    if site.layer.op_type == "MatMul" and x is not None and len(x) >= 2:
        return (*x[:-1], int(site.weight.shape[-1]))
    if site.layer.op_type == "Gemm" and x is not None and len(x) == 2:
        m = x[1] if site.layer.attributes.get_int("transA", 0) else x[0]
        return (m, site.channels)
    return None


def _layer(site: sites.Site, ir_version: int) -> legality.Layer:
    """The legality facts of a site."""
    layer = site.layer
    dtype = sites.dtype_of(layer, site.weight)
    rank: int | None = None
    channel_axis: int | None = 1
    if layer.op_type == "Gemm":
        rank = 2
    elif layer.op_type == "MatMul":
        rank = _known_rank(layer.outputs[0], site.tail.outputs[0], layer.inputs[0])
        channel_axis = None if rank is None else rank - 1
    return legality.Layer(
        label=f"{layer.op_type} '{_name(layer)}'",
        weight=site.weight,
        bias=site.bias,
        axis=site.axis,
        groups=site.groups,
        channel_axis=channel_axis,
        rank=rank,
        steps=_steps(site, ir_version),
        rank_hint="run onnx shape inference first",
        dtype=numpy_dtype(dtype) if dtype in FLOAT_TYPES else None,
        dtype_name=type_name(dtype, site.weight.dtype),
    )


def _bn_params(bn: Node, ir_version: int) -> legality.Params | Refusal:
    """(scale, bias, mean, var) as constants, and epsilon."""
    params = []
    for index, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        value = bn.inputs[index] if index < len(bn.inputs) else None
        if value is None:
            return Refusal(Skip.BAD_PARAMETERS, f"the BatchNorm has no {what} input")
        array = constant_array(value, ir_version)
        if isinstance(array, NotConstant):
            return sites.not_constant(f"BatchNorm {what}", array)
        if not fold.is_float(array):
            dtype = type_name(value.dtype, array.dtype)
            return Refusal(
                Skip.BAD_PARAMETERS,
                f"the BatchNorm {what} '{value.name}' is a {dtype} tensor; BatchNorm parameters "
                "are floating point",
            )
        params.append(array)
    gamma, beta, mean, var = params
    return legality.Params(gamma, beta, mean, var, bn.attributes.get_float("epsilon", 1e-5))


def _consumers(node: Node) -> tuple[str, ...]:
    return tuple(u.node.name or u.node.op_type for u in node.outputs[0].uses())


# --- BatchNorm -> following Conv ----------------------------------------------------


def _following_conv(bn: Node) -> Node | None:
    out = bn.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    user = uses[0].node
    if user.op_type != "Conv" or user.domain not in ("", "ai.onnx") or uses[0].idx != 0:
        return None
    return user


def _following(
    bn: Node, conv: Node, ir_version: int
) -> tuple[legality.Following, sites.Site] | Refusal:
    """The facts of the Conv after ``bn``, and the site its fold would land in."""
    if conv.graph is not bn.graph:
        return Refusal(Skip.UNSUPPORTED, "the Conv is in another graph")
    params = sites.weight_and_bias(conv, ("weight", "bias"), ir_version)
    if isinstance(params, Refusal):
        return params
    weight, bias = params
    groups = conv.attributes.get_int("group", 1)
    dtype = sites.dtype_of(conv, weight)
    facts = legality.Following(
        label=f"Conv '{_name(conv)}'",
        weight=weight,
        bias=bias,
        groups=groups,
        padding=_padding(conv, weight),
        dtype=numpy_dtype(dtype) if dtype in FLOAT_TYPES else None,
        dtype_name=type_name(dtype, weight.dtype),
    )
    site = sites.Site(conv, conv, weight, 1, groups, bias, 2, sites.source(conv.inputs[1]))
    return facts, site


def _padding(conv: Node, weight: Array) -> str | None:
    """The padding the conv reads, in its attribute's words; None when it reads none."""
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return None if all(k == 1 for k in weight.shape[2:]) else auto_pad  # 1x1 never pads
    pads = list(conv.attributes.get_ints("pads", []) or [])
    return f"pads={pads}" if any(p != 0 for p in pads) else None


# --- Conv / ConvTranspose / Gemm -> Mul or Add by a constant -----------------------


def _match_scale_shift(node: Node, graph_name: str, ir_version: int) -> Match | None:
    """A Mul/Add right after a layer; None when it is no candidate (e.g. a residual Add)."""
    for layer_index in (0, 1):
        x = node.inputs[layer_index] if layer_index < len(node.inputs) else None
        layer = x.producer() if x is not None else None
        if (
            layer is not None
            and layer.op_type in SCALE_SHIFT_LAYERS
            and layer.domain in ("", "ai.onnx")
        ):
            break
    else:
        return None
    other = node.inputs[1 - layer_index]
    const = constant_array(other, ir_version) if other is not None else NotConstant("missing")
    if node.op_type == "Add" and isinstance(const, NotConstant):
        return None  # Add(layer, something computed): a residual connection, not a candidate
    candidate = Candidate(
        node=_name(node),
        graph=graph_name,
        layer=_name(layer),
        layer_op=layer.op_type,
        op=node.op_type,
    )
    label = f"{node.op_type} '{_name(node)}'"
    if isinstance(const, NotConstant):
        return Match(
            replace(
                candidate,
                skip=Skip.NOT_CONSTANT,
                reason=f"the other factor of {label} is computed at run time: {const.reason}",
            )
        )
    site = sites.site(layer, ir_version)
    if isinstance(site, sites.Site) and layer.graph is not node.graph:
        site = Refusal(Skip.UNSUPPORTED, f"{layer.op_type} '{_name(layer)}' is in another graph")
    facts = _layer(site, ir_version) if isinstance(site, sites.Site) else site
    uses = [_use(layer, node)] if isinstance(site, sites.Site) else []
    decided = legality.decide_scale_shift(node.op_type, const, facts, uses, label)
    if isinstance(site, sites.Site):
        site.release()
    if isinstance(decided, Refusal):
        return Match(replace(candidate, skip=decided.skip, reason=decided.reason))
    assert isinstance(site, sites.Site)
    return Match(candidate, _plan(node, site, decided))


def _known_rank(*values: Value | None) -> int | None:
    for value in values:
        dims = shapes.value_dims(value)
        if dims is not None:
            return len(dims)
    return None
