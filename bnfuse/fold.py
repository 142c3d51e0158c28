"""The fold arithmetic, and nothing else: numpy in, numpy out, float64 inside.

At inference a BatchNormalization is a per-channel affine map::

    bn(y) = gamma * (y - mu) / sigma + beta,   sigma = sqrt(var + eps)
          = s * y + t,                          s = gamma / sigma,  t = beta - s * mu

so for a linear layer y = W x + b whose output channel c is scaled by s[c]::

    bn(W x + b) = (s * W) x + s * (b - mu) + beta  =  W' x + b'

Every product is computed in float64 from the stored parameters and rounded
once to the layer's dtype, so a fp16 weight lands within 0.5 ulp of the exact
value (peers compute in fp16 and land several ulp off). A fold whose result is
not finite in the target dtype is refused rather than written.

This module knows nothing about ONNX or torch; both paths call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
F64 = npt.NDArray[np.float64]

__all__ = [
    "Affine",
    "FoldError",
    "FoldOverflow",
    "bn_affine",
    "check_fits",
    "fold_bias",
    "fold_weight",
    "fold_weight_rounded",
    "max_abs_per_channel",
    "round_to",
]


class FoldError(ValueError):
    """The parameters cannot be folded; the message says why, for a user."""


class FoldOverflow(FoldError):
    """The folded weight or bias would not be finite in the layer's dtype."""


@dataclass(frozen=True)
class Affine:
    """The per-channel map ``y -> scale * y + shift`` an inference BN applies."""

    scale: F64
    shift: F64
    mean: F64
    beta: F64

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def bn_affine(
    gamma: Array | None,
    beta: Array | None,
    mean: Array,
    var: Array,
    eps: float,
) -> Affine:
    """The float64 affine map of an inference BatchNorm.

    ``gamma``/``beta`` may be None (PyTorch ``affine=False``): 1 and 0.
    Raises FoldError when the parameters are not usable.
    """
    mu = _as_f64_vector(mean, "running mean")
    v = _as_f64_vector(var, "running variance")
    channels = mu.shape[0]
    if channels == 0:
        raise FoldError("the BatchNorm has 0 channels; there is nothing to fold")
    g = np.ones(channels) if gamma is None else _as_f64_vector(gamma, "scale (gamma)")
    b = np.zeros(channels) if beta is None else _as_f64_vector(beta, "bias (beta)")
    if not (g.shape == b.shape == mu.shape == v.shape):
        raise FoldError(
            "BatchNorm parameters disagree in length: "
            f"scale {g.shape[0]}, bias {b.shape[0]}, mean {mu.shape[0]}, var {v.shape[0]}"
        )
    if not np.isfinite(np.concatenate((g, b, mu, v))).all():
        for name, arr in (("scale", g), ("bias", b), ("mean", mu), ("variance", v)):
            if not np.isfinite(arr).all():
                raise FoldError(f"BatchNorm {name} contains NaN or Inf")
    if not math.isfinite(eps):
        raise FoldError(f"BatchNorm epsilon is {eps}, not a finite number")
    denom = v + np.float64(eps)
    if (denom <= 0).any():
        worst = int(np.argmin(denom))
        raise FoldError(
            f"variance + epsilon is not positive in channel {worst} ({denom[worst]:.3g})"
        )
    scale = g / np.sqrt(denom)
    return Affine(scale=scale, shift=b - scale * mu, mean=mu, beta=b)


def is_float(arr: Array) -> bool:
    """Whether ``arr`` holds floating-point numbers (bfloat16 and the float8s included)."""
    return arr.dtype.kind == "f" or (arr.dtype.kind == "V" and "float" in arr.dtype.name)


def _as_f64_vector(arr: Array, what: str) -> F64:
    a = np.asarray(arr)
    if a.ndim != 1:
        raise FoldError(
            f"BatchNorm {what} has shape {list(a.shape)}, expected one value per channel"
        )
    return a.astype(np.float64)


