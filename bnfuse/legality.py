"""When a BatchNorm may fold, and why not: the rules, written once for every format.

Each format's matcher (ONNX ``onnx/match.py``, torch.fx and torch.export
``torch/fx_fuse.py``, TorchScript ``torch/script_fuse.py``) finds its
candidates and reads facts out of its own IR: the BatchNorm's mode and
parameters (``Norm``), the layer's weight and where its output channels land
(``Layer``), who else reads the values in between (``Use``). It hands them
to ``decide``, which applies the rules in one order and returns a ``Fold``
(the affine map, the dtype to round to, the folded weight's peak) or a
``Refusal`` with the sentence a user reads. Nothing here knows an IR.

The rules, in the order they are checked (DESIGN.md section 4):

1. inference mode: running statistics, not the batch's own; its statistics
   outputs unused;
2. a layer with constant weights produces the BatchNorm's input (the
   format's extractor says why not, as a Refusal);
3. the values between layer and BatchNorm are read by nothing else and are
   not a graph output;
4. the BatchNorm's channel axis (1) is the layer's output-channel axis;
5. the parameters are valid (constant, floating point, finite, var + eps > 0);
6. as many channels as the layer has outputs;
7. a floating-point layer, and a fold that stays finite in its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from bnfuse import fold
from bnfuse.fold import Affine, Array, FoldError
from bnfuse.health import BNHealth, bn_health
from bnfuse.result import Skip


@dataclass(frozen=True)
class Refusal:
    """Why a fold does not apply: the summary's category and a sentence for the user."""

    skip: Skip
    reason: str


@dataclass(frozen=True)
class Params:
    """A BatchNorm's parameters as read from the model (gamma/beta None: 1 and 0)."""

    gamma: Array | None
    beta: Array | None
    mean: Array
    var: Array
    eps: float


@dataclass(frozen=True)
class Norm:
    """The facts about one BatchNorm."""

    params: Params | Refusal  # Refusal: not constants, or not floating point
    batch_statistics: str | None = None  # why it normalises with batch statistics, if it does
    stats_output: str | None = None  # the name of a statistics output that is read
    variant: str | None = None  # a variant bnfuse does not fold, in words


@dataclass(frozen=True)
class Reshape:
    """A step between layer and BatchNorm that only regroups elements in order
    (Reshape, Flatten, Squeeze, Unsqueeze, view): the shapes around it; a dim
    None is not known, a shape None neither."""

    label: str
    before: tuple[int | None, ...] | None
    after: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Permute:
    """A step that moves axes (Transpose, permute): axis ``perm[i]`` becomes axis i."""

    label: str
    perm: tuple[int, ...] | None  # None: not known


Step = Reshape | Permute


@dataclass(frozen=True)
class Layer:
    """The facts about the layer a BatchNorm would fold into."""

    label: str  # as a user reads it: "Conv 'conv1'", "'layer1.0.conv1'"
    weight: Array
    bias: Array | None
    axis: int  # the weight's output-channel axis
    groups: int = 1  # > 1 only for a grouped ConvTranspose (axis 1)
    # The axis of the layer's output that holds its output channels; None when it is
    # not known (a Linear/MatMul output of unknown rank).
    channel_axis: int | None = 1
    rank: int | None = None  # the rank of the layer's output, where known
    steps: tuple[Step, ...] = ()  # shape-only steps from the layer's output to the BatchNorm
    rank_hint: str = ""  # how a user makes an unknown rank known
    dtype: np.dtype[Any] | None = None  # the weight's dtype; None: not floating point
    dtype_name: str = ""  # as the format names it: "FLOAT16", "torch.float16"

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.axis]) * self.groups


# Rule 3's "other readers" leave out those that read only what a fold keeps: a tensor's
# shape, rank, element count, dtype and device (timm's BatchNormAct2d asserts x.ndim;
# BatchNorm's own input check reads x.dim()). Each format spells them its own way.
METADATA_READS = {
    "onnx": frozenset({"Shape", "Size"}),
    # torch.fx: attributes read with getattr, and methods
    "fx_attributes": frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"}),
    "fx_methods": frozenset({"size", "dim", "ndimension", "numel", "nelement"}),
    "torchscript": frozenset(
        [
            "aten::dim",
            "aten::size",
            "aten::sizes",
            "prim::shape",
            "aten::len",
            "aten::numel",
            "prim::dtype",
            "prim::device",
            "prim::is_cuda",
            "prim::layout",
        ]
    ),
}


