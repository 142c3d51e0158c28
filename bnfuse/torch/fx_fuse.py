"""Fold BatchNorm into the preceding layer of a torch.fx GraphModule, in place.

The graph comes from ``torch.fx.symbolic_trace`` (nn.Module calls) or from an
ExportedProgram's ``module()`` (aten calls with get_attr parameters). Handled:

  layers  nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d (any groups), nn.Linear,
          and the functional and aten forms of conv, conv_transpose, convolution
          and linear whose weight and bias are module attributes (constants)
  norms   nn.BatchNorm1d/2d/3d, F.batch_norm, aten.batch_norm and
          aten._native_batch_norm_legit_no_training (its output 0)

This module reads the facts (the BN's mode and parameters, the layer, who
else reads the layer's output) out of the graph; bnfuse.legality decides,
with the same rules and sentences as the ONNX and TorchScript paths.

A module called in two places, once before a BN and once not, is copied for
the folded call, so the other call keeps its weights (torch.fx's own fuse
rewrites the shared module and changes the other call's output).
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from bnfuse import legality
from bnfuse.legality import Refusal
from bnfuse.result import Candidate, Skip
from bnfuse.torch import facts

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


@dataclass
class _BatchNorm:
    out: fx.Node  # the node whose value is the normalised tensor
    calls: list[fx.Node]  # nodes to erase (the BN call, and its getitem)
    input: Any  # the normalised value: a node, or whatever else the call was given
    norm: legality.Norm


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # conv / convT / linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None  # for call_module layers

    def facts(self, name: str) -> legality.Layer:
        return facts.layer(
            name, self.kind, self.weight, self.bias, self.groups, _output_rank(self.node),
            "pass example inputs",
        )  # fmt: skip


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


def _constant(gm: fx.GraphModule, arg: Any, what: str) -> torch.Tensor | Refusal | None:
    """The tensor behind a get_attr node (None stays None)."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = _fetch(gm, str(arg.target))
        if isinstance(value, torch.Tensor):
            return value
    shown = arg.name if isinstance(arg, fx.Node) else repr(arg)
    return Refusal(
        Skip.NOT_CONSTANT, f"{what} '{shown}' is computed in the graph, not a stored constant"
    )


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | None:
    """The facts of ``node`` as a BatchNorm, or None when it is no BatchNorm."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return None
        why = None
        if mod.training:
            why = "the module is in train mode"
        elif not mod.track_running_stats:
            why = "track_running_stats=False (even in eval mode)"
        mean, var = mod.running_mean, mod.running_var
        found: legality.Params | Refusal = (
            facts.params(mod.weight, mod.bias, mean, var, mod.eps)
            if mean is not None and var is not None
            else Refusal(Skip.TRAINING_MODE, "no running statistics")
        )
        norm = legality.Norm(found, batch_statistics=why)
        return _BatchNorm(out=node, calls=[node], input=node.args[0], norm=norm)
    if node.op != "call_function" or node.target not in BN_FUNCTIONS:
        return None
    args = _bind(node, BN_FUNCTIONS[node.target])
    out, calls, stats_output, why = node, [node], None, None
    if node.target is aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        stats = [u for u in users if not (u.target is operator.getitem and u.args[1] == 0)]
        if stats or len(users) != 1:
            stats_output = (stats or users)[0].name
        else:
            out, calls = users[0], [users[0], node]
    elif args.get("training", False) is not False:
        why = "training=True"
    return _BatchNorm(out, calls, args["input"], _norm(gm, args, why, stats_output))


def _norm(
    gm: fx.GraphModule, args: dict[str, Any], why: str | None, stats_output: str | None
) -> legality.Norm:
    """The facts of a functional or aten batch_norm call, from its bound arguments."""
    found: dict[str, torch.Tensor | None] = {}
    params: legality.Params | Refusal | None = None
    for key in ("weight", "bias", "running_mean", "running_var"):
        value = _constant(gm, args.get(key), f"BatchNorm {key}")
        if isinstance(value, Refusal):
            params = value
            break
        found[key] = value
    mean, var = found.get("running_mean"), found.get("running_var")
    if params is None and (mean is None or var is None):
        why = why or "no running statistics"
        params = Refusal(Skip.TRAINING_MODE, why)
    if params is None:
        assert mean is not None and var is not None
        params = facts.params(found["weight"], found["bias"], mean, var, args.get("eps", 1e-5))
    return legality.Norm(params, batch_statistics=why, stats_output=stats_output)


def _layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | Refusal:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.modules.conv._ConvNd):
            kind = "convT" if mod.transposed else "conv"
            return _Layer(node, kind, mod.weight, mod.bias, mod.groups, mod)
        if isinstance(mod, nn.Linear):
            return _Layer(node, "linear", mod.weight, mod.bias, 1, mod)
        return legality.no_layer(f"{type(mod).__name__} '{node.target}'")
    if node.op != "call_function" or node.target not in LAYER_FUNCTIONS:
        what = (
            getattr(node.target, "__name__", str(node.target))
            if node.op != "placeholder"
            else "a graph input"
        )
        return legality.no_layer(f"{what} ('{node.name}')")
    kind, names = LAYER_FUNCTIONS[node.target]
    args = _bind(node, names)
    if kind == "convolution":
        kind = "convT" if args.get("transposed") else "conv"
    weight = _constant(gm, args.get("weight"), "layer weight")
    bias = _constant(gm, args.get("bias"), "layer bias")
    if isinstance(weight, Refusal):
        return weight
    if isinstance(bias, Refusal):
        return bias
    if weight is None:
        return Refusal(Skip.NOT_CONSTANT, f"'{node.name}' has no weight")
    groups = args.get("groups", 1)
    if not isinstance(groups, int):
        return Refusal(Skip.NOT_CONSTANT, f"'{node.name}' has a computed group count")
    return _Layer(node, kind, weight, bias, groups, None)


def _output_rank(node: fx.Node) -> int | None:
    shape = _shape(node)
    return None if shape is None else len(shape)


def _uses(bn: _BatchNorm, chain: Sequence[fx.Node], layer: fx.Node) -> list[legality.Use]:
    """The layer's output and each shape-only step's: read by the next step and nothing
    else (reads of their shape only do not count: folding changes no shape)."""
    nodes = [layer, *chain]
    uses = []
    for node, reader in zip(nodes, [*chain, bn.calls[-1]], strict=True):
        readers = [u for u in node.users if u is not reader and not _reads_shape(u, node)]
        others = tuple(u.name for u in readers if u.op != "output")
        output = any(u.op == "output" for u in readers)
        uses.append(legality.Use(f"the output of '{_name(node)}'", others, graph_output=output))
    return uses


# --- Shape-only steps between the layer and the BatchNorm (LeViT's flatten -> BN) ----

_VIEWS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "_unsafe_view"}
_PERMUTES = {"permute", "transpose"}
_SHAPE_OF_ARG1 = {"reshape_as", "view_as", "expand_as"}  # read only the shape of args[1]


def _op_name(node: fx.Node) -> str:
    """A method's name, or a function's (``aten.view.default`` -> ``view``); "" otherwise."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", "")).split(".")[0]
    return ""


