"""Fold BatchNorm into the preceding layer of a torch.fx GraphModule, in place.

The graph comes from ``torch.fx.symbolic_trace`` (nn.Module calls) or from an
ExportedProgram's ``module()`` (aten calls with get_attr parameters). Handled:

  layers  nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d (any groups), nn.Linear,
          and the functional and aten forms of conv, conv_transpose, convolution
          and linear whose weight and bias are module attributes (constants)
  norms   nn.BatchNorm1d/2d/3d, F.batch_norm, aten.batch_norm and
          aten._native_batch_norm_legit_no_training (its output 0)

Legality, each failure a Skip with its reason: the BN in eval mode with
running statistics (train mode or track_running_stats=False use batch
statistics); constant parameters; the layer's output read only by the BN;
channels matching; Linear only on a 2-D input (BatchNorm1d normalises axis 1);
the fold finite in the layer's dtype.

A module called in two places, once before a BN and once not, is copied for
the folded call, so the other call keeps its weights (torch.fx's own fuse
rewrites the shared module and changes the other call's output).
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from bnfuse import fold
from bnfuse.fold import FoldError
from bnfuse.health import BNHealth, bn_health
from bnfuse.result import Candidate, Skip
from bnfuse.torch.tensors import as_f64, as_f64_or_none, numpy_dtype, to_torch

aten = torch.ops.aten

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
_LINEAR_ARGS = ("input", "weight", "bias")
_CONVOLUTION_ARGS = (
    "input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups",
)  # fmt: skip

# call_function targets -> (kind, argument names in order)
LAYER_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{f: ("conv", _CONV_ARGS) for f in (F.conv1d, F.conv2d, F.conv3d)},
    **{f: ("conv", _CONV_ARGS) for f in (torch.conv1d, torch.conv2d, torch.conv3d)},
    **{
        f: ("conv", _CONV_ARGS)
        for f in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
    },
    **{
        f: ("convT", _CONVT_ARGS)
        for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    },
    **{
        f: ("convT", _CONVT_ARGS)
        for f in (
            aten.conv_transpose1d.default,
            aten.conv_transpose2d.input,
            aten.conv_transpose3d.input,
        )
    },
    aten.convolution.default: ("convolution", _CONVOLUTION_ARGS),
    F.linear: ("linear", _LINEAR_ARGS),
    aten.linear.default: ("linear", _LINEAR_ARGS),
}

_F_BN_ARGS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)
_ATEN_BN_ARGS = (
    "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled",
)  # fmt: skip
_NATIVE_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
BN_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_BN_ARGS,
    torch.batch_norm: _ATEN_BN_ARGS,
    aten.batch_norm.default: _ATEN_BN_ARGS,
    aten._native_batch_norm_legit_no_training.default: _NATIVE_BN_ARGS,
}


def _bind(node: fx.Node, names: Sequence[str]) -> dict[str, Any]:
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


@dataclass(frozen=True)
class _Fail:
    skip: Skip
    reason: str


@dataclass
class _BatchNorm:
    out: fx.Node  # the node whose value is the normalised tensor
    calls: list[fx.Node]  # nodes to erase (the BN call, and its getitem)
    input: fx.Node
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    name: str


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # conv / convT / linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None  # for call_module layers

    @property
    def axis(self) -> int:
        return 1 if self.kind == "convT" else 0

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.axis]) * (self.groups if self.kind == "convT" else 1)


# The module classes whose own op a node is: such a node is named by the module's path.
_OWN_OP = {"batch_norm": "BatchNorm", "conv": "Conv", "linear": "Linear"}


def _name(node: fx.Node) -> str:
    """The module path a node comes from (``layer1.0.bn1``), as reports name layers.

    A call_module node is its target; an aten op of a torch.export graph carries
    the stack of modules that called it, and when the innermost one is the op's
    own kind (a BatchNorm2d for batch_norm) it is named by that module's path.
    Other nodes (functional calls) keep their node name.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack and node.op == "call_function":
        path, cls = list(stack.values())[-1]
        kind = str(getattr(node.target, "__name__", node.target))
        own = next((c for op, c in _OWN_OP.items() if op in kind), None)
        if path and own is not None and own in str(getattr(cls, "__name__", cls)):
            return str(path)
    return node.name


