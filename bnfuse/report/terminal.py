"""The terminal summary of a fusion, drawn with rich (imported here only)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnfuse.errors import printable
from bnfuse.result import FuseResult, VerifyResult

_MAX_LISTED = 10


def shown(text: object) -> str:
    """A name or path from the model, safe in rich markup and on a terminal: rich's tags
    escaped, and control characters (ESC, CR, newlines) shown as escapes."""
    return escape(printable(str(text)))


# Width when the output is no terminal (a CI log, a pipe): wide enough that no name or
# path is ever cut or folded; tables still take only the width their contents need.
UNBOUNDED = 100_000


def reader_left() -> None:
    """Standard output's reader has gone (``bnfuse ... | head`` closes the pipe early).

    What is left to print goes nowhere, and the run goes on to the exit code its
    outcome gives: the model is written and judged whatever was read of the summary.
    (Python's own advice exits 1, and click and rich do: to bnfuse, 1 means a failed
    verification.)
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits 1
        self.quiet = True
        reader_left()


def console(*, stderr: bool = False) -> Console:
    """A console for bnfuse's output: the terminal's width at a terminal, else unbounded."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else UNBOUNDED
    return _Console(soft_wrap=True, stderr=stderr, width=width)


def print_fuse_summary(result: FuseResult, console: Console) -> None:
    console.print(f"[bold]{shown(result.input)}[/]: {shown(result.headline())}", highlight=False)
    groups = result.skipped_by_reason()
    for skip, cands in groups.items():
        console.print(f"[yellow]skipped {len(cands)}[/]: {skip.value}")
        for cand in cands[:_MAX_LISTED]:
            console.print(f"  {shown(cand.node)}: {shown(cand.reason)}", highlight=False)
        if len(cands) > _MAX_LISTED:
            console.print(f"  ... and {len(cands) - _MAX_LISTED} more")
    flags = result.health_flags()
    if flags:
        console.print(f"[yellow]health: {len(flags)} flag(s)[/] (bnfuse inspect shows each BN)")
        for bn, flag in flags[:_MAX_LISTED]:
            console.print(f"  {shown(bn)}: {shown(flag)}", highlight=False)
        if len(flags) > _MAX_LISTED:
            console.print(f"  ... and {len(flags) - _MAX_LISTED} more")
    if result.dry_run:
        if result.folded:
            table = Table(title="Would fold", title_justify="left")
            table.add_column("node")
            table.add_column("into")
            table.add_column("graph")
            for cand in result.folded:
                where = "the following" if cand.into == "following" else ""
                table.add_row(
                    f"{cand.op} '{shown(cand.node)}'",
                    f"{where} {shown(cand.layer_op)} '{shown(cand.layer)}'".strip(),
                    shown(cand.graph),
                )
            console.print(table)
        return
    ops = Table(title="Nodes by op type", title_justify="left")
    ops.add_column("op")
    ops.add_column("before", justify="right")
    ops.add_column("after", justify="right")
    for op in sorted(set(result.ops_before) | set(result.ops_after)):
        before, after = result.ops_before[op], result.ops_after[op]
        style = "bold" if before != after else ""
        ops.add_row(shown(op), str(before), str(after), style=style)
    ops.add_row(
        "total",
        str(sum(result.ops_before.values())),
        str(sum(result.ops_after.values())),
        style="dim",
    )
    console.print(ops)
    for path in result.outputs:
        console.print(f"wrote {shown(path)}", highlight=False)


def _share(fraction: float) -> str:
    """A fraction as a reader compares it: ``198%``, ``37%``, ``under 1%``."""
    return f"{fraction:.0%}" if fraction >= 0.01 else "under 1%"


def print_verify_summary(result: VerifyResult, console: Console) -> None:
    from bnfuse.report.fmt import db, num

    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    console.print(
        f"verify {verdict}: {shown(result.candidate)} against {shown(result.original)} "
        f"on {', '.join(result.devices)} ({result.samples} sample(s), "
        f"{shown(result.input_source)} inputs{', ' + result.runtime if result.runtime else ''})",
        highlight=False,
    )
    table = Table(title="Outputs (failing first)", title_justify="left")
    table.add_column("output", overflow="fold")
    table.add_column("device")
    table.add_column("verdict")
    for col in ("max abs", "SNR", "beyond tol", "noise floor"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in result.ordered_outputs():
        floor = result.noise_for(c)
        table.add_row(
            shown(c.name),
            c.device,
            c.verdict if c.passed else "[red]FAIL[/]",
            num(c.max_abs),
            db(c.snr_db),
            f"{c.failed}/{c.total}",
            num(floor.max_abs) if floor is not None else "-",
        )
    console.print(table)
    for c in result.outputs:
        if c.argmax_agreement is not None:
            console.print(
                f"  {shown(c.name)} ({c.device}): top-1 agreement {100 * c.argmax_agreement:.1f}%"
            )
    worst = result.worst_layer
    if worst is not None:
        console.print(
            f"worst layer: {shown(worst.name)} (max abs {num(worst.max_abs)} over a range of "
            f"{num(worst.value_range)}; {len(result.layers)} layers compared)",
            highlight=False,
        )
    first = result.first_failing_layer
    if first is not None:
        console.print(
            f"[red]first failing layer[/]: {shown(first.name)} (max abs {num(first.max_abs)}; "
            "the error starts here and flows downstream)",
            highlight=False,
        )
    for note in result.notes:
        console.print(f"[dim]{shown(note)}[/]", highlight=False)


def print_inspect(result: FuseResult, console: Console) -> None:
    """Every candidate: where it sits, whether it folds (and why not), its health."""
    console.print(f"[bold]{shown(result.input)}[/]: {shown(result.headline())}", highlight=False)
    for c in result.candidates:
        console.print()
        console.print(
            f"[bold]{c.op}[/] '{shown(c.node)}' [dim]({shown(c.graph)})[/]", highlight=False
        )
        feeds = ", ".join(shown(n) for n in c.consumers) or "(a graph output)"
        if c.into == "following":
            console.print(f"  feeds {shown(c.layer_op)} '{shown(c.layer)}'", highlight=False)
        else:
            console.print(
                f"  reads {shown(c.layer_op or 'a graph input')} '{shown(c.layer or '-')}'; "
                f"feeds {feeds}",
                highlight=False,
            )
        if c.fusable:
            console.print(
                f"  [green]folds[/] into the {c.into} {shown(c.layer_op)}", highlight=False
            )
        else:
            console.print(f"  [yellow]stays[/]: {shown(c.reason)}", highlight=False)
        if c.health is None:
            continue
        h = c.health
        summary = f"{h.channels} channels, max |gamma/sigma| {h.max_scale:.3g}"
        if h.range_fraction is not None and h.dtype in ("float16", "bfloat16"):
            summary += (
                f", fused weight peak {h.fused_peak:.3g} "
                f"({_share(h.range_fraction)} of the {h.dtype} range)"
            )
        if not h.flags:
            console.print(f"  health: [green]ok[/] ({summary})", highlight=False)
            continue
        console.print(f"  health ({summary}):", highlight=False)
        for flag in h.flags:
            console.print(f"    [red]![/] {shown(flag)}", highlight=False)
