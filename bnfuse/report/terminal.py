"""The terminal summary of a fusion, drawn with rich (imported here only)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bnfuse.result import FuseResult

_MAX_LISTED = 10


def print_fuse_summary(result: FuseResult, console: Console) -> None:
    found, folded, skipped = len(result.candidates), len(result.folded), len(result.skipped)
    verb = "would fold" if result.dry_run else "folded"
    console.print(
        f"[bold]{result.input}[/]: {found} BatchNormalization found, "
        f"[green]{folded} {verb}[/], "
        + (f"[yellow]{skipped} skipped[/]" if skipped else "0 skipped")
    )
    groups = result.skipped_by_reason()
    for skip, cands in groups.items():
        console.print(f"[yellow]skipped {len(cands)}[/]: {skip.value}")
        for cand in cands[:_MAX_LISTED]:
            console.print(f"  {cand.bn}: {cand.reason}", highlight=False, markup=False)
        if len(cands) > _MAX_LISTED:
            console.print(f"  ... and {len(cands) - _MAX_LISTED} more")
    if result.dry_run:
        if result.folded:
            table = Table(title="Would fold", title_justify="left")
            table.add_column("BatchNorm")
            table.add_column("into")
            table.add_column("graph")
            for cand in result.folded:
                table.add_row(cand.bn, f"{cand.producer_op} '{cand.producer}'", cand.graph)
            console.print(table)
        return
    ops = Table(title="Nodes by op type", title_justify="left")
    ops.add_column("op")
    ops.add_column("before", justify="right")
    ops.add_column("after", justify="right")
    for op in sorted(set(result.ops_before) | set(result.ops_after)):
        before, after = result.ops_before[op], result.ops_after[op]
        style = "bold" if before != after else ""
        ops.add_row(op, str(before), str(after), style=style)
    ops.add_row(
        "total",
        str(sum(result.ops_before.values())),
        str(sum(result.ops_after.values())),
        style="dim",
    )
    console.print(ops)
    for path in result.outputs:
        console.print(f"wrote {path}")
