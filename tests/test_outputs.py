"""No output path, signal, crash or race destroys a file or leaves a partial one.

The rules are bnfuse.outputs'; signal and crash cases run the real ``bnfuse``
command (supervised, in a child process) in a subprocess, with a fault
injected at a chosen point.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from bnfuse import outputs
from sample_models.models import layer_bn
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """m.onnx (inline) and e.onnx with its weights in e.data."""
    model = layer_bn("Conv", cin=16, cout=16)
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(model, tmp_path / "e.onnx", save_as_external_data=True, location="e.data")
    return tmp_path


# --- paths ----------------------------------------------------------------------------


def test_output_on_the_inputs_data_file_is_refused(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _digest(folder)
    args = [str(folder / "e.onnx"), "-o", str(folder / "e.data"), "--force"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "would overwrite the input's external data file" in err
    assert _digest(folder) == before


def test_output_through_a_link_to_the_input_is_refused(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "soft.onnx").symlink_to(folder / "m.onnx")
    os.link(folder / "m.onnx", folder / "hard.onnx")
    before = _digest(folder)
    for name in ("soft.onnx", "hard.onnx"):
        args = [str(folder / "m.onnx"), "-o", str(folder / name), "--force"]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "would overwrite the input model" in err, err
    assert _digest(folder) == before


def test_report_on_an_input_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input's external data happens to be named like a report."""
    onnx.save(
        layer_bn("Conv", cin=16, cout=16), tmp_path / "m.onnx",
        save_as_external_data=True, location="w.json",
    )  # fmt: skip
    before = _digest(tmp_path)
    for command in (["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx")],
                    ["verify", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")]):  # fmt: skip
        code, _, err = run_cli([*command, "--report", str(tmp_path / "w.json"), "--force"], capsys)
        assert code == 2 and "would overwrite the" in err and "external data" in err, err
        assert _digest(tmp_path) == before


def test_report_on_the_output_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = folder / "out.md"
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(out), "--report", str(out)], capsys)
    assert code == 2 and "each output needs its own file" in err
    assert not out.exists()


