"""Run the command in a child process, so that even a crash leaves nothing behind.

Some failures cannot be caught inside the process that meets them: a SIGBUS
when another process shrinks a memory-mapped input, a segfault in a native
library on a hostile model, the kernel's OOM killer. The ``bnfuse`` command
therefore does its work in a forked child while the parent waits. The child
tells the parent, through a pipe, of each temporary folder it makes and each
file it publishes (bnfuse.outputs.on_event). If the child dies of a signal,
the parent removes what it published and its temporary folders, prints one
line, and exits 2. Signals the parent receives (SIGTERM, SIGHUP, SIGINT) are
passed on to the child, which cleans up itself (bnfuse.outputs.Terminated).

POSIX only; elsewhere, and when bnfuse is called as a library, the work runs
in-process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bnfuse import outputs

EXIT_USAGE = 2
# True in the child that does the work (bnfuse.sandbox confines it, never a library's caller).
in_child = False

_WHY: dict[int, str] = {
    signal.SIGBUS: "a file bnfuse was reading shrank or became unreadable during the run "
    "(SIGBUS: was the input modified meanwhile?)",
    signal.SIGSEGV: "a native library crashed on this model (SIGSEGV)",
    signal.SIGABRT: "a native library aborted on this model (SIGABRT)",
    signal.SIGILL: "a native library crashed on this model (SIGILL)",
    signal.SIGFPE: "a native library crashed on this model (SIGFPE)",
    signal.SIGKILL: "killed (SIGKILL; out of memory?)",
}


def available() -> bool:
    return hasattr(os, "fork") and os.name == "posix"


_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def run(work: Callable[[], int]) -> int:
    """``work()`` in a child process; its exit code, or 2 (after cleaning up) if it crashed.

    The parent's forwarding handlers are in place before the fork, so a signal
    that comes at any moment reaches the child (held until its pid is known).
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child: list[int] = []
    pending: list[int] = []
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if not child:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child[0], signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: bnfuse.cli installs its own handlers (outputs.Terminated)
        global in_child
        in_child = True
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(read_fd)
        code = EXIT_USAGE
        try:
            _die_with(parent)
            outputs.on_event = _reporter(write_fd)
            code = work()
        except BaseException:  # --debug lets errors through: show them as Python would
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    child.append(pid)
    for signum in pending:
        forward(signum, None)
    os.close(write_fd)
    try:
        return _wait(pid, read_fd, received)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _die_with(parent: int) -> None:
    """Have the kernel send this child SIGTERM when ``parent`` dies (Linux), however it dies.

    A parent killed by SIGKILL or by a signal it does not forward (SIGUSR1) would
    otherwise leave the child running, to publish its output and print PASS after
    the command has exited. SIGTERM lets the child clean up what it wrote.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took
        os.kill(os.getpid(), signal.SIGTERM)


def _reporter(fd: int) -> Callable[..., None]:
    def report(kind: str, path: Path, kept: Path | None = None) -> None:
        third = os.path.abspath(kept) if kept is not None else _identity(path)
        record = f"{kind}\0{os.path.abspath(path)}\0{third}\n"
        os.write(fd, os.fsencode(record))

    return report


def _identity(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def _wait(pid: int, read_fd: int, received: list[int]) -> int:
    """The child's exit code; after a signal or a crash, what it published is removed."""
    data = b""
    with os.fdopen(read_fd, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            data += chunk
    _, status = os.waitpid(pid, 0)
    _remove_scratch(data)
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code > 128:  # stopped by a signal: what any of its processes published goes too
            _clean_up(data)
        elif received:  # the signal came as the child finished: the run was stopped all the same
            _clean_up(data)
            return _stopped(received[0])
        return code
    signum = os.WTERMSIG(status)
    _clean_up(data)
    if signum in _FORWARDED:  # it came before the child could take it: stopped, cleaned up
        return _stopped(signum)
    why = _WHY.get(signum, f"stopped by signal {signal.Signals(signum).name}")
    print(f"bnfuse: error: {why}; nothing was left behind", file=sys.stderr)
    return EXIT_USAGE


def _stopped(signum: int) -> int:
    name = signal.Signals(signum).name
    print(f"bnfuse: error: stopped by {name}; nothing partial was left behind", file=sys.stderr)
    return 128 + signum


def _remove_scratch(data: bytes) -> None:
    """The scratch folders the child worked in (bnfuse.sandbox), however it ended."""
    import shutil

    for line in os.fsdecode(data).splitlines():
        parts = line.split("\0")
        if len(parts) == 3 and parts[0] == "scratch":
            shutil.rmtree(parts[1], ignore_errors=True)


def _clean_up(data: bytes) -> None:
    """Remove what the dead child published (if unchanged since), putting back any file it
    replaced, and its temporary folders."""
    folders: set[Path] = set()
    previous: dict[Path, Path] = {}
    for line in os.fsdecode(data).splitlines():
        parts = line.split("\0")
        if len(parts) != 3:
            continue
        kind, path, third = parts[0], Path(parts[1]), parts[2]
        if kind == "staging":
            folders.add(path.parent)
        elif kind == "previous":
            previous[path] = Path(third)
        elif kind == "published" and third and _identity(path) == third:
            with contextlib.suppress(OSError):
                if path in previous:
                    os.replace(previous.pop(path), path)
                else:
                    path.unlink()
    for folder in folders:
        outputs.sweep(folder)
