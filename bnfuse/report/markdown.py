"""The Markdown report: fits a GitHub job summary ($GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from bnfuse.report.fmt import db, md_code, md_text, num, pct
from bnfuse.result import Comparison, FuseResult, VerifyResult
from bnfuse.verify.metrics import VERDICT_RULE


def render(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    error: str | None = None,
    run: str = "",
) -> str:
    lines = _heading(verification, error)
    if fusion is not None:
        lines += _fusion(fusion)
    if verification is not None:
        lines += _verification(verification)
    return "\n".join(lines) + "\n"


def _heading(verification: VerifyResult | None, error: str | None) -> list[str]:
    if error is not None:
        return ["## bnfuse: :x: ERROR", "", md_code(error), ""]
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
    lines = [f"**{md_text(fusion.input)}**: {md_text(fusion.headline())}.", ""]
    for skip, cands in fusion.skipped_by_reason().items():
        lines.append(f"- skipped {len(cands)}: {skip.value}")
        lines += _first([f"  - {md_code(c.node)}: {md_text(c.reason)}" for c in cands])
    if fusion.skipped:
        lines.append("")
    flags = fusion.health_flags()
    if flags:
        lines.append(f"- health: {len(flags)} flag(s)")
        lines += _first([f"  - {md_code(bn)}: {md_text(flag)}" for bn, flag in flags])
        lines.append("")
    before, after = fusion.ops_before, fusion.ops_after
    changed = sorted(op for op in set(before) | set(after) if before[op] != after[op])
    if changed:
        lines += ["| op | before | after |", "| --- | ---: | ---: |"]
        lines += [
            f"| {md_code(op, in_table=True)} | {before[op]} | {after[op]} |" for op in changed
        ]
        lines += [f"| total | {sum(before.values())} | {sum(after.values())} |", ""]
    return lines


def _verification(v: VerifyResult) -> list[str]:
    lines = [
        f"Compared {md_code(v.candidate)} with {md_code(v.original)} on "
        f"{md_text(', '.join(v.devices))}; {v.samples} sample(s), {md_text(v.input_source)} "
        f"inputs (seed {v.seed}), run with {md_text(v.runtime or 'onnxruntime')}.",
        "",
        f"_{VERDICT_RULE}_",
        "",
        "| output | device | verdict | max abs | max rel | cosine | SNR | beyond tol | noise floor (max abs) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in v.ordered_outputs():
        floor = v.noise_for(c)
        lines.append(
            f"| {md_code(c.name, in_table=True)} | {c.device} | {_verdict(c)} | {num(c.max_abs)} "
            f"| {num(c.max_rel)} | {num(c.cosine, 8)} | {db(c.snr_db)} | {c.failed}/{c.total} "
            f"| {num(floor.max_abs) if floor is not None else '-'} |"
        )
    argmax = [c for c in v.outputs if c.argmax_agreement is not None]
    if argmax:
        lines.append("")
        lines += [
            f"- {md_code(c.name)} ({c.device}): top-1 agreement {pct(c.argmax_agreement)}"
            for c in argmax
        ]
    if v.layers:
        lines += _layers(v)
    if v.notes:
        lines.append("")
        lines += [f"> {md_text(note)}" for note in v.notes]
    return lines


def _verdict(c: Comparison) -> str:
    return c.verdict if c.passed else "**FAIL**"


def _layers(v: VerifyResult) -> list[str]:
    worst, first = v.worst_layer, v.first_failing_layer
    return [
        "",
        f"Per layer (worst: {md_code(worst.name) if worst is not None else '-'}"
        + (f"; first failing: {md_code(first.name)}" if first is not None else "")
        + "):",
        "",
        "| tensor | max abs | range | verdict |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {md_code(c.name, in_table=True)} | {num(c.max_abs)} | {num(c.value_range)} "
            f"| {_verdict(c)} |"
            for c in v.layers
        ),
    ]
