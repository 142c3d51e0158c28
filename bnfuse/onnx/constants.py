"""Which values are constants, and their arrays.

A value is a constant when it is an initializer that a caller cannot override
(IR version 4 and later let a graph input of the same name replace an
initializer; onnxruntime honours that, so such values are not constants),
the output of a Constant node, or Identity/Cast applied to a constant (the
TorchScript exporter emits ``running_var = Identity(weight)`` when two
parameters hold the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfuse.fold import Array

# IR version 4 is where initializers stopped having to be graph inputs.
OVERRIDABLE_SINCE_IR = 4


@dataclass(frozen=True)
class NotConstant:
    """Why a value is not a usable constant (``overridable`` says which kind)."""

    reason: str
    overridable: bool = False


def constant_array(value: ir.Value, ir_version: int) -> Array | NotConstant:
    """The value's array, or why it is not a constant."""
    name = value.name or "<unnamed>"
    if value.is_graph_input():
        if value.const_value is not None and ir_version >= OVERRIDABLE_SINCE_IR:
            return NotConstant(
                f"'{name}' is an initializer that is also a graph input, so a caller "
                "can override it",
                overridable=True,
            )
        if value.const_value is None:
            return NotConstant(f"'{name}' is a graph input, not a constant")
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        return NotConstant(f"'{name}' has no producer and no value")
    if node.domain not in ("", "ai.onnx"):
        return NotConstant(f"'{name}' is computed by {node.domain}.{node.op_type}")
    if node.op_type == "Constant":
        return _constant_node_array(node, name)
    if node.op_type in ("Identity", "Cast") and node.inputs and node.inputs[0] is not None:
        inner = constant_array(node.inputs[0], ir_version)
        if isinstance(inner, NotConstant) or node.op_type == "Identity":
            return inner
        to = node.attributes.get_int("to")
        if to is None:
            return NotConstant(f"'{name}' comes from a Cast without 'to'")
        return inner.astype(ir.DataType(to).numpy())
    return NotConstant(f"'{name}' is computed by {node.op_type} '{node.name}', not a constant")


def _constant_node_array(node: ir.Node, name: str) -> Array | NotConstant:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor().numpy()
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"].as_float(), dtype=np.float32)
    if "value_floats" in attrs:
        return np.asarray(attrs["value_floats"].as_floats(), dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"].as_int(), dtype=np.int64)
    if "value_ints" in attrs:
        return np.asarray(attrs["value_ints"].as_ints(), dtype=np.int64)
    return NotConstant(f"'{name}' comes from a Constant node bnfuse cannot read")