@dataclass(frozen=True)
class Use:
    """A value between the layer and the BatchNorm, and who else reads it (those that read
    only its metadata, ``METADATA_READS``, are no readers)."""

    value: str  # as a user reads it: "the output 'conv_out' of Conv 'conv1'"
    others: tuple[str, ...] = ()  # readers other than the next step of the chain
    graph_output: bool = False


@dataclass(frozen=True)
class Fold:
    """A legal fold: the BatchNorm's map, the dtype to round to, max |folded weight|."""

    affine: Affine
    dtype: np.dtype[Any]
    peak: float


BATCH_STATISTICS = "it normalises with the batch's own statistics, which change with every input"


def decide(norm: Norm, layer: Layer | Refusal, uses: Sequence[Use]) -> Fold | Refusal:
    """The fold of ``norm`` into ``layer``, or why it is not allowed (rules 1-7, in order)."""
    mode = inference_mode(norm)
    if mode is not None:
        return mode
    if isinstance(layer, Refusal):
        return layer
    alone = used_alone(uses)
    if alone is not None:
        return alone
    axis = channel_axis(layer)
    if axis is not None:
        return axis
    affine = affine_of(norm)
    if isinstance(affine, Refusal):
        return affine
    if affine.channels != layer.channels:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"the BatchNorm has {affine.channels} channels but {layer.label} has "
            f"{layer.channels} output channels",
        )
    return fits(layer, affine)


def inference_mode(norm: Norm) -> Refusal | None:
    """Rule 1: running statistics, no statistics output read, a variant bnfuse folds."""
    if norm.batch_statistics is not None:
        return Refusal(Skip.TRAINING_MODE, f"{norm.batch_statistics}: {BATCH_STATISTICS}")
    if norm.stats_output is not None:
        return Refusal(
            Skip.STATS_OUTPUTS,
            f"its statistics output '{norm.stats_output}' is used, so it runs as in training",
        )
    if norm.variant is not None:
        return Refusal(Skip.UNSUPPORTED, f"{norm.variant} is not folded")
    return None


def used_alone(uses: Sequence[Use]) -> Refusal | None:
    """Rule 3: folding changes these values, so nothing else may read them."""
    for use in uses:
        if use.graph_output:
            return Refusal(
                Skip.GRAPH_OUTPUT,
                f"{use.value} is also a graph output, and folding would change it",
            )
        if use.others:
            others = ", ".join(sorted(set(use.others)))
            return Refusal(
                Skip.OTHER_CONSUMERS,
                f"{use.value} is also read by {len(use.others)} other node(s) ({others}), "
                "which need the unfolded values",
            )
    return None


def channel_axis(layer: Layer) -> Refusal | None:
    """Rule 4: BatchNorm scales axis 1 of its input; the fold scales the layer's output
    channels. Between the two, shape-only steps may move that axis, never mix it."""
    if layer.channel_axis is None:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"the rank of the output of {layer.label} is unknown; BatchNorm normalises axis 1, "
            f"which holds the layer's output channels only for 2-D inputs ({layer.rank_hint})",
        )
    axis = follow(layer.channel_axis, layer.channels, layer.steps, layer.rank_hint)
    if isinstance(axis, str):
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"{axis}; BatchNorm normalises axis 1 of its input, which must hold the output "
            f"channels of {layer.label} and nothing else",
        )
    if axis == 1:
        return None
    if layer.steps:
        through = ", ".join(step.label for step in layer.steps)
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"after {through}, the output channels of {layer.label} are on axis {axis}: "
            "BatchNorm normalises axis 1",
        )
    rank = f" is {layer.rank}-D:" if layer.rank is not None else ":"
    return Refusal(
        Skip.SHAPE_MISMATCH,
        f"the output of {layer.label}{rank} BatchNorm normalises axis 1, but the layer's "
        f"output channels are on axis {axis}",
    )


# --- The shape-only steps between a layer and its BatchNorm, in every format ----------

MAX_CHAIN = 8  # shape-only steps followed back from a BatchNorm to its layer
_LOOK_BEYOND = 32  # how much further a layer is looked for, to say why it is not followed
N = TypeVar("N")


