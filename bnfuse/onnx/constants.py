"""Which values are constants, and their arrays.

A value is a constant when it is an initializer that a caller cannot override
(IR version 4 and later let a graph input of the same name replace an
initializer; onnxruntime honours that, so such values are not constants),
the output of a Constant node, or a constant sub-expression: a small set of
shape and arithmetic ops whose inputs are constants. That covers what
exporters emit, e.g. ``running_var = Identity(weight)`` from the TorchScript
exporter, and the zero conv bias ``Expand(CastLike(0, x), Shape(W))`` from
torch's newer exporter with ``optimize=False``, and a Linear's weight as
``Transpose(W)`` (both exporters, constant folding off). ``Shape`` of any value with a
static shape is a constant, and ``CastLike`` needs only the dtype of its
second input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnfuse.fold import Array
from bnfuse.onnx.graph import Node, Value
from bnfuse.onnx.light import numpy_dtype
from bnfuse.onnx.ops import EVALUATED, MAX_DEPTH, evaluates, node_name, op_name
from bnfuse.onnx.tensors import proto_array

# IR version 4 is where initializers stopped having to be graph inputs.
OVERRIDABLE_SINCE_IR = 4
# No evaluated value may hold more elements than this (2**24: 128 MB in float64). A
# BatchNorm parameter or bias is one value per channel, and the largest weight of a
# real network is well under it; a 2 KB model can otherwise ask for gigabytes
# (Expand(var, [2**26, 8])).
MAX_ELEMENTS = 2**24


@dataclass(frozen=True)
class NotConstant:
    """Why a value is not a usable constant (``overridable`` says which kind)."""

    reason: str
    overridable: bool = False


def constant_array(value: Value, ir_version: int, depth: int = 0) -> Array | NotConstant:
    """The value's array, or why it is not a constant."""
    name = value.name or "<unnamed>"
    if value.is_graph_input():
        if value.init is not None and ir_version >= OVERRIDABLE_SINCE_IR:
            return NotConstant(
                f"'{name}' is an initializer that is also a graph input, so a caller "
                "can override it",
                overridable=True,
            )
        if value.init is None:
            return NotConstant(f"'{name}' is a graph input, not a constant")
    if value.init is not None:
        assert value.graph is not None
        return value.graph.model.array(value)
    node = value.producer()
    if node is None:
        return NotConstant(f"'{name}' has no producer and no value")
    if not evaluates(node):
        return NotConstant(
            f"'{name}' is computed by {op_name(node)} '{node_name(node)}', not a constant"
        )
    if depth >= MAX_DEPTH:
        return NotConstant(f"'{name}' is a constant expression deeper than {MAX_DEPTH} nodes")
    if value is not node.outputs[0]:
        return NotConstant(f"'{name}' is a secondary output of {node.op_type} '{node.name}'")
    try:
        with np.errstate(all="ignore"):  # x/0 and the like: the fold's checks say what is wrong
            result = _EVALUATORS[node.op_type](node, ir_version, depth + 1)
    except _NotConstantError as exc:
        return exc.why
    except (ValueError, TypeError, IndexError, OverflowError) as exc:  # malformed sub-expression
        return NotConstant(f"'{name}' cannot be evaluated ({node.op_type}: {exc})")
    except MemoryError:
        return NotConstant(f"'{name}' is too large to evaluate ({node.op_type} '{node.name}')")
    return result


