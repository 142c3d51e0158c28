"""Tensor shapes the ONNX matcher needs and the model may not record.

A BatchNorm behind shape-only nodes folds only where its channel axis can be
followed through them, and that needs the shapes around each. They come from
the model's recorded shapes, else from the value's producer (the ops torch
exports put between a layer and a BatchNorm), else from onnx's shape inference,
run once per model on a copy without weights and only if asked. Within
``inferring(model)`` (bnfuse.onnx.match.find) ``value_dims`` may work shapes out;
outside it, it reads what the model records.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import numpy as np

from bnfuse.onnx import io
from bnfuse.onnx.constants import NotConstant, constant_array
from bnfuse.onnx.graph import Model, Node, Value
from bnfuse.onnx.ops import SHAPE_OPS

Dims = tuple[int | None, ...]


def value_dims(value: Value | None) -> Dims | None:
    """The value's shape as the model records it, or else as onnx's shape inference
    works it out (run once per model, on a copy without weights, and only if asked)."""
    if value is None:
        return None
    if value.shape is not None:
        return value.shape
    inferred = _INFERRED.get()
    if inferred is None:
        return None
    return inferred.dims(value)


class _Inferred:
    """Shapes the model does not record, worked out on request; the model is not changed.

    First from the value's producer (the ops torch exports put between a layer and
    a BatchNorm: element-wise ops, MatMul, shape-only ops, and Reshape to another
    value's Shape, which onnx's own data propagation does not follow), then from
    onnx's shape inference, run once per model on a copy without weights.
    """

    def __init__(self, model: Model) -> None:
        self._model = model
        self._shapes: dict[str, tuple[int | None, ...]] | None = None
        self._memo: dict[int, Dims | None] = {}
        self._depth = 0

    def dims(self, value: Value) -> Dims | None:
        key = id(value)
        if key not in self._memo:
            self._memo[key] = None  # a cycle or a deep chain gives up, not loops
            self._memo[key] = self._local(value) or self._onnx(value)
        return self._memo[key]

    def _onnx(self, value: Value) -> Dims | None:
        if self._shapes is None:
            self._shapes = io.inferred_shapes(self._model)
        return self._shapes.get(value.name) if value.name else None

    def _local(self, value: Value) -> Dims | None:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or value is not node.outputs[0]:
            return None
        if self._depth > _MAX_LOCAL_DEPTH:
            return None
        self._depth += 1
        try:
            return _local_dims(node, self._model.ir_version)
        finally:
            self._depth -= 1


_MAX_LOCAL_DEPTH = 64
_ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf",
    "Softplus", "Elu", "Selu", "Mish", "Clip", "Cast", "CastLike", "Identity", "Neg", "Abs",
    "Sqrt", "Exp", "Dropout", "Softmax", "LogSoftmax", "BatchNormalization", "LayerNormalization",
}  # fmt: skip
_ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


def _local_dims(node: Node, ir_version: int) -> Dims | None:
    """The output shape of ``node`` from its inputs' shapes, for the ops that need no more."""
    op = node.op_type
    first = node.inputs[0] if node.inputs else None
    if op in _ELEMENTWISE_UNARY:
        return value_dims(first)
    if (op in _ELEMENTWISE_BINARY or op == "MatMul") and len(node.inputs) == 2:
        a, b = value_dims(first), value_dims(node.inputs[1])
        if a is None or b is None:
            return None
        if op != "MatMul":
            return _broadcast(a, b)
        return (*a[:-1], b[-1]) if len(a) >= 2 and len(b) == 2 else None
    if op == "Reshape" and _shape_of(node) is not None:
        return value_dims(_shape_of(node))  # reshape_as: the shape of another value
    if op in SHAPE_OPS:
        return shape_op_dims(node, value_dims(first), ir_version)
    return None


