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

Handled producers (the "site" the fold lands in):
  Conv           W [Cout, Cin/g, k...], output channel axis 0, optional bias
  ConvTranspose  W [Cin, Cout/g, k...], output channel axis 1 within each group
  Gemm           B [K, N] (transB=0) or [N, K] (transB=1); C scaled by beta
  MatMul         constant 2-D W [K, N] on a 2-D input, optionally then Add(bias)

Legality (DESIGN.md section 4), each failure a Skip with a sentence: inference
mode; constant, non-overridable parameters; the intermediate tensor used only
by the BN and not a graph output; channels matching on the right axis; a
result finite in the layer's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from bnfuse import fold
from bnfuse.errors import ModelError
from bnfuse.fold import Affine, Array, FoldError
from bnfuse.health import BNHealth, bn_health
from bnfuse.onnx import mapped
from bnfuse.onnx.constants import NotConstant, constant_array
from bnfuse.onnx.io import all_graphs
from bnfuse.result import Candidate, Skip

FLOAT_TYPES = {
    ir.DataType.FLOAT16,
    ir.DataType.FLOAT,
    ir.DataType.DOUBLE,
    ir.DataType.BFLOAT16,
}


@dataclass(frozen=True)
class Site:
    """Where a fold lands: the layer's weight, and where its bias lives."""

    layer: ir.Node  # Conv / ConvTranspose / Gemm / MatMul
    tail: ir.Node  # the node whose output the BN reads: the layer, or the bias Add
    weight: Array
    axis: int  # output-channel axis of the weight
    groups: int  # > 1 only for grouped ConvTranspose
    bias: Array | None  # float64-ready bias (Gemm: already times beta)
    bias_index: int | None  # input index of the bias on ``tail``; None: there is none yet

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.axis]) * self.groups


AFTER, BEFORE = "after", "before"  # the folded node follows the layer / precedes it


@dataclass(frozen=True)
class Plan:
    bn: ir.Node  # the node folded away: a BatchNormalization, Mul or Add
    site: Site
    affine: Affine
    dtype: np.dtype[np.generic]
    direction: str = AFTER
    peak: float | None = None  # max |folded weight|, for the health report


@dataclass(frozen=True)
class Match:
    candidate: Candidate
    plan: Plan | None = None


@dataclass(frozen=True)
class _Fail:
    skip: Skip
    reason: str


def is_batchnorm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def find(model: ir.Model) -> list[Match]:
    """Every candidate in the model, in graph order (subgraphs after their parent)."""
    matches = []
    for graph in all_graphs(model.graph):
        graph_name = graph.name or "main"
        for node in graph:
            try:
                if is_batchnorm(node):
                    matches.append(_match_bn(node, graph_name, model.ir_version))
                elif node.op_type in ("Mul", "Add") and node.domain in ("", "ai.onnx"):
                    match = _match_scale_shift(node, graph_name, model.ir_version)
                    if match is not None:
                        matches.append(match)
            except TypeError as exc:  # onnx-ir: an attribute of the wrong type
                raise ModelError(f"node '{node.name}' ({node.op_type}) is invalid: {exc}") from exc
    matches += _in_functions(model)
    return matches


def _in_functions(model: ir.Model) -> list[Match]:
    """BatchNorms inside model-local functions: reported, never folded.

    A function's weights are its inputs, bound anew at each call site, so
    there is no one constant to fold into; inlining the function first would
    make them foldable.
    """
    matches = []
    for function in model.functions.values():
        where = f"{function.domain}::{function.name}" if function.domain else function.name
        for node in function.all_nodes():
            if is_batchnorm(node):
                producer = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
                candidate = Candidate(
                    bn=_name(node),
                    graph=f"function {where}",
                    producer=producer.name if producer is not None else None,
                    producer_op=producer.op_type if producer is not None else None,
                    skip=Skip.UNSUPPORTED,
                    reason=(
                        f"it is inside the model-local function '{where}', whose weights are "
                        "bound at each call; bnfuse does not rewrite functions (inline them "
                        "first, e.g. with onnx.inliner.inline_local_functions)"
                    ),
                )
                matches.append(Match(candidate))
    return matches


