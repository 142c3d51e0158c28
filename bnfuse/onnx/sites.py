"""Where a fold lands: each layer op's weight and bias, read as constants.

A Site is the layer a BatchNorm (or a Mul/Add by a constant) folds into:
its weight, the weight's output-channel axis and groups, and where its bias
lives (an input of the layer, or of the Add after a MatMul). Reading one
checks what only the op's own layout says (a Conv's bias has Cout values; a
ConvTranspose's group divides its input channels); bnfuse.legality decides
the rest.

  Conv           W [Cout, Cin/g, k...], output channel axis 0, optional bias
  ConvTranspose  W [Cin, Cout/g, k...], output channel axis 1 within each group
  Gemm           B [K, N] (transB=0) or [N, K] (transB=1); C scaled by beta
  MatMul         constant 2-D W [K, N], optionally then Add(bias)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfuse.fold import Array
from bnfuse.legality import Refusal, no_layer
from bnfuse.onnx.constants import NotConstant, constant_array
from bnfuse.onnx.graph import Node, Value
from bnfuse.onnx.light import type_code
from bnfuse.onnx.ops import node_name as _name
from bnfuse.result import Skip


@dataclass(frozen=True)
class Site:
    """Where a fold lands: the layer's weight, and where its bias lives."""

    layer: Node  # Conv / ConvTranspose / Gemm / MatMul
    tail: Node  # the node whose output the BN reads: the layer, or the bias Add
    weight: Array
    axis: int  # output-channel axis of the weight
    groups: int  # > 1 only for grouped ConvTranspose
    bias: Array | None  # float64-ready bias (Gemm: already times beta)
    bias_index: int | None  # input index of the bias on ``tail``; None: there is none yet
    # The TensorProto ``weight`` is read from (found when the site is read: the rewrite
    # may give the layer another one, a shared weight's copy, before the fold is computed).
    source: Any = None
    # Shape-only nodes from ``tail`` to the BatchNorm (LeViT's Linear -> Flatten -> BN).
    chain: tuple[Node, ...] = ()

    def release(self) -> None:
        """The weight was read (for its peak, or folded): drop its pages from memory."""
        if self.source is not None:
            self.layer.graph.model.arrays.release(self.source)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.axis]) * self.groups


def dtype_of(layer: Node, weight: Array) -> int | None:
    """The weight's ONNX element type: as the model declares it, else its array's."""
    value = layer.inputs[1]
    if value is not None and value.dtype is not None:
        return value.dtype
    return type_code(weight.dtype)


def not_constant(what: str, why: NotConstant) -> Refusal:
    skip = Skip.OVERRIDABLE if why.overridable else Skip.NOT_CONSTANT
    return Refusal(skip, f"{what}: {why.reason}")


def const_input(node: Node, index: int, what: str, ir_version: int) -> Array | Refusal | None:
    """The constant at ``node.inputs[index]``; None if the input is absent."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    array = constant_array(value, ir_version)
    if isinstance(array, NotConstant):
        return not_constant(f"{node.op_type} '{_name(node)}' {what}", array)
    return array


def source(value: Value | None) -> Any:
    """The stored TensorProto a constant input reads, through Identity nodes."""
    while value is not None and value.init is None:
        node = value.producer()
        if node is None or node.op_type != "Identity" or not node.inputs:
            return None
        value = node.inputs[0]
    return value.init if value is not None else None


def site(producer: Node, ir_version: int) -> Site | Refusal:
    """The site of the layer ``producer`` is, or why it is none."""
    if producer.domain not in ("", "ai.onnx"):
        return Refusal(Skip.NO_LAYER, f"its input comes from {producer.domain}.{producer.op_type}")
    if producer.op_type in ("Conv", "ConvTranspose"):
        return _conv_site(producer, ir_version)
    if producer.op_type == "Gemm":
        return _gemm_site(producer, ir_version)
    if producer.op_type == "MatMul":
        return _matmul_site(producer, producer, None, None, ir_version)
    if producer.op_type == "Add":
        return _matmul_add_site(producer, ir_version)
    return no_layer(f"{producer.op_type} '{_name(producer)}'")


def _required_const(node: Node, index: int, what: str, ir_version: int) -> Array | Refusal:
    array = const_input(node, index, what, ir_version)
    if array is None:
        return Refusal(Skip.NOT_CONSTANT, f"{node.op_type} '{_name(node)}' has no {what}")
    return array


def weight_and_bias(
    node: Node, names: tuple[str, str], ir_version: int
) -> tuple[Array, Array | None] | Refusal:
    """The layer's constant weight (input 1) and optional constant bias (input 2)."""
    weight = _required_const(node, 1, names[0], ir_version)
    if isinstance(weight, Refusal):
        return weight
    bias = const_input(node, 2, names[1], ir_version)
    if isinstance(bias, Refusal):
        return bias
    return weight, bias