def _shape_of(reshape: Node) -> Value | None:
    """The value whose whole Shape a Reshape takes as its target shape, if it does."""
    target = reshape.inputs[1] if len(reshape.inputs) == 2 else None
    source = target.producer() if target is not None else None
    if (
        source is None
        or source.op_type != "Shape"
        or source.attributes.get_int("start", 0) != 0
        or source.attributes.get_int("end", None) is not None
    ):
        return None
    return source.inputs[0]


def _broadcast(a: Dims, b: Dims) -> Dims | None:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    out: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        elif x is None or y is None:
            out.append(x if y is None else y)  # the known one, where the model is valid
        else:
            return None
    return tuple(out)


_INFERRED: ContextVar[_Inferred | None] = ContextVar("bnfuse_inferred_shapes", default=None)


def shape_op_dims(node: Node, dims: Dims | None, ir_version: int) -> Dims | None:
    """The output shape of a shape-only node, from its input's (None where unknown)."""
    if dims is None or node.op_type not in _SHAPE_RULES:
        return None
    return _SHAPE_RULES[node.op_type](node, dims, ir_version)


def _transpose_dims(node: Node, dims: Dims, _v: int) -> Dims | None:
    rank = len(dims)
    perm = node.attributes.get_ints("perm", list(range(rank))[::-1])
    return tuple(dims[int(p)] for p in perm) if sorted(perm) == list(range(rank)) else None


def _flatten_dims(node: Node, dims: Dims, _v: int) -> Dims | None:
    axis = node.attributes.get_int("axis", 1) % (len(dims) + 1) if dims else 0
    return (_prod(dims[:axis]), _prod(dims[axis:]))


def _reshape_dims(node: Node, dims: Dims, ir_version: int) -> Dims | None:
    shape = _const_ints(node, 1, ir_version)
    if shape is None or node.attributes.get_int("allowzero", 0) != 0:
        return None
    out = [
        dims[i] if s == 0 and i < len(dims) else (None if s < 0 else s) for i, s in enumerate(shape)
    ]
    known, total = _prod(tuple(d for d in out if d is not None)), _prod(dims)
    if shape.count(-1) == 1 and known and total is not None and total % known == 0:
        out[shape.index(-1)] = total // known
    return tuple(out)


def _axes(node: Node, ir_version: int) -> list[int]:
    axes = _const_ints(node, 1, ir_version)  # opset 13 on: an input; before: an attribute
    return axes if axes is not None else [int(a) for a in node.attributes.get_ints("axes", [])]


def _unsqueeze_dims(node: Node, dims: Dims, ir_version: int) -> Dims | None:
    axes = _axes(node, ir_version)
    grown: list[int | None] = list(dims)
    for axis in sorted(a % (len(dims) + len(axes)) for a in axes):
        grown.insert(axis, 1)
    return tuple(grown)


def _squeeze_dims(node: Node, dims: Dims, ir_version: int) -> Dims | None:
    axes = _axes(node, ir_version)
    if not axes:  # every dim of size 1: which ones is only known where all are known
        return None
    gone = {a % len(dims) for a in axes}
    return tuple(d for i, d in enumerate(dims) if i not in gone)


_SHAPE_RULES: dict[str, Callable[[Node, Dims, int], Dims | None]] = {
    "Transpose": _transpose_dims,
    "Flatten": _flatten_dims,
    "Reshape": _reshape_dims,
    "Unsqueeze": _unsqueeze_dims,
    "Squeeze": _squeeze_dims,
}


def _const_ints(node: Node, index: int, ir_version: int) -> list[int] | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    array = constant_array(value, ir_version)
    return None if isinstance(array, NotConstant) else [int(a) for a in array.reshape(-1)]


def _prod(dims: Dims) -> int | None:
    return (
        None if None in dims else int(np.prod([d for d in dims if d is not None], dtype=np.int64))
    )


@contextlib.contextmanager
def inferring(model: Model) -> Iterator[None]:
    """Within the block, ``value_dims`` works out the shapes ``model`` does not record."""
    token = _INFERRED.set(_Inferred(model))
    try:
        yield
    finally:
        _INFERRED.reset(token)
