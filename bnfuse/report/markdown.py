"""The Markdown report: fits a GitHub job summary ($GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from bnfuse.report.fmt import db, num, pct
from bnfuse.result import Comparison, FuseResult, VerifyResult
from bnfuse.verify.metrics import VERDICT_RULE


def render(
    fusion: FuseResult | None, verification: VerifyResult | None, error: str | None = None
) -> str:
    lines = _heading(verification, error)
    if fusion is not None:
        lines += _fusion(fusion)
    if verification is not None:
        lines += _verification(verification)
    return "\n".join(lines) + "\n"


def _heading(verification: VerifyResult | None, error: str | None) -> list[str]:
    if error is not None:
        text = error.replace("`", "'")
        return ["## bnfuse: :x: ERROR", "", f"`{text}`", ""]
    if verification is not None:
        mark = "PASS" if verification.passed else "FAIL"
        icon = ":white_check_mark:" if verification.passed else ":x:"
        return [f"## bnfuse: {icon} {mark}", ""]
    return ["## bnfuse", ""]


def _first(items: list[str], limit: int = 10) -> list[str]:
    """The first ``limit`` list items, and how many more there are."""
    more = [f"  - ... and {len(items) - limit} more"] if len(items) > limit else []
    return items[:limit] + more


def _fusion(fusion: FuseResult) -> list[str]:
    lines = [f"**{fusion.input}**: {fusion.headline()}.", ""]
    for skip, cands in fusion.skipped_by_reason().items():
        lines.append(f"- skipped {len(cands)}: {skip.value}")
        lines += _first([f"  - `{c.node}`: {c.reason}" for c in cands])
    if fusion.skipped:
        lines.append("")
    flags = fusion.health_flags()
    if flags:
        lines.append(f"- health: {len(flags)} flag(s)")
        lines += _first([f"  - `{bn}`: {flag}" for bn, flag in flags])
        lines.append("")
    before, after = fusion.ops_before, fusion.ops_after
    changed = sorted(op for op in set(before) | set(after) if before[op] != after[op])
    if changed:
        lines += ["| op | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {op} | {before[op]} | {after[op]} |" for op in changed]
        lines += [f"| total | {sum(before.values())} | {sum(after.values())} |", ""]
    return lines


def _verification(v: VerifyResult) -> list[str]:
    lines = [
        f"Compared `{v.candidate}` with `{v.original}` on {', '.join(v.devices)}; "
        f"{v.samples} sample(s), {v.input_source} inputs (seed {v.seed}), "
        f"run with {v.runtime or 'onnxruntime'}.",
        "",
        f"_{VERDICT_RULE}_",
        "",
        "| output | device | verdict | max abs | max rel | cosine | SNR | beyond tol | noise floor (max abs) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in v.ordered_outputs():
        floor = v.noise_for(c)
        lines.append(
            f"| `{c.name}` | {c.device} | {_verdict(c)} | {num(c.max_abs)} "
            f"| {num(c.max_rel)} | {num(c.cosine, 8)} | {db(c.snr_db)} | {c.failed}/{c.total} "
            f"| {num(floor.max_abs) if floor is not None else '-'} |"
        )
    argmax = [c for c in v.outputs if c.argmax_agreement is not None]
    if argmax:
        lines.append("")
        lines += [
            f"- `{c.name}` ({c.device}): top-1 agreement {pct(c.argmax_agreement)}" for c in argmax
        ]
    if v.layers:
        lines += _layers(v)
    if v.notes:
        lines.append("")
        lines += [f"> {note}" for note in v.notes]
    return lines


def _verdict(c: Comparison) -> str:
    return "pass" if c.passed else "**FAIL**"


def _layers(v: VerifyResult) -> list[str]:
    worst, first = v.worst_layer, v.first_failing_layer
    return [
        "",
        f"Per layer (worst: `{worst.name if worst is not None else '-'}`"
        + (f"; first failing: `{first.name}`" if first is not None else "")
        + "):",
        "",
        "| tensor | max abs | range | verdict |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| `{c.name}` | {num(c.max_abs)} | {num(c.value_range)} | {_verdict(c)} |"
            for c in v.layers
        ),
    ]
