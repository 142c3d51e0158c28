"""Fold BatchNorms into the user's own module: same object, class, methods and names.

The graph is captured (torch.fx, or torch.export with the example inputs) on a
copy, only to decide: bnfuse.legality rules on it exactly as on the copying
path (fx_fuse.decisions). Each legal fold is then applied to the user's
module by module path: the layer's weight and bias are overwritten in place
(float64 fold, rounded once; a layer without bias gains one) and the
BatchNorm module is replaced by ``nn.Identity``. Nothing else changes:
methods, attributes, hooks and every other parameter's name stay.

In place is exact only where the graph's calls are the modules' calls, so a
pair is folded in place only when

- the BatchNorm and the layer are modules (nn.BatchNorm*d, nn.Conv*d,
  nn.ConvTranspose*d, nn.Linear), not functional calls on stored tensors;
- the BatchNorm module's forward is BatchNorm's own: a subclass that adds to it
  (timm's BatchNormAct2d applies its activation) would lose that with it;
- each module is called once in the graph (a layer called twice would change
  its other call; a BatchNorm called twice would vanish from its other call);
- no other module shares the layer's weight or bias.

Otherwise the BatchNorm is skipped with the reason; ``bnfuse.fuse`` without
``inplace`` folds such pairs in a copy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from bnfuse import legality
from bnfuse.legality import Refusal
from bnfuse.result import Candidate, Skip
from bnfuse.torch import facts
from bnfuse.torch.fx_fuse import (
    BN_FUNCTIONS,
    LAYER_FUNCTIONS,
    Decision,
    _bind,
    _Layer,
    decisions,
    skipped,
)

_COPY = "bnfuse.fuse without inplace=True folds it in a copy"


def fuse_in_place(gm: fx.GraphModule, module: nn.Module) -> list[Candidate]:
    """Fold every BatchNorm of ``module`` that may be folded in place; ``gm`` is its graph.

    ``gm`` was captured from a copy of ``module``, so its module paths are ``module``'s.
    """
    calls = _calls(gm)
    holders = Counter(
        id(t)
        for _, t in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    )  # how many (module, name) places hold each tensor
    candidates = []
    folds = []
    for d in decisions(gm):
        if isinstance(d.verdict, Refusal):
            candidates.append(skipped(d.candidate, d.verdict))
            continue
        where = _modules(module, d, calls, holders)
        if isinstance(where, Refusal):
            candidates.append(skipped(d.candidate, where))
            continue
        folds.append((where, d))
        candidates.append(d.candidate)
    for (layer_path, bn_path), d in folds:  # decided on the unchanged graph, then applied
        assert isinstance(d.layer_facts, legality.Layer)
        assert isinstance(d.verdict, legality.Fold)
        _apply(module, layer_path, bn_path, d.layer_facts, d.verdict)
    return candidates


def _apply(
    module: nn.Module, layer_path: str, bn_path: str, layer: legality.Layer, fold: legality.Fold
) -> None:
    target = module.get_submodule(layer_path)
    weight = target.weight
    assert isinstance(weight, torch.Tensor)
    new_weight, new_bias = facts.folded(layer, fold, weight)
    with torch.no_grad():
        weight.copy_(new_weight)
        if isinstance(target.bias, torch.Tensor):
            target.bias.copy_(new_bias)
        else:
            target.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    parent_path, _, name = bn_path.rpartition(".")
    setattr(module.get_submodule(parent_path), name, nn.Identity())


def _modules(
    module: nn.Module, d: Decision, calls: Counter[str], holders: Counter[int]
) -> tuple[str, str] | Refusal:
    """The paths of the layer and BatchNorm modules, if the fold may be made in place."""
    assert isinstance(d.layer, _Layer)
    bn_path = _bn_path(d)
    layer_path = _layer_path(d.layer)
    for path, kinds, what in (
        (layer_path, (nn.modules.conv._ConvNd, nn.Linear), "layer"),
        (bn_path, (nn.modules.batchnorm._BatchNorm,), "BatchNorm"),
    ):
        held = _submodule(module, path) if path is not None else None
        if held is None or not isinstance(held, kinds):
            return Refusal(
                Skip.UNSUPPORTED,
                f"in place needs a {what} module, and this {what} is a functional call on "
                f"stored tensors ({_COPY})",
            )
        assert path is not None
        leaf = "weight" if what == "layer" else "running_mean"
        count = calls[path] + calls[f"{path}.{leaf}"]
        if count != 1:
            return Refusal(
                Skip.OTHER_CONSUMERS,
                f"the {type(held).__name__} module '{path}' is called {count} times; folding "
                f"in place would change its other calls ({_COPY})",
            )
    assert layer_path is not None and bn_path is not None
    norm = module.get_submodule(bn_path)
    if type(norm).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return Refusal(
            Skip.UNSUPPORTED,
            f"the {type(norm).__name__} module '{bn_path}' has a forward of its own (an "
            f"activation after the BatchNorm, say), which nn.Identity in its place would drop "
            f"({_COPY})",
        )
    target = module.get_submodule(layer_path)
    for name in ("weight", "bias"):
        tensor = getattr(target, name, None)
        if isinstance(tensor, torch.Tensor) and holders[id(tensor)] > 1:
            return Refusal(
                Skip.OTHER_CONSUMERS,
                f"the {name} of '{layer_path}' is shared with another module, which folding "
                f"in place would change too ({_COPY})",
            )
    return layer_path, bn_path


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _bn_path(d: Decision) -> str | None:
    call = d.bn.calls[-1]
    if call.op == "call_module":
        return str(call.target)
    stats = _bind(call, BN_FUNCTIONS[call.target]).get("running_mean")
    return _owner(stats)


def _layer_path(layer: _Layer) -> str | None:
    if layer.node.op == "call_module":
        return str(layer.node.target)
    weight = _bind(layer.node, LAYER_FUNCTIONS[layer.node.target][1]).get("weight")
    return _owner(weight, "weight")


def _owner(arg: Any, leaf: str = "running_mean") -> str | None:
    """The module path of a stored tensor ``path.leaf`` read by a get_attr node."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        path, _, name = str(arg.target).rpartition(".")
        if name == leaf:
            return path
    return None


def _calls(gm: fx.GraphModule) -> Counter[str]:
    """How many times the graph calls each module (by path) or reads each stored tensor
    (by ``path.name``, counting the readers of its get_attr nodes)."""
    counts: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] += 1
        elif n.op == "get_attr":
            counts[str(n.target)] += len(n.users)
    return counts