def _name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name or "<unnamed>")


def _match_bn(bn: ir.Node, graph_name: str, ir_version: int) -> Match:
    match = _decide_bn(bn, graph_name, ir_version)
    health = _health(bn, match.plan, ir_version)
    return replace(match, candidate=replace(match.candidate, health=health))


def _decide_bn(bn: ir.Node, graph_name: str, ir_version: int) -> Match:
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    candidate = Candidate(
        bn=_name(bn),
        graph=graph_name,
        producer=producer.name if producer is not None else None,
        producer_op=producer.op_type if producer is not None else None,
        consumers=_consumers(bn),
    )
    result = _check(bn, producer, ir_version)
    if not isinstance(result, _Fail):
        return Match(candidate, result)
    follower = _following_conv(bn)
    if follower is not None and result.skip not in (Skip.TRAINING_MODE, Skip.STATS_OUTPUTS):
        forward = _check_before_conv(bn, follower, ir_version)
        into = replace(
            candidate, producer=follower.name, producer_op=follower.op_type, into="following"
        )
        if not isinstance(forward, _Fail):
            return Match(into, forward)
        reason = f"{result.reason}; nor can it fold into the following Conv: {forward.reason}"
        return Match(replace(candidate, skip=result.skip, reason=reason))
    return Match(replace(candidate, skip=result.skip, reason=result.reason))


def _check(bn: ir.Node, producer: ir.Node | None, ir_version: int) -> Plan | _Fail:
    mode = _check_inference_mode(bn)
    if mode is not None:
        return mode
    if producer is None:
        return _Fail(Skip.NO_LAYER, "its input is a graph input, not a layer's output")
    site = _site(producer, ir_version)
    if isinstance(site, _Fail):
        return site
    if site.layer.graph is not bn.graph or site.tail.graph is not bn.graph:
        return _Fail(
            Skip.UNSUPPORTED,
            f"{site.layer.op_type} '{site.layer.name}' is in an enclosing graph, outside the "
            "subgraph that holds the BatchNorm",
        )
    chain = (
        [(site.tail, bn)] if site.layer is site.tail else [(site.layer, site.tail), (site.tail, bn)]
    )
    for node, consumer in chain:
        alone = _check_single_use(node, consumer)
        if alone is not None:
            return alone
    affine = _bn_affine(bn, ir_version)
    if isinstance(affine, _Fail):
        return affine
    if affine.channels != site.channels:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the BatchNorm has {affine.channels} channels but {site.layer.op_type} "
            f"'{site.layer.name}' has {site.channels} output channels",
        )
    return _check_fits(bn, site, affine)


def _bn_params(bn: ir.Node, ir_version: int) -> tuple[list[Array], float] | _Fail:
    """(scale, bias, mean, var) as constants, and epsilon."""
    params = []
    for index, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        value = bn.inputs[index] if index < len(bn.inputs) else None
        if value is None:
            return _Fail(Skip.BAD_PARAMETERS, f"the BatchNorm has no {what} input")
        array = constant_array(value, ir_version)
        if isinstance(array, NotConstant):
            return _not_constant(f"BatchNorm {what}", array)
        if not fold.is_float(array):
            dtype = value.dtype or ir.DataType.from_numpy(array.dtype)
            return _Fail(
                Skip.BAD_PARAMETERS,
                f"the BatchNorm {what} '{value.name}' is a {dtype} tensor; BatchNorm parameters "
                "are floating point",
            )
        params.append(array)
    return params, bn.attributes.get_float("epsilon", 1e-5)


def _bn_affine(bn: ir.Node, ir_version: int) -> Affine | _Fail:
    params = _bn_params(bn, ir_version)
    if isinstance(params, _Fail):
        return params
    (gamma, beta, mean, var), eps = params
    try:
        return fold.bn_affine(gamma, beta, mean, var, eps)
    except FoldError as exc:
        return _Fail(Skip.BAD_PARAMETERS, str(exc))