def _bounded(node: Node, shape: tuple[int, ...] | list[int]) -> list[int]:
    """``shape`` as ints, refused (not a constant) if it would hold more than MAX_ELEMENTS."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in {dims}")
    size = int(np.prod(dims, dtype=np.float64))
    if size > MAX_ELEMENTS:
        raise _NotConstantError(
            NotConstant(
                f"{node.op_type} '{node.name}' would make a constant of {size:,} elements "
                f"(shape {dims}), more than bnfuse evaluates ({MAX_ELEMENTS:,})"
            )
        )
    return dims


class _NotConstantError(Exception):
    def __init__(self, why: NotConstant) -> None:
        super().__init__(why.reason)
        self.why = why


def _input(node: Node, index: int, ir_version: int, depth: int) -> Array | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    array = constant_array(value, ir_version, depth)
    if isinstance(array, NotConstant):
        raise _NotConstantError(array)
    return array


def _required(node: Node, index: int, ir_version: int, depth: int) -> Array:
    array = _input(node, index, ir_version, depth)
    if array is None:
        raise ValueError(f"input {index} is missing")
    return array


def _constant(node: Node, _v: int, _d: int) -> Array:
    attrs = node.attributes
    tensor = attrs.get_tensor("value")
    if tensor is not None:
        return proto_array(tensor)
    if "value_float" in attrs:
        return np.asarray(attrs.get_float("value_float"), dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs.get_int("value_int"), dtype=np.int64)
    if "value_floats" in attrs:
        return np.asarray(attrs.get_floats("value_floats"), dtype=np.float32)
    if "value_ints" in attrs:
        return np.asarray(attrs.get_ints("value_ints"), dtype=np.int64)
    raise ValueError("a Constant bnfuse cannot read (sparse or string)")


def _identity(node: Node, v: int, d: int) -> Array:
    return _required(node, 0, v, d)


def _cast(node: Node, v: int, d: int) -> Array:
    to = node.attributes.get_int("to")
    if to is None:
        raise ValueError("no 'to' attribute")
    return _required(node, 0, v, d).astype(numpy_dtype(to))


def _cast_like(node: Node, v: int, d: int) -> Array:
    target = node.inputs[1] if len(node.inputs) > 1 else None
    if target is None or target.dtype is None:
        raise _NotConstantError(NotConstant(f"CastLike '{node.name}' has no known target dtype"))
    return _required(node, 0, v, d).astype(numpy_dtype(target.dtype))


def _shape(node: Node, v: int, d: int) -> Array:
    source = node.inputs[0]
    dims: list[int] | None = None
    shape = source.shape if source is not None else None
    if shape is not None and None not in shape:
        dims = [int(x) for x in shape if x is not None]
    elif source is not None:
        array = constant_array(source, v, d)
        if not isinstance(array, NotConstant):
            dims = list(array.shape)
    if dims is None:
        raise _NotConstantError(NotConstant(f"Shape '{node.name}' reads a value of unknown shape"))
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return np.asarray(dims[start:end], dtype=np.int64)


def _expand(node: Node, v: int, d: int) -> Array:
    data, shape = _required(node, 0, v, d), _required(node, 1, v, d)
    target = np.broadcast_shapes(data.shape, tuple(_bounded(node, list(shape))))
    return np.broadcast_to(data, _bounded(node, target)).copy()


def _reshape(node: Node, v: int, d: int) -> Array:
    data, shape = _required(node, 0, v, d), _required(node, 1, v, d)
    dims = [int(s) if s != 0 else data.shape[i] for i, s in enumerate(shape)]
    return data.reshape(dims)


def _unsqueeze(node: Node, v: int, d: int) -> Array:
    data = _required(node, 0, v, d)
    axes = _input(node, 1, v, d)
    axes_list = (
        list(node.attributes.get_ints("axes", [])) if axes is None else [int(a) for a in axes]
    )
    out = data
    for axis in sorted(a % (data.ndim + len(axes_list)) for a in axes_list):
        out = np.expand_dims(out, axis)
    return out


def _squeeze(node: Node, v: int, d: int) -> Array:
    data = _required(node, 0, v, d)
    axes = _input(node, 1, v, d)
    axes_list = (
        list(node.attributes.get_ints("axes", [])) if axes is None else [int(a) for a in axes]
    )
    return np.squeeze(data, axis=tuple(axes_list)) if axes_list else np.squeeze(data)


def _transpose(node: Node, v: int, d: int) -> Array:
    data = _required(node, 0, v, d)
    perm = node.attributes.get_ints("perm", None)
    return np.transpose(data, None if perm is None else [int(p) for p in perm])  # a view


def _constant_of_shape(node: Node, v: int, d: int) -> Array:
    shape = _bounded(node, list(_required(node, 0, v, d)))
    tensor = node.attributes.get_tensor("value")
    fill = proto_array(tensor) if tensor is not None else None
    if fill is None:
        return np.zeros(shape, dtype=np.float32)
    return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)


def _binary(fn: Callable[[Array, Array], Array]) -> Callable[[Node, int, int], Array]:
    def evaluate(node: Node, v: int, d: int) -> Array:
        a, b = _required(node, 0, v, d), _required(node, 1, v, d)
        _bounded(node, np.broadcast_shapes(a.shape, b.shape))
        out = np.asarray(fn(a, b))
        return out.astype(a.dtype) if out.dtype != a.dtype else out

    return evaluate


def _concat(node: Node, v: int, d: int) -> Array:
    parts = [_required(node, i, v, d) for i in range(len(node.inputs))]
    _bounded(node, [sum(int(p.size) for p in parts)])
    return np.concatenate(parts, axis=node.attributes.get_int("axis", 0))


_EVALUATORS: dict[str, Callable[[Node, int, int], Array]] = {
    "Constant": _constant,
    "Identity": _identity,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Shape": _shape,
    "Expand": _expand,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": _transpose,
    "ConstantOfShape": _constant_of_shape,
    "Concat": _concat,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
}
assert set(_EVALUATORS) == set(EVALUATED), "ops.EVALUATED names these evaluators"
