"""Runners share one interface: build once, then ``infer(feeds) -> {output: array}``.

The ONNX reference runs with every onnxruntime graph optimisation off:
otherwise onnxruntime folds BatchNorm itself and "before" is already fused.
"""

from __future__ import annotations

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


def onnx_devices() -> dict[str, str | None]:
    """Each device and why it cannot run (None when it can)."""
    import onnxruntime as ort

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


class OnnxRuntimeRunner:
    """One onnxruntime session on one device."""

    def __init__(self, model: Path | bytes, device: str, *, optimize: bool = False) -> None:
        import onnxruntime as ort

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
        source: Any = str(model) if isinstance(model, Path) else model
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
