"""Batch mode: many models, worker processes, one table, one report, the worst exit code."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest

from sample_models.models import conv_chain, layer_bn, with_extra_output
from tests.test_cli import run_cli


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    root = tmp_path / "zoo"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    onnx.save(layer_bn("Conv"), root / "a" / "conv.onnx")
    onnx.save(layer_bn("Gemm", trans_b=1), root / "b" / "gemm.onnx")
    onnx.save(conv_chain(), root / "b" / "chain.onnx")
    onnx.save(with_extra_output(layer_bn("Conv"), None, "h"), root / "skip.onnx")
    (root / "notes.txt").write_text("not a model")
    return root


def test_folder_batch_with_workers_and_reports(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fused"
    rj, rx, rm, rh = (tmp_path / f"batch.{s}" for s in ("json", "xml", "md", "html"))
    args = [
        str(zoo),
        "-o",
        str(out),
        "-j",
        "2",
        *(x for r in (rj, rx, rm, rh) for x in ("--report", str(r))),
    ]
    code, text, err = run_cli(args, capsys)
    assert code == 0, err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onnx"))
    assert written == ["a/conv.onnx", "b/chain.onnx", "b/gemm.onnx", "skip.onnx"]
    assert "4 models" in text
    data = json.loads(rj.read_text())
    assert data["schema"] == "bnfuse-batch" and data["exit_code"] == 0
    by_input = {Path(m["input"]).name: m for m in data["models"]}
    assert by_input["chain.onnx"]["fusion"]["folded"] == 3
    assert by_input["skip.onnx"]["fusion"]["skipped"] == 1
    assert all(m["verification"]["passed"] for m in data["models"])
    root = ET.parse(rx).getroot()
    assert (
        int(root.get("tests", -1)) == len(root.findall(".//testcase")) == 5
    )  # skip.onnx has 2 outputs
    assert "| model |" in rm.read_text()
    assert rh.read_text().count("<section") == 4


def test_glob_and_worst_exit_code(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (zoo / "b" / "broken.onnx").write_bytes(b"garbage")
    out = tmp_path / "fused"
    code, text, err = run_cli([str(zoo / "b" / "*.onnx"), "-o", str(out), "--no-verify"], capsys)
    assert code == 2  # one unreadable model: the batch reports it and fails
    broken = zoo / "b" / "broken.onnx"
    # on stderr, where CI logs look for errors; the path once
    assert err.strip().splitlines() == [
        f"bnfuse: error: {broken}: not a readable ONNX model "
        "(malformed protobuf: unsupported wire type 7) (expected an ONNX protobuf file (.onnx))"
    ], err
    assert "ERROR" in text
    assert sorted(p.name for p in out.iterdir()) == ["chain.onnx", "gemm.onnx"]


def test_batch_needs_an_output_folder(zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([str(zoo)], capsys)
    assert code == 2 and "-o" in err
    code, _, err = run_cli([str(zoo), "-o", str(zoo / "a" / "conv.onnx")], capsys)
    assert code == 2 and "names a file" in err


def test_output_folder_inside_inputs_is_refused(
    zoo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli([str(zoo), "-o", str(zoo / "out"), "--no-verify"], capsys)
    assert code == 0, err
    # a second run would read its own outputs: refused
    code, _, err = run_cli([str(zoo), "-o", str(zoo / "out"), "--no-verify", "--force"], capsys)
    assert code == 2 and "inside the output folder" in err
