"""The command as CI runs it, in the environment CI gives it: LANG=C, a file name that is
not UTF-8, a HOME nothing can be written to. Each runs the real ``bnfuse`` in a
subprocess; stderr must hold nothing on success."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "conv2d_bn.onnx"


def _bnfuse(args: list[str | bytes], **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if k != "BNFUSE_IN_PROCESS"} | env
    return subprocess.run(
        [sys.executable, "-m", "bnfuse", *args], cwd=ROOT, capture_output=True, env=environ,
        timeout=120,
    )  # fmt: skip


def test_a_file_name_that_is_not_utf8_is_fused_and_verified_under_lang_c(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    src = os.path.join(folder, b"mod\xffel.onnx")
    shutil.copyfile(SAMPLE, src)
    out = os.path.join(folder, b"f.onnx")
    proc = _bnfuse([src, b"-o", out, b"-q"], LANG="C", LC_ALL="C")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"PASS") and proc.stderr == b""
    proc = _bnfuse([b"verify", src, out, b"-q"], LANG="C", LC_ALL="C")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs a folder no one can write to")
def test_an_unwritable_home_leaves_stderr_empty(tmp_path: Path) -> None:
    """onnxruntime warns on stderr when it cannot store its telemetry id under HOME."""
    proc = _bnfuse([str(SAMPLE), "-o", str(tmp_path / "f.onnx"), "-q"], HOME="/proc/1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
