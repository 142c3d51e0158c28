"""The GitHub Action (action.yml): its step (action/run.sh) run as the action runs it, with
the inputs as environment variables, in a fresh working folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def _run_action(folder: Path, models: str, args: str = "") -> tuple[int, dict[str, str]]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MODELS": models,
        "ARGS": args,
        "GITHUB_OUTPUT": str(folder / "github_output"),
        "GITHUB_STEP_SUMMARY": str(folder / "summary.md"),
    }
    env.pop("BNFUSE_IN_PROCESS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "action" / "run.sh")], cwd=folder, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    said = dict(line.split("=", 1) for line in (folder / "github_output").read_text().splitlines())
    return proc.returncode, said


def test_the_action_declares_what_its_step_reads() -> None:
    action = (ROOT / "action.yml").read_text()
    assert "action/run.sh" in action and "using: composite" in action
    for name in ("MODELS", "OUTPUT_DIR", "REPORT_DIR", "ARGS"):
        assert re.search(rf"^\s+{name}: \$\{{\{{ inputs\.", action, re.M), name


@pytest.mark.parametrize("how", ["batch", "one_model"])
def test_the_action_fuses_verifies_and_reports(how: str, tmp_path: Path) -> None:
    models = (
        f"{SAMPLES / 'conv2d_bn.onnx'} {SAMPLES / 'shared_weight.onnx'}"
        if how == "batch"
        else str(SAMPLES / "conv2d_bn.onnx")
    )
    code, said = _run_action(tmp_path, models)
    assert code == 0 and said == {"exit-code": "0"}
    reports = tmp_path / "bnfuse-reports"
    assert {p.name for p in reports.iterdir()} == {
        "bnfuse.json", "bnfuse.xml", "bnfuse.html", "bnfuse.md"
    }  # fmt: skip
    report = json.loads((reports / "bnfuse.json").read_text())
    assert report["exit_code"] == 0 if how == "batch" else report["passed"] is True
    assert (tmp_path / "bnfuse-out" / "conv2d_bn.onnx").is_file()
    assert "bnfuse" in (tmp_path / "summary.md").read_text()  # the job summary


def test_the_action_exits_as_bnfuse_exits_and_still_reports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, said = _run_action(tmp_path, str(bad))
    assert code == 2 and said == {"exit-code": "2"}
    report = json.loads((tmp_path / "bnfuse-reports" / "bnfuse.json").read_text())
    assert "not a readable ONNX model" in report["error"]