def _health(bn: ir.Node, plan: Plan | None, ir_version: int) -> BNHealth | None:
    """Parameter health, with the folded weight's peak where the layer is known."""
    params = _bn_params(bn, ir_version)
    if isinstance(params, _Fail):
        return None
    (gamma, beta, mean, var), eps = params
    peak, dtype = None, None
    if plan is not None:
        peak, dtype = plan.peak, plan.dtype
    else:  # skipped: the peak it would have had, where the layer before it is known
        producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        site = _site(producer, ir_version) if producer is not None else None
        if isinstance(site, Site):
            try:
                affine = fold.bn_affine(gamma, beta, mean, var, eps)
                if affine.channels == site.channels:
                    dtype = _dtype_of(site.layer, site.weight).numpy()
                    peaks = fold.max_abs_per_channel(site.weight, site.axis, site.groups)
                    mapped.release(site.weight)
                    peak = float((peaks * np.abs(affine.scale)).max())
            except (FoldError, ValueError, TypeError):
                peak = None
    try:
        return bn_health(gamma, beta, mean, var, eps, folded_weight_peak=peak, dtype=dtype)
    except ValueError:  # parameters of different lengths: the skip reason says so
        return None


def _consumers(node: ir.Node) -> tuple[str, ...]:
    return tuple(u.node.name or u.node.op_type for u in node.outputs[0].uses())


# --- BatchNorm -> following Conv ----------------------------------------------------


def _following_conv(bn: ir.Node) -> ir.Node | None:
    out = bn.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    user = uses[0].node
    if user.op_type != "Conv" or user.domain not in ("", "ai.onnx") or uses[0].idx != 0:
        return None
    return user


def _check_before_conv(bn: ir.Node, conv: ir.Node, ir_version: int) -> Plan | _Fail:
    if conv.graph is not bn.graph:
        return _Fail(Skip.UNSUPPORTED, "the Conv is in another graph")
    params = _weight_and_bias(conv, ("weight", "bias"), ir_version)
    if isinstance(params, _Fail):
        return params
    weight, bias = params
    padding = _padding_problem(conv, weight)
    if padding is not None:
        return _Fail(Skip.UNSUPPORTED, padding)
    affine = _bn_affine(bn, ir_version)
    if isinstance(affine, _Fail):
        return affine
    groups = conv.attributes.get_int("group", 1)
    if weight.shape[1] * groups != affine.channels:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"Conv '{conv.name}' reads {weight.shape[1] * groups} channels, the BatchNorm has "
            f"{affine.channels}",
        )
    dtype_enum = _dtype_of(conv, weight)
    if dtype_enum not in FLOAT_TYPES:
        return _Fail(Skip.UNSUPPORTED, f"Conv '{conv.name}' has {dtype_enum} weights")
    dtype = dtype_enum.numpy()
    w = fold.round_to(fold.fold_weight_into_following(weight, affine.scale, groups), dtype)
    b = fold.round_to(fold.fold_bias_into_following(weight, bias, affine.shift, groups), dtype)
    mapped.release(weight)
    if not (
        np.all(np.isfinite(w.astype(np.float64))) and np.all(np.isfinite(b.astype(np.float64)))
    ):
        return _Fail(Skip.NOT_FINITE, f"the folded values are beyond the range of {dtype_enum}")
    site = Site(conv, conv, weight, axis=1, groups=groups, bias=bias, bias_index=2)
    peak = float(np.abs(w.astype(np.float64)).max(initial=0.0))
    return Plan(bn=bn, site=site, affine=affine, dtype=dtype, direction=BEFORE, peak=peak)


def _padding_problem(conv: ir.Node, weight: Array) -> str | None:
    """Why padding makes the fold inexact, or None when the conv reads no padding."""
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    kernel = weight.shape[2:]
    if auto_pad == "VALID":
        return None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if all(k == 1 for k in kernel):
            return None  # a 1x1 kernel never needs padding
        return (
            f"Conv '{conv.name}' pads its input ({auto_pad}); the padding would read 0 where "
            "the BatchNorm's shift should be"
        )
    pads = list(conv.attributes.get_ints("pads", []) or [])
    if any(p != 0 for p in pads):
        return (
            f"Conv '{conv.name}' pads its input (pads={pads}); the padding would read 0 where "
            "the BatchNorm's shift should be"
        )
    return None


