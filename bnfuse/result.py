"""Result objects every stage returns; the reports read only these."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from bnfuse.health import BNHealth


class Skip(str, Enum):
    """Why a BatchNorm was left in place; the value is the summary's label."""

    TRAINING_MODE = "uses batch statistics (training mode)"
    STATS_OUTPUTS = "its running-statistics outputs are used"
    NO_LAYER = "not preceded by a layer with weights (Conv, ConvTranspose, Gemm/Linear, MatMul)"
    OTHER_CONSUMERS = "the layer's output has other consumers"
    GRAPH_OUTPUT = "the layer's output is a graph output"
    NOT_CONSTANT = "a parameter is not a constant"
    OVERRIDABLE = "a parameter can be overridden as a graph input"
    SHAPE_MISMATCH = "shapes or channel axes do not match"
    BAD_PARAMETERS = "invalid BatchNorm parameters"
    NOT_FINITE = "the folded values do not fit the layer's dtype"
    UNSUPPORTED = "unsupported variant"


@dataclass(frozen=True)
class Candidate:
    """One node the matcher looked at (a BatchNorm, or a Mul/Add by a constant after a
    layer): fusable, or skipped with a reason."""

    node: str  # the node that would be folded away
    graph: str
    layer: str | None = None  # the layer it folds into (or would): before it, or after it
    layer_op: str | None = None
    skip: Skip | None = None
    reason: str | None = None
    op: str = "BatchNormalization"  # what folds: BatchNormalization, Mul or Add
    into: str = "preceding"  # where ``layer`` stands: "preceding" or "following" the node
    consumers: tuple[str, ...] = ()  # nodes that read the folded node's output
    health: BNHealth | None = None  # BatchNorm parameter health (bnfuse inspect)

    @property
    def fusable(self) -> bool:
        return self.skip is None

    @property
    def pattern(self) -> str:
        layer = self.layer_op or "?"
        return f"{self.op} -> {layer}" if self.into == "following" else f"{layer} -> {self.op}"


@dataclass
class FuseResult:
    """What a fusion did: every candidate, node counts, the files involved."""

    candidates: list[Candidate]
    ops_before: Counter[str]
    ops_after: Counter[str]
    input: Path | None = None
    outputs: list[Path] = field(default_factory=list)
    dry_run: bool = False

    @property
    def folded(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fusable]

    @property
    def skipped(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.fusable]

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """Per folded op ("BatchNormalization", "Mul", "Add"): found, folded, skipped."""
        out: dict[str, tuple[int, int, int]] = {}
        for c in self.candidates:
            found, folded, skipped = out.get(c.op, (0, 0, 0))
            out[c.op] = (found + 1, folded + c.fusable, skipped + (not c.fusable))
        return out

    def headline(self) -> str:
        """ "3 BatchNormalization found, 2 folded, 1 skipped; 1 Mul: 1 folded"."""
        verb = "would fold" if self.dry_run else "folded"
        counts = self.counts()
        bn = counts.pop("BatchNormalization", (0, 0, 0))
        text = f"{bn[0]} BatchNormalization found, {bn[1]} {verb}, {bn[2]} skipped"
        for op, (found, folded, skipped) in sorted(counts.items()):
            text += f"; {found} {op} by a constant: {folded} {verb}, {skipped} skipped"
        return text

    def health_flags(self) -> list[tuple[str, str]]:
        """(BatchNorm, flag) for every candidate whose parameters look unhealthy."""
        return [(c.node, flag) for c in self.candidates if c.health for flag in c.health.flags]

    def skipped_by_reason(self) -> dict[Skip, list[Candidate]]:
        groups: dict[Skip, list[Candidate]] = {}
        for cand in self.skipped:
            assert cand.skip is not None
            groups.setdefault(cand.skip, []).append(cand)
        return groups


@dataclass(frozen=True)
class Comparison:
    """How far one output (or intermediate tensor) moved; true when it passes."""

    name: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    mean_abs: float
    rmse: float
    cosine: float
    snr_db: float
    failed: int
    total: int
    worst_index: tuple[int, ...]
    worst_ref: float
    worst_got: float
    nan_ref: int
    nan_got: int
    inf_ref: int
    inf_got: int
    argmax_agreement: float | None
    value_range: float  # max - min of the reference's finite values: errors in context
    errors: tuple[float, ...] = ()  # a sample of |ref - got| for histograms
    # The precision the model computes this output in (its tolerance comes from it).
    compute_dtype: str = ""
    # Elements where one side is NaN/Inf and the other is not the same: never excused.
    nonfinite_mismatch: int = 0
    # The largest error of the original against itself under a change that should not
    # matter (the noise floor), where one was measured for this output and device.
    floor_max_abs: float | None = None

    @property
    def within_floor(self) -> bool:
        """The error is no larger than what the model's own runtime moves it by."""
        return (
            self.floor_max_abs is not None
            and self.nonfinite_mismatch == 0
            and self.max_abs <= self.floor_max_abs
        )

    @property
    def passed(self) -> bool:
        """Every element within tolerance, or the whole error at or below the noise floor."""
        return self.failed == 0 or self.within_floor

    @property
    def verdict(self) -> str:
        """``pass``, ``pass (noise floor)`` where elements beyond tolerance were excused by
        the noise-floor rule, or ``FAIL``: how each report words one output."""
        if not self.passed:
            return "FAIL"
        return "pass" if self.failed == 0 else "pass (noise floor)"

    def __bool__(self) -> bool:
        return self.passed


@dataclass
class VerifyResult:
    """Before vs after, per output and device, with the noise floor beside it.

    True when every output on every device passes (within tolerance, or at or below
    the noise floor).
    """

    original: Path
    candidate: Path
    devices: list[str]
    outputs: list[Comparison]
    noise_floor: list[Comparison] = field(default_factory=list)
    layers: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    samples: int = 1
    input_source: str = "generated"
    runtime: str = ""  # what ran the models: onnxruntime, torch, or onnx reference evaluator

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.outputs if not c.passed]

    def ordered_outputs(self) -> list[Comparison]:
        """Failing outputs first, then by name and device."""
        return sorted(self.outputs, key=lambda c: (c.passed, c.name, c.device))

    def noise_for(self, comparison: Comparison) -> Comparison | None:
        """The noise-floor entry for the same output (first one found)."""
        for floor in self.noise_floor:
            if floor.name == comparison.name:
                return floor
        return None

    @property
    def first_failing_layer(self) -> Comparison | None:
        """The earliest folded layer (graph order) beyond tolerance: where an error starts.

        Errors flow downstream, so later layers fail too; the first one is the culprit.
        """
        return next((c for c in self.layers if not c.passed), None)

    @property
    def worst_layer(self) -> Comparison | None:
        """The folded layer whose output moved most, relative to its range."""
        if not self.layers:
            return None
        return max(
            self.layers, key=lambda c: c.max_abs / c.value_range if c.value_range else c.max_abs
        )