def _constant(gm: fx.GraphModule, arg: Any, what: str) -> torch.Tensor | _Fail | None:
    """The tensor behind a get_attr node (None stays None)."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = _fetch(gm, str(arg.target))
        if isinstance(value, torch.Tensor):
            return value
    shown = arg.name if isinstance(arg, fx.Node) else repr(arg)
    return _Fail(
        Skip.NOT_CONSTANT, f"{what} '{shown}' is computed in the graph, not a stored constant"
    )


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | _Fail | None:
    """A BN view of ``node``, why it cannot fold, or None when it is no BN."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return None
        if mod.training:
            return _Fail(
                Skip.TRAINING_MODE,
                "the module is in train mode: it normalises with batch statistics",
            )
        if not mod.track_running_stats or mod.running_mean is None or mod.running_var is None:
            return _Fail(
                Skip.TRAINING_MODE,
                "track_running_stats=False: it normalises with batch statistics even in eval mode",
            )
        return _BatchNorm(
            out=node, calls=[node], input=node.args[0],  # type: ignore[arg-type]
            gamma=mod.weight, beta=mod.bias, mean=mod.running_mean, var=mod.running_var,
            eps=float(mod.eps), name=_name(node),
        )  # fmt: skip
    if node.op != "call_function" or node.target not in BN_FUNCTIONS:
        return None
    args = _bind(node, BN_FUNCTIONS[node.target])
    out, calls = node, [node]
    if node.target is aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if (
            not all(u.target is operator.getitem and u.args[1] == 0 for u in users)
            or len(users) != 1
        ):
            return _Fail(Skip.STATS_OUTPUTS, "its batch-statistics outputs are used")
        out, calls = users[0], [users[0], node]
    elif args.get("training", False) is not False:
        return _Fail(Skip.TRAINING_MODE, "training=True: it normalises with batch statistics")
    params: dict[str, torch.Tensor | None] = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        value = _constant(gm, args.get(key), f"BatchNorm {key}")
        if isinstance(value, _Fail):
            return value
        params[key] = value
    mean, var = params["running_mean"], params["running_var"]
    if mean is None or var is None:
        return _Fail(
            Skip.TRAINING_MODE, "no running statistics: it normalises with batch statistics"
        )
    return _BatchNorm(
        out=out, calls=calls, input=args["input"], gamma=params["weight"], beta=params["bias"],
        mean=mean, var=var, eps=float(args.get("eps", 1e-5)), name=_name(node),
    )  # fmt: skip


def _layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | _Fail:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.modules.conv._ConvNd):
            kind = "convT" if mod.transposed else "conv"
            return _Layer(node, kind, mod.weight, mod.bias, mod.groups, mod)
        if isinstance(mod, nn.Linear):
            return _Layer(node, "linear", mod.weight, mod.bias, 1, mod)
        return _Fail(
            Skip.NO_LAYER,
            f"its input comes from {type(mod).__name__} '{node.target}', which has no weight to fold into",
        )
    if node.op != "call_function" or node.target not in LAYER_FUNCTIONS:
        what = (
            getattr(node.target, "__name__", str(node.target))
            if node.op != "placeholder"
            else "a graph input"
        )
        return _Fail(
            Skip.NO_LAYER,
            f"its input comes from {what} ('{node.name}'), which has no weight to fold into",
        )
    kind, names = LAYER_FUNCTIONS[node.target]
    args = _bind(node, names)
    if kind == "convolution":
        kind = "convT" if args.get("transposed") else "conv"
    weight = _constant(gm, args.get("weight"), "layer weight")
    bias = _constant(gm, args.get("bias"), "layer bias")
    if isinstance(weight, _Fail):
        return weight
    if isinstance(bias, _Fail):
        return bias
    if weight is None:
        return _Fail(Skip.NOT_CONSTANT, f"'{node.name}' has no weight")
    groups = args.get("groups", 1)
    if not isinstance(groups, int):
        return _Fail(Skip.NOT_CONSTANT, f"'{node.name}' has a computed group count")
    return _Layer(node, kind, weight, bias, groups, None)


