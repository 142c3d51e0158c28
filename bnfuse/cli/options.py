"""The options the commands share, declared once for typer; and the verifier's options
built from them (parsed without loading the verifier)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from bnfuse.verify.options import VerifyOptions

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
        help="Write a report; type by suffix: .json, .md, .xml (JUnit), .html (repeatable); "
        "- prints the JSON report on standard output (the summary then goes to stderr).",
    ),
]


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print one line: the verdict or what was written, or the error."
    ),
]


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


def verify_options(
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
