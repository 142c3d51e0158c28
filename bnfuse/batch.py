"""Batch mode: fuse (and verify) many models with worker processes.

``bnfuse a.onnx models/ 'zoo/**/*.onnx' -o OUTDIR -j 4``: files, folders
(searched recursively for .onnx, .pt and .pt2) and glob patterns. Each model
is written under OUTDIR with its path relative to the folder or glob root it
came from, so two models with one name do not collide. One worker process per
model at a time (``-j``); one outcome per model; the batch's exit code is the
worst of them (2 for an error, 1 for a failed verification, else 0).
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bnfuse import outputs
from bnfuse.errors import BnfuseError, InputError, OutputError
from bnfuse.formats import BATCH_SUFFIXES, is_pattern
from bnfuse.result import FuseResult, VerifyResult

if TYPE_CHECKING:
    from bnfuse.verify.options import VerifyOptions


@dataclass
class Outcome:
    input: Path
    output: Path
    fusion: FuseResult | None = None
    verification: VerifyResult | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return 2
        if self.verification is not None and not self.verification.passed:
            return 1
        return 0


@dataclass
class BatchResult:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((o.exit_code for o in self.outcomes), default=0)


def expand(items: list[str]) -> list[tuple[Path, Path]]:
    """(model path, path relative to where it was found), in a stable order."""
    found: dict[Path, Path] = {}
    for item in items:
        path = Path(item)
        if is_pattern(item):
            root = _glob_root(item)
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in BATCH_SUFFIXES]
            if not files:
                raise InputError(f"{item}: matches no model file")
            for f in files:
                found.setdefault(f, _relative(f, root))
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES
            )
            if not files:
                raise InputError(f"{item}: a folder with no .onnx, .pt or .pt2 file")
            for f in files:
                found.setdefault(f, f.relative_to(path))
        elif path.is_file():
            found.setdefault(path, Path(path.name))
        else:
            raise InputError(f"{item}: no such file or folder")
    relatives = list(found.values())
    if len(set(relatives)) != len(relatives):
        dup = next(r for r in relatives if relatives.count(r) > 1)
        raise InputError(
            f"two inputs would both be written as {dup}", hint="fuse them in two batches"
        )
    return list(found.items())


def _glob_root(pattern: str) -> Path:
    """The folder a glob searches from: its leading parts without wildcards."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if is_pattern(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    force: bool
    verify: VerifyOptions | None
    trust_pickle: bool
    writes_beneath: tuple[Path, ...] = ()  # the folders a batch writes into (bnfuse.sandbox)


def run_one(job: Job) -> Outcome:
    """Fuse and verify one model; every error becomes the outcome's one-line message."""
    from bnfuse import sandbox
    from bnfuse.api import fuse_and_verify

    outcome = Outcome(job.input, job.output)
    try:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        sandbox.for_model([job.input], job.writes_beneath, trusted=job.trust_pickle)
        outcome.fusion, outcome.verification = fuse_and_verify(
            job.input,
            job.output,
            verify=job.verify,
            force=job.force,
            trust_pickle=job.trust_pickle,
            input_shapes=job.verify.input_shapes if job.verify is not None else {},
        )
    except BnfuseError as exc:
        outcome.error = str(exc)
    except MemoryError:
        outcome.error = "not enough memory"
    except Exception as exc:  # one bad model must not stop the batch
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def run_batch(
    items: list[str],
    outdir: Path,
    *,
    jobs: int = 1,
    force: bool = False,
    verify: VerifyOptions | None = None,
    trust_pickle: bool = False,
    also_writes: Sequence[tuple[str, Path]] = (),
    also_reads: Sequence[tuple[str, Path]] = (),
) -> BatchResult:
    """Fuse (and verify) every model ``items`` name into ``outdir``.

    ``also_writes`` (the caller's reports) are checked against every input model
    and ``also_reads`` (bnfuse.outputs' rules) before anything is written.
    """
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a folder; -o names a folder in batch mode")
    models = expand(items)
    if also_writes:
        reads = [("an input model", src) for src, _ in models]
        outputs.check_targets(also_writes, [*reads, *also_reads], force=force)
    outdir_resolved = outdir.resolve()
    for src, _ in models:
        if src.resolve().is_relative_to(outdir_resolved):
            raise OutputError(
                f"{src}: lies inside the output folder {outdir}", hint="choose another -o"
            )
    outdir.mkdir(parents=True, exist_ok=True)
    from bnfuse import sandbox

    reports = [p for _, p in also_writes]
    folders = (outdir, *sandbox.writable_folders(reports, reports))
    work = [Job(src, outdir / rel, force, verify, trust_pickle, folders) for src, rel in models]
    if jobs <= 1 or len(work) == 1:
        return BatchResult([run_one(job) for job in work])
    workers = min(jobs, len(work), os.cpu_count() or 1)
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        return BatchResult(list(pool.map(run_one, work)))
    except BaseException:  # stopped: the workers stop too, and clean up after themselves
        for process in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
