"""The ``bnfuse`` command: parse, call the library, print, set the exit code.

Exit codes (stable; scripts rely on them):
  0  success
  1  verification failed (the fused model's outputs differ beyond tolerance)
  2  bad usage, or an unreadable or invalid input; nothing was written
  128 + N  stopped by signal N (SIGTERM: 143), after cleaning up

``bnfuse IN -o OUT`` is short for ``bnfuse fuse IN -o OUT``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from bnfuse.errors import BnfuseError, first_line, printable
from bnfuse.formats import MODEL_SUFFIXES, is_pattern

if TYPE_CHECKING:
    from bnfuse.batch import BatchResult
    from bnfuse.result import FuseResult, VerifyResult
    from bnfuse.verify.options import Step, VerifyOptions

T = TypeVar("T")

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2

app = typer.Typer(
    name="bnfuse",
    help=(
        "Fold inference-time BatchNormalization into the neighbouring Conv, "
        "ConvTranspose, Gemm or MatMul.\n\n"
        "Examples:\n\n"
        "  bnfuse model.onnx -o fused.onnx\n\n"
        "  bnfuse model.onnx --dry-run\n\n"
        "  bnfuse verify model.onnx fused.onnx --report junit.xml\n\n"
        "  bnfuse inspect model.onnx\n\n"
        "Exit codes: 0 ok, 1 verification failed, 2 bad usage or unreadable input, "
        "128+N stopped by signal N (143: SIGTERM)."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Options shared by `fuse` (which verifies after writing) and `verify`.
Device = Annotated[
    str,
    typer.Option(help="Where to run the comparison: cpu, cuda, or all that are present."),
]
Seed = Annotated[int, typer.Option(help="Seed of the generated inputs.")]
Samples = Annotated[int, typer.Option(min=1, help="How many generated input samples to run.")]
InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Shape for an input with dynamic dimensions, NAME:1x3x224x224 (repeatable).",
    ),
]
InputsFile = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        exists=True,
        dir_okay=False,
        help="Your own inputs: a .npz of input name to array.",
    ),
]
PerLayer = Annotated[
    bool,
    typer.Option(
        "--per-layer",
        help="Also compare each folded layer's output with the BN's, and name the worst.",
    ),
]
Atol = Annotated[
    float | None, typer.Option(help="Absolute tolerance (default by dtype: fp32 1e-4, fp16 1e-2).")
]
Rtol = Annotated[
    float | None, typer.Option(help="Relative tolerance (default by dtype: fp32 1e-4, fp16 1e-2).")
]
Reports = Annotated[
    list[Path] | None,
    typer.Option(
        "--report",
        help="Write a report; type by suffix: .json, .md, .xml (JUnit), .html (repeatable).",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only (for CI logs).")]
MaxMemory = Annotated[
    float,
    typer.Option(
        "--max-memory",
        min=0.01,
        metavar="GIB",
        help="Memory verification may hold (inputs, outputs, comparison), in GiB; a larger "
        "one is refused before it runs.",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Trust the model file to run its own code: load a full torch.save pickle, and "
        "TorchScript or .pt2 code that calls more than tensor arithmetic.",
    ),
]


def _run(
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


def _confine(models: list[Path], writes: list[Path], reports: list[Path], trusted: bool) -> None:
    """Before a torch model is opened: the second wall (bnfuse.sandbox), writes beneath the
    folders of ``writes`` (and of the job summary a .md report goes to) only."""
    from bnfuse import sandbox

    sandbox.for_model(models, sandbox.writable_folders(writes, reports), trusted=trusted)


def _verify_options(
    device: str,
    seed: int,
    samples: int,
    input_shape: list[str] | None,
    inputs: Path | None,
    per_layer: bool,
    atol: float | None,
    rtol: float | None,
    trust_pickle: bool = False,
    max_memory: float = 4.0,
) -> VerifyOptions:
    from bnfuse.verify.options import VerifyOptions, parse_input_shapes

    return VerifyOptions(
        device=device,
        seed=seed,
        samples=samples,
        atol=atol,
        rtol=rtol,
        input_shapes=parse_input_shapes(input_shape or []),
        inputs=inputs,
        per_layer=per_layer,
        trust_pickle=trust_pickle,
        max_bytes=int(max_memory * 2**30),
    )


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Step | None]:
    """A progress bar on stderr for verification, for a person at a terminal; else None."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.description}"), console=Console(stderr=True), transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("loading", total=None)

        def on_step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        yield on_step


