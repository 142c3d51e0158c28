"""Where bnfuse writes, and how: one set of rules for every file it writes.

The files a run writes are its outputs: the fused model, its external data
file, and each report. Every one of them follows these rules:

- It is never a file the run reads (the input model, its external data,
  ``--inputs``), compared by identity (device and inode), so a link or another
  spelling of the same file is caught; and no two outputs are the same file.
- Only a regular file is ever replaced, and only with ``--force``; a folder,
  device, FIFO or socket at that path is refused.
- It is written inside a private temporary folder beside it, named
  ``.bnfuse-tmp-XXXXXXXX``, and moved into place when complete. Without
  ``--force`` the move is a hard link, which fails if a file appeared there
  meanwhile (another run): a file is never replaced silently. With ``--force``
  it is a rename.
- The temporary folder is held with an ``flock`` while the run lives, and
  marked as bnfuse's (``MARK``) once it is held. SIGTERM, SIGHUP and Ctrl-C
  unwind the run (``terminate_on_signals``), which removes it; after a
  SIGKILL, the next run that writes into that folder removes every such
  folder that is marked and whose lock is free, and none that holds a file
  the run reads. A folder of that name that bnfuse did not make is never
  touched.
- A file replaced with ``--force`` is not lost if the run then fails (its
  verification cannot run, a report cannot be written) or is stopped: within
  ``replacing()``, the previous file is kept (a hard link in a held temporary
  folder) until the run ends, and ``remove`` puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from bnfuse.errors import OutputError

TMP_PREFIX = ".bnfuse-tmp-"
# Written into a temporary folder once its run holds the lock: only folders with it are swept.
MARK = ".bnfuse-staging"


class Terminated(BaseException):
    """The run was asked to stop by a signal; raised so that cleanup runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_FileId = tuple[int, int]


def file_id(path: Path) -> _FileId | None:
    """(device, inode) of the file ``path`` names (links followed), or None if there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise OutputError(f"{path}: the file name is too long for this file system") from exc
        raise OutputError(f"{path}: cannot check it ({exc.strerror or exc})") from exc
    return st.st_dev, st.st_ino


def check_targets(
    targets: Sequence[tuple[str, Path]], reads: Sequence[tuple[str, Path]], *, force: bool
) -> None:
    """Refuse any output that would destroy an input, another output, or a non-regular file.

    ``targets`` are (what, path) pairs, e.g. ("output", fused.onnx) or
    ("--report", r.json); ``reads`` the same for every file the run reads,
    e.g. ("the input model", model.onnx).
    """
    read_ids = {i: (label, p) for label, p in reads if (i := file_id(p)) is not None}
    _reading.update(os.path.realpath(p) for _, p in reads)
    seen: dict[object, tuple[str, Path]] = {}
    for what, path in targets:
        where = f"{what} {path}" if what.startswith("-") else str(path)
        name = path.name
        if not name or str(path).endswith(os.sep):
            raise OutputError(f"{where}: names a folder; expected a file name")
        _check_folder(where, path.parent if str(path.parent) else Path("."), name)
        ident = file_id(path)
        key: object = ident if ident is not None else os.path.abspath(path)
        if key in seen:
            other_what, other = seen[key]
            raise OutputError(
                f"{where}: the same file as {other_what} {other}; each output needs its own file"
            )
        seen[key] = (what, path)
        if ident is None:
            if os.path.islink(path) and not force:  # a link to nothing: the name is taken
                raise OutputError(
                    f"{where}: a symbolic link to {os.readlink(path)}, which does not exist",
                    hint="pass --force to replace the link, or choose another name",
                )
            continue
        if ident in read_ids:
            label, source = read_ids[ident]
            same = "" if os.path.abspath(source) == os.path.abspath(path) else f" {source}"
            raise OutputError(
                f"{where}: would overwrite {label}{same}; bnfuse never writes over a file it reads",
                hint="choose another name",
            )
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{where}: is a folder; expected a file name")
        if not stat.S_ISREG(mode):
            raise OutputError(
                f"{where}: not a regular file (a device, FIFO or socket); bnfuse only "
                "ever replaces regular files"
            )
        if not force:
            raise OutputError(f"{where}: already exists", hint="pass --force to replace it")


def _check_folder(where: str, folder: Path, name: str) -> None:
    if not folder.exists():
        raise OutputError(f"{where}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{where}: {folder} is not a folder")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(name)) > name_max:
        raise OutputError(
            f"{where}: the file name is {len(os.fsencode(name))} bytes long; this file "
            f"system allows {name_max}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = _read_only_fs(folder)
        raise OutputError(
            f"{where}: cannot write into {folder} "
            f"({'a read-only file system' if read_only else 'permission denied'})"
        )


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# Every file this run reads (real paths): a folder holding one is never swept.
_reading: set[str] = set()


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A private temporary folder in ``folder``, locked while in use and removed afterwards.

    Leftovers of killed runs in ``folder`` (marked, their lock free) are removed first.
    """
    tmp, fd = _held_folder(folder)
    try:
        yield tmp
    finally:
        _drop(tmp, fd)


