"""The ONNX op names and element types that the two ONNX paths (match and direct) and the
constant evaluator agree on. No onnx-ir here: the direct path runs without it."""

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


# Each takes an onnx-ir Node or a NodeProto: both have ``op_type`` and ``domain``.


def op_name(node: Any) -> str:
    """The op as a report names it: ``Conv``, or ``com.microsoft.FusedConv`` off the
    default domain."""
    return str(node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}")


def is_batchnorm(node: Any) -> bool:
    return bool(node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS)


def evaluates(node: Any) -> bool:
    """Whether ``node``'s output may be a constant sub-expression (constants evaluates it)."""
    return bool(node.domain in DEFAULT_DOMAINS and node.op_type in EVALUATED)


class FreshNames:
    """Fresh, deterministic names (``base``, ``base_2``...) that clash with none taken."""

    def __init__(self, taken: Iterable[str]) -> None:
        self._taken = set(taken)

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name
