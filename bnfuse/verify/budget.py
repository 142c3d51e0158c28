"""How much memory a verification will hold, known from the declared shapes before it runs.

Verification keeps every input sample and every output of every run (the
original, the candidate and the noise floor: ``RUNS``) in memory until it
compares them, and comparing one output takes float64 working arrays of
``COMPARE_BYTES`` per element (measured: about 80). A tiny model can declare
inputs of 2^26 floats each, or an output of 2^31 elements (``Expand`` to a
constant shape), so the total is computed first, from the inputs' shapes and
onnx's shape inference of the outputs at those shapes (without data
propagation, which itself took 4 GB on eight inputs of 2^22 floats), and a
verification beyond the bound (``--max-memory``, 4 GiB by default) is refused
with the figure rather than left to the kernel's OOM killer. Not counted: the
runtime's own intermediate tensors, and an output whose shape inference
cannot tell.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from bnfuse.errors import InputError
from bnfuse.verify.inputs import InputSpec

RUNS = 3  # original, candidate, noise floor (on the CPU)
COMPARE_BYTES = 96


def check(
    specs: list[InputSpec],
    shapes: dict[str, tuple[int, ...]],
    samples: int,
    proto: onnx.ModelProto | None,
    limit: int,
) -> None:
    """Refuse a verification that would hold more than ``limit`` bytes, saying how much."""
    inputs = {s.name: _bytes(shapes[s.name], s.dtype) for s in specs if s.name in shapes}
    outputs = _output_sizes(proto, shapes) if proto is not None else {}
    held = sum(inputs.values()) + sum(size for size, _ in outputs.values()) * RUNS
    comparing = max((n for _, n in outputs.values()), default=0) * COMPARE_BYTES
    total = (held + comparing) * samples
    if total <= limit:
        return
    what, size = max(
        [*((f"input '{n}'", b) for n, b in inputs.items()),
         *((f"output '{n}'", b) for n, (b, _) in outputs.items())],
        key=lambda item: item[1],
    )  # fmt: skip
    raise InputError(
        f"verification would hold about {_gib(total)} (inputs, outputs and their comparison; "
        f"{what} alone is {_gib(size)} a sample), over the bound of {_gib(limit)}",
        hint="raise it with --max-memory GIB, or pass smaller --input-shape, fewer --samples "
        "or --no-verify",
    )


def _bytes(shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> int:
    return math.prod(shape) * dtype.itemsize


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _output_sizes(
    proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, int]]:
    """Each graph output's (bytes, elements) at these input shapes, where shape inference
    knows them."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for value in model.graph.input:
        if value.name not in shapes or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape
        dims.ClearField("dim")
        for d in shapes[value.name]:
            dims.dim.add().dim_value = d
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a model shape inference cannot read: verification says more
        return {}
    sizes = {}
    for value in inferred.graph.output:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if not tensor.HasField("shape") or None in dims:
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            continue
        elements = math.prod(d for d in dims if d is not None)
        sizes[value.name] = (elements * dtype.itemsize, elements)
    return sizes
