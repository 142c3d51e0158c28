"""The JSON report: a documented, versioned schema (see README, "JSON report").

Numbers are plain JSON numbers; a value that is not finite (the SNR of an exact
match, a NaN parameter's figures) is null: ``dumps`` writes every report so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from bnfuse.health import BNHealth
from bnfuse.result import Candidate, Comparison, FuseResult, VerifyResult
from bnfuse.verify.metrics import VERDICT_RULE

SCHEMA = "bnfuse-report"
SCHEMA_VERSION = 2


def dumps(data: Any) -> str:
    """``data`` as JSON text, each float that is not finite (NaN, Inf) written as null."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def comparison_dict(c: Comparison) -> dict[str, Any]:
    d = asdict(c)
    d.pop("errors")
    d["shape"] = list(c.shape)
    d["worst_index"] = list(c.worst_index)
    d["passed"] = c.passed
    d["within_floor"] = c.within_floor
    return d


def health_dict(h: BNHealth | None) -> dict[str, Any] | None:
    if h is None:
        return None
    return {
        "channels": h.channels,
        "never_updated": h.never_updated,
        "tiny_variance_channels": list(h.tiny_variance),
        "dead_channels": list(h.dead),
        "max_scale": h.max_scale,
        "epsilon": h.epsilon,
        "fused_peak": h.fused_peak,
        "dtype": h.dtype,
        "dtype_max": h.dtype_max,
        "range_fraction": h.range_fraction,
        "flags": h.flags,
    }


def candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "node": c.node,
        "op": c.op,
        "into": c.into,
        "graph": c.graph,
        "layer": c.layer,
        "layer_op": c.layer_op,
        "consumers": list(c.consumers),
        "fused": c.fusable,
        "skip_code": c.skip.name.lower() if c.skip else None,
        "skip_label": c.skip.value if c.skip else None,
        "reason": c.reason,
        "health": health_dict(c.health),
    }


def fusion_dict(r: FuseResult) -> dict[str, Any]:
    return {
        "input": str(r.input) if r.input else None,
        "outputs": [str(p) for p in r.outputs],
        "dry_run": r.dry_run,
        "found": len(r.candidates),
        "folded": len(r.folded),
        "skipped": len(r.skipped),
        "by_op": {
            op: {"found": f, "folded": d, "skipped": k} for op, (f, d, k) in r.counts().items()
        },
        "candidates": [candidate_dict(c) for c in r.candidates],
        "ops_before": dict(sorted(r.ops_before.items())),
        "ops_after": dict(sorted(r.ops_after.items())),
    }


def verification_dict(v: VerifyResult) -> dict[str, Any]:
    worst, first = v.worst_layer, v.first_failing_layer
    return {
        "original": str(v.original),
        "candidate": str(v.candidate),
        "passed": v.passed,
        "devices": v.devices,
        "notes": v.notes,
        "seed": v.seed,
        "samples": v.samples,
        "input_source": v.input_source,
        "runtime": v.runtime,
        "rule": VERDICT_RULE,
        "outputs": [comparison_dict(c) for c in v.ordered_outputs()],
        "noise_floor": [comparison_dict(c) for c in v.noise_floor],
        "layers": [comparison_dict(c) for c in v.layers],
        "worst_layer": worst.name if worst is not None else None,
        "first_failing_layer": first.name if first is not None else None,
    }


def report_dict(
    fusion: FuseResult | None, verification: VerifyResult | None, error: str | None = None
) -> dict[str, Any]:
    from bnfuse import __version__

    passed = verification.passed if verification is not None else None
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "bnfuse_version": __version__,
        "passed": False if error is not None else passed,
        "error": error,
        "fusion": fusion_dict(fusion) if fusion is not None else None,
        "verification": verification_dict(verification) if verification is not None else None,
    }


def render(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    error: str | None = None,
    run: str = "",
) -> str:
    data = report_dict(fusion, verification, error)
    return dumps(data)


INSPECT_SCHEMA = "bnfuse-inspect"


def render_inspect(result: FuseResult) -> str:
    """`bnfuse inspect --json`: every candidate with its verdict and health."""
    from bnfuse import __version__

    data = {
        "schema": INSPECT_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "bnfuse_version": __version__,
        "input": str(result.input) if result.input else None,
        "by_op": {
            op: {"found": f, "fusable": d, "skipped": k}
            for op, (f, d, k) in result.counts().items()
        },
        "candidates": [candidate_dict(c) for c in result.candidates],
    }
    return dumps(data)
