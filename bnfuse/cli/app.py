"""The ``bnfuse`` typer application and its exit codes (stable; scripts rely on them).

0  success
1  verification failed (the fused model's outputs differ beyond tolerance), or
     inspect --check found a fold left
2  bad usage, or an unreadable or invalid input; nothing was written
128 + N  stopped by signal N (SIGTERM: 143), after cleaning up
"""

from __future__ import annotations

import typer

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FUSED = 1  # inspect --check: a fold is left

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
        "  bnfuse --version\n\n"
        "Exit codes: 0 ok, 1 verification failed (inspect --check: a fold is left), "
        "2 bad usage or unreadable input, "
        "128+N stopped by signal N (143: SIGTERM)."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Fold inference-time BatchNormalization into the neighbouring layer."""
