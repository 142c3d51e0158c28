"""Reports: the terminal summary (rich) and files chosen by suffix.

.json  versioned schema (json_report)     .md   GitHub job summary (markdown)
.xml   JUnit, one testcase per output     .html one self-contained page (html)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bnfuse.errors import BnfuseError, OutputError
from bnfuse.result import FuseResult, VerifyResult

Renderer = Callable[[FuseResult | None, VerifyResult | None], str]
SUFFIXES = (".json", ".md", ".xml", ".html")


def check_report_paths(paths: list[Path]) -> None:
    for path in paths:
        if path.suffix.lower() not in SUFFIXES:
            raise BnfuseError(
                f"--report {path}: unknown report type {path.suffix or '(no suffix)'!r}",
                hint="use .json, .md, .xml (JUnit) or .html",
            )
        if not path.parent.exists():
            raise OutputError(f"--report {path}: the folder {path.parent} does not exist")


def _renderer(suffix: str) -> Renderer:
    if suffix == ".json":
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
    paths: list[Path], fusion: FuseResult | None, verification: VerifyResult | None
) -> None:
    """Write each report; a .md report is also appended to $GITHUB_STEP_SUMMARY when set."""
    for path in paths:
        text = _renderer(path.suffix.lower())(fusion, verification)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"--report {path}: cannot write it ({exc.strerror or exc})") from exc
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and any(p.suffix.lower() == ".md" for p in paths):
        from bnfuse.report import markdown

        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown.render(fusion, verification))
