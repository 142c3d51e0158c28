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
from dataclasses import replace
from typing import Any

import torch
from torch.jit._script import RecursiveScriptModule

from bnfuse import legality
from bnfuse.legality import Refusal
from bnfuse.result import Candidate, FuseResult, Skip
from bnfuse.torch import facts

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


_SHAPE_READS = legality.METADATA_READS["torchscript"]


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Inline submodules and turn parameters into constants, without BN folding.

    What the user reaches on the top module besides ``forward`` stays: every
    ``@torch.jit.export`` method, and the top module's own attributes (numbers,
    strings, lists, tensors that are not a submodule's parameters).
    """
    frozen = RecursiveScriptModule(torch._C._freeze_module(module._c, preserved(module)))
    RecursiveScriptModule._finalize_scriptmodule(frozen)
    return frozen


def preserved(module: torch.jit.ScriptModule) -> list[str]:
    """The exported methods and the top module's own attributes."""
    methods = [m for m in module._c._method_names() if m != "forward"]
    attributes = torch._C._jit_debug_module_iterators(module._c)["named_attributes"]  # type: ignore[attr-defined]
    own = [
        name
        for name, value in attributes
        if not name.startswith("_")
        and name != "training"
        and not isinstance(value, torch._C.ScriptModule)
    ]
    return methods + own


def _owners(module: torch.jit.ScriptModule) -> dict[int, str]:
    """Each parameter or buffer's storage, and the one module path that holds it."""
    seen: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.numel():
            seen.setdefault(tensor.data_ptr(), []).append(name.rpartition(".")[0])
    return {ptr: paths[0] for ptr, paths in seen.items() if len(set(paths)) == 1}


def _const(value: Any) -> Any:
    node = value.node()
    if node.kind() != "prim::Constant":
        raise LookupError(value.debugName())
    return value.toIValue()


def _label(node: Any, owners: dict[int, str]) -> str:
    """The module path the node comes from (``layer1.0.bn1``), where it can be known.

    A module traced in this process keeps its scope
    (``__module.layer1/__module.layer1.0.bn1``). A module loaded from a file keeps
    none; its frozen constants are still the module's own tensors, so a BatchNorm
    is named by the module holding its running statistics and a layer by the one
    holding its weight. Otherwise: the op and its output value.
    """
    scope = str(node.scopeName()).rsplit("/", 1)[-1]
    if scope.startswith("__module.") and len(scope) > len("__module."):
        return scope[len("__module.") :]
    held = [1] if node.kind() in _LAYERS else [3, 4] if node.kind() == "aten::batch_norm" else []
    paths = {_owner(node.inputsAt(i), owners) for i in held if i < node.inputsSize()}
    if len(paths) == 1 and None not in paths:
        return str(paths.pop())
    out = node.output() if node.outputsSize() == 1 else None
    return f"{node.kind()} %{out.debugName()}" if out is not None else node.kind()


def _owner(value: Any, owners: dict[int, str]) -> str | None:
    try:
        tensor = _const(value)
    except LookupError:
        return None
    return owners.get(tensor.data_ptr()) if isinstance(tensor, torch.Tensor) else None


def op_counts(graph: Any) -> Counter[str]:
    return Counter(n.kind() for n in graph.nodes() if n.kind() != "prim::Constant")


def fuse_script_module(
    module: torch.jit.ScriptModule, example_inputs: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.jit.ScriptModule, FuseResult]:
    """A frozen, fused copy of ``module`` and the report.

    BatchNorms fold in ``forward`` and in every exported method; the report
    lists ``forward``'s, and another method's only where it is skipped there
    (with the method as its graph). Op counts are ``forward``'s.
    """
    owners = _owners(module)
    frozen = freeze(module)
    methods = ["forward", *(m for m in frozen._c._method_names() if m != "forward")]
    candidates: list[Candidate] = []
    before = after = Counter[str]()
    for method in methods:
        graph = frozen._c._get_method(method).graph
        examples = example_inputs if method == "forward" else None
        counts = op_counts(graph)
        found = _fuse_graph(graph, method, examples, owners)
        # Another method's BatchNorms are forward's modules again: only a skip is news.
        candidates += found if method == "forward" else [c for c in found if not c.fusable]
        if method == "forward":
            before, after = counts, op_counts(graph)
    names = Counter(c.node for c in candidates if c.graph == "forward")
    if any(n > 1 for n in names.values()):  # two BatchNorms, one name: constants were pooled
        candidates = [
            replace(c, node=c.node if names[c.node] < 2 else _unnamed(c)) for c in candidates
        ]
    return frozen, FuseResult(candidates=candidates, ops_before=before, ops_after=after)


def _unnamed(candidate: Candidate) -> str:
    return f"aten::batch_norm ({candidate.graph}, {candidate.node})"


