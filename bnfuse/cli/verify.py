"""``bnfuse verify A B``: compare two models on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnfuse.cli.app import app
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
)  # fmt: skip
from bnfuse.cli.running import check_reports, confine, error_reports, finish, progress, run

if TYPE_CHECKING:
    from bnfuse.result import VerifyResult


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

        check_reports(check_report_paths(reports), reads, force)
        options = verify_options(
            device, seed, samples, input_shape, inputs, per_layer, atol, rtol, trust_pickle,
            max_memory,
        )  # fmt: skip
        confine([original, candidate], reports, reports, trust_pickle)
        from bnfuse.verify.compare import verify_models

        with progress(quiet) as on_step:
            return verify_models(original, candidate, options, on_step)

    def on_error(message: str) -> None:
        error_reports(reports, None, message, force, reads, run=f"verify {candidate.name}")

    verification = run(debug, str(candidate), work, on_error)
    run(debug, "report", lambda: finish(None, verification, reports, quiet, force))