def chain_back(
    producer: N, step_input: Callable[[N], N | None], is_layer: Callable[[N], bool]
) -> tuple[list[N], N, Refusal | None]:
    """The shape-only steps back from the BatchNorm's ``producer`` to a layer (in graph
    order) and that layer, as every format walks them.

    ``step_input(node)`` is the node a shape-only step reads (None where ``node`` is no
    such step, or reads a graph input). Where no layer stands behind the steps there is
    no chain: ``([], producer, None)``, and the BatchNorm's own producer is judged. Where
    one stands further back than ``MAX_CHAIN`` steps, the refusal says so.
    """
    chain: list[N] = []
    origin = producer
    while len(chain) < MAX_CHAIN + _LOOK_BEYOND and (previous := step_input(origin)) is not None:
        chain.append(origin)
        origin = previous
    if not chain or not is_layer(origin):
        return [], producer, None
    if len(chain) > MAX_CHAIN:
        return (
            [],
            producer,
            Refusal(
                Skip.UNSUPPORTED,
                f"its input is {len(chain)} shape-only steps after the layer, more than the "
                f"{MAX_CHAIN} bnfuse follows",
            ),
        )
    return chain[::-1], origin, None


def follow(axis: int, channels: int, steps: Sequence[Step], hint: str = "") -> int | str:
    """The axis that holds the ``channels`` of ``axis`` after ``steps``, or why none does
    (``hint``: how a user makes an unknown shape known).

    A reshape keeps elements in row-major order, so an element's channel is
    ``(offset // inner) % channels``, ``inner`` the product of the dims after the
    channel axis. An axis of the result holds the same channels, and only them,
    when its size is ``channels`` and the dims after it multiply to the same
    ``inner`` (dims before it may be unknown: a dynamic batch).
    """
    unknown = f" ({hint})" if hint else ""
    for step in steps:
        if isinstance(step, Permute):
            if step.perm is None or axis not in step.perm:
                return f"the permutation of {step.label} is not known{unknown}"
            axis = step.perm.index(axis)
            continue
        inner = _product(step.before[axis + 1 :]) if step.before is not None else None
        if step.after is None or inner is None or step.before is None or step.before[axis] is None:
            return f"the shapes around {step.label} are not known{unknown}"
        if step.before[axis] != channels:
            return (
                f"{step.label} reads {step.before[axis]} values on the axis that should hold "
                f"the {channels} output channels"
            )
        for j, dim in enumerate(step.after):
            if dim == channels and _product(step.after[j + 1 :]) == inner:
                axis = j
                break
        else:
            return (
                f"{step.label} ({_shape(step.before)} -> {_shape(step.after)}) mixes the "
                f"{channels} output channels with other elements"
            )
    return axis


def _product(dims: tuple[int | None, ...]) -> int | None:
    return None if None in dims else math.prod(d for d in dims if d is not None)


def _shape(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def affine_of(norm: Norm) -> Affine | Refusal:
    """Rule 5: the BatchNorm's per-channel map, from valid parameters."""
    if isinstance(norm.params, Refusal):
        return norm.params
    p = norm.params
    try:
        return fold.bn_affine(p.gamma, p.beta, p.mean, p.var, p.eps)
    except FoldError as exc:
        return Refusal(Skip.BAD_PARAMETERS, str(exc))


def no_layer(source: str) -> Refusal:
    """Rule 2 where the BatchNorm's input comes from ``source``, a node that is no layer."""
    return Refusal(
        Skip.NO_LAYER, f"its input comes from {source}, which has no weight to fold into"
    )


def _not_float(label: str, dtype_name: str) -> Refusal:
    """Rule 7 for a layer whose weights are not floating point (an integer Conv)."""
    return Refusal(
        Skip.UNSUPPORTED, f"{label} has {dtype_name} weights; only floating-point layers are folded"
    )


def fits(layer: Layer, affine: Affine) -> Fold | Refusal:
    """Rule 7: a floating-point layer whose folded weight and bias stay finite."""
    if layer.dtype is None:
        return _not_float(layer.label, layer.dtype_name)
    try:
        peak = fold.check_fits(
            layer.weight, layer.bias, affine, layer.axis, layer.groups, layer.dtype,
            layer.dtype_name,
        )  # fmt: skip
    except FoldError as exc:
        return Refusal(Skip.NOT_FINITE, str(exc))
    return Fold(affine, layer.dtype, peak)


# --- A BatchNorm folded into the Conv that follows it (ONNX) -----------------------


@dataclass(frozen=True)
class Following:
    """The facts about a Conv that reads a BatchNorm's output (and only it reads it)."""

    label: str
    weight: Array  # [Cout, Cin/g, k...]
    bias: Array | None
    groups: int
    padding: str | None  # why it reads padding (which would see 0, not the shift); None: none
    dtype: np.dtype[Any] | None
    dtype_name: str


def decide_following(norm: Norm, conv: Following | Refusal) -> Fold | Refusal:
    """The fold of ``norm`` into the input channels of the Conv after it, or why not."""
    mode = inference_mode(norm)
    if mode is not None:
        return mode
    if isinstance(conv, Refusal):
        return conv
    if conv.padding is not None:
        return Refusal(
            Skip.UNSUPPORTED,
            f"{conv.label} pads its input ({conv.padding}); the padding would read 0 where "
            "the BatchNorm's shift should be",
        )
    affine = affine_of(norm)
    if isinstance(affine, Refusal):
        return affine
    reads = conv.weight.shape[1] * conv.groups
    if reads != affine.channels:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"{conv.label} reads {reads} channels, the BatchNorm has {affine.channels}",
        )
    if conv.dtype is None:
        return _not_float(conv.label, conv.dtype_name)
    w = fold.round_to(
        fold.fold_weight_into_following(conv.weight, affine.scale, conv.groups), conv.dtype
    ).astype(np.float64)
    b = fold.round_to(
        fold.fold_bias_into_following(conv.weight, conv.bias, affine.shift, conv.groups),
        conv.dtype,
    ).astype(np.float64)
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        return Refusal(
            Skip.NOT_FINITE, f"the folded values are beyond the range of {conv.dtype_name}"
        )
    return Fold(affine, conv.dtype, float(np.abs(w).max(initial=0.0)))


