"""One rule, one sentence, whatever the format.

Each case builds the same situation as an ONNX model (a sample from
sample_models/, or a builder) and as a PyTorch module, and runs it through
every path that can express it: ONNX, torch.fx (``bnfuse.fuse(module)``),
torch.export (.pt2) and TorchScript. Each path must skip the BatchNorm for the
same reason, in the sentence bnfuse.legality writes for that rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfuse
from bnfuse import legality
from bnfuse.result import Candidate, Skip
from bnfuse.torch.fx_fuse import fuse_graph_module
from bnfuse.torch.module import NotFoldedWarning, fuse_module
from bnfuse.torch.script_fuse import fuse_script_module
from sample_models import models as m
from tests.torch.test_module_fuse import LinearOn3d

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


class ConvBN(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(dtype)
        self.bn = nn.BatchNorm2d(4).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TwoReaders(ConvBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h) + h.sigmoid()


class LayerOutputReturned(ConvBN):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return self.bn(h), h


class AfterCat(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([x, x], 1))


def train_mode() -> nn.Module:
    net = ConvBN().eval()
    net.bn.train()
    return net


def negative_variance() -> nn.Module:
    net = ConvBN().eval()
    net.bn.running_var.fill_(-1.0)
    return net


def fp16_overflow() -> nn.Module:
    net = ConvBN(torch.float16).eval()
    with torch.no_grad():
        net.conv.weight.fill_(60000.0)
        net.bn.weight.fill_(4.0)
    return net


def negative_variance_onnx() -> onnx.ModelProto:
    return m.with_initializer(m.layer_bn("Conv"), "bn.var", -np.ones(8, np.float32))


@dataclass(frozen=True)
class Case:
    skip: Skip
    sentence: str  # a regular expression: the rule's own words
    onnx: str | Callable[[], onnx.ModelProto] | None  # a sample's file name, or a builder
    torch: Callable[[], nn.Module] | None
    shape: tuple[int, ...] = (1, 3, 8, 8)
    formats: tuple[str, ...] = ("fx", "export", "script")


CASES = {
    "rule 1, batch statistics": Case(
        Skip.TRAINING_MODE, re.escape(legality.BATCH_STATISTICS),
        "skip_training_mode.onnx", train_mode, formats=("fx", "script"),
    ),
    "rule 2, no layer": Case(
        Skip.NO_LAYER, r"its input comes from .*, which has no weight to fold into$",
        "skip_bn_after_concat.onnx", lambda: AfterCat().eval(),
    ),
    "rule 3, other readers": Case(
        Skip.OTHER_CONSUMERS,
        r"^the output .* is also read by 1 other node\(s\) \(.+\), which need the unfolded values$",
        "skip_two_consumers.onnx", lambda: TwoReaders().eval(),
    ),
    "rule 3, graph output": Case(
        Skip.GRAPH_OUTPUT, r"^the output .* is also a graph output, and folding would change it$",
        "skip_graph_output.onnx", lambda: LayerOutputReturned().eval(),
    ),
    "rule 4, channel axis": Case(
        Skip.SHAPE_MISMATCH,
        r"^the output of (MatMul|Linear) '.+' is 3-D: BatchNorm normalises axis 1, but the "
        r"layer's output channels are on axis 2$",
        "skip_matmul_3d.onnx", lambda: LinearOn3d().eval(), shape=(2, 6, 6),
    ),
    "rule 5, invalid parameters": Case(
        Skip.BAD_PARAMETERS, r"^variance \+ epsilon is not positive in channel 0",
        negative_variance_onnx, negative_variance,
    ),
    "rule 7, beyond the dtype": Case(
        Skip.NOT_FINITE, r"^the folded weight of channel \d+ reaches .*, beyond the range of",
        "skip_fp16_overflow.onnx", fp16_overflow, formats=("fx", "script"),
    ),
}  # fmt: skip


def _onnx_candidate(case: Case, tmp_path: Path) -> Candidate:
    if isinstance(case.onnx, str):
        src = SAMPLES / case.onnx
    else:
        assert case.onnx is not None
        src = tmp_path / "m.onnx"
        onnx.save(case.onnx(), src)
    (cand,) = [c for c in bnfuse.fuse(src, dry_run=True).candidates if not c.fusable]
    return cand


def _torch_candidate(case: Case, fmt: str) -> Candidate:
    assert case.torch is not None
    net = case.torch()
    x = torch.randn(*case.shape).to(next(net.parameters()).dtype)
    if fmt == "fx":
        with pytest.warns(NotFoldedWarning):
            (cand,) = fuse_module(net, (x,)).result.candidates
    elif fmt == "export":
        gm = torch.export.export(net, (x,)).module()
        (cand,) = fuse_graph_module(gm)
    else:
        (cand,) = fuse_script_module(torch.jit.script(net), (x,))[1].candidates
    return cand


RUNS = [(name, fmt) for name, case in CASES.items() for fmt in ("onnx", *case.formats)]


@pytest.mark.parametrize(("name", "fmt"), RUNS, ids=[f"{n}-{f}" for n, f in RUNS])
def test_each_rule_says_the_same_in_every_format(name: str, fmt: str, tmp_path: Path) -> None:
    case = CASES[name]
    cand = _onnx_candidate(case, tmp_path) if fmt == "onnx" else _torch_candidate(case, fmt)
    assert cand.skip is case.skip, cand
    assert cand.reason is not None and re.search(case.sentence, cand.reason), cand.reason


# --- The rules on their own, from facts (no IR) ------------------------------------


def _layer(**changes: object) -> legality.Layer:
    facts = {
        "label": "Conv 'c'", "weight": np.ones((4, 3, 1, 1), np.float32), "bias": None,
        "axis": 0, "dtype": np.dtype(np.float32), "dtype_name": "float32",
    }  # fmt: skip
    facts.update(changes)
    return legality.Layer(**facts)  # type: ignore[arg-type]


def _norm(channels: int = 4, **changes: object) -> legality.Norm:
    ones = np.ones(channels)
    facts: dict[str, object] = {
        "params": legality.Params(ones * 4, ones, ones * 0.5, ones * 4, 0.0)
    }
    facts.update(changes)
    return legality.Norm(**facts)  # type: ignore[arg-type]


def test_a_legal_fold_carries_the_bn_map_and_the_folded_peak() -> None:
    decided = legality.decide(_norm(), _layer(), [legality.Use("the output of Conv 'c'")])
    assert isinstance(decided, legality.Fold)
    # gamma 4, beta 1, mean 0.5, var 4, eps 0: scale 4 / 2 = 2, shift 1 - 2 * 0.5 = 0
    np.testing.assert_array_equal(decided.affine.scale, np.full(4, 2.0))
    np.testing.assert_array_equal(decided.affine.shift, np.zeros(4))
    assert decided.peak == 2.0 and decided.dtype == np.float32


@pytest.mark.parametrize(
    ("norm", "layer", "uses", "skip", "words"),
    [
        pytest.param(_norm(batch_statistics="training=True"), _layer(), [], Skip.TRAINING_MODE,
                     "training=True: it normalises with the batch's own", id="1-mode"),
        pytest.param(_norm(stats_output="mean_out"), _layer(), [], Skip.STATS_OUTPUTS,
                     "'mean_out' is used", id="1-stats-output"),
        pytest.param(_norm(variant="spatial=0"), _layer(), [], Skip.UNSUPPORTED,
                     "spatial=0 is not folded", id="1-variant"),
        pytest.param(_norm(), legality.Refusal(Skip.NO_LAYER, "no layer"), [], Skip.NO_LAYER,
                     "no layer", id="2-layer"),
        pytest.param(_norm(), _layer(), [legality.Use("v", graph_output=True)],
                     Skip.GRAPH_OUTPUT, "v is also a graph output", id="3-graph-output"),
        pytest.param(_norm(), _layer(), [legality.Use("v", ("a", "b"))], Skip.OTHER_CONSUMERS,
                     "v is also read by 2 other node(s) (a, b)", id="3-readers"),
        pytest.param(_norm(), _layer(channel_axis=None, rank_hint="hint"), [],
                     Skip.SHAPE_MISMATCH, "(hint)", id="4-unknown-rank"),
        pytest.param(_norm(), _layer(channel_axis=2, rank=3), [], Skip.SHAPE_MISMATCH,
                     "is 3-D: BatchNorm normalises axis 1", id="4-axis"),
        pytest.param(_norm(params=legality.Refusal(Skip.NOT_CONSTANT, "computed")), _layer(), [],
                     Skip.NOT_CONSTANT, "computed", id="5-not-constant"),
        pytest.param(_norm(), _layer(weight=np.ones((5, 3, 1, 1), np.float32)), [],
                     Skip.SHAPE_MISMATCH, "4 channels but Conv 'c' has 5", id="6-channels"),
        pytest.param(_norm(), _layer(dtype=None, dtype_name="INT8"), [], Skip.UNSUPPORTED,
                     "INT8 weights", id="7-integer-layer"),
        pytest.param(_norm(), _layer(weight=np.full((4, 3, 1, 1), 40000, np.float16),
                                     dtype=np.dtype(np.float16), dtype_name="float16"), [],
                     Skip.NOT_FINITE, "reaches 8e+04, beyond the range of float16", id="7-range"),
    ],
)  # fmt: skip
def test_each_rule_refuses_with_its_sentence(
    norm: legality.Norm, layer: legality.Layer | legality.Refusal, uses: list[legality.Use],
    skip: Skip, words: str,
) -> None:  # fmt: skip
    decided = legality.decide(norm, layer, uses)
    assert isinstance(decided, legality.Refusal) and decided.skip is skip, decided
    assert words in decided.reason, decided.reason


def test_the_rules_apply_in_order() -> None:
    """A BatchNorm that breaks every rule is refused for the first: its mode."""
    norm = _norm(3, batch_statistics="training=True")
    layer = _layer(channel_axis=2, rank=3, dtype=None)
    decided = legality.decide(norm, layer, [legality.Use("v", ("a",), graph_output=True)])
    assert isinstance(decided, legality.Refusal) and decided.skip is Skip.TRAINING_MODE
    decided = legality.decide(_norm(3), layer, [legality.Use("v", ("a",), graph_output=True)])
    assert isinstance(decided, legality.Refusal) and decided.skip is Skip.GRAPH_OUTPUT
