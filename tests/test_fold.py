"""bnfuse.fold's fast paths give the bits of the plain computation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfuse import fold


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((37, 5, 3, 3), 0), ((37, 5, 3, 3), 1), ((300, 7), 0), ((7, 300), 1)],
    ids=["conv", "convtranspose", "gemm_transb", "matmul"],
)
def test_blockwise_fold_has_the_same_bits(
    dtype: type, shape: tuple[int, ...], axis: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folding by blocks of rows (to bound memory) changes no bit of the result."""
    monkeypatch.setattr(fold, "BLOCK_ELEMENTS", 100)  # many blocks, the last one short
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, shape).astype(dtype)
    scale = rng.uniform(-3, 3, shape[axis])
    whole = fold.round_to(fold.fold_weight(w, scale, axis), dtype)
    blocks = fold.fold_weight_rounded(w, scale, axis, 1, dtype)
    assert blocks.dtype == whole.dtype
    assert np.array_equal(blocks.view(np.uint8), whole.view(np.uint8))


@pytest.mark.parametrize(
    "dtype", [np.float16, ml_dtypes.bfloat16, np.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize(
    ("axis", "groups"), [(0, 1), (1, 1), (1, 2)], ids=["axis0", "axis1", "grouped"]
)
def test_peak_per_channel_matches_abs_max(dtype: type, axis: int, groups: int) -> None:
    rng = np.random.default_rng(5)
    w = (rng.normal(0, 1, (4, 6, 3, 3)) * rng.choice([1e-6, 1, 1e3], (4, 6, 3, 3))).astype(dtype)
    w[0, 0, 0, 0] = -np.inf if dtype is not np.float16 else -60000  # negative extremes win
    w[1, 1] = -0.0
    a = np.abs(w.astype(np.float64))
    if groups == 1:
        expected = np.moveaxis(a, axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    else:  # ConvTranspose [Cin, Cout/g, k...]: channel g*Cout/g + j reads rows of group g
        g = a.reshape(groups, 2, 6, 3, 3)
        expected = np.moveaxis(g, 2, 1).reshape(groups * 6, -1).max(axis=1)
    assert np.array_equal(fold.max_abs_per_channel(w, axis, groups), expected)


def _wide_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values over 26 decades, with a NaN, both infinities, zeros of both signs."""
    values = rng.normal(0, 1, shape) * 10.0 ** rng.uniform(-13, 13, shape)
    flat = values.reshape(-1)
    flat[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    return values


@pytest.mark.parametrize(
    ("weight_dtype", "dtype"),
    [(np.float16, np.float16), (np.float32, np.float32), (np.float64, np.float64),
     (np.float16, np.float32), (np.float32, np.float16)],
    ids=["fp16", "fp32", "fp64", "fp16-into-fp32", "fp32-into-fp16"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("shape", "axis", "groups"),
    [((37, 5, 3, 3), 0, 1), ((37, 5, 3, 3), 1, 1), ((8, 5, 3, 3), 1, 4), ((300, 7), 0, 1),
     ((7, 300), 1, 1), ((600, 1000), 0, 1)],
    ids=["conv", "convtranspose", "convtranspose_g4", "gemm_transb", "matmul", "large"],
)  # fmt: skip
def test_one_pass_fold_has_the_bits_of_round_to(
    weight_dtype: type, dtype: type, shape: tuple[int, ...], axis: int, groups: int
) -> None:
    """Widen, scale and round in one numpy multiply: the bits of fold_weight then round_to,
    overflow to inf, subnormals, NaN and signed zeros included."""
    rng = np.random.default_rng(11)
    with np.errstate(over="ignore"):
        w = _wide_values(rng, shape).astype(weight_dtype)
    channels = shape[axis] * (groups if axis == 1 else 1)
    decades = {np.float16: 9, np.float32: 45, np.float64: 300}[dtype]  # past both ends
    scale = 10.0 ** rng.uniform(-decades, decades, channels) * rng.choice([-1.0, 1.0], channels)
    scale[0], scale[-1] = 10.0**-decades, -(10.0**decades)
    with np.errstate(over="ignore"):  # fp64 products past float64 itself: inf either way
        expected = fold.round_to(fold.fold_weight(w, scale, axis, groups), dtype)
    got = fold.fold_weight_rounded(w, scale, axis, groups, dtype)
    assert got.dtype == expected.dtype == np.dtype(dtype)
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))
    magnitude = np.abs(got[np.isfinite(got)])
    subnormal = (magnitude > 0) & (magnitude < np.finfo(dtype).tiny)
    assert np.isinf(got).any() and (got == 0).any() and subnormal.any()  # extremes reached


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16], ids=lambda d: d.__name__
)
def test_largest_is_ml_dtypes_finfo(dtype: type) -> None:
    """numpy's finfo for its own floats, ml_dtypes' for bfloat16: the same largest value."""
    dt = np.dtype(dtype)
    assert fold.largest(dt) == float(ml_dtypes.finfo(dt).max)