# --- Conv / ConvTranspose / Gemm -> Mul or Add by a constant -----------------------

_SCALE_SHIFT_LAYERS = ("Conv", "ConvTranspose", "Gemm")


def _match_scale_shift(node: ir.Node, graph_name: str, ir_version: int) -> Match | None:
    """A Mul/Add right after a layer; None when it is no candidate (e.g. a residual Add)."""
    for layer_index in (0, 1):
        x = node.inputs[layer_index] if layer_index < len(node.inputs) else None
        layer = x.producer() if x is not None else None
        if (
            layer is not None
            and layer.op_type in _SCALE_SHIFT_LAYERS
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
        bn=_name(node),
        graph=graph_name,
        producer=layer.name,
        producer_op=layer.op_type,
        op=node.op_type,
    )
    result = _check_scale_shift(node, layer, const, ir_version)
    if isinstance(result, _Fail):
        return Match(replace(candidate, skip=result.skip, reason=result.reason))
    return Match(candidate, result)


def _check_scale_shift(
    node: ir.Node, layer: ir.Node, const: Array | NotConstant, ir_version: int
) -> Plan | _Fail:
    if isinstance(const, NotConstant):
        return _Fail(
            Skip.NOT_CONSTANT,
            f"the other factor of {node.op_type} '{node.name}' is computed at run time: {const.reason}",
        )
    site = _site(layer, ir_version)
    if isinstance(site, _Fail):
        return site
    if layer.graph is not node.graph:
        return _Fail(Skip.UNSUPPORTED, f"{layer.op_type} '{layer.name}' is in another graph")
    alone = _check_single_use(layer, node)
    if alone is not None:
        return alone
    rank = 2 if layer.op_type == "Gemm" else site.weight.ndim
    vector = _channel_vector(const, rank, site.channels, node)
    if isinstance(vector, _Fail):
        return vector
    try:
        affine = fold.channel_affine([(node.op_type.lower(), vector)], site.channels)
    except FoldError as exc:
        return _Fail(Skip.BAD_PARAMETERS, str(exc))
    return _check_fits(node, site, affine)


def _channel_vector(const: Array, rank: int, channels: int, node: ir.Node) -> Array | _Fail:
    """The constant as one value per output channel, if it broadcasts along channels only."""
    shape = tuple(const.shape)
    if len(shape) > rank:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the constant of {node.op_type} '{node.name}' has shape {list(shape)}, which would "
            f"change the rank of the {rank}-D output",
        )
    aligned = (1,) * (rank - len(shape)) + shape  # numpy/ONNX broadcasting aligns on the right
    others = [i for i, d in enumerate(aligned) if d != 1 and i != 1]
    if others or aligned[1] not in (1, channels):
        axes = ", ".join(str(i) for i in others) or "1"
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the constant of {node.op_type} '{node.name}' has shape {list(shape)}; on the "
            f"{rank}-D output it broadcasts along axis {axes}, not only along the channel axis 1 "
            f"(use shape [{channels}, 1, ...] or [1, {channels}, 1, ...])",
        )
    return const.reshape(-1) if aligned[1] == channels else const.reshape(-1)[:1]


def _check_inference_mode(bn: ir.Node) -> _Fail | None:
    if bn.attributes.get_int("training_mode", 0) != 0 or bn.attributes.get_int("is_test", 1) == 0:
        return _Fail(
            Skip.TRAINING_MODE,
            "training_mode=1 (or is_test=0): it normalises with the batch's own statistics, "
            "which change with every input",
        )
    for extra in bn.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            return _Fail(
                Skip.STATS_OUTPUTS,
                f"its statistics output '{extra.name}' is used, so it runs as in training",
            )
    if bn.attributes.get_int("spatial", 1) != 1:
        return _Fail(
            Skip.UNSUPPORTED, "spatial=0 (per-element statistics, opset 7/8) is not folded"
        )
    return None


