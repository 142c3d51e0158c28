"""What the command line asks of verification, parsed without loading the verifier.

``bnfuse model.onnx -o fused.onnx --no-verify`` still reads ``--input-shape``
(a PyTorch model is traced at those shapes), so the options live apart from
bnfuse.verify.compare, which imports onnx and onnxruntime's helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bnfuse.errors import InputError

Step = Callable[[str, int, int], None]  # (what runs now, steps done, steps in all)


@dataclass
class VerifyOptions:
    device: str = "all"
    seed: int = 0
    samples: int = 1
    atol: float | None = None
    rtol: float | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: Path | None = None
    per_layer: bool = False
    trust_pickle: bool = False
    max_bytes: int = 4 * 2**30  # what verification may hold (bnfuse.verify.budget)


def parse_input_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x224x224", "mask:1x224"]`` -> {"x": (1, 3, 224, 224), ...}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(
                f"--input-shape {item!r}: expected NAME:DxDxD, e.g. input:1x3x224x224"
            ) from None
        shapes[name] = shape
    return shapes
