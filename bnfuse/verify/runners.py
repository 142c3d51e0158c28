"""Runners share one interface: build once, then ``infer(feeds) -> {output: array}``.

The ONNX reference runs with every onnxruntime graph optimisation off:
otherwise onnxruntime folds BatchNorm itself and "before" is already fused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnfuse.errors import BnfuseError, InputError, first_line

Feeds = dict[str, np.ndarray]

CPU, CUDA = "cpu", "cuda"
_PROVIDER = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider"}


class Runner(Protocol):
    label: str
    device: str

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]: ...


def import_onnxruntime() -> Any:
    """onnxruntime, imported with what it prints on stderr while it starts kept off it.

    Where it cannot store its telemetry device id (HOME not writable), importing
    onnxruntime prints a warning on stderr, once a process; bnfuse's stderr holds
    one line for an error and nothing for a success. (An import that fails still
    raises.)
    """
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import onnxruntime
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return onnxruntime


def onnx_devices() -> dict[str, str | None]:
    """Each device and why it cannot run (None when it can)."""
    ort = import_onnxruntime()

    providers = ort.get_available_providers()
    cuda = (
        None
        if _PROVIDER[CUDA] in providers
        else (
            "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu and a CUDA runtime)"
        )
    )
    return {CPU: None, CUDA: cuda}


def pick_devices(asked: str, available: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """The devices to run on, and a note for each one that was skipped."""
    if asked not in (CPU, CUDA, "all"):
        raise BnfuseError(f"--device {asked!r}: expected cpu, cuda or all")
    if asked != "all":
        why = available.get(asked)
        if why is not None:
            raise BnfuseError(f"--device {asked}: not available: {why}")
        return [asked], []
    devices = [d for d, why in available.items() if why is None]
    notes = [f"{d.upper()} not checked: {why}" for d, why in available.items() if why is not None]
    return devices, notes


class NoKernel(InputError):
    """onnxruntime has no kernel for an op of the model as typed (float64 Conv, say)."""

    reason = ""


def _encodable(model: Path) -> tuple[str, Any]:
    """A path to ``model`` that onnxruntime can open, and what keeps it alive (or None).

    onnxruntime takes a path as UTF-8 text, and a file name that is not UTF-8 (under
    LANG=C, Python holds its bytes as surrogates) cannot be written so. Such a model is
    opened through a temporary folder of links to its folder's files, by names that
    are: external data is found there by the locations the model records (UTF-8).
    """
    text = str(model)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text, None
    import tempfile

    view = tempfile.TemporaryDirectory(prefix="bnfuse-ort-")
    folder = model.resolve().parent
    entries = []
    for entry in os.listdir(folder):
        try:
            entry.encode("utf-8")
        except UnicodeEncodeError:
            continue
        entries.append(entry)
        os.symlink(folder / entry, Path(view.name) / entry)
    name = next(
        f"model{i}.onnx" for i in range(len(entries) + 1) if f"model{i}.onnx" not in entries
    )
    os.symlink(model.resolve(), Path(view.name) / name)
    return str(Path(view.name) / name), view


class OnnxRuntimeRunner:
    """One onnxruntime session on one device."""

    def __init__(self, model: Path | bytes, device: str, *, optimize: bool = False) -> None:
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 4  # bnfuse reports failures itself, in one line
        # Idle threads sleep rather than spin between runs: the comparison runs in between.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not optimize:  # a few runs: no second, pre-packed copy of every weight
            options.add_session_config_entry("session.disable_prepacking", "1")
        self.device = device
        self.label = f"onnxruntime {device.upper()}" + (" (optimised)" if optimize else "")
        self._view: Any = None
        source: Any = model
        if isinstance(model, Path):
            source, self._view = _encodable(model)
        name = model.name if isinstance(model, Path) else "model"
        self._name = name
        try:
            self._session = ort.InferenceSession(source, options, providers=[_PROVIDER[device]])
        except Exception as exc:
            first = first_line(exc) or type(exc).__name__
            if "NOT_IMPLEMENTED" in first or "Could not find an implementation" in first:
                error = NoKernel(f"{name}: onnxruntime cannot run it: {first}")
                error.reason = first
                raise error from exc
            raise InputError(f"{name}: onnxruntime cannot load it: {first}") from exc
        if _PROVIDER[device] not in self._session.get_providers():
            raise BnfuseError(f"{name}: onnxruntime did not place it on {device}")
        self.output_names = [o.name for o in self._session.get_outputs()]

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:
            first = first_line(exc) or type(exc).__name__
            raise InputError(f"{self._name}: onnxruntime failed to run it: {first}") from exc
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}
