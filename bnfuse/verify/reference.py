"""onnx's reference evaluator as a runner, for models onnxruntime cannot run.

onnxruntime has no float64 Conv kernel (among others), so an fp64 model
could not be verified with it. onnx's reference evaluator runs any standard
op in numpy, in the model's own types: slow, but a real, independent runtime.
Two of its kernels are not right for this use and are handled here:

- its BatchNormalization (opset 9 and later) applies the training formula
  whenever ``momentum`` is set, as exporters always set it:
  ``InferenceBatchNorm`` computes the inference formula instead;
- its ConvTranspose ignores ``group``: a model with a grouped ConvTranspose
  is not run with it (``unsupported`` says why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnfuse.errors import InputError, first_line

LABEL = "onnx reference evaluator"


class InferenceBatchNorm(OpRun):
    """BatchNormalization in inference mode (every opset), for the reference evaluator."""

    op_domain = ""

    def _run(
        self,
        x: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        epsilon: float | None = None,
        momentum: float | None = None,
        spatial: int | None = None,
        training_mode: int | None = None,
        is_test: int | None = None,
    ) -> tuple[np.ndarray]:
        if training_mode:
            raise ValueError("a BatchNormalization in training mode")
        shape = (-1,) + (1,) * (x.ndim - 2)
        eps = 1e-5 if epsilon is None else epsilon
        y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(
            var.reshape(shape) + eps
        ) + bias.reshape(shape)
        return (y.astype(x.dtype),)


InferenceBatchNorm.__name__ = "BatchNormalization"


def unsupported(model: onnx.ModelProto) -> str | None:
    """Why the reference evaluator would compute this model wrongly, or None."""
    for node in model.graph.node:
        if node.op_type == "ConvTranspose" and any(
            a.name == "group" and a.i > 1 for a in node.attribute
        ):
            return f"it ignores the groups of ConvTranspose '{node.name}'"
    return None


class ReferenceRunner:
    """One model in onnx's reference evaluator, on the CPU."""

    def __init__(self, model: onnx.ModelProto, name: str) -> None:
        self.device = "cpu"
        self.label = LABEL
        self._name = name
        why = unsupported(model)
        if why is not None:
            raise InputError(f"{name}: onnx's reference evaluator cannot run it ({why})")
        try:
            self._evaluator: Any = ReferenceEvaluator(model, new_ops=[InferenceBatchNorm])
        except Exception as exc:
            raise InputError(
                f"{name}: onnx's reference evaluator cannot load it "
                f"({type(exc).__name__}: {first_line(exc)[:200]})"
            ) from exc
        self.output_names = [o.name for o in model.graph.output]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._evaluator.run(None, feeds)
        except Exception as exc:
            raise InputError(
                f"{self._name}: onnx's reference evaluator failed to run it "
                f"({type(exc).__name__}: {first_line(exc)[:200]})"
            ) from exc
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}
