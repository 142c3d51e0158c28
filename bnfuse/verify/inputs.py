"""The inputs both models are run on: generated from the graph's input types, or the user's.

Generated inputs are seeded, so a run can be repeated exactly. Ranges per
dtype: floats from a standard normal; integers in [0, 10) (they are often
indices or lengths); bool fair coin flips. A dynamic dimension is set by
``--input-shape name:1x3x224x224``; a dynamic leading (batch) dimension
defaults to 1; any other dynamic dimension is an error that says what to pass.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnfuse.errors import InputError

Feeds = dict[str, np.ndarray]
# Generated inputs larger than this (elements per input) are refused, not allocated.
MAX_ELEMENTS = 2**28


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype[np.generic]
    # int: fixed; str: symbolic; None: unknown. The whole shape is None when even
    # the rank is unknown (a saved TorchScript module).
    shape: tuple[int | str | None, ...] | None


def onnx_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input '{vi.name}' is not a tensor; bnfuse can only feed tensors")
        shape: tuple[int | str | None, ...] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def concrete_shapes(
    specs: list[InputSpec], overrides: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    known = {s.name for s in specs}
    for name in overrides:
        if name not in known:
            raise InputError(
                f"--input-shape names '{name}', which is not an input "
                f"(inputs: {', '.join(sorted(known))})"
            )
    shapes = {}
    for spec in specs:
        if spec.shape is None:
            if spec.name not in overrides:
                raise InputError(
                    f"input '{spec.name}' has no recorded shape",
                    hint=f"pass --input-shape {spec.name}:1x3x224x224 (its real shape)",
                )
            shapes[spec.name] = overrides[spec.name]
            continue
        if spec.name in overrides:
            given = overrides[spec.name]
            if len(given) != len(spec.shape):
                raise InputError(
                    f"--input-shape {spec.name}: {len(given)} dimensions given, "
                    f"the input has {len(spec.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, given, strict=True)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"--input-shape {spec.name}: axis {axis} is fixed at {want}, got {got}"
                    )
            shapes[spec.name] = given
            continue
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim < 0:
                raise InputError(
                    f"input '{spec.name}' declares dimension {dim} on axis {axis}, which is no "
                    "size (ONNX dimensions are 0 or more, or named)",
                    hint=f"pass --input-shape {spec.name}:... with the real shape",
                )
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)  # a dynamic batch dimension
            else:
                example = "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
                raise InputError(
                    f"input '{spec.name}' has a dynamic dimension '{dim or '?'}' on axis {axis}",
                    hint=f"pass --input-shape {spec.name}:{example} with N set",
                )
        shapes[spec.name] = tuple(dims)
    return shapes


def generate(
    specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int, samples: int
) -> list[Feeds]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        feeds: Feeds = {}
        for spec in specs:
            shape = shapes[spec.name]
            size = int(np.prod(shape, dtype=np.float64))
            if size > MAX_ELEMENTS:
                raise InputError(
                    f"input '{spec.name}' would have {size:.3g} elements (shape "
                    f"{'x'.join(map(str, shape))}), too many to generate",
                    hint=f"pass --input-shape {spec.name}:... with a smaller shape",
                )
            kind = spec.dtype.kind
            if kind == "f" or spec.dtype.name == "bfloat16":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif kind in "iu":
                feeds[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
            elif kind == "b":
                feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                raise InputError(
                    f"input '{spec.name}' has dtype {spec.dtype}, which bnfuse cannot generate",
                    hint="pass your own data with --inputs data.npz",
                )
        out.append(feeds)
    return out


def load_npz(path: Path, specs: list[InputSpec]) -> list[Feeds]:
    """The user's arrays, by input name, used exactly as given (one sample)."""
    hint = "save it with numpy.savez(path, INPUT_NAME=array, ...)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
        if head == b"\x93NUMPY":
            raise InputError(
                f"--inputs {path}: one array (.npy), not an .npz of input name to array",
                hint=hint,
            )
        if not head.startswith(b"PK"):
            raise InputError(f"--inputs {path}: not an .npz file (a zip of arrays)", hint=hint)
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"--inputs {path}: cannot read it as .npz ({exc})") from exc
    wanted = {s.name: s for s in specs}
    missing = sorted(set(wanted) - set(arrays))
    extra = sorted(set(arrays) - set(wanted))
    if missing or extra:
        raise InputError(
            f"--inputs {path}: "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"not inputs of the model: {', '.join(extra)}" if extra else "",
                )
                if part
            )
        )
    for name, array in arrays.items():
        if array.dtype != wanted[name].dtype:
            raise InputError(
                f"--inputs {path}: '{name}' is {array.dtype}, the model wants {wanted[name].dtype}"
            )
    return [arrays]