def _check_single_use(node: ir.Node, consumer: ir.Node) -> _Fail | None:
    out = node.outputs[0]
    if out.is_graph_output():
        return _Fail(
            Skip.GRAPH_OUTPUT,
            f"the output '{out.name}' of {node.op_type} '{node.name}' is also a graph output, "
            "and folding would change it",
        )
    uses = out.uses()
    if len(uses) != 1:
        others = sorted({u.node.name or u.node.op_type for u in uses if u.node is not consumer})
        return _Fail(
            Skip.OTHER_CONSUMERS,
            f"the output '{out.name}' of {node.op_type} '{node.name}' is also read by "
            f"{len(uses) - 1} other node(s) ({', '.join(others)}), which need the unfolded values",
        )
    return None


def _check_fits(bn: ir.Node, site: Site, affine: Affine) -> Plan | _Fail:
    dtype_enum = _dtype_of(site.layer, site.weight)
    if dtype_enum not in FLOAT_TYPES:
        return _Fail(
            Skip.UNSUPPORTED,
            f"{site.layer.op_type} '{site.layer.name}' has {dtype_enum} weights; "
            "only floating-point layers are folded",
        )
    dtype = dtype_enum.numpy()
    try:
        peak = fold.check_fits(
            site.weight, site.bias, affine, site.axis, site.groups, dtype, str(dtype_enum)
        )
    except FoldError as exc:
        return _Fail(Skip.NOT_FINITE, str(exc))
    finally:
        mapped.release(site.weight)  # read once for its peak; folded when written
    return Plan(bn=bn, site=site, affine=affine, dtype=dtype, peak=peak)


def _dtype_of(layer: ir.Node, weight: Array) -> ir.DataType:
    value = layer.inputs[1]
    if value is not None and value.dtype is not None:
        return value.dtype
    return ir.DataType.from_numpy(weight.dtype)


def _not_constant(what: str, why: NotConstant) -> _Fail:
    skip = Skip.OVERRIDABLE if why.overridable else Skip.NOT_CONSTANT
    return _Fail(skip, f"{what}: {why.reason}")


def _const_input(node: ir.Node, index: int, what: str, ir_version: int) -> Array | _Fail | None:
    """The constant at ``node.inputs[index]``; None if the input is absent."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    array = constant_array(value, ir_version)
    if isinstance(array, NotConstant):
        return _not_constant(f"{node.op_type} '{node.name}' {what}", array)
    return array


def _site(producer: ir.Node, ir_version: int) -> Site | _Fail:
    if producer.domain not in ("", "ai.onnx"):
        return _Fail(Skip.NO_LAYER, f"its input comes from {producer.domain}.{producer.op_type}")
    if producer.op_type in ("Conv", "ConvTranspose"):
        return _conv_site(producer, ir_version)
    if producer.op_type == "Gemm":
        return _gemm_site(producer, ir_version)
    if producer.op_type == "MatMul":
        return _matmul_site(producer, producer, None, None, ir_version)
    if producer.op_type == "Add":
        return _matmul_add_site(producer, ir_version)
    return _Fail(
        Skip.NO_LAYER,
        f"its input comes from {producer.op_type} '{producer.name}', which has no weight "
        "to fold into",
    )


def _required_const(node: ir.Node, index: int, what: str, ir_version: int) -> Array | _Fail:
    array = _const_input(node, index, what, ir_version)
    if array is None:
        return _Fail(Skip.NOT_CONSTANT, f"{node.op_type} '{node.name}' has no {what}")
    return array


def _weight_and_bias(
    node: ir.Node, names: tuple[str, str], ir_version: int
) -> tuple[Array, Array | None] | _Fail:
    """The layer's constant weight (input 1) and optional constant bias (input 2)."""
    weight = _required_const(node, 1, names[0], ir_version)
    if isinstance(weight, _Fail):
        return weight
    bias = _const_input(node, 2, names[1], ir_version)
    if isinstance(bias, _Fail):
        return bias
    return weight, bias