def _print(text: str, nl: bool = True) -> None:
    """A line of the summary on standard output; a reader that has gone changes nothing
    (bnfuse.report.terminal.reader_left)."""
    try:
        typer.echo(text, nl=nl)
    except BrokenPipeError:
        from bnfuse.report.terminal import reader_left

        reader_left()


def _finish_batch(result: BatchResult, reports: list[Path], quiet: bool, force: bool) -> None:
    from bnfuse.report.batch import print_batch_summary, write_batch_reports

    write_batch_reports(reports, result, force=force)
    for o in result.outcomes:  # each error once, path once, where CI logs look for them
        if o.error is not None:
            message = o.error.removeprefix(f"{o.input}: ")
            typer.echo(f"bnfuse: error: {printable(f'{o.input}: {message}')}", err=True)
    if quiet:
        from bnfuse.report.line import batch_line

        _print(batch_line(result))
    else:
        from bnfuse.report.terminal import console as terminal_console
        from bnfuse.report.terminal import shown

        console = terminal_console()
        print_batch_summary(result, console)
        for path in reports:
            console.print(f"report: {shown(path)}", highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _finish(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    reports: list[Path],
    quiet: bool,
    force: bool,
) -> None:
    from bnfuse import outputs
    from bnfuse.report import write_reports

    try:
        write_reports(reports, fusion, verification, force=force)
    except BaseException:
        if fusion is not None:  # the run ends in an error: its model goes too
            outputs.remove(fusion.outputs)
        raise
    if quiet:
        from bnfuse.report.line import one_line

        _print(one_line(fusion, verification))
    else:
        from bnfuse.report.terminal import console as terminal_console
        from bnfuse.report.terminal import print_fuse_summary, print_verify_summary, shown

        console = terminal_console()
        if fusion is not None:
            print_fuse_summary(fusion, console)
        if verification is not None:
            print_verify_summary(verification, console)
        for path in reports:
            console.print(f"report: {shown(path)}", highlight=False)
    if verification is not None and not verification.passed:
        raise typer.Exit(EXIT_VERIFY_FAILED)


@app.command("fuse")
def fuse_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="The model to fuse: .onnx (external data beside it), TorchScript .pt, "
            "or torch.export .pt2. Several models, folders or globs: batch mode.",
            metavar="INPUT...",
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the fused model (a folder in batch mode).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Worker processes in batch mode.")
    ] = 1,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="List what would be folded and what is skipped; write nothing."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace OUTPUT if it already exists.")
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Write the fused model without comparing outputs.")
    ] = False,
    trust_pickle: TrustPickle = False,
    device: Device = "all",
    seed: Seed = 0,
    samples: Samples = 1,
    input_shape: InputShape = None,
    inputs_file: InputsFile = None,
    per_layer: PerLayer = False,
    atol: Atol = None,
    rtol: Rtol = None,
    max_memory: MaxMemory = 4.0,
    report: Reports = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fold BatchNorms, write the fused model, and verify it against the original.

    Examples:

      bnfuse model.onnx -o fused.onnx

      bnfuse model.onnx -o fused.onnx --report report.json --report junit.xml

      bnfuse model.onnx -o fused.onnx --input-shape input:1x3x224x224 --samples 4

      bnfuse models/ 'zoo/**/*.onnx' -o fused/ -j 4 --report batch.json
    """
    _check_fuse_usage(inputs, output, dry_run)
    run = _Run(report or [], inputs_file, force, quiet, debug, trust_pickle)

    def verify_options() -> VerifyOptions:
        return _verify_options(
            device, seed, samples, input_shape, inputs_file, per_layer, atol, rtol, trust_pickle,
            max_memory,
        )  # fmt: skip

    if _is_batch(inputs):
        assert output is not None
        _fuse_batch(inputs, Path(output), jobs, None if no_verify else verify_options, run)
    else:
        out = Path(output) if output is not None else None
        _fuse_one(Path(inputs[0]), out, dry_run, no_verify, verify_options, run)


@dataclass(frozen=True)
class _Run:
    """What every fuse run is told besides its models: reports, data read, flags."""

    reports: list[Path]
    inputs_file: Path | None
    force: bool
    quiet: bool
    debug: bool
    trust_pickle: bool

    @property
    def data_read(self) -> list[tuple[str, Path]]:
        return [("the --inputs file", self.inputs_file)] if self.inputs_file is not None else []


def _is_batch(inputs: list[str]) -> bool:
    return len(inputs) != 1 or Path(inputs[0]).is_dir() or is_pattern(inputs[0])


def _usage_error(message: str) -> typer.Exit:
    typer.echo(f"bnfuse: error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _check_fuse_usage(inputs: list[str], output: str | None, dry_run: bool) -> None:
    """The -o a run needs: a file for one model, a folder for a batch."""
    if output is None and not dry_run:
        if len(inputs) > 1:
            raise _usage_error(
                "several inputs make a batch, which needs -o DIR (a folder for the models)"
            )
        raise _usage_error("missing -o/--output (or pass --dry-run)")
    if _is_batch(inputs):
        if output is None or dry_run:
            raise _usage_error("batch mode needs -o OUTDIR (and no --dry-run)")
        if Path(output).suffix.lower() in MODEL_SUFFIXES and not Path(output).is_dir():
            raise _usage_error(
                f"-o {output}: batch mode writes each model into a folder, and this names a "
                "file (give a folder, e.g. -o fused/)"
            )
    elif output is not None and output.endswith(("/", os.sep)) and not dry_run:
        raise _usage_error(
            f"-o {output}: a trailing slash names a folder, and one model is written to a "
            f"file (e.g. -o {output}fused{_suffix_for(Path(inputs[0]))})"
        )


def _fuse_batch(
    inputs: list[str],
    outdir: Path,
    jobs: int,
    verify_options: Callable[[], VerifyOptions] | None,
    run: _Run,
) -> None:
    def batch() -> BatchResult:
        from bnfuse.batch import run_batch
        from bnfuse.report import check_report_paths

        targets = check_report_paths(run.reports)
        return run_batch(
            inputs, outdir, jobs=jobs, force=run.force,
            verify=verify_options() if verify_options is not None else None,
            trust_pickle=run.trust_pickle, also_writes=targets, also_reads=run.data_read,
        )  # fmt: skip

    result = _run(run.debug, "batch", batch)
    _run(run.debug, "report", lambda: _finish_batch(result, run.reports, run.quiet, run.force))


def _fuse_one(
    input: Path,
    out: Path | None,
    dry_run: bool,
    no_verify: bool,
    verify_options: Callable[[], VerifyOptions],
    run: _Run,
) -> None:
    state: dict[str, FuseResult] = {}  # the fusion result, for the reports of a failed run

    def work() -> tuple[FuseResult, VerifyResult | None]:
        from bnfuse.api import fuse_and_verify
        from bnfuse.report import check_report_paths

        targets = check_report_paths(run.reports)
        options = verify_options()
        writes = [p for _, p in targets] + ([out] if out is not None and not dry_run else [])
        _confine([input], writes, run.reports, run.trust_pickle)
        with _progress(run.quiet) as on_step:
            return fuse_and_verify(
                input, out, verify=None if no_verify else options, force=run.force,
                dry_run=dry_run, trust_pickle=run.trust_pickle,
                input_shapes=options.input_shapes, also_writes=targets, also_reads=run.data_read,
                on_fused=lambda result: state.update(fusion=result), on_step=on_step,
            )  # fmt: skip

    def error_reports(message: str) -> None:
        also = [("output", out)] if out is not None else []
        reads = [("the input model", input), *run.data_read]
        _error_reports(run.reports, state.get("fusion"), message, run.force, reads, also)

    fusion, verification = _run(run.debug, str(input), work, error_reports)
    _run(
        run.debug, "report",
        lambda: _finish(fusion, verification, run.reports, run.quiet, run.force),
    )  # fmt: skip


def _error_reports(
    reports: list[Path],
    fusion: FuseResult | None,
    message: str,
    force: bool,
    reads: list[tuple[str, Path]],
    also_writes: Sequence[tuple[str, Path]] = (),
) -> None:
    """Reports for a run that ended in an error (exit 2), so CI's always() finds them.

    Under the same rules as ever (checked again here, since the error may have
    come before the check): nothing the run reads, not the output's path, no
    existing file without --force.
    """
    from bnfuse.report import SUFFIXES, write_reports

    paths = [p for p in reports if p.suffix.lower() in SUFFIXES]
    if not paths:
        return
    _check_reports([*also_writes, *(("--report", p) for p in paths)], reads, force)
    write_reports(paths, fusion, None, force=force, error=message)


def _check_reports(
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


def _suffix_for(input: Path) -> str:
    suffix = input.suffix.lower()
    return suffix if suffix in MODEL_SUFFIXES else ".onnx"


@app.command("verify")
def verify_command(
    original: Annotated[Path, typer.Argument(help="The reference model (e.g. before fusion).")],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.")],
    device: Device = "all",
    seed: Seed = 0,
    samples: Samples = 1,
    input_shape: InputShape = None,
    inputs: InputsFile = None,
    per_layer: PerLayer = False,
    atol: Atol = None,
    rtol: Rtol = None,
    max_memory: MaxMemory = 4.0,
    report: Reports = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace existing report files.")
    ] = False,
    quiet: Quiet = False,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
) -> None:
    """Compare two models with the same inputs and outputs; exit 1 if any output differs.

    Example: bnfuse verify model.onnx fused.onnx --report junit.xml
    """
    reports = report or []

    reads = [("the original model", original), ("the candidate model", candidate)]
    if inputs is not None:
        reads.append(("the --inputs file", inputs))

    def work() -> VerifyResult:
        from bnfuse.report import check_report_paths

        _check_reports(check_report_paths(reports), reads, force)
        options = _verify_options(
            device, seed, samples, input_shape, inputs, per_layer, atol, rtol, trust_pickle,
            max_memory,
        )  # fmt: skip
        _confine([original, candidate], reports, reports, trust_pickle)
        from bnfuse.verify.compare import verify_models

        with _progress(quiet) as on_step:
            return verify_models(original, candidate, options, on_step)

    def error_reports(message: str) -> None:
        _error_reports(reports, None, message, force, reads)

    verification = _run(debug, str(candidate), work, error_reports)
    _run(debug, "report", lambda: _finish(None, verification, reports, quiet, force))


@app.command("inspect")
def inspect_command(
    input: Annotated[Path, typer.Argument(help="The model: .onnx, TorchScript .pt or .pt2.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON (schema bnfuse-inspect) instead of a table.")
    ] = False,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
) -> None:
    """Show every BatchNorm (and constant Mul/Add after a layer): what it reads and feeds,
    whether it folds and why not, and the health of its parameters.

    Example: bnfuse inspect model.onnx --json
    """

    def work() -> FuseResult:
        from bnfuse.api import fuse_file
        from bnfuse.verify.options import parse_input_shapes

        shapes = parse_input_shapes(input_shape or [])
        _confine([input], [], [], trust_pickle)
        return fuse_file(input, None, dry_run=True, trust_pickle=trust_pickle, input_shapes=shapes)

    result = _run(debug, str(input), work)
    if json_out:
        from bnfuse.report.json_report import render_inspect

        _print(render_inspect(result), nl=False)
        return
    from bnfuse.report.terminal import console as terminal_console
    from bnfuse.report.terminal import print_inspect

    print_inspect(result, terminal_console())


_COMMANDS = {"fuse", "verify", "inspect"}


def _valued_options() -> set[str]:
    """The options of any command that take a value (``-o OUT``), as typer declares them:
    so that the input can be found among the words before it."""
    group = typer.main.get_command(app)
    names: set[str] = set()
    for command in getattr(group, "commands", {}).values():
        for param in command.params:  # click's (or typer's own copy of click's) parameters
            option = getattr(param, "param_type_name", "") == "option"
            if option and not getattr(param, "is_flag", False) and not getattr(param, "count", 0):
                names.update(param.opts)
    return names


def _route(args: list[str]) -> list[str] | str:
    """``bnfuse [OPTIONS] IN ...`` is ``bnfuse fuse [OPTIONS] IN ...``; or a usage error.

    Options may come before the input (``bnfuse -q m.onnx -o f.onnx``). A first
    word that is no file but looks like a command (``verfy``) is a typo.
    """
    first = None
    valued = _valued_options()
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            first = i + 1 if i + 1 < len(args) else None
            break
        if not word.startswith("-") or word == "-":
            first = i
            break
        i += 2 if word in valued else 1
    if first is None or args[first] in _COMMANDS:
        return args
    word = args[first]
    if not os.path.exists(word) and not is_pattern(word):
        import difflib

        close = difflib.get_close_matches(word, sorted(_COMMANDS), n=1, cutoff=0.6)
        if close:
            return f"unknown command '{word}'; did you mean '{close[0]}'?"
    return ["fuse", *args]


@app.callback()
def _root() -> None:
    """Fold inference-time BatchNormalization into the neighbouring layer."""


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``bnfuse IN ...`` routes to ``bnfuse fuse IN ...``.

    Usage errors exit 2 (click's own code for them), as the contract says. As
    the ``bnfuse`` command (``argv`` None) the work runs in a child process
    that a crash cannot take the cleanup with (bnfuse.supervise); called with
    ``argv`` (tests, embedding) it runs here.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-V"]):
        from bnfuse import __version__

        typer.echo(f"bnfuse {__version__}")
        raise SystemExit(EXIT_OK)
    routed = _route(args)
    if isinstance(routed, str):
        typer.echo(f"bnfuse: error: {routed}", err=True)
        raise SystemExit(EXIT_USAGE)
    args = routed
    from bnfuse import supervise

    if argv is None and supervise.available() and not os.environ.get("BNFUSE_IN_PROCESS"):
        code = supervise.run(lambda: _exit_code(args))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to add
                stream.flush()
        os._exit(code)  # the child did the work: nothing here needs the interpreter's teardown
    raise SystemExit(_exit_code(args))


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Libraries' warnings and log lines stay off stderr: bnfuse says what matters itself.

    numpy's RuntimeWarnings from constant evaluation, torch's UserWarnings and
    FutureWarnings, its loggers' tracebacks: a CI log holds one line for an
    error and nothing for a success. ``--debug`` lets them through.
    """
    if debug:
        yield
        return
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _exit_code(args: list[str]) -> int:
    """Run the app; SIGTERM, SIGHUP and Ctrl-C end it after cleanup, with 128 + the signal."""
    from bnfuse import outputs
    from bnfuse.outputs import Terminated, terminate_on_signals

    outputs.published.clear()  # this run's files only
    with outputs.replacing():  # a file replaced with --force comes back if the run fails
        try:
            with terminate_on_signals(), _quiet_libraries("--debug" in args):
                app(args=args, prog_name="bnfuse")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Terminated as exc:
            outputs.remove_published()  # a stopped run leaves nothing, not even a complete one
            message = f"bnfuse: error: stopped by {exc}; nothing partial was left behind"
            typer.echo(message, err=True)
            return 128 + exc.signum
    return 0
