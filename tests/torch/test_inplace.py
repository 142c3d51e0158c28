"""bnfuse.fuse(module, inplace=True): the user's own module, folded where that is exact."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import bnfuse
from bnfuse import Skip
from bnfuse.torch.module import NotFoldedWarning, fuse_module
from sample_models.torch_nets import NETS, build, trained

SPECS = {s.name: s for s in NETS}


def _bns(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _expected_fold(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """W' and b' computed here in float64 from the formula, independently of bnfuse."""
    w = conv.weight.detach().double().numpy()
    b = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(w.shape[0])
    g, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mu, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    s = g / np.sqrt(var + bn.eps)
    return w * s.reshape(-1, *([1] * (w.ndim - 1))), (b - mu) * s + beta


@pytest.mark.parametrize("net", ["resnet", "mobilenet"])
def test_in_place_keeps_the_object_and_folds_every_bn(net: str) -> None:
    spec = SPECS[net]
    model = trained(build(spec)).eval()
    model.note = "kept"  # type: ignore[assignment]
    reference = copy.deepcopy(model)
    x = torch.randn(*spec.input_shape)
    bn_paths = _bns(model)
    names_before = [n for n, _ in model.named_parameters()]
    pairs = {}  # BN path -> (conv path, the conv and BN of the reference copy)
    modules = dict(reference.named_modules())
    for layer_path, bn_path in zip(list(modules), list(modules)[1:], strict=False):
        if bn_path in bn_paths and isinstance(modules[layer_path], nn.Conv2d):
            pairs[bn_path] = (layer_path, modules[layer_path], modules[bn_path])

    out = bnfuse.fuse(model, example_inputs=(x,), inplace=True)

    assert out is model and type(out) is type(reference) and out.note == "kept"
    assert _bns(model) == []
    for path in bn_paths:
        assert isinstance(model.get_submodule(path), nn.Identity), path
    # Every other parameter keeps its name; a conv without bias gains one.
    names_after = [n for n, _ in model.named_parameters()]
    gone = {n for n in names_before if n.rpartition(".")[0] in bn_paths}
    assert set(names_before) - gone <= set(names_after)
    assert all(n.endswith(".bias") for n in set(names_after) - set(names_before))
    assert len(pairs) >= len(bn_paths) - 1  # nearly every BN directly follows its conv
    for _bn_path, (layer_path, conv, bn) in pairs.items():
        want_w, want_b = _expected_fold(conv, bn)
        folded = model.get_submodule(layer_path)
        np.testing.assert_allclose(folded.weight.detach().double().numpy(), want_w, rtol=6e-8)
        np.testing.assert_allclose(
            folded.bias.detach().double().numpy(), want_b, rtol=6e-8, atol=1e-7
        )
    with torch.no_grad():
        want, got = reference(x), model(x)
    assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())


class DetectHead(nn.Module):
    """Like ultralytics' Detect: per-level conv + BN, shapes unpacked (fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.cv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outs = []
        for level in self.cv:
            y = level(x)
            bs, _, ny, nx = y.shape
            outs.append(y.view(bs, 2, 4, ny, nx).permute(0, 1, 3, 4, 2).flatten(1))
            if nx > 1:  # control flow on a shape, as Detect's `if self.shape != shape`
                x = F.avg_pool2d(x, 2)
        return torch.cat(outs, 1)


class WithCond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.cond(y.sum() > 0, lambda t: t.relu(), lambda t: t.sigmoid(), (y,))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(DetectHead, (2, 3, 16, 16)), (WithCond, (2, 3, 8, 8))],
    ids=["detect", "cond"],
)
def test_in_place_works_where_fx_cannot_trace(
    make: type[nn.Module], shape: tuple[int, ...]
) -> None:
    model = trained(make()).eval()
    with pytest.raises(Exception):  # noqa: B017 - the point: torch.fx gives up on it
        fx.symbolic_trace(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    x = torch.randn(*shape)
    report = fuse_module(model, (x,), inplace=True)
    assert report.module is model and not report.result.skipped and _bns(model) == []
    with torch.no_grad():
        want, got = reference(x), model(x)
    assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())


class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


class BNTwice(ConvTwice):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn(self.conv2(x))


class TiedWeight(ConvTwice):
    def __init__(self) -> None:
        super().__init__()
        self.other = nn.Conv2d(4, 4, 3, padding=1)
        self.other.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.other(x)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(F.conv2d(x, self.w), self.mean, self.var)


@pytest.mark.parametrize(
    ("make", "skip", "words"),
    [
        (ConvTwice, Skip.OTHER_CONSUMERS, "the Conv2d module 'conv' is called 2 times"),
        (BNTwice, Skip.OTHER_CONSUMERS, "the BatchNorm2d module 'bn' is called 2 times"),
        (TiedWeight, Skip.OTHER_CONSUMERS, "the weight of 'conv' is shared with another module"),
        (Functional, Skip.UNSUPPORTED, "is a functional call on stored tensors"),
    ],
    ids=["layer-called-twice", "bn-called-twice", "tied-weight", "functional"],
)
def test_in_place_refuses_what_it_cannot_do_exactly(
    make: type[nn.Module], skip: Skip, words: str
) -> None:
    model = trained(make()).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(NotFoldedWarning, match="not folded"):
        report = fuse_module(model, (x,), inplace=True)
    first = report.result.candidates[0]
    assert first.skip is skip and words in (first.reason or ""), first
    assert "without inplace=True folds it in a copy" in (first.reason or "")
    with torch.no_grad():  # what was skipped is untouched: the output is the same bits
        assert torch.equal(reference(x), model(x))
    # The copying path folds the same pair, in its copy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotFoldedWarning)
        copied = fuse_module(copy.deepcopy(reference), (x,))
    assert copied.result.candidates[0].fusable


def test_in_place_rounds_fp16_once() -> None:
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval().half()
    conv, bn = copy.deepcopy(model[0]), copy.deepcopy(model[1])
    bnfuse.fuse(model, example_inputs=(torch.randn(1, 3, 8, 8).half(),), inplace=True)
    want_w, want_b = _expected_fold(conv, bn)
    assert model[0].weight.dtype == torch.float16 and isinstance(model[1], nn.Identity)
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), want_w.astype(np.float16))
    np.testing.assert_array_equal(model[0].bias.detach().numpy(), want_b.astype(np.float16))


def test_in_place_skips_a_train_mode_bn_with_the_shared_reason() -> None:
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    model[1].train()
    with pytest.warns(NotFoldedWarning, match="batch's own statistics"):
        report = fuse_module(model, (torch.randn(2, 3, 8, 8),), inplace=True)
    assert report.result.candidates[0].skip is Skip.TRAINING_MODE
    assert isinstance(model[1], nn.BatchNorm2d)
