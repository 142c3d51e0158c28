"""Every Python block of the README runs as written (a new user's first lines).

Each block runs in a folder holding the files it names: ``model.onnx`` (a sample with a
BatchNorm that folds and one that is skipped) and, for the PyTorch blocks, ``model``
(a Conv -> BatchNorm -> ReLU network in eval mode).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


def test_the_readme_names_the_schema_versions_the_reports_write() -> None:
    from bnfuse.report.json_report import SCHEMA_VERSION

    said = re.findall(r"schema [^\n]*version (\d+)", (ROOT / "README.md").read_text())
    assert said and {int(v) for v in said} == {SCHEMA_VERSION}, said


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_python_block_runs_as_written(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    block = BLOCKS[index]
    shutil.copy(ROOT / "sample_models" / "torch_densenet_opset17.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    if "torch" in block:
        torch = pytest.importorskip("torch")
        from torch import nn

        torch.manual_seed(0)
        namespace["model"] = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    exec(compile(block, f"README.md block {index + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    if "onnx" in block and "print(" in block:  # the ONNX example prints what it did
        assert "6 folded" in out and "its input comes from Concat" in out, out


def test_a_python_caller_is_told_arguments_not_flags(tmp_path: Path) -> None:
    """bnfuse.fuse() said "(pass --force to replace it)"; from Python that is force=True."""
    import bnfuse

    out = tmp_path / "f.onnx"
    out.write_bytes(b"someone's file")
    with pytest.raises(bnfuse.BnfuseError) as raised:
        bnfuse.fuse(ROOT / "sample_models" / "conv2d_bn.onnx", out)
    assert raised.value.hint == "pass force=True to replace it"
    assert out.read_bytes() == b"someone's file"
