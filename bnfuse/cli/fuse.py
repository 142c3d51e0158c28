"""``bnfuse fuse`` (and ``bnfuse IN -o OUT``): one model, or a batch of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnfuse.cli.app import EXIT_USAGE, app
from bnfuse.cli.options import (
    Atol,
    Debug,
    Device,
    InputsFile,
    InputShape,
    MaxMemory,
    PerLayer,
    Quiet,
    Reports,
    Rtol,
    Samples,
    Seed,
    TrustPickle,
    verify_options,
)
from bnfuse.cli.running import confine, error_reports, finish, finish_batch, progress, run
from bnfuse.formats import MODEL_SUFFIXES, is_pattern

if TYPE_CHECKING:
    from bnfuse.batch import BatchResult
    from bnfuse.result import FuseResult, VerifyResult
    from bnfuse.verify.options import VerifyOptions


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
    if _is_batch(inputs) and _to_stdout(report or []):
        raise _usage_error(
            "--report - prints one model's JSON report; batch mode writes its report to a file "
            "(e.g. --report batch.json)"
        )
    job = _Run(report or [], inputs_file, force, quiet, debug, trust_pickle)

    def options() -> VerifyOptions:
        return verify_options(
            device, seed, samples, input_shape, inputs_file, per_layer, atol, rtol, trust_pickle,
            max_memory,
        )  # fmt: skip

    if _is_batch(inputs):
        assert output is not None
        _fuse_batch(inputs, Path(output), jobs, None if no_verify else options, job)
    else:
        out = Path(output) if output is not None else None
        _fuse_one(Path(inputs[0]), out, dry_run, no_verify, options, job)


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


def _to_stdout(reports: list[Path]) -> bool:
    from bnfuse.report import to_stdout  # not at start: the reports' modules load numpy

    return to_stdout(reports)


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
    options_of: Callable[[], VerifyOptions] | None,
    job: _Run,
) -> None:
    def batch() -> BatchResult:
        from bnfuse.batch import run_batch
        from bnfuse.report import check_report_paths

        targets = check_report_paths(job.reports)
        return run_batch(
            inputs, outdir, jobs=jobs, force=job.force,
            verify=options_of() if options_of is not None else None,
            trust_pickle=job.trust_pickle, also_writes=targets, also_reads=job.data_read,
        )  # fmt: skip

    result = run(job.debug, "batch", batch)
    run(job.debug, "report", lambda: finish_batch(result, job.reports, job.quiet, job.force))


def _fuse_one(
    input: Path,
    out: Path | None,
    dry_run: bool,
    no_verify: bool,
    options_of: Callable[[], VerifyOptions],
    job: _Run,
) -> None:
    state: dict[str, FuseResult] = {}  # the fusion result, for the reports of a failed run

    def work() -> tuple[FuseResult, VerifyResult | None]:
        from bnfuse.api import fuse_and_verify
        from bnfuse.report import check_report_paths

        targets = check_report_paths(job.reports)
        options = options_of()
        writes = [p for _, p in targets] + ([out] if out is not None and not dry_run else [])
        confine([input], writes, job.reports, job.trust_pickle)
        with progress(job.quiet, "fusing") as on_step:
            return fuse_and_verify(
                input, out, verify=None if no_verify else options, force=job.force,
                dry_run=dry_run, trust_pickle=job.trust_pickle,
                input_shapes=options.input_shapes, also_writes=targets, also_reads=job.data_read,
                on_fused=lambda result: state.update(fusion=result), on_step=on_step,
            )  # fmt: skip

    def on_error(message: str) -> None:
        also = [("output", out)] if out is not None else []
        reads = [("the input model", input), *job.data_read]
        error_reports(
            job.reports, state.get("fusion"), message, job.force, reads, also,
            run=f"fuse {input.name}",
        )  # fmt: skip

    fusion, verification = run(job.debug, str(input), work, on_error)
    run(
        job.debug, "report",
        lambda: finish(fusion, verification, job.reports, job.quiet, job.force),
    )  # fmt: skip


def _suffix_for(input: Path) -> str:
    suffix = input.suffix.lower()
    return suffix if suffix in MODEL_SUFFIXES else ".onnx"