def _fuse_graph(
    graph: Any, method: str, example_inputs: tuple[torch.Tensor, ...] | None, owners: dict[int, str]
) -> list[Candidate]:
    """Fold the BatchNorms of one method's graph, in place."""
    # Drop branches that eval mode makes dead (F.batch_norm's batch-size check reads the
    # conv output under `if training:`); this evaluates no BatchNorm.
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    frozen_types = [v.type() for v in graph.inputs()]
    if example_inputs is not None:  # ranks for the Linear -> BatchNorm1d check
        for value, example in zip(list(graph.inputs())[1:], example_inputs, strict=False):
            value.setType(torch._C.TensorType.create_from_tensor(example))
        torch._C._jit_pass_propagate_shapes_on_graph(graph)
    shapes = _Shapes(graph, example_inputs)
    candidates = []
    for bn in list(graph.nodes()):
        if bn.kind() != "aten::batch_norm":
            continue
        chain, producer, too_far = _chain(bn.inputsAt(0).node())
        candidate = Candidate(
            node=_label(bn, owners), graph=method, layer=_label(producer, owners),
            layer_op=producer.kind(), consumers=tuple(u.user.kind() for u in bn.output().uses()),
        )  # fmt: skip
        norm = _norm(bn)
        layer = too_far or _layer(producer, owners, shapes)
        if isinstance(layer, legality.Layer):
            layer = replace(layer, steps=_steps(chain, shapes))
        nodes = [producer, *chain]
        uses = [_use(node, reader) for node, reader in zip(nodes, [*chain, bn], strict=True)]
        decided = legality.decide(norm, layer, uses)
        candidate = replace(candidate, health=legality.health(norm, layer, decided))
        if isinstance(decided, Refusal):
            candidates.append(replace(candidate, skip=decided.skip, reason=decided.reason))
            continue
        assert isinstance(layer, legality.Layer)
        _apply(graph, bn, producer, layer, decided)
        candidates.append(candidate)
    torch._C._jit_pass_dce(graph)
    if example_inputs is not None:  # forget the example's shapes: any shape stays accepted
        for value, type_ in zip(graph.inputs(), frozen_types, strict=True):
            value.setType(type_)
        for node in graph.nodes():
            for value in node.outputs():
                if isinstance(value.type(), torch._C.TensorType):
                    value.setType(torch._C.TensorType.get())
    return candidates


def _norm(bn: Any) -> legality.Norm:
    """The facts of an aten::batch_norm node."""
    try:
        training = _const(bn.inputsAt(5))
    except LookupError:
        return legality.Norm(
            Refusal(Skip.TRAINING_MODE, "training flag not constant"),
            batch_statistics="its training flag is not a constant (the module was saved in "
            "train mode)",
        )
    why = "the module is in train mode" if training else None
    try:
        gamma, beta, mean, var = (_const(bn.inputsAt(i)) for i in range(1, 5))
        eps = float(_const(bn.inputsAt(7)))
    except LookupError as exc:
        refusal = Refusal(
            Skip.NOT_CONSTANT, f"BatchNorm argument %{exc.args[0]} is computed, not a constant"
        )
        return legality.Norm(refusal, batch_statistics=why)
    if mean is None or var is None:
        why = why or "no running statistics"
        return legality.Norm(Refusal(Skip.TRAINING_MODE, why), batch_statistics=why)
    return legality.Norm(facts.params(gamma, beta, mean, var, eps), batch_statistics=why)


# aten ops that only regroup or move their first input's elements.
_VIEWS = {
    "aten::flatten", "aten::view", "aten::reshape", "aten::_unsafe_view", "aten::reshape_as",
    "aten::view_as", "aten::squeeze", "aten::unsqueeze",
}  # fmt: skip
_PERMUTES = {"aten::permute", "aten::transpose"}
_SHAPE_OF_ARG1 = {"aten::reshape_as", "aten::view_as", "aten::expand_as"}


def _chain(producer: Any) -> tuple[list[Any], Any, Refusal | None]:
    """Shape-only nodes back from ``producer`` to a layer (legality.chain_back)."""

    def step_input(node: Any) -> Any:
        return node.inputsAt(0).node() if node.kind() in _VIEWS | _PERMUTES else None

    return legality.chain_back(producer, step_input, lambda n: n.kind() in _LAYERS)


class _Shapes:
    """Tensor shapes by value name, measured (``_probe``) the first time one is asked for:
    only a Linear's rank and shape-only steps need them, so a graph of convolutions is
    never run."""

    def __init__(self, graph: Any, example_inputs: tuple[torch.Tensor, ...] | None) -> None:
        self._graph, self._examples = graph, example_inputs
        self._measured: dict[str, tuple[int, ...]] | None = None

    def get(self, name: str) -> tuple[int, ...] | None:
        if self._measured is None:
            examples = self._examples
            self._measured = _probe(self._graph, examples) if examples is not None else {}
        return self._measured.get(name)


