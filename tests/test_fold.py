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
