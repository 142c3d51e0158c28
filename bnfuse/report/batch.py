"""Reports for batch mode: one table, one file, every model in it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bnfuse.batch import BatchResult, Outcome
from bnfuse.errors import printable
from bnfuse.report import html, json_report, junit
from bnfuse.report.fmt import md_code, md_text, num

STATUS = {0: "ok", 1: "FAIL (verification)", 2: "ERROR"}


def _worst_error(o: Outcome) -> float | None:
    if o.verification is None or not o.verification.outputs:
        return None
    return max(c.max_abs for c in o.verification.outputs)


def print_batch_summary(result: BatchResult, console: Console) -> None:
    from bnfuse.report.terminal import shown

    table = Table(title=f"{len(result.outcomes)} models", title_justify="left")
    table.add_column("model", overflow="fold")
    for col in ("BN found", "folded", "skipped", "max abs err"):
        table.add_column(col, justify="right")
    table.add_column("result", overflow="fold")
    for o in sorted(result.outcomes, key=lambda o: (-o.exit_code, str(o.input))):
        f = o.fusion
        counts = f.counts().get("BatchNormalization", (0, 0, 0)) if f is not None else None
        status = STATUS[o.exit_code] if o.error is None else f"ERROR: {o.error}"
        style = {0: "", 1: "red", 2: "red"}[o.exit_code]
        table.add_row(
            shown(o.input),
            *(str(x) for x in counts) if counts else ("-", "-", "-"),
            num(_worst_error(o)),
            shown(status),
            style=style,
        )
    console.print(table)


def _outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "input": str(o.input),
        "output": str(o.output),
        "exit_code": o.exit_code,
        "error": o.error,
        "fusion": json_report.fusion_dict(o.fusion) if o.fusion is not None else None,
        "verification": (
            json_report.verification_dict(o.verification) if o.verification is not None else None
        ),
    }


def render_json(result: BatchResult) -> str:
    from bnfuse import __version__

    data = {
        "schema": "bnfuse-batch",
        "schema_version": json_report.SCHEMA_VERSION,
        "bnfuse_version": __version__,
        "exit_code": result.exit_code,
        "models": [_outcome_dict(o) for o in result.outcomes],
    }
    return json_report.dumps(data)


def render_markdown(result: BatchResult) -> str:
    icon = ":white_check_mark:" if result.exit_code == 0 else ":x:"
    lines = [
        f"## bnfuse batch: {icon} {len(result.outcomes)} models",
        "",
        "| model | BN found | folded | skipped | max abs err | result |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for o in result.outcomes:
        counts = o.fusion.counts().get("BatchNormalization", (0, 0, 0)) if o.fusion else None
        cells = " | ".join(str(x) for x in counts) if counts else "- | - | -"
        status = STATUS[o.exit_code] if o.error is None else f"ERROR: {o.error}"
        lines.append(
            f"| {md_code(o.input, in_table=True)} | {cells} | {num(_worst_error(o))} "
            f"| {md_text(status)} |"
        )
    return "\n".join(lines) + "\n"


def render_junit(result: BatchResult) -> str:
    """One testsuite per model (its outputs as testcases); errors as <error> testcases."""
    root = ET.Element("testsuites", {"name": "bnfuse batch"})
    tests = failures = errors = 0
    for o in result.outcomes:
        if o.error is not None:
            suite = ET.SubElement(
                root,
                "testsuite",
                {"name": printable(str(o.input)), "tests": "1", "errors": "1", "failures": "0"},
            )
            case = ET.SubElement(
                suite,
                "testcase",
                {"classname": "bnfuse.fuse", "name": printable(str(o.input)), "time": "0"},
            )
            ET.SubElement(case, "error", {"message": printable(o.error), "type": "BnfuseError"})
            tests, errors = tests + 1, errors + 1
            continue
        single = ET.fromstring(junit.render(o.fusion, o.verification))
        for suite in single.findall("testsuite"):
            suite.set("name", printable(str(o.input)))
            root.append(suite)
            tests += int(suite.get("tests", "0"))
            failures += int(suite.get("failures", "0"))
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render_html(result: BatchResult) -> str:
    """The models' single reports, one after another, under a summary table."""
    rows = []
    sections = []
    for i, o in enumerate(result.outcomes):
        status = (
            STATUS[o.exit_code]
            if o.error is None
            else f"ERROR: {o.error.removeprefix(f'{o.input}: ')}"
        )
        rows.append(
            f'<tr class="{"bad" if o.exit_code else ""}"><td><a href="#m{i}">{escape(str(o.input))}</a></td>'
            f'<td>{num(_worst_error(o))}</td><td class="l wrap">{escape(status)}</td></tr>'
        )
        if o.error is None:
            page = html.render(o.fusion, o.verification)
            body = page.split("<body>", 1)[1].rsplit("</body>", 1)[0]
            sections.append(f'<section id="m{i}">{body}</section>')
    page = html.render(None, None)
    head, _ = page.split("<body>", 1)
    n = len(result.outcomes)
    failed = sum(o.exit_code == 1 for o in result.outcomes)
    errors = sum(o.exit_code == 2 for o in result.outcomes)
    verdict, css = ("ERROR", "fail") if errors else ("FAIL", "fail") if failed else ("PASS", "pass")
    summary = (
        f'<h1>bnfuse batch: {n} models <span class="verdict {css}">{verdict}</span></h1>'
        f"<p>{n - failed - errors} passed, {failed} failed verification, {errors} error(s). "
        f'<span class="muted">{escape(_provenance())}</span></p>'
        "<table><tr><th>model</th><th>max abs err</th><th class=l>result</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return head + "<body>" + summary + "<hr>".join(sections) + "</body></html>\n"


def _provenance() -> str:
    """When and with what the report was made: the date and the versions that decide results."""
    import datetime
    import importlib.metadata as metadata

    from bnfuse import __version__

    versions = [f"bnfuse {__version__}"]
    for package in ("onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Made {when} with {', '.join(versions)}."


RENDERERS = {
    ".json": render_json,
    ".md": render_markdown,
    ".xml": render_junit,
    ".html": render_html,
}


def write_batch_reports(paths: list[Path], result: BatchResult, *, force: bool = False) -> None:
    from bnfuse.report import write_texts

    write_texts(paths, lambda path: RENDERERS[path.suffix.lower()](result), force=force)
