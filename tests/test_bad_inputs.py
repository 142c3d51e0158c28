"""The bad-input corpus (tests/bad_inputs/make.py) through the command line.

For each case: one clear line and exit 2, or, where the model is valid and only
the pair cannot fold, a skip with its reason and exit 0. Never a traceback,
never an output file on failure, and the input is unchanged (hash before and
after).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.bad_inputs.make import CASES, RUNTIME_REJECTS, make
from tests.test_cli import run_cli


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# The diagnosis each case must give, where a generic line used to stand.
REASONS = {
    "duplicate_initializer.onnx": "two initializers named 'bn.scale'",
    "shadowing_initializer.onnx": "shadows a name of an enclosing graph",
    "sparse_initializer.onnx": "holds sparse initializers",
    "unknown_elem_type.onnx": "which is no ONNX type",
    "fp16_in_float_data.onnx": "is FLOAT16 but keeps its values in float_data",
    "constant_external_outside.onnx": "outside the model's folder",
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(
    name: str, verify: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "in"
    expected = make(corpus)[name]
    before = digest(corpus)
    out = tmp_path / "out" / ("fused" + Path(name).suffix)
    out.parent.mkdir()
    args = [str(corpus / name), "-o", str(out), *([] if verify else ["--no-verify"])]
    code, text, err = run_cli(args, capsys)
    assert "Traceback" not in text + err
    assert digest(corpus) == before, "the input changed"
    structurally_valid = name in RUNTIME_REJECTS
    if expected == "error" and (verify or not structurally_valid):
        assert code == 2, text + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfuse: error: "), err
        assert "--debug" not in err, f"an unforeseen error, not a diagnosis: {err}"
        assert list(out.parent.iterdir()) == [], "an output was left behind"
        if not verify and name in REASONS:  # (with verification, onnxruntime may speak first)
            assert REASONS[name] in err, err
    else:
        # valid models: the pair is skipped with its reason (or, without verification, a
        # structurally valid model onnxruntime would reject is written as it is)
        assert code == 0, err
        assert out.exists()
        if expected == "skip":
            assert "skipped 1" in text


SKIP_REASONS = {
    "nan_params.onnx": "BatchNorm variance contains NaN or Inf",
    "nan_epsilon.onnx": "BatchNorm epsilon is nan, not a finite number",
    "inf_epsilon.onnx": "BatchNorm epsilon is inf, not a finite number",
}


@pytest.mark.parametrize("name", list(SKIP_REASONS))
def test_nonfinite_parameters_reach_every_report(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The skip is worded, health flags it, and JSON (which has no NaN) says null."""
    import json

    corpus = tmp_path / "in"
    make(corpus)
    code, text, err = run_cli(["inspect", str(corpus / name), "--json"], capsys)
    assert code == 0 and not err, err
    (cand,) = json.loads(text)["candidates"]
    assert cand["skip_code"] == "bad_parameters" and cand["reason"] == SKIP_REASONS[name]
    out = tmp_path / "f.onnx"
    reports = [tmp_path / f"r.{s}" for s in ("json", "md", "xml", "html")]
    args = [str(corpus / name), "-o", str(out), *(a for r in reports for a in ("--report", str(r)))]
    code, text, err = run_cli(args, capsys)
    assert code == 0, text + err
    assert out.exists() and all(r.exists() for r in reports)
    report = json.loads(reports[0].read_text())
    (cand,) = report["fusion"]["candidates"]
    assert cand["reason"] == SKIP_REASONS[name]
    if "epsilon" in name:
        assert cand["health"]["epsilon"] is None
        assert any("epsilon is" in f for f in cand["health"]["flags"])
