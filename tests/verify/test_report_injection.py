"""A name in the model is data in every report: it cannot add a Markdown heading or link,
break the JUnit XML, or move the cursor of a terminal.

The model's BatchNorm, layer and output carry names a hostile exporter could write:
a newline and a ``## ... PASS`` heading, a link to a CI page, an ESC sequence that
clears the screen, a carriage return that overwrites the line, a rich markup tag.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
from markdown_it import MarkdownIt

from sample_models.models import layer_bn
from tests.test_cli import run_cli

EVIL = (
    "y\n## bnfuse: :white_check_mark: PASS\n[job](https://ci.example/evil) \x1b[2J\rX [red]red[/] `"
)


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in model.graph.output:
        if value.name == old:
            value.name = new


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    model = layer_bn("Conv")
    _rename(model, "y", EVIL)
    for node in model.graph.node:
        node.name = f"{node.name}{EVIL}"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_names_are_escaped_in_every_report(
    hostile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = hostile.parent
    reports = {s: folder / f"r.{s}" for s in ("md", "xml", "json", "html")}
    args = [str(hostile), "-o", str(folder / "f.onnx")]
    for path in reports.values():
        args += ["--report", str(path)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, out + err
    for text in (out, err):
        assert "\x1b" not in text and "\r" not in text
    assert "\\x1b[2J\\rX [red]red[/]" in out  # shown, not obeyed (rich markup included)

    md = reports["md"].read_text()
    assert "\x1b" not in md and "\r" not in md
    page = MarkdownIt("commonmark").enable("table").render(md)  # as a Markdown reader sees it
    assert re.findall(r"<h\d>.*?</h\d>", page) == ["<h2>bnfuse: :white_check_mark: PASS</h2>"]
    assert "<a " not in page, "a live link"
    assert page.count("<table>") == 2  # the op table and the outputs: no cell split off

    root = ET.parse(reports["xml"]).getroot()  # it parses
    names = [case.get("name") for case in root.iter("testcase")]
    assert names and all(n is not None and "\\x1b" in n for n in names)

    data = json.loads(reports["json"].read_text())
    assert data["verification"]["outputs"][0]["name"] == EVIL  # JSON keeps the exact name

    code, out, err = run_cli([str(hostile), "-o", str(folder / "g.onnx"), "-q"], capsys)
    assert code == 0 and len(out.splitlines()) == 1, out + err
    assert "\x1b" not in out and "\r" not in out


def test_inspect_shows_names_as_they_are(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["inspect", str(hostile)], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\r" not in out and "\\x1b[2J" in out
