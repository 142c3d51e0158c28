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

from tests.bad_inputs.make import CASES, make
from tests.test_cli import run_cli


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


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
    structurally_valid = name in ("channel_mismatch.onnx", "absurd_dims.onnx")
    if expected == "error" and (verify or not structurally_valid):
        assert code == 2, text + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfuse: error: "), err
        assert "--debug" not in err, f"an unforeseen error, not a diagnosis: {err}"
        assert list(out.parent.iterdir()) == [], "an output was left behind"
    else:
        # valid models: the pair is skipped with its reason (or, without verification, a
        # structurally valid model onnxruntime would reject is written as it is)
        assert code == 0, err
        assert out.exists()
        if expected == "skip":
            assert "skipped 1" in text
