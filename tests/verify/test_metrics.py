"""Metrics against hand-computed values, and the tolerance rule at its boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfuse.verify.metrics import compare


def test_metrics_match_hand_computed_values() -> None:
    ref = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], dtype=np.float32)
    got = np.array([[1.0, -2.5, 3.0], [0.5, 4.0, -0.9]], dtype=np.float32)
    c = compare("y", "cpu", ref, got, atol=0.01, rtol=0.0)
    err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    assert c.max_abs == pytest.approx(0.5)
    assert c.max_rel == pytest.approx(0.25)  # 0.5 / |-2|
    assert c.mean_abs == pytest.approx(err.mean())
    assert c.rmse == pytest.approx(math.sqrt((0.25 + 0.01) / 6), rel=1e-6)
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    assert c.cosine == pytest.approx(r @ g / (np.linalg.norm(r) * np.linalg.norm(g)))
    assert c.snr_db == pytest.approx(10 * math.log10((r @ r) / (err**2).sum()))
    assert (c.failed, c.total) == (2, 6)
    assert c.worst_index == (0, 1) and c.worst_ref == -2.0 and c.worst_got == -2.5
    assert c.argmax_agreement == 1.0  # rows' top classes: 2 and 1 in both
    assert not c.passed and not c


def test_tolerance_rule_is_atol_plus_rtol_times_reference() -> None:
    """Outputs within [-1, 1]: atol is absolute."""
    ref = np.array([1.0, 0.5])
    inside = compare("y", "cpu", ref, ref + np.array([0.0109, 0.0]), atol=0.01, rtol=1e-3)
    outside = compare("y", "cpu", ref, ref + np.array([0.0111, 0.0]), atol=0.01, rtol=1e-3)
    assert inside.passed and not outside.passed and outside.worst_index == (0,)


def test_atol_scales_with_the_outputs_largest_magnitude() -> None:
    """An element near 0 in an output that reaches 100 is judged against 100, not 1."""
    ref = np.array([100.0, 1e-3])
    inside = compare("y", "cpu", ref, ref + np.array([0.0, 0.0099]), atol=1e-4, rtol=1e-4)
    outside = compare("y", "cpu", ref, ref + np.array([0.0, 0.0101]), atol=1e-4, rtol=1e-4)
    assert inside.passed and not outside.passed and outside.worst_index == (1,)


def test_an_error_within_the_noise_floor_passes_and_one_beyond_fails() -> None:
    from dataclasses import replace

    ref = np.array([1.0, 2.0], dtype=np.float32)
    c = compare("y", "cpu", ref, ref + np.array([0.0, 0.01], dtype=np.float32))
    assert not c.passed and c.failed == 1
    assert replace(c, floor_max_abs=0.02).passed  # the runtime itself moves it that much
    assert not replace(c, floor_max_abs=0.005).passed
    nan = compare("y", "cpu", ref, np.array([np.nan, 2.0], dtype=np.float32))
    assert not replace(nan, floor_max_abs=1e9).passed  # a NaN is never excused


def test_compute_precision_sets_the_tolerance() -> None:
    ref = np.array([1.0, 1.0], dtype=np.float32)
    got = ref + np.array([0.0, 2e-3], dtype=np.float32)
    assert not compare("y", "cpu", ref, got).passed  # judged as float32
    c = compare("y", "cpu", ref, got, compute_dtype="float16")
    assert c.passed and c.atol == 1e-2 and c.compute_dtype == "float16"


def test_nan_mismatch_fails_and_matching_inf_passes() -> None:
    ref = np.array([1.0, np.inf, 2.0], dtype=np.float32)
    assert compare("y", "cpu", ref, ref.copy()).passed
    got = ref.copy()
    got[2] = np.nan
    c = compare("y", "cpu", ref, got)
    assert not c.passed and c.nan_got == 1 and c.inf_ref == 1 and c.worst_index == (2,)


def test_argmax_agreement_counts_rows() -> None:
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    got = np.array([[0.1, 0.9], [0.1, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert compare("logits", "cpu", ref, got).argmax_agreement == 0.75


def test_default_tolerance_depends_on_dtype() -> None:
    ref = np.ones(4, dtype=np.float16)
    c16 = compare("y", "cpu", ref, ref + np.float16(0.005))
    c32 = compare("y", "cpu", ref.astype(np.float32), ref.astype(np.float32) + 0.005)
    assert c16.passed and (c16.atol, c16.rtol) == (1e-2, 1e-2)
    assert not c32.passed and (c32.atol, c32.rtol) == (1e-4, 1e-4)
