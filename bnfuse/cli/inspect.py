"""``bnfuse inspect IN``: every BatchNorm, whether it folds and why not."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnfuse.cli.app import EXIT_NOT_FUSED, app
from bnfuse.cli.options import Debug, InputShape, TrustPickle
from bnfuse.cli.running import confine, echo, run

if TYPE_CHECKING:
    from bnfuse.result import FuseResult


@app.command("inspect")
def inspect_command(
    input: Annotated[Path, typer.Argument(help="The model: .onnx, TorchScript .pt or .pt2.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON (schema bnfuse-inspect) instead of a table.")
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit 1 if anything would still fold: for a pre-commit hook or a CI step "
            "that keeps unfused models out.",
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

      bnfuse inspect fused.onnx --check   # exit 1 if a fold is left
    """

    def work() -> FuseResult:
        from bnfuse.api import fuse_file
        from bnfuse.verify.options import parse_input_shapes

        shapes = parse_input_shapes(input_shape or [])
        confine([input], [], [], trust_pickle)
        return fuse_file(input, None, dry_run=True, trust_pickle=trust_pickle, input_shapes=shapes)

    result = run(debug, str(input), work)
    if json_out:
        from bnfuse.report.json_report import render_inspect

        echo(render_inspect(result), nl=False)
    else:
        from bnfuse.report.terminal import console as terminal_console
        from bnfuse.report.terminal import print_inspect

        print_inspect(result, terminal_console())
    if check and result.folded:
        names = ", ".join(c.node for c in result.folded[:3]) + (
            ", ..." if len(result.folded) > 3 else ""
        )
        typer.echo(
            f"bnfuse: {input}: {len(result.folded)} fold(s) left ({names}); "
            f"bnfuse {input} -o FUSED makes them",
            err=True,
        )
        raise typer.Exit(EXIT_NOT_FUSED)
