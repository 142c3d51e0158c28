"""``bnfuse inspect IN``: every BatchNorm, whether it folds and why not."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnfuse.cli.app import EXIT_NOT_FUSED, EXIT_USAGE, app
from bnfuse.cli.options import Debug, InputShape, TrustPickle
from bnfuse.cli.running import confine, echo, run

if TYPE_CHECKING:
    from bnfuse.result import FuseResult


@app.command("inspect")
def inspect_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="The model: .onnx, TorchScript .pt or .pt2 (several with --check).",
            metavar="INPUT...",
        ),
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON (schema bnfuse-inspect) instead of a table.")
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Print only what would still fold, and exit 1 if anything would: for a "
            "pre-commit hook or a CI step that keeps unfused models out.",
        ),
    ] = False,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
) -> None:
    """Show every BatchNorm (and constant Mul/Add after a layer): what it reads and feeds,
    whether it folds and why not, and the health of its parameters.

    Examples:

      bnfuse inspect model.onnx --json

      bnfuse inspect fused.onnx other.onnx --check   # exit 1 if a fold is left
    """
    if len(inputs) > 1 and not check:
        raise _one_at_a_time("several models are inspected with --check only")
    if len(inputs) > 1 and json_out:
        raise _one_at_a_time("--json describes one model")
    left = 0
    for input in inputs:
        result = _inspect(input, input_shape, trust_pickle, debug)
        if check:
            left += _said_left(input, result)
            continue
        if json_out:
            from bnfuse.report.json_report import render_inspect

            echo(render_inspect(result), nl=False)
        else:
            from bnfuse.report.terminal import console as terminal_console
            from bnfuse.report.terminal import print_inspect

            print_inspect(result, terminal_console())
    if left:
        raise typer.Exit(EXIT_NOT_FUSED)


def _inspect(
    input: Path, input_shape: list[str] | None, trust_pickle: bool, debug: bool
) -> FuseResult:
    def work() -> FuseResult:
        from bnfuse.api import fuse_file
        from bnfuse.verify.options import parse_input_shapes

        shapes = parse_input_shapes(input_shape or [])
        confine([input], [], [], trust_pickle)
        return fuse_file(input, None, dry_run=True, trust_pickle=trust_pickle, input_shapes=shapes)

    return run(debug, str(input), work)


def _said_left(input: Path, result: FuseResult) -> int:
    """How many folds are left in the model; a line on stderr names them."""
    if not result.folded:
        return 0
    names = ", ".join(c.node for c in result.folded[:3])
    more = ", ..." if len(result.folded) > 3 else ""
    typer.echo(
        f"bnfuse: {input}: {len(result.folded)} fold(s) left ({names}{more}); "
        f"bnfuse {input} -o FUSED makes them",
        err=True,
    )
    return len(result.folded)


def _one_at_a_time(why: str) -> typer.Exit:
    typer.echo(f"bnfuse: error: {why} (see bnfuse inspect -h)", err=True)
    return typer.Exit(EXIT_USAGE)
