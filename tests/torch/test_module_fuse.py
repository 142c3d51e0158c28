"""nn.Module fusion: fused copies that compute the same, and the cases that must not fold."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfuse  # noqa: E402
from bnfuse import Skip  # noqa: E402
from bnfuse.torch.module import NotFoldedWarning, fuse_module  # noqa: E402
from sample_models.torch_nets import NETS, NetSpec, build, trained  # noqa: E402

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_count(module: nn.Module) -> int:
    mods = sum(isinstance(m, BN_TYPES) for m in module.modules())
    graph = getattr(module, "graph", None)
    calls = 0
    if graph is not None:
        calls = sum(
            n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", "")
            for n in graph.nodes
        )
    return mods + calls


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / (a64.max() - a64.min()))


@pytest.mark.parametrize("spec", NETS, ids=[s.name for s in NETS])
def test_network_fuses_and_original_is_untouched(spec: NetSpec) -> None:
    model = build(spec)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fused = fuse_module(model, (x,))
    assert len(fused.result.skipped) == spec.bn_not_after_layer
    # one NotFoldedWarning for each BatchNorm left, naming it
    told = [str(w.message) for w in said if issubclass(w.category, NotFoldedWarning)]
    assert len(told) == spec.bn_not_after_layer
    assert all(
        f"'{c.node}' was not folded" in t for c, t in zip(fused.result.skipped, told, strict=True)
    )
    assert bn_count(fused.module) == spec.bn_not_after_layer
    with torch.no_grad():
        assert max_rel_error(model(x), fused.module(x)) < 1e-5
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, BN_TYPES) for m in model.modules())


def test_fuse_returns_a_module() -> None:
    model = build(NETS[0])
    fused = bnfuse.fuse(model)
    assert isinstance(fused, nn.Module) and fused is not model
    assert bn_count(fused) == 0


def conv_bn(bn: nn.Module) -> nn.Module:
    return trained(nn.Sequential(nn.Conv2d(3, 8, 3), bn))


def test_train_mode_bn_is_skipped() -> None:
    model = conv_bn(nn.BatchNorm2d(8)).train()
    with pytest.warns(NotFoldedWarning, match="train mode"):
        (cand,) = fuse_module(model).result.candidates
    assert cand.skip is Skip.TRAINING_MODE and "train mode" in (cand.reason or "")


def test_bn_without_running_stats_is_skipped() -> None:
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)))
    with pytest.warns(NotFoldedWarning, match="track_running_stats=False"):
        (cand,) = fuse_module(model).result.candidates
    assert cand.skip is Skip.TRAINING_MODE and "track_running_stats=False" in (cand.reason or "")


def test_affine_false_bn_folds() -> None:
    model = conv_bn(nn.BatchNorm2d(8, affine=False))
    fused = fuse_module(model)
    assert [c.fusable for c in fused.result.candidates] == [True]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert max_rel_error(model(x), fused.module(x)) < 1e-5


class SharedConv(nn.Module):
    """One conv module called twice: once before a BN, once not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn(self.conv(x)), self.conv(x)


def test_shared_module_keeps_its_other_call_right() -> None:
    model = trained(SharedConv())
    fused = fuse_module(model)
    assert [c.fusable for c in fused.result.candidates] == [True]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        (a_bn, a_plain), (b_bn, b_plain) = model(x), fused.module(x)
    assert torch.equal(a_plain, b_plain)
    assert max_rel_error(a_bn, b_bn) < 1e-5


class Functional(nn.Module):
    """F.conv2d and F.batch_norm on stored parameters, no submodules."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g))
        self.gamma = nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(8, generator=g))
        self.register_buffer("mean", torch.randn(8, generator=g))
        self.register_buffer("var", torch.rand(8, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.w, None, 1, 1)
        return F.batch_norm(h, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_functional_conv_and_batch_norm_fold() -> None:
    model = Functional().eval()
    fused = fuse_module(model)
    assert [c.fusable for c in fused.result.candidates] == [True]
    assert bn_count(fused.module) == 0
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert max_rel_error(model(x), fused.module(x)) < 1e-5


class LinearOn3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_linear_on_3d_input_is_skipped() -> None:
    """[N, 6, 6] -> Linear -> BatchNorm1d normalises axis 1, not Linear's features."""
    model = trained(LinearOn3d())
    with pytest.warns(NotFoldedWarning, match="3-D"):
        (cand,) = fuse_module(model, (torch.randn(2, 6, 6),)).result.candidates
    assert cand.skip is Skip.SHAPE_MISMATCH and "3-D" in (cand.reason or "")
    with pytest.warns(NotFoldedWarning, match="unknown"):
        (cand,) = fuse_module(model).result.candidates
    assert cand.skip is Skip.SHAPE_MISMATCH and "unknown" in (cand.reason or "")


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        return torch.cond(h.sum() > 0, lambda t: t * 2, lambda t: t - 1, (h,))


def test_untraceable_model_goes_through_torch_export() -> None:
    model = trained(Branchy())
    with pytest.raises(bnfuse.BnfuseError, match="pass example_inputs"):
        fuse_module(model)
    x = torch.randn(2, 3, 9, 9)
    fused = fuse_module(model, (x,))
    assert [c.fusable for c in fused.result.candidates] == [True]
    with torch.no_grad():
        assert max_rel_error(model(x), fused.module(x)) < 1e-5


def half_ulp_error(got: np.ndarray, exact: np.ndarray, mantissa_bits: int) -> float:
    """max |got - exact| in units of got's ulp (normal numbers)."""
    exponent = np.floor(np.log2(np.abs(got.astype(np.float64))))
    ulp = 2.0 ** (exponent - mantissa_bits)
    return float(np.max(np.abs(got.astype(np.float64) - exact) / ulp))


@pytest.mark.parametrize(("dtype", "bits"), [(torch.float16, 10), (torch.bfloat16, 7)])
def test_low_precision_weights_are_rounded_once(dtype: Any, bits: int) -> None:
    model = conv_bn(nn.BatchNorm2d(8))
    model = model.to(dtype)
    conv, bn = model[0], model[1]
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact = (conv.weight.double() * s[:, None, None, None]).detach().numpy()
    fused = fuse_module(model)
    (w,) = [p for n, p in fused.module.named_parameters() if n.endswith("weight")]
    assert w.dtype == dtype
    assert half_ulp_error(w.detach().double().numpy(), exact, bits) <= 0.5
    x = torch.randn(2, 3, 9, 9).to(dtype)
    with torch.no_grad():
        assert max_rel_error(model(x), fused.module(x)) < 2e-2


def test_a_bn_left_unfolded_by_the_python_api_is_said() -> None:
    """Linear -> BatchNorm1d without example inputs: the rank is unknown, so it stays; said."""
    import warnings as w

    from bnfuse.torch.module import NotFoldedWarning

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        bnfuse.fuse(net)
    messages = [str(c.message) for c in caught if issubclass(c.category, NotFoldedWarning)]
    assert len(messages) == 1
    assert "BatchNormalization '1' was not folded" in messages[0]
    assert "pass example inputs" in messages[0]
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        bnfuse.fuse(net, example_inputs=(torch.randn(2, 4),))
    assert not [c for c in caught if issubclass(c.category, NotFoldedWarning)]