def _held_folder(folder: Path) -> tuple[Path, int]:
    """A new temporary folder in ``folder``, locked (the descriptor holds it), then marked
    and recorded; a terminating signal waits until it is (an unmarked folder is one no
    cleanup removes)."""
    sweep(folder)
    with _signals_held():
        try:
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
        except OSError as exc:
            raise OutputError(f"{folder}: cannot write into it ({exc.strerror or exc})") from exc
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(os.open(tmp / MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            if on_event is not None:
                on_event("staging", tmp)
        except BaseException:
            _drop(tmp, fd)
            raise
    return tmp, fd


def _drop(tmp: Path, fd: int) -> None:
    """Remove the folder, whole: a terminating signal waits until it is gone (one that
    came midway could leave it without its mark, which the sweep of a later run, or the
    supervisor's, needs to know it for bnfuse's)."""
    with _signals_held():
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


Staged = list[tuple[Path, Path]]  # (temporary file, where it goes), in publishing order


def write_new(folder: Path, write: Callable[[Path], Staged], *, force: bool) -> list[Path]:
    """The one way bnfuse writes files: ``write(tmpdir)`` in a staging folder in ``folder``
    returns the (temporary, final) pairs it made, which are then published in order.

    All or none: if one cannot be published, those already published are removed.
    Returns the final paths, in publishing order.
    """
    done: list[Path] = []
    with staging(folder) as tmpdir:
        staged = write(tmpdir)
        try:
            for tmp, final in staged:
                publish(tmp, final, force=force)
                done.append(final)
        except BaseException:
            remove(done)
            raise
    return done


def write_file(
    output: Path, write: Callable[[Path], Staged], *, force: bool, what: str = ""
) -> list[Path]:
    """``write_new`` into ``output``'s folder, a failed write said in one line naming
    ``output`` (``what``: how the user named it, "--report" say) and its cause."""
    try:
        return write_new(output.parent, write, force=force)
    except OSError as exc:
        raise write_error(output, exc, what) from exc


def sweep(folder: Path) -> list[Path]:
    """Remove the temporary folders of runs that no longer live; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        if not os.path.isfile(os.path.join(entry.path, MARK)):
            continue  # not bnfuse's, or a run that has not locked it yet
        inside = os.path.realpath(entry.path) + os.sep
        if any(p.startswith(inside) for p in _reading):
            continue  # this run reads a file in it
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run
            os.close(fd)
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        os.close(fd)
        removed.append(Path(entry.path))
    return removed


# Told of each temporary folder made ("staging", folder), each file published ("published",
# file) and each file kept to be put back ("previous", file, where its old version is):
# the supervising process (bnfuse.supervise) keeps the list, so that it can clean up if
# this process dies of a crash.
on_event: Callable[..., None] | None = None


def publish(tmp: Path, final: Path, *, force: bool) -> None:
    """Move the finished file ``tmp`` to ``final``; without ``force`` never replace a file.

    A terminating signal waits until the file is in place and recorded: one that
    came between the two would leave a file that no cleanup knows of.
    """
    with _signals_held():
        _publish(tmp, final, force=force)


# While not None, terminate_on_signals' handler notes a signal here instead of raising.
_held: list[int] | None = None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A terminating signal that comes during the block is raised (Terminated) after it.

    Held in the handler, not with a signal mask: the mask is per thread, and a
    process-directed signal goes to any thread that does not block it (numpy's
    BLAS threads), whose handler would still interrupt the main thread.
    """
    global _held
    outer, _held = _held, []
    try:
        yield
    finally:
        came, _held = _held, outer
        if came:
            raise Terminated(came[0])


def _publish(tmp: Path, final: Path, *, force: bool) -> None:
    if force:
        ident = file_id(final)
        if ident is not None and not stat.S_ISREG(os.stat(final).st_mode):
            raise OutputError(f"{final}: not a regular file; bnfuse only replaces regular files")
        if ident is not None and _previous is not None and final not in _previous:
            _keep_previous(final)
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            raise OutputError(
                f"{final}: a file appeared there while bnfuse was writing it (another run?); "
                "it was not replaced",
                hint="pass --force to replace it",
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # no hard links on this file system (FAT, some network mounts): the next best
            if os.path.lexists(final):
                raise OutputError(
                    f"{final}: a file appeared there while bnfuse was writing it; "
                    "it was not replaced",
                    hint="pass --force to replace it",
                ) from None
            os.rename(tmp, final)
    published.append((final, file_id(final)))
    if on_event is not None:
        on_event("published", final)


# Every file this process published, with its identity then: a run stopped by a signal
# removes them (``remove_published``), so that a stopped run leaves nothing, complete or not.
published: list[tuple[Path, _FileId | None]] = []


def remove_published() -> None:
    """Remove the files this process published that are still the ones it wrote
    (putting back the file each replaced, if any)."""
    for path, ident in published:
        if ident is not None and file_id(path) == ident:
            _take_back(path)
    published.clear()


# While ``replacing()`` runs: each file replaced with --force -> its previous version,
# hard-linked into a held temporary folder beside it (with that folder's descriptor).
_previous: dict[Path, tuple[Path, Path, int]] | None = None


@contextlib.contextmanager
def replacing() -> Iterator[None]:
    """Within the block, a file replaced with ``--force`` can still be put back.

    A run publishes its model before it verifies it and writes its reports;
    if the run then fails or is stopped, ``remove`` and ``remove_published``
    restore the file that was there before, so that "nothing was written"
    holds for ``--force`` too. When the block ends the kept versions go.
    Nested blocks are one.
    """
    global _previous
    if _previous is not None:
        yield
        return
    _previous = {}
    try:
        yield
    finally:
        kept, _previous = _previous, None
        for _backup, tmp, fd in kept.values():
            _drop(tmp, fd)


def _keep_previous(final: Path) -> None:
    assert _previous is not None
    tmp, fd = _held_folder(final.parent)
    backup = tmp / "previous"
    try:
        try:
            os.link(final, backup, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            shutil.copy2(final, backup)  # no hard links on this file system
    except BaseException:
        _drop(tmp, fd)
        raise
    _previous[final] = (backup, tmp, fd)
    if on_event is not None:
        on_event("previous", final, backup)


def _take_back(path: Path) -> None:
    """Remove the file this run published at ``path``, or put back the one it replaced."""
    kept = _previous.pop(path, None) if _previous is not None else None
    with contextlib.suppress(OSError):
        if kept is not None:
            os.replace(kept[0], path)
            _drop(kept[1], kept[2])
        else:
            path.unlink()


_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EFBIG: "the file is too large for this file system",
}


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` (os.write may write fewer)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_error(path: Path, exc: OSError, what: str = "") -> OutputError:
    """One line for a failed write, naming the cause in words (nothing was left behind)."""
    cause = _WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    where = f"{what} {path}" if what else str(path)
    return OutputError(f"{where}: cannot write it ({cause}); nothing was written")


def remove(paths: Sequence[Path]) -> None:
    """Remove files this run published (on failure), putting back any it replaced;
    never raises."""
    for path in paths:
        _take_back(path)


_TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM, SIGHUP (what CI sends on cancel) and Ctrl-C into ``Terminated``, once.

    The exception unwinds the run like Ctrl-C does, so every ``finally`` and
    cleanup on the way out runs; a second signal during that cleanup is
    ignored rather than cutting it short. Outside the main thread this does
    nothing (Python delivers signals to the main thread only).
    """
    try:
        previous = {sig: signal.getsignal(sig) for sig in _TERMINATING}
    except ValueError:
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        for sig in _TERMINATING:
            signal.signal(sig, signal.SIG_IGN)
        if _held is not None:  # a file is being published: after it is recorded
            _held.append(signum)
            return
        raise Terminated(signum)

    try:
        for sig in _TERMINATING:
            signal.signal(sig, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