def _output_rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if val is None and "tensor_meta" in node.meta:
        val = node.meta["tensor_meta"]
    shape = getattr(val, "shape", None)
    return None if shape is None else len(shape)


def _check(gm: fx.GraphModule, bn: _BatchNorm) -> tuple[_Layer, fold.Affine, np.dtype[Any]] | _Fail:
    producer = bn.input
    if not isinstance(producer, fx.Node):
        return _Fail(Skip.NO_LAYER, "its input is not a graph value")
    layer = _layer(gm, producer)
    if isinstance(layer, _Fail):
        return layer
    others = [u.name for u in producer.users if u is not bn.calls[-1]]
    if others:
        return _Fail(
            Skip.OTHER_CONSUMERS,
            f"the output of '{_name(producer)}' is also read by {', '.join(others)}, which need the unfolded values",
        )
    if layer.kind == "linear":
        rank = _output_rank(producer)
        if rank is None:
            return _Fail(
                Skip.SHAPE_MISMATCH,
                f"the rank of Linear '{_name(producer)}' output is unknown; BatchNorm normalises axis 1, "
                "which is Linear's output feature axis only for 2-D inputs (pass example inputs)",
            )
        if rank != 2:
            return _Fail(
                Skip.SHAPE_MISMATCH,
                f"Linear '{_name(producer)}' output is {rank}-D: BatchNorm normalises axis 1, "
                "not Linear's output feature axis",
            )
    try:
        affine = fold.bn_affine(
            as_f64_or_none(bn.gamma),
            as_f64_or_none(bn.beta),
            as_f64(bn.mean),
            as_f64(bn.var),
            bn.eps,
        )
    except FoldError as exc:
        return _Fail(Skip.BAD_PARAMETERS, str(exc))
    if affine.channels != layer.channels:
        return _Fail(
            Skip.SHAPE_MISMATCH,
            f"the BatchNorm has {affine.channels} channels but '{_name(producer)}' has {layer.channels}",
        )
    if not layer.weight.is_floating_point():
        return _Fail(Skip.UNSUPPORTED, f"'{_name(producer)}' has {layer.weight.dtype} weights")
    dtype = numpy_dtype(layer.weight.dtype)
    groups = layer.groups if layer.kind == "convT" else 1
    try:
        fold.check_fits(
            as_f64(layer.weight),
            as_f64_or_none(layer.bias),
            affine,
            layer.axis,
            groups,
            dtype,
            str(layer.weight.dtype),
        )
    except FoldError as exc:
        return _Fail(Skip.NOT_FINITE, str(exc))
    return layer, affine, dtype


