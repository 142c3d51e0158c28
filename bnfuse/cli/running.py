"""What every command does around the library call: one line and exit 2 for an error, the
sandbox before a torch model opens, a progress bar, the summary and the reports."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from bnfuse.cli.app import EXIT_USAGE, EXIT_VERIFY_FAILED
from bnfuse.errors import BnfuseError, first_line, printable

if TYPE_CHECKING:
    from bnfuse.batch import BatchResult
    from bnfuse.result import FuseResult, VerifyResult
    from bnfuse.verify.options import Step

T = TypeVar("T")


def run(
    debug: bool,
    what: str,
    func: Callable[[], T],
    on_error: Callable[[str], None] | None = None,
) -> T:
    """Call the library; a BnfuseError (or a crash) becomes one line and exit 2.

    ``on_error`` is told the line first (to write it into the reports).
    """
    try:
        return func()
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, BnfuseError):
            message = exc.message + (f" ({exc.hint})" if exc.hint else "")
            code = exc.exit_code
        elif isinstance(exc, MemoryError):
            message, code = f"{what}: not enough memory; nothing was written", EXIT_USAGE
        else:  # a bug, or a model no check foresaw: one line, exit 2
            message = (
                f"{what}: {type(exc).__name__}: {first_line(exc)[:300]} "
                "(run with --debug for the traceback)"
            )
            code = EXIT_USAGE
        if on_error is not None:
            with contextlib.suppress(Exception):  # the error itself is what must be said
                on_error(message)
        typer.echo(f"bnfuse: error: {printable(message)}", err=True)
        raise typer.Exit(code) from None


def confine(models: list[Path], writes: list[Path], reports: list[Path], trusted: bool) -> None:
    """Before a torch model is opened: the second wall (bnfuse.sandbox), writes beneath the
    folders of ``writes`` (and of the job summary a .md report goes to) only."""
    from bnfuse import sandbox

    sandbox.for_model(models, sandbox.writable_folders(writes, reports), trusted=trusted)


@contextlib.contextmanager
def progress(quiet: bool, first: str = "verifying") -> Iterator[Step | None]:
    """A progress bar on stderr, for a person at a terminal; else None. It names the stage
    that runs: ``first`` (``fusing``: reading, folding, writing) until the verifier reports
    its first step, then ``verifying`` with the verifier's count."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.description}"), console=Console(stderr=True), transient=True,
    ) as progress:  # fmt: skip
        opening = "reading, folding, writing" if first == "fusing" else "loading"
        task = progress.add_task(opening, total=None, stage=first)

        def on_step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total, stage="verifying")

        yield on_step


def echo(text: str, nl: bool = True) -> None:
    """A line of the summary on standard output; a reader that has gone changes nothing
    (bnfuse.report.terminal.reader_left)."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError:
        from bnfuse.report.terminal import reader_left

        reader_left()


def finish_batch(result: BatchResult, reports: list[Path], quiet: bool, force: bool) -> None:
    from bnfuse.report.batch import print_batch_summary, write_batch_reports

    write_batch_reports(reports, result, force=force)
    for o in result.outcomes:  # each error once, path once, where CI logs look for them
        if o.error is not None:
            message = o.error.removeprefix(f"{o.input}: ")
            typer.echo(f"bnfuse: error: {printable(f'{o.input}: {message}')}", err=True)
    if quiet:
        from bnfuse.report.line import batch_line

        echo(batch_line(result))
    else:
        from bnfuse.report.terminal import console as terminal_console
        from bnfuse.report.terminal import shown

        console = terminal_console()
        print_batch_summary(result, console)
        for path in reports:
            console.print(f"report: {shown(path)}", highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def finish(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    reports: list[Path],
    quiet: bool,
    force: bool,
) -> None:
    from bnfuse import outputs
    from bnfuse.report import STDOUT, to_stdout, write_reports

    try:
        write_reports(reports, fusion, verification, force=force)
    except BaseException:
        if fusion is not None:  # the run ends in an error: its model goes too
            outputs.remove(fusion.outputs)
        raise
    aside = to_stdout(reports)  # the JSON report has standard output: the summary goes aside
    if quiet:
        from bnfuse.report.line import one_line

        if aside:
            typer.echo(one_line(fusion, verification), err=True)
        else:
            echo(one_line(fusion, verification))
    else:
        from bnfuse.report.terminal import console as terminal_console
        from bnfuse.report.terminal import print_fuse_summary, print_verify_summary, shown

        console = terminal_console(stderr=aside)
        if fusion is not None:
            print_fuse_summary(fusion, console)
        if verification is not None:
            print_verify_summary(verification, console)
        for path in reports:
            if path != STDOUT:
                console.print(f"report: {shown(path)}", highlight=False)
    if verification is not None and not verification.passed:
        raise typer.Exit(EXIT_VERIFY_FAILED)


def error_reports(
    reports: list[Path],
    fusion: FuseResult | None,
    message: str,
    force: bool,
    reads: list[tuple[str, Path]],
    also_writes: Sequence[tuple[str, Path]] = (),
    run: str = "",
) -> None:
    """Reports for a run that ended in an error (exit 2), so CI's always() finds them;
    ``run`` names it (``fuse model.onnx``).

    Under the same rules as ever (checked again here, since the error may have
    come before the check): nothing the run reads, not the output's path, no
    existing file without --force.
    """
    from bnfuse.report import STDOUT, SUFFIXES, write_reports

    paths = [p for p in reports if p.suffix.lower() in SUFFIXES or p == STDOUT]
    if not paths:
        return
    files = [p for p in paths if p != STDOUT]
    check_reports([*also_writes, *(("--report", p) for p in files)], reads, force)
    write_reports(paths, fusion, None, force=force, error=message, run=run)


def check_reports(
    targets: Sequence[tuple[str, Path]], reads: list[tuple[str, Path]], force: bool
) -> None:
    """bnfuse.outputs' rules for reports, against the given models and their external data."""
    if not targets:
        return
    from bnfuse import outputs
    from bnfuse.verify.sources import files_read

    outputs.check_targets(
        targets, [r for label, p in reads for r in files_read(p, label)], force=force
    )
