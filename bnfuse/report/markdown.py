"""The Markdown report: fits a GitHub job summary ($GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from bnfuse.report.fmt import db, num, pct
from bnfuse.result import FuseResult, VerifyResult
from bnfuse.verify.metrics import VERDICT_RULE


def render(
    fusion: FuseResult | None, verification: VerifyResult | None, error: str | None = None
) -> str:
    lines: list[str] = []
    if error is not None:
        text = error.replace("`", "'")
        lines += ["## bnfuse: :x: ERROR", "", f"`{text}`", ""]
    elif verification is not None:
        mark = "PASS" if verification.passed else "FAIL"
        icon = ":white_check_mark:" if verification.passed else ":x:"
        lines += [f"## bnfuse: {icon} {mark}", ""]
    else:
        lines += ["## bnfuse", ""]
    if fusion is not None:
        lines += [
            f"**{fusion.input}**: {fusion.headline()}.",
            "",
        ]
        for skip, cands in fusion.skipped_by_reason().items():
            lines.append(f"- skipped {len(cands)}: {skip.value}")
            lines += [f"  - `{c.node}`: {c.reason}" for c in cands[:10]]
            if len(cands) > 10:
                lines.append(f"  - ... and {len(cands) - 10} more")
        if fusion.skipped:
            lines.append("")
        flags = fusion.health_flags()
        if flags:
            lines.append(f"- health: {len(flags)} flag(s)")
            lines += [f"  - `{bn}`: {flag}" for bn, flag in flags[:10]]
            if len(flags) > 10:
                lines.append(f"  - ... and {len(flags) - 10} more")
            lines.append("")
        changed = sorted(
            op
            for op in set(fusion.ops_before) | set(fusion.ops_after)
            if fusion.ops_before[op] != fusion.ops_after[op]
        )
        if changed:
            lines += ["| op | before | after |", "| --- | ---: | ---: |"]
            lines += [
                f"| {op} | {fusion.ops_before[op]} | {fusion.ops_after[op]} |" for op in changed
            ]
            lines.append(
                f"| total | {sum(fusion.ops_before.values())} | {sum(fusion.ops_after.values())} |"
            )
            lines.append("")
    if verification is not None:
        v = verification
        lines += [
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
                f"| `{c.name}` | {c.device} | {'pass' if c.passed else '**FAIL**'} | {num(c.max_abs)} "
                f"| {num(c.max_rel)} | {num(c.cosine, 8)} | {db(c.snr_db)} | {c.failed}/{c.total} "
                f"| {num(floor.max_abs) if floor is not None else '-'} |"
            )
        argmax = [c for c in v.outputs if c.argmax_agreement is not None]
        if argmax:
            lines.append("")
            lines += [
                f"- `{c.name}` ({c.device}): top-1 agreement {pct(c.argmax_agreement)}"
                for c in argmax
            ]
        if v.layers:
            worst, first = v.worst_layer, v.first_failing_layer
            lines += [
                "",
                f"Per layer (worst: `{worst.name if worst is not None else '-'}`"
                + (f"; first failing: `{first.name}`" if first is not None else "")
                + "):",
                "",
                "| tensor | max abs | range | verdict |",
                "| --- | ---: | ---: | --- |",
            ]
            lines += [
                f"| `{c.name}` | {num(c.max_abs)} | {num(c.value_range)} | {'pass' if c.passed else '**FAIL**'} |"
                for c in v.layers
            ]
        if v.notes:
            lines.append("")
            lines += [f"> {note}" for note in v.notes]
    return "\n".join(lines) + "\n"