class _Rewriter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._count = 0

    def fresh(self, base: str) -> str:
        while True:
            self._count += 1
            name = f"_bnfused_{base}_{self._count}"
            if not hasattr(self.gm, name):
                return name

    def apply(
        self, bn: _BatchNorm, layer: _Layer, affine: fold.Affine, dtype: np.dtype[Any]
    ) -> None:
        groups = layer.groups if layer.kind == "convT" else 1
        w64 = fold.fold_weight(as_f64(layer.weight), affine.scale, layer.axis, groups)
        weight = to_torch(fold.round_to(w64, dtype), layer.weight)
        bias = to_torch(
            fold.round_to(fold.fold_bias(as_f64_or_none(layer.bias), affine), dtype), layer.weight
        )
        if layer.module is not None:
            self._set_module_params(layer, weight, bias)
        else:
            self._set_function_params(layer, weight, bias)
        bn.out.replace_all_uses_with(layer.node)
        orphans = [a for call in bn.calls for a in call.all_input_nodes if a.op == "get_attr"]
        for call in bn.calls:
            self.gm.graph.erase_node(call)
        for node in dict.fromkeys(orphans):
            if not node.users:
                self.gm.graph.erase_node(node)

    def _set_module_params(self, layer: _Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        node, mod = layer.node, layer.module
        assert mod is not None
        callers = [
            n for n in self.gm.graph.nodes
            if n.op == "call_module" and self.gm.get_submodule(str(n.target)) is mod
        ]  # fmt: skip
        if len(callers) > 1:  # shared: fold into a copy for this call only
            mod = copy.deepcopy(mod)
            name = self.fresh(str(node.target).replace(".", "_"))
            self.gm.add_submodule(name, mod)
            node.target = name
        mod.weight = nn.Parameter(weight, requires_grad=False)
        mod.bias = nn.Parameter(bias, requires_grad=False)

    def _set_function_params(self, layer: _Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        node = layer.node
        _, names = LAYER_FUNCTIONS[node.target]
        for key, value in (("weight", weight), ("bias", bias)):
            index = names.index(key)
            current = node.args[index] if index < len(node.args) else node.kwargs.get(key)
            if isinstance(current, fx.Node) and self._exclusive(current, node):
                self._assign(str(current.target), value)
                continue
            name = self.fresh(f"{node.name}_{key}")
            self.gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
            with self.gm.graph.inserting_before(node):
                attr = self.gm.graph.get_attr(name)
            if index < len(node.args):
                args = list(node.args)
                args[index] = attr
                node.args = tuple(args)
            elif key in node.kwargs or index > len(node.args):
                node.kwargs = {**node.kwargs, key: attr}
            else:
                node.args = (*node.args, attr)

    def _exclusive(self, attr: fx.Node, user: fx.Node) -> bool:
        """Only ``user`` reads this attribute (through any get_attr node)."""
        readers = [
            u for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == attr.target
            for u in n.users
        ]  # fmt: skip
        return readers == [user]

    def _assign(self, target: str, value: torch.Tensor) -> None:
        owner_path, _, leaf = target.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        old = getattr(owner, leaf)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value)


def fuse_graph_module(gm: fx.GraphModule) -> list[Candidate]:
    """Fold every legal BN of ``gm`` (in place); every BN is reported."""
    rewriter = _Rewriter(gm)
    candidates = []
    for node in list(gm.graph.nodes):  # nodes erased on the way are getitem/get_attr: no BN
        bn = _batchnorm(gm, node)
        if bn is None:
            continue
        producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        base = Candidate(
            bn=_name(node), graph="forward",
            producer=_name(producer) if producer is not None else None,
            producer_op=_op_label(gm, producer) if producer is not None else None,
            consumers=tuple(u.name for u in (node if isinstance(bn, _Fail) else bn.out).users),
        )  # fmt: skip
        checked = bn if isinstance(bn, _Fail) else _check(gm, bn)
        if isinstance(bn, _BatchNorm):
            base = replace(
                base, health=_health(bn, None if isinstance(checked, _Fail) else checked)
            )
        if isinstance(checked, _Fail):
            candidates.append(replace(base, skip=checked.skip, reason=checked.reason))
            continue
        assert isinstance(bn, _BatchNorm)
        rewriter.apply(bn, *checked)
        candidates.append(base)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return candidates


def _health(bn: _BatchNorm, checked: tuple[_Layer, fold.Affine, np.dtype[Any]] | None) -> BNHealth:
    peak, dtype = None, None
    if checked is not None:
        layer, affine, dtype = checked
        groups = layer.groups if layer.kind == "convT" else 1
        peaks = fold.max_abs_per_channel(as_f64(layer.weight), layer.axis, groups)
        peak = float((peaks * np.abs(affine.scale)).max())
    return bn_health(
        as_f64_or_none(bn.gamma), as_f64_or_none(bn.beta), as_f64(bn.mean), as_f64(bn.var), bn.eps,
        folded_weight_peak=peak, dtype=dtype,
    )  # fmt: skip


def _op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """Ops by kind; torch.export's input-guard module (``_guards_fn``) is no op of the model."""
    return Counter(
        _op_label(gm, n)
        for n in gm.graph.nodes
        if n.op in ("call_module", "call_function", "call_method") and n.target != "_guards_fn"
    )
