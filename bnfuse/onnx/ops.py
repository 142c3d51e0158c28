"""The ONNX op names and element types that the matcher, the rewrite and the constant
evaluator agree on."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bnfuse.onnx.proto import TensorProto

# The default ONNX domain, as models spell it.
DEFAULT_DOMAINS = ("", "ai.onnx")

# Layers a BatchNorm folds into (an Add: a MatMul's bias).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
# Ops that only regroup or move elements: a BatchNorm behind them may still fold.
SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
# Element types of a layer bnfuse folds into.
FLOAT_TYPES: frozenset[int] = frozenset(
    {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)
# Layers a Mul or Add by a constant folds into.
SCALE_SHIFT_LAYERS = ("Conv", "ConvTranspose", "Gemm")
# Ops whose output may be a constant sub-expression (constants._EVALUATORS evaluates them).
EVALUATED = (
    "Constant", "Identity", "Cast", "CastLike", "Shape", "Expand", "Reshape", "Unsqueeze",
    "Squeeze", "Transpose", "ConstantOfShape", "Concat", "Add", "Sub", "Mul", "Div",
)  # fmt: skip
# Sub-expressions deeper than this are not evaluated (and so are not constants).
MAX_DEPTH = 32


# Each takes a bnfuse.onnx.graph Node or a NodeProto: both have ``op_type`` and ``domain``.


def op_name(node: Any) -> str:
    """The op as a report names it: ``Conv``, or ``com.microsoft.FusedConv`` off the
    default domain."""
    return str(node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}")


def node_name(node: Any) -> str:
    """How a report names a node: by its name, or (ONNX names are optional) by its first
    output's. Takes a bnfuse.onnx.graph Node (``outputs``: values) or a NodeProto
    (``output``)."""
    if node.name:
        return str(node.name)
    outputs = node.outputs if hasattr(node, "outputs") else node.output
    first = outputs[0] if len(outputs) else None
    first = getattr(first, "name", first)
    return str(first) if first else "<unnamed>"


def is_batchnorm(node: Any) -> bool:
    return bool(node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS)


def default_opset(versions: dict[str, int]) -> int | None:
    """The model's opset of the default domain (``""`` or ``"ai.onnx"``), if it imports one."""
    return versions.get("", versions.get("ai.onnx"))


def batch_statistics(
    opset: int | None, *, training_mode: int, is_test: int | None, outputs: int
) -> str | None:
    """Why a BatchNormalization computes batch statistics (training mode), or None.

    ONNX has spelt the mode three ways: ``is_test`` up to opset 6, whose default 0
    means training; the number of outputs in opsets 7 to 13, where five (mean,
    variance and their saved copies) means training whether or not they are read;
    ``training_mode`` from opset 14. ``outputs`` counts the declared (named) outputs.
    """
    if training_mode != 0:
        return "training_mode=1"
    if is_test == 0 and opset is not None and opset >= 7:
        return "is_test=0"
    if opset is not None and opset < 7 and is_test != 1:
        said = "is_test=0" if is_test == 0 else "is_test is not set"
        return f"{said}, which in opset {opset} means training mode"
    if opset is not None and 7 <= opset < 14 and outputs > 1:
        return f"it declares {outputs} outputs, which in opset {opset} means training mode"
    return None


def evaluates(node: Any) -> bool:
    """Whether ``node``'s output may be a constant sub-expression (constants evaluates it)."""
    return bool(node.domain in DEFAULT_DOMAINS and node.op_type in EVALUATED)


class FreshNames:
    """Fresh, deterministic names (``base``, ``base_2``...) that clash with none taken.

    Each base's last number is kept: names are only ever taken, so the search for the
    next one starts there. (Counting from 1 each time made a model of 10,000 unnamed
    Convs, whose new biases all start from "Conv.B", quadratic: 5 s of 7.)
    """

    def __init__(self, taken: Iterable[str]) -> None:
        self._taken = set(taken)
        self._last: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        n = self._last.get(base, 1)
        name = base if n == 1 else f"{base}_{n}"
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        self._last[base] = n
        return name
