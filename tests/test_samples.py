"""The committed sample models: listed, small, and each fuses as its name says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import bnfuse

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
LISTED = re.findall(r"^\| `([^`]+)` \| .+ \|$", (SAMPLES / "README.md").read_text(), re.M)


def test_every_onnx_file_is_listed_with_a_description() -> None:
    on_disk = {p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*.onnx")}
    assert on_disk == set(LISTED)


@pytest.mark.parametrize("name", LISTED)
def test_sample_fuses_as_its_name_says(name: str, tmp_path: Path) -> None:
    src = SAMPLES / name
    assert src.stat().st_size < 2 * 2**20
    result = bnfuse.fuse(src, tmp_path / "out.onnx")
    if name.startswith("skip_bn_then_padded_conv"):  # the more specific name first
        assert result.skipped and not result.folded
        assert "padding" in (result.skipped[0].reason or "")
    elif name.startswith("skip_"):
        assert result.skipped and not result.folded
    elif "untouched" in name:
        assert result.candidates == []
    elif name.startswith("torch_densenet"):
        assert len(result.skipped) == 7 and len(result.folded) == 6
    else:
        assert result.folded and not result.skipped, result.skipped