def _conv_site(node: ir.Node, ir_version: int) -> Site | _Fail:
    params = _weight_and_bias(node, ("weight", "bias"), ir_version)
    if isinstance(params, _Fail):
        return params
    weight, bias = params
    if weight.ndim < 3:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"{node.op_type} '{node.name}' weight has shape {list(weight.shape)}",
        )
    groups_t = node.attributes.get_int("group", 1) if node.op_type == "ConvTranspose" else 1
    cout = weight.shape[0] if node.op_type == "Conv" else weight.shape[1] * groups_t
    if bias is not None and bias.shape != (cout,):
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"{node.op_type} '{node.name}' bias has shape {list(bias.shape)}, expected [{cout}]",
        )
    if node.op_type == "Conv":
        return Site(node, node, weight, axis=0, groups=1, bias=bias, bias_index=2)
    groups = node.attributes.get_int("group", 1)
    if groups < 1 or weight.shape[0] % groups:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"ConvTranspose '{node.name}' has group={groups}, which does not divide "
            f"its {weight.shape[0]} input channels",
        )
    return Site(node, node, weight, axis=1, groups=groups, bias=bias, bias_index=2)


def _gemm_site(node: ir.Node, ir_version: int) -> Site | _Fail:
    params = _weight_and_bias(node, ("B", "C"), ir_version)
    if isinstance(params, _Fail):
        return params
    weight, c = params
    if weight.ndim != 2:
        return _Fail(Skip.SHAPE_MISMATCH, f"Gemm '{node.name}' B has shape {list(weight.shape)}")
    axis = 0 if node.attributes.get_int("transB", 0) else 1
    bias = None
    if c is not None:
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, weight.shape[axis])):
            return _Fail(Skip.SHAPE_MISMATCH, f"Gemm '{node.name}' C has shape {list(c.shape)}")
        bias = c.astype(np.float64) * node.attributes.get_float("beta", 1.0)
    return Site(node, node, weight, axis=axis, groups=1, bias=bias, bias_index=2)


def _matmul_site(
    matmul: ir.Node,
    tail: ir.Node,
    bias: Array | None,
    bias_index: int | None,
    ir_version: int,
) -> Site | _Fail:
    weight = _required_const(matmul, 1, "weight (second input)", ir_version)
    if isinstance(weight, _Fail):
        return weight
    if weight.ndim != 2:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"MatMul '{matmul.name}' weight has shape {list(weight.shape)}, "
            "only a 2-D [K, N] weight is folded",
        )
    rank = _known_rank(matmul.inputs[0], matmul.outputs[0], tail.outputs[0])
    if rank is None:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the rank of MatMul '{matmul.name}' output is unknown; BatchNorm normalises "
            "axis 1, which is the MatMul's output channel only for 2-D inputs "
            "(run onnx shape inference first)",
        )
    if rank != 2:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"MatMul '{matmul.name}' output is {rank}-D: BatchNorm normalises axis 1, "
            "but the MatMul's output channels are on the last axis",
        )
    return Site(matmul, tail, weight, axis=1, groups=1, bias=bias, bias_index=bias_index)


def _matmul_add_site(add: ir.Node, ir_version: int) -> Site | _Fail:
    for bias_index in (1, 0):
        other = add.inputs[1 - bias_index]
        matmul = other.producer() if other is not None else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        bias = _required_const(add, bias_index, "bias", ir_version)
        if isinstance(bias, _Fail):
            return bias
        if bias.ndim > 2:
            return _Fail(
                Skip.SHAPE_MISMATCH,
                f"Add '{add.name}' bias has shape {list(bias.shape)}, which would change "
                "the output's rank",
            )
        weight_value = matmul.inputs[1]
        n = weight_value.shape[-1] if weight_value is not None and weight_value.shape else None
        if bias.ndim >= 1 and n is not None and bias.shape[-1] not in (1, n):
            return _Fail(Skip.SHAPE_MISMATCH, f"Add '{add.name}' bias has shape {list(bias.shape)}")
        return _matmul_site(matmul, add, bias, bias_index, ir_version)
    return _Fail(
        Skip.NO_LAYER,
        f"its input comes from Add '{add.name}', which is not a MatMul plus a constant bias",
    )


def _known_rank(*values: ir.Value | None) -> int | None:
    for value in values:
        if value is not None and value.shape is not None:
            return len(value.shape)
    return None
