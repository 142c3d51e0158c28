"""The HTML report renders in a real browser (headless Chromium), offline."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import onnx
import pytest

import bnfuse
from bnfuse.report import write_reports
from bnfuse.verify.compare import verify_models
from bnfuse.verify.options import VerifyOptions
from sample_models.models import conv_chain

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(conv_chain(), src)
    fusion = bnfuse.fuse(src, out)
    verification = verify_models(src, out, VerifyOptions(per_layer=True, samples=2))
    page = tmp_path / "report.html"
    write_reports([page], fusion, verification)
    assert CHROMIUM is not None
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert dom.stdout.count("<svg") == 2 and "PASS" in dom.stdout and "bn3_out" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1400",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 1400)
