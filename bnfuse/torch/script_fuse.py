"""Fold BatchNorm in a TorchScript module.

The module is frozen without optimisation (``torch._C._freeze_module``:
parameters become graph constants; unlike ``torch.jit.freeze`` it does not
fold BatchNorm itself), then each ``aten::batch_norm`` whose input comes from
``aten::conv1d/2d/3d``, ``aten::_convolution``, ``aten::conv_transpose1d/2d/3d``
or ``aten::linear`` with constant parameters is folded with bnfuse.fold and
spliced out. Other uses of a shared weight keep the original constant.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.jit._script import RecursiveScriptModule

from bnfuse import fold
from bnfuse.fold import FoldError
from bnfuse.health import BNHealth, bn_health
from bnfuse.result import Candidate, FuseResult, Skip
from bnfuse.torch.tensors import as_f64, as_f64_or_none, numpy_dtype, to_torch

# op -> (kind, index of groups, index of transposed): weight is input 1, bias input 2
_LAYERS: dict[str, tuple[str, int | None, int | None]] = {
    "aten::conv1d": ("conv", 6, None),
    "aten::conv2d": ("conv", 6, None),
    "aten::conv3d": ("conv", 6, None),
    "aten::_convolution": ("conv", 8, 6),
    "aten::convolution": ("conv", 8, 6),
    "aten::conv_transpose1d": ("convT", 6, None),
    "aten::conv_transpose2d": ("convT", 6, None),
    "aten::conv_transpose3d": ("convT", 6, None),
    "aten::linear": ("linear", None, None),
}


_SHAPE_READS = {"aten::dim", "aten::size", "aten::sizes", "prim::shape", "aten::len"}


@dataclass(frozen=True)
class _Fail:
    skip: Skip
    reason: str


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Inline submodules and turn parameters into constants, without BN folding."""
    frozen = RecursiveScriptModule(torch._C._freeze_module(module._c))
    RecursiveScriptModule._finalize_scriptmodule(frozen)
    return frozen


def _const(value: Any) -> Any:
    node = value.node()
    if node.kind() != "prim::Constant":
        raise LookupError(value.debugName())
    return value.toIValue()


def _label(node: Any) -> str:
    """The module path the node comes from (``layer1.0.bn1``), where its scope records it.

    A module traced in this process keeps its scope
    (``__module.layer1/__module.layer1.0.bn1``); otherwise the op and its output value.
    """
    scope = str(node.scopeName()).rsplit("/", 1)[-1]
    if scope.startswith("__module.") and len(scope) > len("__module."):
        return scope[len("__module.") :]
    # (A module loaded from a file keeps no scope; the names of a frozen graph's
    # constants are no guide either: freezing merges equal constants under one name.)
    out = node.output() if node.outputsSize() == 1 else None
    return f"{node.kind()} %{out.debugName()}" if out is not None else node.kind()


def op_counts(graph: Any) -> Counter[str]:
    return Counter(n.kind() for n in graph.nodes() if n.kind() != "prim::Constant")


def fuse_script_module(
    module: torch.jit.ScriptModule, example_inputs: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.jit.ScriptModule, FuseResult]:
    """A frozen, fused copy of ``module`` and the report."""
    frozen = freeze(module)
    graph = frozen.graph
    # Drop branches that eval mode makes dead (F.batch_norm's batch-size check reads the
    # conv output under `if training:`); this evaluates no BatchNorm.
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    frozen_types = [v.type() for v in graph.inputs()]
    if example_inputs is not None:  # ranks for the Linear -> BatchNorm1d check
        for value, example in zip(list(graph.inputs())[1:], example_inputs, strict=False):
            value.setType(torch._C.TensorType.create_from_tensor(example))
        torch._C._jit_pass_propagate_shapes_on_graph(graph)
    before = op_counts(graph)
    candidates = []
    for bn in list(graph.nodes()):
        if bn.kind() != "aten::batch_norm":
            continue
        producer = bn.inputsAt(0).node()
        base = Candidate(
            bn=_label(bn), graph="forward", producer=_label(producer), producer_op=producer.kind()
        )
        checked = _check(bn, producer)
        base = replace(
            base,
            consumers=tuple(u.user.kind() for u in bn.output().uses()),
            health=_health(bn, None if isinstance(checked, _Fail) else checked),
        )
        if isinstance(checked, _Fail):
            candidates.append(replace(base, skip=checked.skip, reason=checked.reason))
            continue
        _apply(graph, bn, producer, *checked)
        candidates.append(base)
    torch._C._jit_pass_dce(graph)
    if example_inputs is not None:  # forget the example's shapes: any shape stays accepted
        for value, type_ in zip(graph.inputs(), frozen_types, strict=True):
            value.setType(type_)
        for node in graph.nodes():
            for value in node.outputs():
                if isinstance(value.type(), torch._C.TensorType):
                    value.setType(torch._C.TensorType.get())
    return frozen, FuseResult(candidates=candidates, ops_before=before, ops_after=op_counts(graph))


