"""A model file behind one interface: its inputs, its outputs, and runners for it.

ONNX runs in onnxruntime; TorchScript (.pt) and ExportedProgram (.pt2) run
in torch. Outputs of a torch model are named ``output_0``, ``output_1``...;
when the two models of a comparison name their outputs differently (a .pt2
against its .onnx export), outputs are paired by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfuse.errors import InputError, first_line
from bnfuse.formats import Format, detect, require_torch
from bnfuse.verify.inputs import InputSpec, onnx_input_specs
from bnfuse.verify.runners import CPU, CUDA, OnnxRuntimeRunner, Runner


@dataclass
class Source:
    path: Path
    format: Format
    specs: list[InputSpec]
    outputs: list[str]
    proto: onnx.ModelProto | None = None  # ONNX: the graph without weights
    _torch_model: Any = field(default=None, repr=False)

    @property
    def is_onnx(self) -> bool:
        return self.format is Format.ONNX

    def runner(
        self, device: str, *, optimize: bool = False, model: Path | bytes | None = None
    ) -> Runner:
        if self.is_onnx:
            return OnnxRuntimeRunner(
                model if model is not None else self.path, device, optimize=optimize
            )
        return TorchRunner(self._torch_model, device, [s.name for s in self.specs], self.path.name)

    def torch_runner(self, device: str, dtype: Any) -> Runner:
        """The torch model with its parameters and floating inputs cast to ``dtype``."""
        return TorchRunner(
            self._torch_model, device, [s.name for s in self.specs], self.path.name, dtype
        )


def open_source(path: Path, trust_pickle: bool = False) -> Source:
    fmt = detect(path)
    if fmt is Format.ONNX:
        from bnfuse.onnx.io import read_proto

        try:  # the graph (large weights are neither read nor parsed), read as the fuse reads it
            proto, _ = read_proto(path)
        except InputError:
            raise
        except Exception as exc:
            why = f"{type(exc).__name__}: {first_line(exc)[:200]}" if first_line(exc) else ""
            raise InputError(
                f"{path}: not a readable ONNX model ({why or type(exc).__name__})"
            ) from exc
        return onnx_source(path, proto)
    require_torch(path, fmt)
    return _open_torch(path, fmt, trust_pickle)


def onnx_source(path: Path, proto: onnx.ModelProto) -> Source:
    """An ONNX model already read (its graph; the weights are not needed)."""
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{path}: not an ONNX model (an empty graph)")
    return Source(
        path, Format.ONNX, onnx_input_specs(proto), [o.name for o in proto.graph.output], proto
    )


def files_read(path: Path, label: str) -> list[tuple[str, Path]]:
    """The files comparing ``path`` reads: the model, and an ONNX model's external data.

    For checking that no report overwrites one of them; a model that cannot
    be read here is reported later, when it is opened.
    """
    try:
        if not path.is_file() or detect(path) is not Format.ONNX:
            return [(label, path)]
    except InputError:  # not a model: just the file itself
        return [(label, path)]
    from bnfuse.onnx.light import light_proto
    from bnfuse.onnx.validate import all_tensors

    try:
        proto = light_proto(path) or onnx.load(str(path), load_external_data=False)
    except Exception:
        return [(label, path)]
    found = [(label, path)]
    for tensor in all_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value and "\0" not in entry.value:
                found.append((f"the external data of {label}", path.parent / entry.value))
    return found


def _open_torch(path: Path, fmt: Format, trust_pickle: bool) -> Source:
    import inspect

    from bnfuse.torch.files import load_exported, load_pickle, load_script, script_input_names
    from bnfuse.torch.tensors import input_dtype, numpy_dtype

    if fmt is Format.TORCHSCRIPT:
        module = load_script(path, trust_pickle).eval()
        # A saved TorchScript module records no input shapes: float32 of shapes the user gives.
        dtype = numpy_dtype(input_dtype(module))  # the dtype its first layer computes in
        specs = [InputSpec(n, dtype, None) for n in script_input_names(module)]
        return Source(path, fmt, specs, [], _torch_model=module)
    if fmt is Format.EXPORTED:
        program = load_exported(path, trust_pickle)
        user = list(program.graph_signature.user_inputs)
        specs = []
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user:
                val = node.meta.get("val")
                shape = tuple(
                    int(d) if isinstance(d, int) else str(d) for d in getattr(val, "shape", ())
                )
                dtype = numpy_dtype(val.dtype)
                specs.append(InputSpec(node.name, np.dtype(dtype), shape))
        return Source(path, fmt, specs, [], _torch_model=program.module())
    pickled = load_pickle(path, trust_pickle).eval()  # refuses unless trusted
    names = list(inspect.signature(pickled.forward).parameters)
    specs = [InputSpec(n, numpy_dtype(input_dtype(pickled)), None) for n in names]
    return Source(path, fmt, specs, [], _torch_model=pickled)


class TorchRunner:
    """A torch model on one device; outputs flattened to output_0, output_1..."""

    def __init__(
        self, model: Any, device: str, input_names: list[str], name: str, dtype: Any = None
    ) -> None:
        import torch

        if device == CUDA and not torch.cuda.is_available():
            raise InputError("torch has no CUDA device here")
        self.device = device
        self.label = f"torch {device.upper()}" + (
            f" ({str(dtype).replace('torch.', '')})" if dtype else ""
        )
        self._names = input_names
        self._file = name
        self._dtype = dtype
        target = "cuda" if device == CUDA else "cpu"
        self._model = model.to(target) if dtype is None else _cast(model, dtype).to(target)
        self._target = target

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from bnfuse.torch.tensors import from_numpy, to_numpy

        args = []
        for name in self._names:
            t = from_numpy(feeds[name]).to(self._target)
            if self._dtype is not None and t.is_floating_point():
                t = t.to(self._dtype)
            args.append(t)
        try:
            with torch.no_grad():
                out = self._model(*args)
        except Exception as exc:  # a guard, a shape the model cannot take...
            raise InputError(
                f"{self._file}: torch cannot run it on these inputs "
                f"({type(exc).__name__}: {first_line(exc)[:300]})",
                hint="check --input-shape (or --inputs) against what the model takes",
            ) from exc
        flat = _flatten(out)
        return {f"output_{i}": to_numpy(t) for i, t in enumerate(flat)}


def _cast(model: Any, dtype: Any) -> Any:
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Module._apply reads .grad of non-leaf tensors
        return copy.deepcopy(model).to(dtype)


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flatten(out[key])]
    return [out]


__all__ = ["CPU", "CUDA", "Source", "TorchRunner", "open_source"]
