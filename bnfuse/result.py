"""Result objects every stage returns; the reports read only these."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Skip(str, Enum):
    """Why a BatchNorm was left in place; the value is the summary's label."""

    TRAINING_MODE = "uses batch statistics (training mode)"
    STATS_OUTPUTS = "its running-statistics outputs are used"
    NO_LAYER = "not preceded by Conv/ConvTranspose/Gemm/MatMul"
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
    """One BatchNorm the matcher looked at: fusable, or skipped with a reason."""

    bn: str
    graph: str
    producer: str | None = None
    producer_op: str | None = None
    skip: Skip | None = None
    reason: str | None = None

    @property
    def fusable(self) -> bool:
        return self.skip is None

    @property
    def pattern(self) -> str:
        return f"{self.producer_op or '?'} -> BatchNormalization"


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

    def skipped_by_reason(self) -> dict[Skip, list[Candidate]]:
        groups: dict[Skip, list[Candidate]] = {}
        for cand in self.skipped:
            assert cand.skip is not None
            groups.setdefault(cand.skip, []).append(cand)
        return groups
