"""A read of a tensor's shape, rank, dtype or device is no reader that blocks a fold: one
rule (legality.METADATA_READS) in every format.

timm builds most of its networks on ``BatchNormAct2d``: a BatchNorm2d subclass whose
forward asserts ``x.ndim == 4``, calls ``F.batch_norm`` on its own buffers, then an
activation. torch.fx records each ``x.ndim`` as a reader of the conv's output; before,
``bnfuse.fuse(module)`` left every one of those BatchNorms unfolded while ONNX, .pt2
and TorchScript folded them. In place, such a subclass is not replaced by
``nn.Identity`` (which would drop its activation): it stays, with the reason.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfuse
from bnfuse.torch.fx_fuse import fuse_graph_module
from bnfuse.torch.module import NotFoldedWarning, fuse_module
from bnfuse.torch.script_fuse import fuse_script_module
from sample_models.torch_nets import trained


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm 1.0 writes it (timm.layers.norm_act), trimmed to eval-time behaviour."""

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.act: nn.Module = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.0 if self.momentum is None else self.momentum, self.eps,
        )  # fmt: skip
        return self.act(x)


class Net(nn.Module):
    """conv -> BatchNormAct2d(relu) -> conv -> BatchNormAct2d; the second conv also reads
    its input's dtype and device, as mixed-precision code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = BatchNormAct2d(8, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.bn1(self.conv1(x)))
        torch._assert(h.dtype == x.dtype, "one dtype")
        torch._assert(h.device == x.device, "one device")
        return self.bn2(h)


X = torch.randn(2, 3, 12, 12)


def _net() -> nn.Module:
    return trained(Net()).eval()


def _folded(candidates: list[bnfuse.Candidate]) -> int:
    return sum(c.fusable for c in candidates)


def test_batchnorm_act_folds_through_the_python_api() -> None:
    net = _net()
    for example in (None, (X,)):
        report = fuse_module(net, example)
        assert _folded(report.result.candidates) == 2, report.result.candidates
        with torch.no_grad():
            got, want = report.module(X), net(X)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_batchnorm_act_folds_as_pt2_and_torchscript() -> None:
    net = _net()
    assert _folded(fuse_graph_module(torch.export.export(net, (X,)).module())) == 2
    scripted = torch.jit.script(net)
    assert _folded(fuse_script_module(scripted, (X,))[1].candidates) == 2


def test_batchnorm_act_folds_as_onnx(tmp_path: object) -> None:
    net = _net()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (X,), buf, dynamo=False, opset_version=17, do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
        )  # fmt: skip
    from pathlib import Path

    src = Path(str(tmp_path)) / "m.onnx"
    src.write_bytes(buf.getvalue())
    assert [n.op_type for n in onnx.load(src).graph.node].count("BatchNormalization") == 2
    assert _folded(bnfuse.fuse(src, dry_run=True).candidates) == 2


def test_in_place_keeps_a_batchnorm_subclass_that_has_its_own_forward() -> None:
    """Replacing BatchNormAct2d by nn.Identity would drop its ReLU (an error of about 2 on
    this net, silently, before): it stays, said so; the copy folds it."""
    net = _net()
    want = net(X).detach()
    mine = copy.deepcopy(net)
    with pytest.warns(NotFoldedWarning, match="has a forward of its own"):
        same = bnfuse.fuse(mine, example_inputs=(X,), inplace=True)
    assert same is mine and isinstance(mine.bn1, BatchNormAct2d)
    np.testing.assert_array_equal(mine(X).detach().numpy(), want.numpy())
