"""The second wall around a torch model's code: Linux Landlock, where the kernel has it.

bnfuse reads a TorchScript or .pt2 program before torch opens it and lets it
run only if it is tensor arithmetic (bnfuse.torch.allowed). Should that
reasoning have a flaw, ``confine`` limits what the process that loads and runs
the model can still do, for the rest of its life (Landlock cannot be lifted):

- write, create, rename or remove files only beneath the folders the run
  writes into (those of the output and the reports, where its temporary
  folders live) and a scratch folder of its own, which becomes the process's
  temporary folder (``TMPDIR``) and which the supervisor removes when the
  child ends; and write ``/dev/null``;
- execute no program at all;
- open no TCP connection and listen on no TCP port (Landlock ABI 4, Linux 6.7);
- signal no process and reach no abstract UNIX socket outside itself (ABI 6).

Not contained: reading files (a model's code could read what the user can and
write it into the output), writes beneath the folders above, other kinds of
socket, and the tensor arithmetic's own cost in memory and time. The ``bnfuse``
command confines its supervised child (bnfuse.supervise), not the process that
calls bnfuse as a library. Where Landlock is absent (another OS, an old kernel,
a container that blocks it) nothing is confined and ``confine`` says so.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_VERSION = 1  # LANDLOCK_CREATE_RULESET_VERSION
_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE = 1 << 0, 1 << 1
_REMOVE_DIR, _REMOVE_FILE = 1 << 4, 1 << 5
_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_NET_ALL = 1 | 2  # bind and connect TCP
_SCOPE_ALL = 1 | 2  # abstract UNIX sockets, signals


class _Ruleset(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("allowed_access", ctypes.c_uint64),
        ("parent_fd", ctypes.c_int32),
    ]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        version = int(libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), _VERSION))
    except (OSError, AttributeError):
        return 0
    return max(version, 0)


_confined = False


def confine(writable: Iterable[Path]) -> str | None:
    """Confine this process (and what it starts) as the module says; None once done, else
    why it could not be. Once per process: a batch's later models find it confined."""
    global _confined
    if _confined:
        return None
    version = abi()
    if version < 1:
        return "Landlock is not available here"
    libc = ctypes.CDLL(None, use_errno=True)
    writes = _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE
    writes |= (_REFER if version >= 2 else 0) | (_TRUNCATE if version >= 3 else 0)
    attr = _Ruleset(
        handled_access_fs=writes | _EXECUTE,
        handled_access_net=_NET_ALL if version >= 4 else 0,
        scoped=_SCOPE_ALL if version >= 6 else 0,
    )
    size = 24 if version >= 6 else 16 if version >= 4 else 8
    ruleset = int(libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0))
    if ruleset < 0:
        return f"Landlock refused a ruleset ({os.strerror(ctypes.get_errno())})"
    try:
        folders = {os.path.realpath(p) for p in writable} | {_scratch()}
        rules = [(f, writes) for f in sorted(folders) if os.path.isdir(f)]
        rules.append(("/dev/null", _WRITE_FILE | (_TRUNCATE if version >= 3 else 0)))
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(allowed_access=allowed, parent_fd=fd)
                if libc.syscall(_ADD_RULE, ruleset, _PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    return f"Landlock refused a rule for {path} ({os.strerror(ctypes.get_errno())})"
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return "the process could not give up new privileges"
        if libc.syscall(_RESTRICT_SELF, ruleset, 0) != 0:
            return f"Landlock could not restrict the process ({os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    _confined = True
    return None


def _scratch() -> str:
    """A temporary folder of this run's own, made the process's temporary folder."""
    from bnfuse import outputs

    folder = tempfile.mkdtemp(prefix="bnfuse-run-")
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder
    if outputs.on_event is not None:  # the supervisor removes it when the child ends
        outputs.on_event("scratch", Path(folder))
    return folder


def writable_folders(writes: Iterable[Path], reports: Iterable[Path]) -> list[Path]:
    """The folders a run writes into: those of ``writes`` (its output and reports), and
    $GITHUB_STEP_SUMMARY's where a .md report among ``reports`` is appended there too."""
    from bnfuse.report import job_summary

    summary = job_summary(list(reports))
    files = [*writes, *([summary] if summary is not None else [])]
    return [Path(os.path.abspath(f)).parent for f in files]


def for_model(models: Iterable[Path], folders: Iterable[Path], *, trusted: bool) -> None:
    """Confine the ``bnfuse`` command's child before it opens a torch model among ``models``
    (``folders``: where it writes). Not for a trusted file, an ONNX model (data, run by
    onnxruntime) or bnfuse called as a library; where Landlock is absent, nothing is."""
    from bnfuse import supervise
    from bnfuse.formats import TORCH_FORMATS, detect

    if trusted or not supervise.in_child:
        return
    try:
        if not any(detect(m) in TORCH_FORMATS for m in models):
            return
    except Exception:  # a file that is no model: opening it says so, in its own words
        return
    confine(folders)