def _conv_site(node: Node, ir_version: int) -> Site | Refusal:
    params = weight_and_bias(node, ("weight", "bias"), ir_version)
    if isinstance(params, Refusal):
        return params
    weight, bias = params
    if weight.ndim < 3:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"{node.op_type} '{_name(node)}' weight has shape {list(weight.shape)}",
        )
    groups_t = node.attributes.get_int("group", 1) if node.op_type == "ConvTranspose" else 1
    cout = weight.shape[0] if node.op_type == "Conv" else weight.shape[1] * groups_t
    if bias is not None and bias.shape != (cout,):
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"{node.op_type} '{_name(node)}' bias has shape {list(bias.shape)}, expected [{cout}]",
        )
    if node.op_type == "Conv":
        return Site(node, node, weight, 0, 1, bias, 2, source(node.inputs[1]))
    groups = node.attributes.get_int("group", 1)
    if groups < 1 or weight.shape[0] % groups:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"ConvTranspose '{_name(node)}' has group={groups}, which does not divide "
            f"its {weight.shape[0]} input channels",
        )
    return Site(node, node, weight, 1, groups, bias, 2, source(node.inputs[1]))


def _gemm_site(node: Node, ir_version: int) -> Site | Refusal:
    params = weight_and_bias(node, ("B", "C"), ir_version)
    if isinstance(params, Refusal):
        return params
    weight, c = params
    if weight.ndim != 2:
        return Refusal(
            Skip.SHAPE_MISMATCH, f"Gemm '{_name(node)}' B has shape {list(weight.shape)}"
        )
    axis = 0 if node.attributes.get_int("transB", 0) else 1
    bias = None
    if c is not None:
        if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, weight.shape[axis])):
            return Refusal(Skip.SHAPE_MISMATCH, f"Gemm '{_name(node)}' C has shape {list(c.shape)}")
        bias = c.astype(np.float64) * node.attributes.get_float("beta", 1.0)
    return Site(node, node, weight, axis, 1, bias, 2, source(node.inputs[1]))


def _matmul_site(
    matmul: Node,
    tail: Node,
    bias: Array | None,
    bias_index: int | None,
    ir_version: int,
) -> Site | Refusal:
    weight = _required_const(matmul, 1, "weight (second input)", ir_version)
    if isinstance(weight, Refusal):
        return weight
    if weight.ndim != 2:
        return Refusal(
            Skip.SHAPE_MISMATCH,
            f"MatMul '{_name(matmul)}' weight has shape {list(weight.shape)}, "
            "only a 2-D [K, N] weight is folded",
        )
    return Site(matmul, tail, weight, 1, 1, bias, bias_index, source(matmul.inputs[1]))


def _matmul_add_site(add: Node, ir_version: int) -> Site | Refusal:
    for bias_index in (1, 0):
        other = add.inputs[1 - bias_index]
        matmul = other.producer() if other is not None else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        bias = _required_const(add, bias_index, "bias", ir_version)
        if isinstance(bias, Refusal):
            return bias
        if bias.ndim > 2:
            return Refusal(
                Skip.SHAPE_MISMATCH,
                f"Add '{_name(add)}' bias has shape {list(bias.shape)}, which would change "
                "the output's rank",
            )
        weight_value = matmul.inputs[1]
        n = weight_value.shape[-1] if weight_value is not None and weight_value.shape else None
        if bias.ndim >= 1 and n is not None and bias.shape[-1] not in (1, n):
            return Refusal(
                Skip.SHAPE_MISMATCH, f"Add '{_name(add)}' bias has shape {list(bias.shape)}"
            )
        return _matmul_site(matmul, add, bias, bias_index, ir_version)
    return Refusal(
        Skip.NO_LAYER,
        f"its input comes from Add '{_name(add)}', which is not a MatMul plus a constant bias",
    )
