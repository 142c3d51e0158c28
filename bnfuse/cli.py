"""The ``bnfuse`` command: parse, call the library, print, set the exit code.

Exit codes (stable; scripts rely on them):
  0  success
  1  verification failed (the fused model's outputs differ beyond tolerance)
  2  bad usage, or an unreadable or invalid input; nothing was written

``bnfuse IN -o OUT`` is short for ``bnfuse fuse IN -o OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from bnfuse.errors import BnfuseError

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
        "Exit codes: 0 ok, 1 verification failed, 2 bad usage or unreadable input."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(exc: BnfuseError, debug: bool) -> NoReturn:
    if debug:
        raise exc
    message = f"bnfuse: error: {exc.message}"
    if exc.hint:
        message += f" ({exc.hint})"
    typer.echo(message, err=True)
    raise typer.Exit(exc.exit_code)


@app.command("fuse")
def fuse_command(
    input: Annotated[
        Path,
        typer.Argument(help="The model to fuse (.onnx; external data is found beside it)."),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the fused model."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="List what would be folded and what is skipped; write nothing."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace OUTPUT if it already exists.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    """Fold BatchNorms and write the fused model.

    Example: bnfuse model.onnx -o fused.onnx
    """
    if output is None and not dry_run:
        typer.echo("bnfuse: error: missing -o/--output (or pass --dry-run)", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        from bnfuse.api import fuse

        result = fuse(input, output, force=force, dry_run=dry_run)
    except BnfuseError as exc:
        _fail(exc, debug)
    except Exception as exc:  # a bug, or a model no check foresaw: one line, exit 2
        if debug:
            raise
        typer.echo(
            f"bnfuse: error: {input}: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE) from None
    if not quiet:
        from rich.console import Console

        from bnfuse.report.terminal import print_fuse_summary

        print_fuse_summary(result, Console(soft_wrap=True))


_COMMANDS = {"fuse"}


@app.callback()
def _root() -> None:
    """Fold inference-time BatchNormalization into the neighbouring layer."""


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``bnfuse IN ...`` routes to ``bnfuse fuse IN ...``.

    Usage errors exit 2 (click's own code for them), as the contract says.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in _COMMANDS and not args[0].startswith("-"):
        args.insert(0, "fuse")
    app(args=args, prog_name="bnfuse")