def _probe(graph: Any, example_inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, by running a copy of the graph on the example inputs once.

    TorchScript's own shape analysis stops at ops it has no formula for
    (reshape_as), so the shapes are measured instead. {} where the graph reads
    its module (a preserved attribute) or does not run on these inputs.
    """
    probe = graph.copy()
    if next(iter(probe.inputs())).uses():
        return {}
    probe.eraseInput(0)
    names, values = [], []
    for original, copied in zip(graph.nodes(), probe.nodes(), strict=True):
        for a, b in zip(original.outputs(), copied.outputs(), strict=True):
            if isinstance(b.type(), torch._C.TensorType):
                names.append(a.debugName())
                values.append(b)
    for index in reversed(range(len(list(probe.outputs())))):
        probe.eraseOutput(index)
    pack = probe.create("prim::TupleConstruct", values)
    pack.insertBefore(probe.return_node())
    pack.output().setType(torch._C.TupleType([v.type() for v in values]))
    probe.registerOutput(pack.output())
    try:
        with torch.no_grad():
            run = torch._C._create_function_from_graph("bnfuse_probe", probe)
            measured = run(*(t.clone() for t in example_inputs))  # in-place ops touch a copy
    except Exception:  # the example does not run: no shapes, and the rules say so
        return {}
    return {
        name: tuple(t.shape)
        for name, t in zip(names, measured, strict=True)
        if isinstance(t, torch.Tensor)
    }


def _steps(chain: list[Any], shapes: _Shapes) -> tuple[legality.Step, ...]:
    steps: list[legality.Step] = []
    for node in chain:
        label = f"{node.kind()} %{node.output().debugName()}"
        before = shapes.get(node.inputsAt(0).debugName())
        after = shapes.get(node.output().debugName())
        if node.kind() in _VIEWS:
            steps.append(legality.Reshape(label, before, after))
            continue
        perm: tuple[int, ...] | None = None
        try:
            args = [_const(node.inputsAt(i)) for i in range(1, node.inputsSize())]
        except LookupError:
            args = []
        rank = len(before) if before is not None else None
        if rank is not None and node.kind() == "aten::permute" and len(args) == 1:
            perm = tuple(int(d) % rank for d in args[0])
        elif rank is not None and node.kind() == "aten::transpose" and len(args) == 2:
            order = list(range(rank))
            a, b = int(args[0]) % rank, int(args[1]) % rank
            order[a], order[b] = order[b], order[a]
            perm = tuple(order)
        steps.append(legality.Permute(label, perm))
    return tuple(steps)


def _layer(producer: Any, owners: dict[int, str], shapes: _Shapes) -> legality.Layer | Refusal:
    """The facts of the node that produces a BatchNorm's input, if it is a layer."""
    kind_info = _LAYERS.get(producer.kind())
    if kind_info is None:
        return legality.no_layer(producer.kind())
    kind, groups_at, transposed_at = kind_info
    try:
        weight = _const(producer.inputsAt(1))
        bias = _const(producer.inputsAt(2))
        groups = int(_const(producer.inputsAt(groups_at))) if groups_at is not None else 1
        if transposed_at is not None and _const(producer.inputsAt(transposed_at)):
            kind = "convT"
    except LookupError as exc:
        return Refusal(
            Skip.NOT_CONSTANT,
            f"{producer.kind()} argument %{exc.args[0]} is computed, not a constant",
        )
    out = producer.output()
    measured = shapes.get(out.debugName()) if kind == "linear" else None  # only its rank counts
    rank = len(measured) if measured is not None else None
    if rank is None and isinstance(out.type(), torch._C.TensorType):
        rank = out.type().dim()
    return facts.layer(
        _label(producer, owners), kind, weight, bias, groups, rank, "pass --input-shape"
    )


def _use(node: Any, reader: Any) -> legality.Use:
    """``node``'s output, read by ``reader``; reads of its shape only do not count (BatchNorm's
    own input check reads out.dim(), reshape_as its target's shape): folding keeps shapes."""
    out = node.output()
    readers = [
        u.user
        for u in out.uses()
        if u.user is not reader
        and u.user.kind() not in _SHAPE_READS
        and not (u.user.kind() in _SHAPE_OF_ARG1 and u.offset == 1)
    ]
    others = tuple(n.kind() for n in readers if not _returned(n))
    output = any(_returned(n) for n in readers)
    return legality.Use(f"the output %{out.debugName()}", others, graph_output=output)


def _returned(node: Any) -> bool:
    """The graph's return, or a tuple/list the graph returns as it is."""
    if node.kind() == "prim::Return":
        return True
    if node.kind() in ("prim::TupleConstruct", "prim::ListConstruct"):
        return all(u.user.kind() == "prim::Return" for u in node.output().uses())
    return False


def _apply(
    graph: Any, bn: Any, producer: Any, layer: legality.Layer, decided: legality.Fold
) -> None:
    like = _const(producer.inputsAt(1))
    for index, tensor in zip((1, 2), facts.folded(layer, decided, like), strict=True):
        value = graph.insertConstant(tensor)
        value.node().moveBefore(producer)
        producer.replaceInput(index, value)
    bn.output().replaceAllUsesWith(bn.inputsAt(0))  # the layer, or the last shape-only step
    bn.destroy()
