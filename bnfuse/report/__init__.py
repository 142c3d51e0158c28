"""Reports: the terminal summary (rich) and files chosen by suffix.

.json  versioned schema (json_report)     .md   GitHub job summary (markdown)
.xml   JUnit, one testcase per output     .html one self-contained page (html)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from bnfuse import outputs
from bnfuse.errors import BnfuseError
from bnfuse.result import FuseResult, VerifyResult

# fusion, verification, the error a run ended in, and the run ("fuse model.onnx")
Renderer = Callable[[FuseResult | None, VerifyResult | None, str | None, str], str]
SUFFIXES = (".json", ".md", ".xml", ".html")


STDOUT = Path("-")  # ``--report -``: the JSON report on standard output


def to_stdout(paths: list[Path]) -> bool:
    """Whether the JSON report goes to standard output (the summary then goes to stderr)."""
    return STDOUT in paths


def check_report_paths(paths: list[Path]) -> list[tuple[str, Path]]:
    """Refuse unknown report types; the files among the paths as outputs for
    bnfuse.outputs.check_targets (``-``, standard output, is none)."""
    paths = [p for p in paths if p != STDOUT]
    for path in paths:
        if path.suffix.lower() not in SUFFIXES:
            raise BnfuseError(
                f"--report {path}: unknown report type {path.suffix or '(no suffix)'!r}",
                hint="use .json, .md, .xml (JUnit) or .html",
            )
    return [("--report", path) for path in paths]


def _renderer(suffix: str) -> Renderer:
    if suffix in (".json", ""):  # "" : ``-``, standard output
        from bnfuse.report import json_report

        return json_report.render
    if suffix == ".md":
        from bnfuse.report import markdown

        return markdown.render
    if suffix == ".xml":
        from bnfuse.report import junit

        return junit.render
    from bnfuse.report import html

    return html.render


def write_reports(
    paths: list[Path],
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    *,
    force: bool = False,
    error: str | None = None,
    run: str = "",
) -> None:
    """Write each report; a .md report is also appended to $GITHUB_STEP_SUMMARY when set.

    ``error``: the run ended in this error (exit 2); the reports say so, with
    whatever was done before it. ``run``: the command and its model (``fuse
    model.onnx``), for a report whose run ended before it had a result to name.
    """
    write_texts(
        paths,
        lambda path: _renderer(path.suffix.lower())(fusion, verification, error, run),
        force=force,
    )


def write_texts(paths: list[Path], render: Callable[[Path], str], *, force: bool) -> None:
    """Write ``render(path)`` to each path, by bnfuse.outputs' rules; all or none.

    If one cannot be written, those already written are removed. The .md text
    is appended to $GITHUB_STEP_SUMMARY when that is set.
    """
    written: list[Path] = []
    printed: list[str] = []
    try:
        for path in paths:
            text = render(path)
            if path == STDOUT:
                printed.append(text)  # once every file is in place: all or none
                continue

            def staged(tmpdir: Path, path: Path = path, text: str = text) -> outputs.Staged:
                (tmpdir / path.name).write_text(text, encoding="utf-8")
                return [(tmpdir / path.name, path)]

            written += outputs.write_file(path, staged, force=force, what="--report")
    except BaseException:
        outputs.remove(written)
        raise
    for text in printed:
        sys.stdout.write(text)
        sys.stdout.flush()
    summary = job_summary(paths)
    if summary is not None:
        markdown = next(p for p in paths if p.suffix.lower() == ".md")
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(render(markdown))


def job_summary(reports: list[Path]) -> Path | None:
    """$GITHUB_STEP_SUMMARY, where a .md report among ``reports`` is appended too; or None."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    wanted = any(p.suffix.lower() == ".md" for p in reports)
    return Path(summary) if summary and wanted else None