# --- A Mul or Add by a constant after a layer (ONNX) ---------------------------------


def channel_vector(const: Array, rank: int, channels: int, label: str) -> Array | Refusal:
    """The constant as one value per output channel, if it broadcasts along axis 1 only."""
    shape = tuple(const.shape)
    if len(shape) > rank:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"the constant of {label} has shape {list(shape)}, which would change the rank of "
            f"the {rank}-D output",
        )
    aligned = (1,) * (rank - len(shape)) + shape  # broadcasting aligns on the right
    others = [i for i, d in enumerate(aligned) if d != 1 and i != 1]
    if others or aligned[1] not in (1, channels):
        axes = ", ".join(str(i) for i in others) or "1"
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"the constant of {label} has shape {list(shape)}; on the {rank}-D output it "
            f"broadcasts along axis {axes}, not only along the channel axis 1 "
            f"(use shape [{channels}, 1, ...] or [1, {channels}, 1, ...])",
        )
    return const.reshape(-1) if aligned[1] == channels else const.reshape(-1)[:1]


def decide_scale_shift(
    op: str, const: Array, layer: Layer | Refusal, uses: Sequence[Use], label: str
) -> Fold | Refusal:
    """The fold of ``Mul``/``Add`` by ``const`` into ``layer``, or why not."""
    if isinstance(layer, Refusal):
        return layer
    alone = used_alone(uses)
    if alone is not None:
        return alone
    rank = layer.rank if layer.rank is not None else layer.weight.ndim
    vector = channel_vector(const, rank, layer.channels, label)
    if isinstance(vector, Refusal):
        return vector
    try:
        affine = fold.channel_affine([(op.lower(), vector)], layer.channels)
    except FoldError as exc:
        return Refusal(Skip.BAD_PARAMETERS, str(exc))
    return fits(layer, affine)


# --- Health -------------------------------------------------------------------------


def health(norm: Norm, layer: Layer | Refusal, decided: Fold | Refusal) -> BNHealth | None:
    """Parameter health, with the folded weight's peak where the layer is known.

    A skipped BatchNorm gets the peak it would have had, where its layer is known
    and matches it (rule 4's channel axis, and the channel count). None when the parameters
    themselves are unreadable.
    """
    if isinstance(norm.params, Refusal):
        return None
    p = norm.params
    peak: float | None = None
    dtype: np.dtype[Any] | None = None
    if isinstance(decided, Fold):
        peak, dtype = decided.peak, decided.dtype
    elif isinstance(layer, Layer) and layer.dtype is not None and channel_axis(layer) is None:
        affine = affine_of(norm)
        if isinstance(affine, Affine) and affine.channels == layer.channels:
            peaks = fold.max_abs_per_channel(layer.weight, layer.axis, layer.groups)
            peak, dtype = float((peaks * np.abs(affine.scale)).max(initial=0.0)), layer.dtype
    try:
        return bn_health(
            p.gamma, p.beta, p.mean, p.var, p.eps, folded_weight_peak=peak, dtype=dtype
        )
    except ValueError:  # parameters of different lengths: the skip reason says so
        return None
