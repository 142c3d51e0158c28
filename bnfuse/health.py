"""Health of a BatchNorm's parameters: what `bnfuse inspect` flags.

- never updated: mean 0 and variance 1 in every channel, the values a BN is
  created with; the model was likely never trained or calibrated.
- near-zero variance: var < 1e-5 in a channel; gamma/sigma is then close to
  gamma/sqrt(eps), which blows small input noise up.
- dead channel: |gamma| < 1e-6; the channel outputs its constant beta.
- an epsilon that is not a finite number (NaN, Inf): no channel folds.
- fused weight against the dtype's range: the largest folded weight as a
  fraction of the dtype's largest finite value (fp16: 65504); above 1 the
  fold is refused, above 1/16 it is flagged as at risk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bnfuse.fold import Array, largest

TINY_VARIANCE = 1e-5
DEAD_GAMMA = 1e-6
RISKY_FRACTION = 1 / 16


@dataclass(frozen=True)
class BNHealth:
    channels: int
    never_updated: bool
    tiny_variance: tuple[int, ...]
    dead: tuple[int, ...]
    max_scale: float  # max |gamma / sigma|
    fused_peak: float | None = None  # max |folded weight|, where the layer is known
    dtype: str | None = None
    dtype_max: float | None = None
    epsilon: float = 1e-5

    @property
    def range_fraction(self) -> float | None:
        if self.fused_peak is None or not self.dtype_max:
            return None
        return self.fused_peak / self.dtype_max

    @property
    def flags(self) -> list[str]:
        out = []
        if self.never_updated:
            out.append(
                "statistics never updated (mean 0, var 1 everywhere): untrained or uncalibrated?"
            )
        if self.tiny_variance:
            out.append(
                f"near-zero variance in {len(self.tiny_variance)} channel(s) {_list(self.tiny_variance)}"
            )
        if self.dead:
            out.append(f"dead channel(s) (gamma ~ 0) {_list(self.dead)}")
        if not math.isfinite(self.epsilon):
            out.append(f"epsilon is {self.epsilon}, not a finite number")
        fraction = self.range_fraction
        if fraction is not None and fraction > RISKY_FRACTION:
            verdict = "overflows" if fraction > 1 else "overflow risk"
            out.append(
                f"fused weight reaches {self.fused_peak:.4g}, {fraction:.0%} of the {self.dtype} range: {verdict}"
            )
        return out


def _list(channels: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return f"[{shown}{', ...' if len(channels) > limit else ''}]"


def bn_health(
    gamma: Array | None,
    beta: Array | None,
    mean: Array,
    var: Array,
    eps: float,
    *,
    folded_weight_peak: float | None = None,
    dtype: npt.DTypeLike | None = None,
) -> BNHealth:
    """Flags for one BN; ``folded_weight_peak`` is max |W'| when the layer is known."""
    mu = np.asarray(mean, dtype=np.float64).reshape(-1)
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    g = np.ones_like(mu) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1)
    denom = v + eps
    if (denom > 0).all():
        scale = np.abs(g) / np.sqrt(denom)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.abs(g) / np.sqrt(denom)
    finite = scale[np.isfinite(scale)]
    dtype_name, dtype_max = None, None
    if dtype is not None:
        dt = np.dtype(dtype)
        dtype_name, dtype_max = dt.name, largest(dt)
    return BNHealth(
        channels=int(mu.shape[0]),
        never_updated=bool(not mu.any() and (v == 1).all()),
        tiny_variance=tuple(int(i) for i in np.flatnonzero(v < TINY_VARIANCE)),
        dead=tuple(int(i) for i in np.flatnonzero(np.abs(g) < DEAD_GAMMA)),
        max_scale=float(finite.max()) if finite.size else float("inf"),
        fused_peak=folded_weight_peak,
        dtype=dtype_name,
        dtype_max=dtype_max,
        epsilon=float(eps),
    )
