"""BatchNorm behind shape-only ops (LeViT's Linear -> flatten -> BatchNorm1d -> reshape).

The fold is exact when the BatchNorm's channel axis (1) holds the layer's output
channels and nothing else after the reshapes and transposes in between; each
format must fold it then, and refuse it with the same sentence otherwise.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfuse
from bnfuse.result import Candidate, Skip
from bnfuse.torch.fx_fuse import fuse_graph_module
from bnfuse.torch.module import NotFoldedWarning, fuse_module
from bnfuse.torch.script_fuse import fuse_script_module
from sample_models.torch_nets import LeViTish, export_onnx, export_onnx_dynamo, trained
from tests.helpers import run_reference


class Transposed(nn.Module):
    """Linear on [B, N, C], then transpose to [B, C, N] for BatchNorm1d: C lands on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 12)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))


class Mixed(nn.Module):
    """Linear on [B, N, C], flattened to [B, N*C]: BatchNorm1d's channels are (n, c) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).flatten(1))


class ReadTwice(nn.Module):
    """The flattened values are also read by another op: they must stay unfolded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).flatten(0, 1)
        return self.bn(h) + h.sigmoid()


SHAPE = (2, 5, 16)
FORMATS = ["onnx-legacy", "onnx-dynamo", "fx", "export", "script-traced", "script"]


def _run(net: nn.Module, fmt: str, tmp_path: Path) -> tuple[list[Candidate], float]:
    """The candidates, and the fused model's max abs error against the module."""
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        want = net(x).numpy()
    if fmt.startswith("onnx"):
        src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
        data = (
            export_onnx(net, SHAPE, 17) if fmt == "onnx-legacy" else export_onnx_dynamo(net, SHAPE)
        )
        src.write_bytes(data)
        result = bnfuse.fuse(src, out)
        model = onnx.load(str(out))
        (got,) = run_reference(model, {model.graph.input[0].name: x.numpy()})
        return result.candidates, float(np.abs(got - want).max())
    if fmt == "fx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotFoldedWarning)
            fused = fuse_module(net, (x,))
        candidates, module = fused.result.candidates, fused.module
    elif fmt == "export":
        module = torch.export.export(net, (x,)).module()
        candidates = fuse_graph_module(module)
    else:
        script = torch.jit.trace(net, x) if fmt == "script-traced" else torch.jit.script(net)
        module, result = fuse_script_module(script, (x,))
        candidates = result.candidates
    with torch.no_grad():
        return candidates, float(np.abs(module(x).numpy() - want).max())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", [LeViTish, Transposed], ids=["levit", "transposed"])
def test_a_bn_behind_shape_ops_folds_in_every_format(
    make: type[nn.Module], fmt: str, tmp_path: Path
) -> None:
    net = trained(make()).eval()
    candidates, error = _run(net, fmt, tmp_path)
    assert candidates and all(c.fusable for c in candidates), candidates
    assert error < 1e-5, error


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("make", "skip", "words"),
    [
        (Mixed, Skip.SHAPE_MISMATCH, "mixes the 4 output channels with other elements; "
         "BatchNorm normalises axis 1 of its input, which must hold the output channels of"),
        (ReadTwice, Skip.OTHER_CONSUMERS, "is also read by 1 other node(s)"),
    ],
    ids=["axis-does-not-map", "read-twice"],
)  # fmt: skip
def test_a_bn_behind_shape_ops_is_refused_with_the_reason(
    make: type[nn.Module], skip: Skip, words: str, fmt: str, tmp_path: Path
) -> None:
    net = trained(make()).eval()
    reference = copy.deepcopy(net)
    (cand,), error = _run(net, fmt, tmp_path)
    assert cand.skip is skip and words in (cand.reason or ""), cand
    assert error <= 1e-6  # left in place: the model computes what it did
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True)
    )


class _Reshape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 8)


class Steps(nn.Module):
    """Linear -> ``n`` shape-only steps (reshapes that keep [B*N, 8]) -> BatchNorm1d."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.steps = nn.Sequential(*(_Reshape() for _ in range(n)))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.steps(self.fc(x).flatten(0, 1)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("steps", [7, 8, 9])  # with the flatten: 8, 9 and 10 shape-only steps
def test_the_same_limit_of_shape_only_steps_in_every_format(
    steps: int, fmt: str, tmp_path: Path
) -> None:
    net = trained(Steps(steps)).eval()
    (cand,), error = _run(net, fmt, tmp_path)
    assert error < 1e-5, error
    if steps + 1 <= 8:
        assert cand.fusable, cand
        return
    assert cand.skip is Skip.UNSUPPORTED, cand
    assert cand.reason == (
        f"its input is {steps + 1} shape-only steps after the layer, more than the 8 bnfuse follows"
    )
