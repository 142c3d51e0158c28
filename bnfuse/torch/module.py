"""Fuse an nn.Module: capture it as a torch.fx graph, fold, return a fused copy.

Capture is torch.fx.symbolic_trace where the model traces; otherwise
torch.export with the example inputs. The original module is never touched
(the fusion works on a deep copy), unless ``inplace=True``: then the graph
only decides, and the folds are made in the module itself (bnfuse.torch.inplace).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfuse.errors import BnfuseError, first_line
from bnfuse.result import FuseResult
from bnfuse.torch.fx_fuse import fuse_graph_module, op_counts


@dataclass
class FusedModule:
    module: nn.Module  # a fused torch.fx.GraphModule; with inplace=True, the module given
    result: FuseResult


def capture(module: nn.Module, example_inputs: Sequence[Any] | None) -> fx.GraphModule:
    """A GraphModule computing what ``module`` computes (on a copy of it)."""
    clone = copy.deepcopy(module)
    try:
        gm = fx.symbolic_trace(clone)
    except Exception as fx_exc:
        fx_why = f"{type(fx_exc).__name__}: {first_line(fx_exc) or 'no message'}"
        if example_inputs is None:
            raise BnfuseError(
                f"torch.fx cannot trace {type(module).__name__} ({fx_why})",
                hint="pass example_inputs so that torch.export can capture it",
            ) from fx_exc
        try:
            exported = torch.export.export(clone, tuple(example_inputs))
        except Exception as export_exc:
            export_why = f"{type(export_exc).__name__}: {first_line(export_exc) or 'no message'}"
            raise BnfuseError(
                f"neither torch.fx ({fx_why}) nor torch.export ({export_why}) "
                f"can capture {type(module).__name__}"
            ) from export_exc
        return exported.module()
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    return gm


def fuse_module(
    module: nn.Module, example_inputs: Sequence[Any] | None = None, *, inplace: bool = False
) -> FusedModule:
    """Fold every legal BN of ``module`` into a fused copy; the original is untouched.

    ``example_inputs`` (a tuple of tensors) lets bnfuse check shapes (Linear ->
    BatchNorm1d needs a 2-D input) and capture models torch.fx cannot trace.
    With ``inplace=True`` the module itself is changed and returned: each folded
    BatchNorm becomes ``nn.Identity`` and its layer's weight and bias are updated.
    """
    gm = capture(module, example_inputs)
    before = op_counts(gm)
    if inplace:
        from bnfuse.torch.inplace import fuse_in_place

        candidates = fuse_in_place(gm, module)
        fused: nn.Module = module
        after = op_counts(capture(module, example_inputs))
    else:
        candidates = fuse_graph_module(gm)
        fused, after = gm, op_counts(gm)
    for cand in candidates:  # a BatchNorm left in place is never silent
        if not cand.fusable:
            warnings.warn(
                f"bnfuse: {cand.op} '{cand.node}' was not folded: {cand.reason}",
                NotFoldedWarning,
                stacklevel=2,
            )
    return FusedModule(fused, FuseResult(candidates=candidates, ops_before=before, ops_after=after))


class NotFoldedWarning(UserWarning):
    """A BatchNorm (or constant Mul/Add) of the module stays; the message says which and why."""
