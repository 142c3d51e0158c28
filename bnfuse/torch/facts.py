"""Torch tensors as bnfuse.legality facts, and a legal fold as new torch tensors.

Both PyTorch paths (torch.fx / torch.export in fx_fuse, TorchScript in
script_fuse) find their BatchNorms and layers in their own IR, then describe
them with these helpers; the rules and the arithmetic are bnfuse.legality's
and bnfuse.fold's, as on the ONNX path.
"""

from __future__ import annotations

import torch

from bnfuse import fold, legality
from bnfuse.torch.tensors import as_f64, as_f64_or_none, numpy_dtype, to_torch

# The layer kinds of both paths, and how a user calls them.
KINDS = {"conv": "Conv", "convT": "ConvTranspose", "linear": "Linear"}


def params(
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> legality.Params:
    return legality.Params(
        as_f64_or_none(gamma), as_f64_or_none(beta), as_f64(mean), as_f64(var), float(eps)
    )


def layer(
    name: str,
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    rank: int | None,
    rank_hint: str,
) -> legality.Layer:
    """A conv / convT / linear layer; ``rank`` is its output's, where known."""
    channel_axis: int | None = 1
    if kind == "linear":  # output features on the last axis
        channel_axis = None if rank is None else rank - 1
    floating = weight.is_floating_point()
    return legality.Layer(
        label=f"{KINDS[kind]} '{name}'",
        weight=as_f64(weight) if floating else weight.detach().cpu().numpy(),
        bias=as_f64_or_none(bias) if floating else None,
        axis=1 if kind == "convT" else 0,
        groups=groups if kind == "convT" else 1,
        channel_axis=channel_axis,
        rank=rank,
        rank_hint=rank_hint,
        dtype=numpy_dtype(weight.dtype) if floating else None,
        dtype_name=str(weight.dtype),
    )


def folded(
    facts: legality.Layer, decided: legality.Fold, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded weight and bias, rounded once to the layer's dtype, on ``like``'s device."""
    w = fold.fold_weight(facts.weight, decided.affine.scale, facts.axis, facts.groups)
    b = fold.fold_bias(facts.bias, decided.affine)
    return (
        to_torch(fold.round_to(w, decided.dtype), like),
        to_torch(fold.round_to(b, decided.dtype), like),
    )