def test_existing_report_needs_force(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = folder / "r.json"
    report.write_text("keep me")
    args = ["verify", str(folder / "m.onnx"), str(folder / "m.onnx"), "--report", str(report)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already exists" in err and report.read_text() == "keep me"
    code, _, err = run_cli([*args, "--force"], capsys)
    assert code == 0, err
    assert report.read_text().startswith("{")


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_only_regular_files_are_replaced(
    kind: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FIFO, a socket, a character device (made here: a test must never risk /dev/null)."""
    target = folder / f"{kind}.onnx"
    if kind == "fifo":
        os.mkfifo(target)
        check = stat.S_ISFIFO
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
        check = stat.S_ISSOCK
    else:
        try:
            os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("making a device node needs root")
        check = stat.S_ISCHR
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(target), "--force"], capsys)
    assert code == 2 and "not a regular file" in err, err
    assert check(os.stat(target).st_mode), f"{target} was replaced"


def test_output_that_is_a_dangling_link_is_refused_and_replaced_with_force(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = folder / "f.onnx"
    link.symlink_to(folder / "nowhere" / "x.onnx")
    args = [str(folder / "m.onnx"), "-o", str(link), "--no-verify"]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "a symbolic link to" in err and "which does not exist" in err and "--force" in err
    assert link.is_symlink()
    code, _, err = run_cli([*args, "--force"], capsys)
    assert code == 0, err
    assert not link.is_symlink() and link.is_file()  # the link replaced, nothing written through it
    assert not (folder / "nowhere").exists()


def test_trailing_slash_names_a_folder(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(folder / "newdir") + "/"], capsys)
    assert code == 2 and "a trailing slash names a folder" in err
    assert not (folder / "newdir").exists()


def test_batch_output_that_names_a_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([str(folder), "-o", str(folder / "x.onnx")], capsys)
    assert code == 2 and "batch mode writes each model into a folder" in err
    assert not (folder / "x.onnx").exists()


def test_unwritable_folder_is_diagnosed(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = folder / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes into any folder: let access() answer as for a user
        from bnfuse import outputs

        monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != locked)
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(locked / "f.onnx")], capsys)
    assert code == 2 and "cannot write into" in err and "permission denied" in err, err


def test_name_too_long_is_diagnosed(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = folder / ("x" * 300 + ".onnx")
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(out)], capsys)
    assert code == 2 and "the file name is" in err and "--debug" not in err, err


# --- races ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["whole", "mapped"])
def test_a_file_that_appears_meanwhile_is_not_replaced(
    route: str, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs on one -o without --force: the second to finish refuses, the first's file stays."""
    from bnfuse import outputs
    from bnfuse.onnx import light

    if route == "mapped":
        monkeypatch.setattr(light, "LIGHT_FROM", 0)
    out = folder / "f.onnx"
    real = outputs.publish

    def other_run_finishes_first(tmp: Path, final: Path, *, force: bool) -> None:
        out.write_bytes(b"the other run's model")  # this run's file is written, not yet in place
        real(tmp, final, force=force)

    monkeypatch.setattr(outputs, "publish", other_run_finishes_first)
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(out), "--no-verify"], capsys)
    assert code == 2 and "appeared there while bnfuse was writing it" in err
    assert out.read_bytes() == b"the other run's model"
    assert not [p for p in folder.iterdir() if p.name.startswith(".bnfuse-tmp-")]


def _leftover(folder: Path, name: str, *, marked: bool = True) -> Path:
    """A temporary folder as a run leaves it: a partial file, bnfuse's mark once locked."""
    path = folder / name
    path.mkdir()
    (path / "f.onnx").write_bytes(b"partial")
    if marked:
        (path / outputs.MARK).touch()
    return path


def test_leftovers_of_a_killed_run_are_swept(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _leftover(folder, ".bnfuse-tmp-dead1234")
    live = _leftover(folder, ".bnfuse-tmp-live5678")  # another run, still writing: locked
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(folder / "f.onnx")], capsys)
        assert code == 0, err
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)


