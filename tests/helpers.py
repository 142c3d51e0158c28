"""Shared test helpers: run a model the independent way, fuse through the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import bnfuse
from bnfuse.result import FuseResult
from bnfuse.verify.reference import InferenceBatchNorm

# onnx's BatchNormalization kernel runs the training formula whenever ``momentum`` is
# set; bnfuse's verifier carries the inference one (a formula, not the code under test).
_InferenceBatchNorm = InferenceBatchNorm


class _TorchConvTranspose(OpRun):
    """ConvTranspose through torch: onnx's reference kernel ignores ``group``."""

    op_domain = ""

    def _run(
        self,
        x,
        w,
        b=None,
        auto_pad=None,
        dilations=None,
        group=None,
        kernel_shape=None,
        output_padding=None,
        output_shape=None,
        pads=None,
        strides=None,
    ):  # type: ignore[no-untyped-def]
        import torch

        assert auto_pad in (None, "NOTSET") and output_shape is None
        nd = x.ndim - 2
        conv = [
            None,
            torch.nn.functional.conv_transpose1d,
            torch.nn.functional.conv_transpose2d,
            torch.nn.functional.conv_transpose3d,
        ][nd]
        pads = pads or [0] * 2 * nd
        assert list(pads[:nd]) == list(pads[nd:]), "asymmetric pads"
        y = conv(
            torch.from_numpy(np.array(x)),
            torch.from_numpy(np.array(w)),
            None if b is None else torch.from_numpy(np.array(b)),
            stride=tuple(strides or [1] * nd),
            padding=tuple(pads[:nd]),
            output_padding=tuple(output_padding or [0] * nd),
            groups=group or 1,
            dilation=tuple(dilations or [1] * nd),
        )
        return (y.numpy(),)


_TorchConvTranspose.__name__ = "ConvTranspose"


def run_reference(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[Any]:
    """Outputs from onnxruntime on CPU with every graph optimisation off.

    Optimisations must be off: onnxruntime would otherwise fold the BN itself
    and the "unfused" reference would already be fused. Where onnxruntime has
    no CPU kernel (float64 Conv), the ONNX reference evaluator runs it instead.
    """
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: overridable-initializer warnings are expected
    source: bytes | str = str(model) if isinstance(model, Path) else proto.SerializeToString()
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        return list(
            ReferenceEvaluator(proto, new_ops=[_InferenceBatchNorm, _TorchConvTranspose]).run(
                None, feeds
            )
        )
    return list(session.run(None, feeds))


def fuse_proto(
    model: onnx.ModelProto, tmp_path: Path, name: str = "model"
) -> tuple[onnx.ModelProto, FuseResult, Path]:
    """Save ``model``, fuse it through the public API, load the result."""
    src = tmp_path / f"{name}.onnx"
    out = tmp_path / f"{name}.fused.onnx"
    onnx.save(model, src)
    result = bnfuse.fuse(src, out)
    return onnx.load(str(out)), result, out


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    raise KeyError(name)


def consumer_input(model: onnx.ModelProto, op: str, index: int) -> str:
    (node,) = [n for n in model.graph.node if n.op_type == op]
    return node.input[index]


def output_range(arrays: list[Any]) -> float:
    return max(float(np.ptp(np.asarray(a, dtype=np.float64))) for a in arrays)


def assert_same_outputs(before: list[Any], after: list[Any], rel: float) -> float:
    """max |before - after| <= rel * (the outputs' range or largest magnitude); returns the error.

    The scale is at least 1: float32 rounding errors scale with the values computed
    on the way, not with the output. The unfused reference computes ``x - mean`` with
    BN statistics of order 1, and where ``gamma * (x - mean) / sigma + beta`` nearly
    cancels (an output range of 0.02) its own rounding error (~2e-7) exceeds 1e-5 of
    the range (Hypothesis found: ConvTranspose 1-D, cin 1, stride 2).
    """
    assert len(before) == len(after)
    largest = max(float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0)) for a in before)
    scale = max(output_range(before), largest, 1.0)
    worst = 0.0
    for a, b in zip(before, after, strict=True):
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a64.shape == b64.shape
        worst = max(worst, float(np.max(np.abs(a64 - b64))))
    assert worst <= rel * scale, f"max error {worst:.3g} > {rel:g} x output range {scale:.3g}"
    return worst
