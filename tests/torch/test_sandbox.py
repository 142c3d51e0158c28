"""The second wall: should bnfuse's reading of a torch program miss something, the
``bnfuse`` command's child still cannot write outside the folders it writes into.

Each case turns the first wall off (the archive checks pass everything) in a real
``bnfuse`` process and hands it a TorchScript module whose ``forward`` creates a
file elsewhere with ``aten::from_file(shared=True)``. Under Landlock the write
fails and the run ends in one line; the same run without the wall writes the file,
which shows the test can tell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from bnfuse import sandbox
from sample_models.torch_nets import ConvBN

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sandbox.abi() < 1, reason="Landlock is not available here")

_RUNNER = """
import sys
sys.path.insert(0, {root!r})
from bnfuse.torch import archive, script_archive
script_archive.check = lambda path: None  # the first wall, as if it had missed the call
archive.check = lambda path: None
{more}
from bnfuse.cli import main
sys.argv = ["bnfuse", *sys.argv[1:]]
main()
"""
_NO_WALL = """
from bnfuse import sandbox
sandbox.confine = lambda folders: None
"""


class _Writer(ConvBN):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.path = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8).fill_(88)
        return self.bn(self.conv(x)) + m.sum().to(x.dtype) * 0


def _run(args: list[str], *, wall: bool) -> subprocess.CompletedProcess[str]:
    code = _RUNNER.format(root=str(ROOT), more="" if wall else textwrap.dedent(_NO_WALL))
    env = {k: v for k, v in os.environ.items() if k != "BNFUSE_IN_PROCESS"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("command", ["fuse", "verify", "inspect"])
@pytest.mark.parametrize("wall", [True, False], ids=["confined", "without-the-wall"])
def test_a_missed_call_still_cannot_write_elsewhere(
    command: str, wall: bool, tmp_path: Path
) -> None:
    elsewhere, work = tmp_path / "elsewhere", tmp_path / "work"
    elsewhere.mkdir()
    work.mkdir()
    marker = elsewhere / "MARKER"
    model = work / "m.pt"
    torch.jit.save(torch.jit.script(_Writer(str(marker)).eval()), str(model))
    shape = ["--input-shape", "x:1x3x8x8"]
    args = {
        "fuse": [str(model), "-o", str(work / "f.pt"), *shape],
        "verify": ["verify", str(model), str(model), *shape],
        "inspect": ["inspect", str(model), *shape],
    }[command]
    proc = _run(args, wall=wall)
    if not wall:
        if command != "inspect":  # inspect runs no forward
            assert marker.exists(), proc.stderr
        return
    assert not marker.exists(), "the write got out"
    if command != "inspect":
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (work / "f.pt").exists()


def test_a_clean_torch_model_is_fused_verified_and_reported_when_confined(tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(ConvBN().eval(), (torch.randn(1, 3, 8, 8),)), model)
    reports = tmp_path / "reports"
    reports.mkdir()
    args = [str(model), "-o", str(tmp_path / "f.pt2"), "--report", str(reports / "r.json"), "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "bnfuse", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS") and proc.stderr == ""
    assert (tmp_path / "f.pt2").is_file() and (reports / "r.json").is_file()


def test_a_process_is_confined_once(tmp_path: Path) -> None:
    """A batch confines its process at its first torch model and finds it confined at each
    later one: one Landlock layer (a process may stack 16), one scratch folder."""
    code = textwrap.dedent(f"""
        import sys, tempfile
        sys.path.insert(0, {str(ROOT)!r})
        from bnfuse import sandbox
        results = [sandbox.confine([{str(tmp_path)!r}]) for _ in range(20)]
        assert results == [None] * 20, results
        fd, name = tempfile.mkstemp()
        print(name)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    scratch = Path(proc.stdout.strip()).parent
    assert scratch.name.startswith("bnfuse-run-") and scratch.parent == Path(tempfile.gettempdir())
    shutil.rmtree(scratch)