def test_a_folder_bnfuse_did_not_mark_is_never_swept(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's folder of that name, or another run's between its creation and its lock."""
    mine = _leftover(folder, ".bnfuse-tmp-mine", marked=False)
    code, _, err = run_cli([str(folder / "m.onnx"), "-o", str(folder / "f.onnx")], capsys)
    assert code == 0, err
    assert (mine / "f.onnx").read_bytes() == b"partial"


def test_the_folder_holding_the_input_is_never_swept(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = _leftover(folder, ".bnfuse-tmp-models")  # marked, unlocked: it looks left over
    (folder / "m.onnx").rename(models / "m.onnx")
    code, _, err = run_cli([str(models / "m.onnx"), "-o", str(folder / "f.onnx")], capsys)
    assert code == 0, err
    assert (models / "m.onnx").is_file()


def test_parallel_runs_into_one_folder_all_succeed(folder: Path) -> None:
    """Each run sweeps the folder as it starts; none may take another's temporary folder."""

    def run(i: int) -> subprocess.Popen[str]:
        args = [str(folder / "m.onnx"), "-o", str(folder / f"f{i}.onnx"), "--no-verify", "-q"]
        return subprocess.Popen(
            [sys.executable, "-m", "bnfuse", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    runs = [run(i) for i in range(12)]
    results = [(r.wait(timeout=120), r.stderr.read() if r.stderr else "") for r in runs]
    assert all(code == 0 for code, _ in results), results
    assert not list(folder.glob(".bnfuse-tmp-*"))


def test_disk_full_report_leaves_nothing(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Path.write_text

    def disk_full(self: Path, *args: object, **kwargs: object) -> int:
        if self.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", disk_full)
    before = sorted(p.name for p in folder.iterdir())
    args = [str(folder / "m.onnx"), "-o", str(folder / "f.onnx")]
    code, _, err = run_cli([*args, "--report", str(folder / "a.md"), "--report", str(folder / "r.json")], capsys)  # fmt: skip
    assert code == 2 and "the disk is full" in err
    assert sorted(p.name for p in folder.iterdir()) == before  # no model, no .md, no temp


# --- signals and crashes, through the real command ---------------------------------------

# Runs ``bnfuse ARGS`` as the console script does (supervised), after FAULT is injected.
_RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
{fault}
from bnfuse.cli import main
sys.argv = ["bnfuse", *sys.argv[1:]]
main()
"""


def _bnfuse(fault: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    code = _RUNNER.format(root=str(ROOT), fault=textwrap.dedent(fault))
    env = {k: v for k, v in os.environ.items() if k != "BNFUSE_IN_PROCESS"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env
    )


_WHILE_WRITING = """
from bnfuse import outputs
real = outputs.write_all
def write_all(fd, data):
    os.kill({target}, signal.{sig})  # the output file is open, and empty
    real(fd, data)
outputs.write_all = write_all
"""
# Reads the model's weights mapped, as for a large file (a small one is parsed whole).
_MAPPED = """
from bnfuse.onnx import light
light.LIGHT_FROM = 0
"""

_WHILE_VERIFYING = """
from bnfuse.verify import compare
real = compare.verify_models
def verify_models(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
compare.verify_models = verify_models
"""


@pytest.mark.parametrize("route", ["whole", "mapped"])
@pytest.mark.parametrize(
    ("sig", "target"),
    [("SIGTERM", "os.getpid()"), ("SIGHUP", "os.getpid()"), ("SIGTERM", "os.getppid()")],
    ids=["sigterm", "sighup", "sigterm-to-supervisor"],
)
def test_signal_while_writing_leaves_nothing(
    sig: str, target: str, route: str, folder: Path
) -> None:
    before = sorted(p.name for p in folder.iterdir())
    fault = _WHILE_WRITING.format(sig=sig, target=target) + (_MAPPED if route == "mapped" else "")
    proc = _bnfuse(fault, [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--no-verify"])
    assert proc.returncode == 128 + signal.Signals[sig].value, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bnfuse: error: stopped by {sig}; nothing partial was left behind"
    ]
    assert sorted(p.name for p in folder.iterdir()) == before


_AFTER_PUBLISHING = """
from bnfuse import outputs
real = outputs.publish
def publish(tmp, final, *, force):
    real(tmp, final, force=force)
    os.kill({target}, signal.SIGTERM)  # the output is complete and in place
outputs.publish = publish
"""


@pytest.mark.parametrize("target", ["os.getpid()", "os.getppid()"], ids=["child", "supervisor"])
def test_signal_after_the_output_is_in_place_removes_it(target: str, folder: Path) -> None:
    """A stopped run leaves nothing, not even a complete output (a signal's timing decides
    nothing); the supervisor removes what any of its processes published."""
    before = sorted(p.name for p in folder.iterdir())
    fault = _AFTER_PUBLISHING.format(target=target)
    proc = _bnfuse(fault, [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--no-verify"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


_WHILE_PUBLISHING = """
from bnfuse import outputs
real = outputs.file_id
sent = []
def file_id(path):
    if not sent and path.name == "f.onnx" and os.path.exists(path):
        sent.append(path)  # the output is in place; publish() is about to record it
        os.kill({target}, signal.SIGTERM)
    return real(path)
outputs.file_id = file_id
"""


@pytest.mark.parametrize("target", ["os.getpid()", "os.getppid()"], ids=["child", "supervisor"])
def test_signal_between_placing_and_recording_the_output_removes_it(
    target: str, folder: Path
) -> None:
    """The output is linked into place, then recorded for cleanup: a signal in between
    waits for the record, so the cleanup knows of the file."""
    before = sorted(p.name for p in folder.iterdir())
    fault = _WHILE_PUBLISHING.format(target=target)
    proc = _bnfuse(fault, [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--no-verify"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def test_signal_while_verifying_removes_the_unverified_output(folder: Path) -> None:
    before = sorted(p.name for p in folder.iterdir())
    proc = _bnfuse(_WHILE_VERIFYING, [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "-q"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == before


_SHRINK_INPUT = """
from bnfuse import fold
from bnfuse.onnx import io, light
light.LIGHT_FROM = 0  # map the weights as for a large file (a small one is parsed whole)
real = fold.fold_weight_rounded
def shrink_then_fold(*args, **kwargs):
    os.truncate(sys.argv[1], 100)  # another process shrinks the memory-mapped input
    return real(*args, **kwargs)
fold.fold_weight_rounded = shrink_then_fold
"""


def test_input_shrunk_during_the_run_ends_in_one_line(folder: Path) -> None:
    """SIGBUS on the mapped input: one line, exit 2, no temp folder, no output."""
    src = folder / "big.onnx"
    onnx.save(layer_bn("Conv", cin=64, cout=64), src)  # a weight past the page the header is on
    before = sorted(p.name for p in folder.iterdir())
    proc = _bnfuse(_SHRINK_INPUT, [str(src), "-o", str(folder / "f.onnx"), "--no-verify"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGBUS" in lines[0], proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


# --- a file replaced with --force is put back when the run then fails ----------------------


def _with_old_output(folder: Path) -> dict[str, str]:
    (folder / "f.onnx").write_bytes(b"the user's previous fused model")
    return _digest(folder)


def test_force_then_verification_that_cannot_run_keeps_the_old_file(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    before = _with_old_output(folder)
    np.savez(folder / "x.npz", x=np.zeros((1, 3, 5), np.float32))  # the wrong rank
    before = _digest(folder)
    args = [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--force",
            "--inputs", str(folder / "x.npz")]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert _digest(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


_KILL_WHILE_VERIFYING = """
from bnfuse.verify import compare
real = compare.verify_models
def verify_models(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the child dies; the supervisor cleans up
compare.verify_models = verify_models
"""


@pytest.mark.parametrize(
    ("fault", "code"),
    [(_WHILE_VERIFYING, 128 + signal.SIGTERM), (_KILL_WHILE_VERIFYING, 2)],
    ids=["sigterm", "child-killed"],
)
def test_force_then_a_stopped_verification_keeps_the_old_file(
    fault: str, code: int, folder: Path
) -> None:
    before = _with_old_output(folder)
    args = [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--force", "-q"]
    proc = _bnfuse(fault, args)
    assert proc.returncode == code, proc.stderr
    assert _digest(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_force_and_a_verified_run_replaces_the_file(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_old_output(folder)
    args = [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "--force", "-q"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert onnx.load(folder / "f.onnx").graph.node
    assert not list(folder.glob(".bnfuse-tmp-*"))


# --- the child dies with its parent ------------------------------------------------------

_SLOW_VERIFY = """
from bnfuse.verify import compare
import time
real = compare.verify_models
def verify_models(*args, **kwargs):
    with open({marker!r}, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(4)
    return real(*args, **kwargs)
compare.verify_models = verify_models
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie no one has reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGUSR1"])
def test_the_child_dies_with_its_parent(sig: str, folder: Path) -> None:
    """Killing the ``bnfuse`` process alone (not its group) ends the work too: nothing is
    published, and nothing is printed, after the command has exited."""
    import time

    before = sorted(p.name for p in folder.iterdir())
    marker = folder / "f.onnx.started"
    fault = textwrap.dedent(_SLOW_VERIFY.format(marker=str(marker)))
    code = _RUNNER.format(root=str(ROOT), fault=fault)
    args = [str(folder / "m.onnx"), "-o", str(folder / "f.onnx"), "-q"]
    env = {k: v for k, v in os.environ.items() if k != "BNFUSE_IN_PROCESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "verification never started"
    time.sleep(0.2)
    child = int(marker.read_text())
    proc.send_signal(signal.Signals[sig])
    proc.wait(timeout=30)
    marker.unlink()
    deadline = time.monotonic() + 30
    while _alive(child):
        if time.monotonic() > deadline:
            pytest.fail("the child outlived its parent")
        time.sleep(0.05)
    time.sleep(0.5)
    assert sorted(p.name for p in folder.iterdir()) == before