def _check(bn: Any, producer: Any) -> tuple[fold.Affine, int, int, torch.Tensor] | _Fail:
    try:
        training = _const(bn.inputsAt(5))
    except LookupError:
        return _Fail(
            Skip.TRAINING_MODE,
            "its training flag is not a constant (the module was saved in train mode): "
            "it may normalise with batch statistics",
        )
    try:
        gamma, beta, mean, var = (_const(bn.inputsAt(i)) for i in range(1, 5))
        eps = float(_const(bn.inputsAt(7)))
    except LookupError as exc:
        return _Fail(
            Skip.NOT_CONSTANT, f"BatchNorm argument %{exc.args[0]} is computed, not a constant"
        )
    if training:
        return _Fail(
            Skip.TRAINING_MODE, "the module is in train mode: it normalises with batch statistics"
        )
    if mean is None or var is None:
        return _Fail(
            Skip.TRAINING_MODE, "no running statistics: it normalises with batch statistics"
        )
    kind_info = _LAYERS.get(producer.kind())
    if kind_info is None:
        return _Fail(
            Skip.NO_LAYER,
            f"its input comes from {producer.kind()}, which has no weight to fold into",
        )
    kind, groups_at, transposed_at = kind_info
    try:
        weight = _const(producer.inputsAt(1))
        bias = _const(producer.inputsAt(2))
        groups = int(_const(producer.inputsAt(groups_at))) if groups_at is not None else 1
        if transposed_at is not None and _const(producer.inputsAt(transposed_at)):
            kind = "convT"
    except LookupError as exc:
        return _Fail(
            Skip.NOT_CONSTANT,
            f"{producer.kind()} argument %{exc.args[0]} is computed, not a constant",
        )
    out = producer.output()
    # BatchNorm's own input check reads out.dim(): shape reads see the same shape after folding.
    others = [u.user for u in out.uses() if u.user is not bn and u.user.kind() not in _SHAPE_READS]
    if others:
        kinds = ", ".join(sorted({n.kind() for n in others}))
        return _Fail(
            Skip.OTHER_CONSUMERS,
            f"the output %{out.debugName()} is also read by {len(others)} other node(s) "
            f"({kinds}), which need the unfolded values",
        )
    if kind == "linear":
        rank = out.type().dim() if isinstance(out.type(), torch._C.TensorType) else None
        if rank is None:
            return _Fail(
                Skip.SHAPE_MISMATCH,
                "the rank of aten::linear's output is unknown; BatchNorm normalises axis 1, which is "
                "Linear's output feature axis only for 2-D inputs (pass --input-shape)",
            )
        if rank != 2:
            return _Fail(
                Skip.SHAPE_MISMATCH,
                f"aten::linear's output is {rank}-D: BatchNorm normalises axis 1",
            )
    axis = 1 if kind == "convT" else 0
    g = groups if kind == "convT" else 1
    try:
        affine = fold.bn_affine(
            as_f64_or_none(gamma), as_f64_or_none(beta), as_f64(mean), as_f64(var), eps
        )
    except FoldError as exc:
        return _Fail(Skip.BAD_PARAMETERS, str(exc))
    channels = int(weight.shape[axis]) * g
    if affine.channels != channels:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the BatchNorm has {affine.channels} channels, the layer {channels}",
        )
    try:
        fold.check_fits(
            as_f64(weight),
            as_f64_or_none(bias),
            affine,
            axis,
            g,
            numpy_dtype(weight.dtype),
            str(weight.dtype),
        )
    except FoldError as exc:
        return _Fail(Skip.NOT_FINITE, str(exc))
    return affine, axis, g, weight


def _health(bn: Any, checked: tuple[fold.Affine, int, int, torch.Tensor] | None) -> BNHealth | None:
    try:
        gamma, beta, mean, var = (_const(bn.inputsAt(i)) for i in range(1, 5))
        eps = float(_const(bn.inputsAt(7)))
    except LookupError:
        return None
    if mean is None or var is None:
        return None
    peak, dtype = None, None
    if checked is not None:
        affine, axis, groups, weight = checked
        dtype = numpy_dtype(weight.dtype)
        peaks = fold.max_abs_per_channel(as_f64(weight), axis, groups)
        peak = float((peaks * np.abs(affine.scale)).max())
    return bn_health(
        as_f64_or_none(gamma), as_f64_or_none(beta), as_f64(mean), as_f64(var), eps,
        folded_weight_peak=peak, dtype=dtype,
    )  # fmt: skip


def _apply(
    graph: Any,
    bn: Any,
    producer: Any,
    affine: fold.Affine,
    axis: int,
    groups: int,
    weight: torch.Tensor,
) -> None:
    dtype = numpy_dtype(weight.dtype)
    bias = _const(producer.inputsAt(2))
    new_w = to_torch(
        fold.round_to(fold.fold_weight(as_f64(weight), affine.scale, axis, groups), dtype), weight
    )
    new_b = to_torch(fold.round_to(fold.fold_bias(as_f64_or_none(bias), affine), dtype), weight)
    for index, tensor in ((1, new_w), (2, new_b)):
        value = graph.insertConstant(tensor)
        value.node().moveBefore(producer)
        producer.replaceInput(index, value)
    bn.output().replaceAllUsesWith(producer.output())
    bn.destroy()