def _kind(node: fx.Node) -> str | None:
    """``view`` / ``permute`` / ``transpose`` when ``node`` only moves its input's elements."""
    name = _op_name(node)
    if name in _VIEWS or name in ("reshape_as", "view_as"):
        return "view"
    return name if name in _PERMUTES else None


def _reads_shape(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only what a fold keeps of ``node``: its shape, rank, dtype...
    (legality.METADATA_READS)."""
    name = _op_name(user)
    if user.op == "call_method" and name in legality.METADATA_READS["fx_methods"]:
        return True
    attribute = user.args[1] if len(user.args) > 1 else None
    if user.op == "call_function" and (
        (user.target is getattr and attribute in legality.METADATA_READS["fx_attributes"])
        or name.startswith("sym_size")
    ):
        return True
    return (
        name in _SHAPE_OF_ARG1
        and len(user.args) > 1
        and user.args[1] is node
        and user.args[0] is not node
    )


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a call of a layer kind (its weights are checked later)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.modules.conv._ConvNd, nn.Linear))
    return node.op == "call_function" and node.target in LAYER_FUNCTIONS


def _chain(gm: fx.GraphModule, producer: fx.Node) -> tuple[list[fx.Node], fx.Node, Refusal | None]:
    """Shape-only nodes back from ``producer`` to a layer (legality.chain_back)."""

    def step_input(node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        return first if _kind(node) is not None and isinstance(first, fx.Node) else None

    return legality.chain_back(producer, step_input, lambda n: _is_layer(gm, n))


def _steps(chain: Sequence[fx.Node]) -> tuple[legality.Step, ...]:
    steps: list[legality.Step] = []
    for node in chain:
        before, after = _shape(node.args[0]), _shape(node)
        label = f"{_kind(node)} '{node.name}'"
        if _kind(node) == "view":
            steps.append(legality.Reshape(label, before, after))
            continue
        rank = len(before) if before is not None else None
        dims = [d for d in node.args[1:] if isinstance(d, int)]
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            dims = [int(d) for d in node.args[1]]
        perm: tuple[int, ...] | None = None
        if rank is not None and _kind(node) == "permute" and len(dims) == rank:
            perm = tuple(d % rank for d in dims)
        elif rank is not None and _kind(node) == "transpose" and len(dims) == 2:
            order = list(range(rank))
            a, b = dims[0] % rank, dims[1] % rank
            order[a], order[b] = order[b], order[a]
            perm = tuple(order)
        steps.append(legality.Permute(label, perm))
    return tuple(steps)


def _shape(arg: Any) -> tuple[int | None, ...] | None:
    """A node's output shape (torch.export's ``val``, or ShapeProp's ``tensor_meta``);
    a symbolic dim is None."""
    if not isinstance(arg, fx.Node):
        return None
    val = arg.meta.get("val")
    if val is None:
        val = arg.meta.get("tensor_meta")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


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
        self, bn: _BatchNorm, layer: _Layer, layer_facts: legality.Layer, decided: legality.Fold
    ) -> None:
        weight, bias = facts.folded(layer_facts, decided, layer.weight)
        if layer.module is not None:
            self._set_module_params(layer, weight, bias)
        else:
            self._set_function_params(layer, weight, bias)
        bn.out.replace_all_uses_with(bn.input)  # the layer, or the last shape-only step
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


@dataclass
class Decision:
    """One BatchNorm of a graph, what it would fold into, and the verdict."""

    candidate: Candidate  # without skip/reason: those come with the verdict
    bn: _BatchNorm
    layer: _Layer | Refusal
    layer_facts: legality.Layer | Refusal
    verdict: legality.Fold | Refusal


def decisions(gm: fx.GraphModule) -> Iterator[Decision]:
    """Every BatchNorm of ``gm``, in graph order, with the legality verdict on it.

    Lazy over a snapshot of the nodes, so the caller may fold each one as it comes.
    """
    for node in list(gm.graph.nodes):  # nodes erased on the way are getitem/get_attr: no BN
        bn = _batchnorm(gm, node)
        if bn is None:
            continue
        producer = bn.input if isinstance(bn.input, fx.Node) else None
        chain, origin, too_far = _chain(gm, producer) if producer is not None else ([], None, None)
        candidate = Candidate(
            node=_name(node), graph="forward",
            layer=_name(origin) if origin is not None else None,
            layer_op=_op_label(gm, origin) if origin is not None else None,
            consumers=tuple(u.name for u in bn.out.users),
        )  # fmt: skip
        layer: _Layer | Refusal
        if too_far is not None:
            layer = too_far
        elif origin is not None:
            layer = _layer(gm, origin)
        else:
            layer = Refusal(Skip.NO_LAYER, "its input is not a graph value")
        layer_facts = (
            replace(layer.facts(_name(layer.node)), steps=_steps(chain))
            if isinstance(layer, _Layer)
            else layer
        )
        uses = _uses(bn, chain, origin) if origin is not None else []
        verdict = legality.decide(bn.norm, layer_facts, uses)
        candidate = replace(candidate, health=legality.health(bn.norm, layer_facts, verdict))
        yield Decision(candidate, bn, layer, layer_facts, verdict)


def skipped(candidate: Candidate, refusal: Refusal) -> Candidate:
    return replace(candidate, skip=refusal.skip, reason=refusal.reason)


def fuse_graph_module(gm: fx.GraphModule) -> list[Candidate]:
    """Fold every legal BN of ``gm`` (in place); every BN is reported."""
    rewriter = _Rewriter(gm)
    candidates = []
    for d in decisions(gm):
        if isinstance(d.verdict, Refusal):
            candidates.append(skipped(d.candidate, d.verdict))
            continue
        assert isinstance(d.layer, _Layer) and isinstance(d.layer_facts, legality.Layer)
        rewriter.apply(d.bn, d.layer, d.layer_facts, d.verdict)
        candidates.append(d.candidate)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return candidates


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