def _channel_view(ndim: int, axis: int, channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def _grouped(w: npt.NDArray[Any], axis: int, groups: int) -> npt.NDArray[Any]:
    """View a ConvTranspose weight [Cin, Cout/g, k...] as [g, Cin/g, Cout/g, k...]."""
    if axis != 1:
        raise ValueError("grouped output channels are only laid out on axis 1")
    cin = w.shape[0]
    return w.reshape(groups, cin // groups, *w.shape[1:])


def max_abs_per_channel(w: Array, axis: int, groups: int = 1) -> F64:
    """max |w| over everything that feeds each output channel, in float64.

    Reduced in the weight's own dtype, as max(max, -min) (both are values of w,
    so widening afterwards is exact), without a float64 or an |w| copy of it.
    """
    a = np.asarray(w)
    if axis == 0:
        per_channel = a.reshape(a.shape[0], -1)
    elif groups == 1:
        per_channel = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    else:
        cin = a.shape[0]
        g = a.reshape(groups, cin // groups, *a.shape[1:])  # [g, Cin/g, Cout/g, k...]
        per_channel = np.moveaxis(g, 2, 1).reshape(groups * g.shape[2], -1)
    if a.dtype.itemsize == 2 and a.dtype.kind in "fV":  # float16, bfloat16
        # numpy reduces 16-bit floats element by element, ~10x slower than integers.
        # Without its sign bit, a float's bits order like its magnitude (NaN above
        # Inf, so a NaN still comes out as the peak): one integer pass instead.
        bits = per_channel.view(np.uint16) & np.uint16(0x7FFF)
        return bits.max(axis=1).view(a.dtype).astype(np.float64)  # type: ignore[no-any-return]
    high = per_channel.max(axis=1).astype(np.float64)
    low = per_channel.min(axis=1).astype(np.float64)
    peaks: F64 = np.maximum(high, -low)
    return peaks


def fold_weight(w: Array, scale: F64, axis: int, groups: int = 1) -> F64:
    """``w`` with output channel c multiplied by ``scale[c]``, in float64.

    ``axis`` is the output-channel axis of the weight: 0 for Conv [Cout, Cin/g, k...]
    and Gemm with transB=1 / Linear [N, K]; 1 for ConvTranspose [Cin, Cout/g, k...]
    (with ``groups``) and for Gemm transB=0 / MatMul [K, N].
    """
    w64 = np.array(w, dtype=np.float64)  # a fresh copy: scaled in place below
    if groups == 1 or axis == 0:
        _require_channels(w64.shape[axis], scale)
        w64 *= scale.reshape(_channel_view(w64.ndim, axis, scale.shape[0]))
        return w64
    per_group = w64.shape[1]
    _require_channels(per_group * groups, scale)
    g = _grouped(w64, axis, groups)
    g *= scale.reshape(groups, 1, per_group, *([1] * (w64.ndim - 2)))
    return w64


def _require_channels(channels: int, scale: F64) -> None:
    if channels != scale.shape[0]:
        raise FoldError(f"weight has {channels} output channels, BatchNorm has {scale.shape[0]}")


BLOCK_ELEMENTS = 1 << 18  # float64 temporaries of 2 MB: they stay in cache


def fold_weight_rounded(
    w: Array, scale: F64, axis: int, groups: int, dtype: npt.DTypeLike
) -> Array:
    """``round_to(fold_weight(w, scale, axis, groups), dtype)``, the same bits, cheaper.

    Into numpy's own float types, in one pass: numpy's multiply widens each
    element to float64, scales it, and rounds the product once into the result,
    by the very cast ``round_to`` makes (its buffers stay in cache, whatever the
    layer's size). bfloat16, which round_to rounds by way of float32, is folded
    a block of rows (first axis) at a time instead, so its float64 copy never
    exceeds BLOCK_ELEMENTS.
    """
    a = np.asarray(w)
    target = np.dtype(dtype)
    if target.kind == "f" and a.dtype.kind == "f":
        return _scaled_into(a, scale, axis, groups, target)
    rows = a.shape[0] if a.ndim else 0
    if groups != 1 or axis not in (0, 1) or rows == 0 or a.size <= BLOCK_ELEMENTS:
        return round_to(fold_weight(a, scale, axis, groups), dtype)
    _require_channels(a.shape[axis], scale)  # for the whole weight, not one block
    out = np.empty(a.shape, target)
    step = max(1, BLOCK_ELEMENTS // (a.size // rows))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block_scale = scale[start:stop] if axis == 0 else scale
        out[start:stop] = round_to(fold_weight(a[start:stop], block_scale, axis), dtype)
    return out


def _scaled_into(a: Array, scale: F64, axis: int, groups: int, target: np.dtype[Any]) -> Array:
    """fold_weight's product, computed in float64 and rounded once into ``target``."""
    out = np.empty(a.shape, target)
    if groups == 1 or axis == 0:
        _require_channels(a.shape[axis], scale)
        factors = scale.reshape(_channel_view(a.ndim, axis, scale.shape[0]))
        into, source = out, a
    else:
        per_group = a.shape[1]
        _require_channels(per_group * groups, scale)
        factors = scale.reshape(groups, 1, per_group, *([1] * (a.ndim - 2)))
        into, source = _grouped(out, axis, groups), _grouped(a, axis, groups)
    with np.errstate(over="ignore"):  # an overflow is inf, as in round_to: check_fits says so
        np.multiply(source, factors, out=into, dtype=np.float64, casting="same_kind")
    return out


def fold_bias(bias: Array | None, affine: Affine) -> F64:
    """``s * (b - mu) + beta``; ``b`` broadcasts against the channels on its last axis.

    A missing bias is zero, so the result is the BN's shift.
    """
    if bias is None:
        return affine.shift.copy()
    b64 = np.asarray(bias).astype(np.float64)
    return (b64 - affine.mean) * affine.scale + affine.beta


def round_to(x: F64, dtype: npt.DTypeLike) -> Array:
    """Round float64 values once, to nearest even, into ``dtype``.

    numpy rounds float64 -> float16/float32 directly. bfloat16 (ml_dtypes) casts
    through float32, which would round twice, so it goes through float32 with
    round-to-odd first, which makes the second rounding exact.
    """
    target = np.dtype(dtype)
    if target.kind != "V" or target.name != "bfloat16":
        x64 = np.asarray(x, dtype=np.float64)
        if target.kind == "f" and x64.size and np.abs(x64).max() <= largest(target):
            return x64.astype(target)  # nothing can overflow: no errstate, which costs more
        with np.errstate(over="ignore"):
            return x64.astype(target)
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        f32 = x64.astype(np.float32)
    back = f32.astype(np.float64)
    inexact = (back != x64) & np.isfinite(x64) & np.isfinite(back)
    # Truncate toward zero, then set the lowest bit: round-to-odd.
    too_far = inexact & (np.abs(back) > np.abs(x64))
    f32 = np.where(too_far, np.nextafter(f32, np.float32(0)), f32).astype(np.float32)
    bits = f32.view(np.uint32) | np.where(inexact, np.uint32(1), np.uint32(0))
    return bits.view(np.float32).astype(target)


_LARGEST: dict[np.dtype[Any], float] = {}


def largest(dtype: np.dtype[Any]) -> float:
    """The dtype's largest finite value, looked up once per dtype (bfloat16: ml_dtypes')."""
    if dtype not in _LARGEST:
        if dtype.kind == "f":  # numpy's own float types
            _LARGEST[dtype] = float(np.finfo(dtype).max)
        else:
            import ml_dtypes  # finfo that knows bfloat16 too (10-20 ms to import)

            _LARGEST[dtype] = float(ml_dtypes.finfo(dtype).max)  # type: ignore[no-untyped-call]
    return _LARGEST[dtype]


def _first_overflow(values: F64, dtype: npt.DTypeLike) -> int | None:
    """The first of ``values`` not finite once rounded to ``dtype``; None when all are."""
    rounded = round_to(values, dtype)
    if np.isfinite(rounded).all():
        return None
    return int(np.flatnonzero(~np.isfinite(rounded.astype(np.float64)))[0])


def check_fits(
    weight: Array,
    bias: Array | None,
    affine: Affine,
    axis: int,
    groups: int,
    dtype: npt.DTypeLike,
    dtype_name: str,
) -> float:
    """The folded weight's peak |W'|; raises FoldOverflow when not finite in ``dtype``.

    Cheap: the weight is reduced to one peak per channel, never folded whole.
    """
    peaks = max_abs_per_channel(weight, axis, groups)
    # Rounding is monotonic, so channel c's largest folded element overflows exactly
    # when max|W_c| * |s_c| does.
    folded_peaks = peaks * np.abs(affine.scale)
    bad = _first_overflow(folded_peaks, dtype)
    if bad is not None:
        raise FoldOverflow(
            f"the folded weight of channel {bad} reaches "
            f"{peaks[bad] * abs(affine.scale[bad]):.4g}, beyond the range of {dtype_name}"
        )
    if _first_overflow(fold_bias(bias, affine), dtype) is not None:
        raise FoldOverflow(f"the folded bias is beyond the range of {dtype_name}")
    return float(folded_peaks.max(initial=0.0))


# --- A channel affine map from constants (Mul/Add chains) ---------------------------


def channel_affine(ops: list[tuple[str, Array]], channels: int) -> Affine:
    """The per-channel map of a chain of ``("mul", c)`` / ``("add", c)`` steps, in order.

    Each constant is a scalar or one value per channel. ``x*a + c`` composes as
    scale a, shift c; ``(x + c)*a`` as scale a, shift c*a.
    """
    scale = np.ones(channels)
    shift = np.zeros(channels)
    for op, const in ops:
        c = np.broadcast_to(np.asarray(const, dtype=np.float64).reshape(-1), (channels,))
        if not np.all(np.isfinite(c)):
            raise FoldError(f"the {op} constant contains NaN or Inf")
        if op == "mul":
            scale, shift = scale * c, shift * c
        else:
            shift = shift + c
    return Affine(scale=scale, shift=shift, mean=np.zeros(channels), beta=shift)


# --- Folding a per-channel affine map into the layer that FOLLOWS it -----------------
#
# conv(W, s*x + t) = conv(W * s[in], x) + sum_{c,k} W[o,c,k] * t[c]: exact only where
# the conv reads no padding (padding would read 0, not the shifted t).


def _per_input_channel(w64: F64, vector: F64, groups: int) -> F64:
    """``vector`` (one value per input channel) laid out like a Conv weight [Cout, Cin/g, k...]."""
    cout, cin_g = w64.shape[0], w64.shape[1]
    per_group = vector.reshape(groups, 1, cin_g)  # [g, 1, Cin/g]
    full = np.broadcast_to(per_group, (groups, cout // groups, cin_g)).reshape(cout, cin_g)
    out: F64 = full.reshape(cout, cin_g, *([1] * (w64.ndim - 2)))
    return out


def fold_weight_into_following(w: Array, scale: F64, groups: int = 1) -> F64:
    """Conv weight [Cout, Cin/g, k...] with input channel c multiplied by ``scale[c]``."""
    w64 = np.asarray(w).astype(np.float64)
    if w64.shape[1] * groups != scale.shape[0]:
        raise FoldError(
            f"the conv reads {w64.shape[1] * groups} input channels, the BatchNorm has {scale.shape[0]}"
        )
    folded: F64 = w64 * _per_input_channel(w64, scale, groups)
    return folded


def fold_bias_into_following(w: Array, bias: Array | None, shift: F64, groups: int = 1) -> F64:
    """``b[o] + sum_{c,k} W[o,c,k] * shift[c]`` for a Conv weight [Cout, Cin/g, k...]."""
    w64 = np.asarray(w).astype(np.float64)
    spread = w64 * _per_input_channel(w64, shift, groups)
    b: F64 = spread.reshape(w64.shape[0], -1).sum(axis=1)
    if bias is not None:
        b = b + np.asarray(bias).astype(np.float64)
    return b
