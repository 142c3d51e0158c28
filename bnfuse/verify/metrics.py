"""Compare a reference output with a candidate's, element by element.

An element fails when ``|ref - got| > atol * scale + rtol * |ref|``, where
``scale`` is the output's largest finite magnitude (at least 1): rounding
errors grow with the values a network carries, so an element near zero in an
output that reaches 6e3 is judged against the output's range, not against 1.
An element also fails when one side is NaN/Inf and the other is not the same
NaN/Inf. (The verdict then also weighs the noise floor: compare.py.)

Default tolerances by the precision the model computes the output in (the
lowest float type on its path; the output's own dtype where that is not
known); ``--atol``/``--rtol`` override both:

    dtype      atol    rtol
    float64    1e-9    1e-9
    float32    1e-4    1e-4
    float16    1e-2    1e-2
    bfloat16   5e-2    5e-2
    integers   0       0
"""

from __future__ import annotations

import math

import numpy as np

from bnfuse.result import Comparison

VERDICT_RULE = (
    "An output passes when every element has |after - before| <= atol * max(1, max|before|) "
    "+ rtol * |before|, with atol and rtol set by the precision the model computes it in, "
    "or when its largest error is no larger than the noise floor (the original itself under "
    "a change that should not matter); a NaN or Inf where the original has none never passes."
)

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def default_tolerance(dtype: np.dtype[np.generic]) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype.name, (0.0, 0.0))


_HISTOGRAM_SAMPLE = 4096


def compare(
    name: str,
    device: str,
    ref: np.ndarray,
    got: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
    *,
    class_scores: bool | None = None,
    compute_dtype: str = "",
) -> Comparison:
    """Compare ``got`` with the reference ``ref``.

    ``class_scores``: whether the last axis holds class scores (top-1 agreement is
    then reported over it); by default, when the output is 2-D [N, C].
    """
    if ref.shape != got.shape:
        raise ValueError(f"output '{name}': shape {got.shape} differs from reference {ref.shape}")
    d_atol, d_rtol = default_tolerance(np.dtype(ref.dtype))
    if compute_dtype in DEFAULT_TOLERANCES:
        d_atol, d_rtol = DEFAULT_TOLERANCES[compute_dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(got, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    same_special = ~finite & ((a == b) | (np.isnan(a) & np.isnan(b)))
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(a - b), 0.0)
    magnitude = np.abs(np.where(finite, a, 0.0))
    scale = max(1.0, float(magnitude.max(initial=0.0)))
    special_bad = ~finite & ~same_special
    bad = special_bad | (diff > atol * scale + rtol * magnitude)
    n = a.size
    if n == 0:
        return _empty(name, device, ref, atol, rtol)
    worst_flat = int(np.argmax(np.where(bad, np.inf, diff))) if bad.any() else int(np.argmax(diff))
    worst = tuple(int(i) for i in np.unravel_index(worst_flat, a.shape))
    fa, fb = a[finite], b[finite]
    err = np.abs(fa - fb)
    nonzero = np.abs(fa) > 0
    max_rel = float(np.max(err[nonzero] / np.abs(fa[nonzero]), initial=0.0))
    signal = float(np.sum(fa * fa))
    noise = float(np.sum(err * err))
    # Plain numpy sums, not BLAS: BLAS threads would wake and fight onnxruntime's for 2 cores.
    norms = math.sqrt(signal * float(np.sum(fb * fb)))
    sample = err if err.size <= _HISTOGRAM_SAMPLE else err[:: max(1, err.size // _HISTOGRAM_SAMPLE)]
    return Comparison(
        name=name,
        device=device,
        dtype=str(ref.dtype),
        shape=tuple(int(s) for s in ref.shape),
        atol=atol,
        rtol=rtol,
        max_abs=float(err.max(initial=0.0)),
        max_rel=max_rel,
        mean_abs=float(err.mean()) if err.size else 0.0,
        rmse=math.sqrt(noise / err.size) if err.size else 0.0,
        cosine=float(np.sum(fa * fb)) / norms if norms > 0 else (1.0 if noise == 0 else 0.0),
        snr_db=(10 * math.log10(signal / noise)) if noise > 0 and signal > 0 else math.inf,
        failed=int(bad.sum()),
        total=int(n),
        worst_index=worst,
        worst_ref=float(a.flat[worst_flat]),
        worst_got=float(b.flat[worst_flat]),
        nan_ref=int(np.isnan(a).sum()),
        nan_got=int(np.isnan(b).sum()),
        inf_ref=int(np.isinf(a).sum()),
        inf_got=int(np.isinf(b).sum()),
        argmax_agreement=_argmax_agreement(
            a, b, a.ndim == 2 if class_scores is None else class_scores
        ),
        value_range=float(np.ptp(fa)) if fa.size else 0.0,
        errors=tuple(sample.tolist()),
        compute_dtype=compute_dtype or str(ref.dtype),
        nonfinite_mismatch=int(special_bad.sum()),
    )


def _argmax_agreement(a: np.ndarray, b: np.ndarray, class_scores: bool) -> float | None:
    """Share of rows whose top class (last axis) agrees, for class-score outputs."""
    if not class_scores or a.ndim < 2 or a.shape[-1] < 2:
        return None
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def _empty(name: str, device: str, ref: np.ndarray, atol: float, rtol: float) -> Comparison:
    return Comparison(
        name, device, str(ref.dtype), tuple(ref.shape), atol, rtol,
        0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, 0, (), 0.0, 0.0, 0, 0, 0, 0, None, 0.0,
    )  # fmt: skip


def stack(samples: list[np.ndarray]) -> np.ndarray:
    """Several samples of one output as one array (compared as a whole)."""
    return samples[0] if len(samples) == 1 else np.stack(samples)
