"""Report details a reader relies on: whole labels, marked failures, provenance, digits."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfuse.report import html, junit
from bnfuse.result import VerifyResult
from bnfuse.verify.metrics import compare
from sample_models.models import layer_bn, with_initializer
from tests.test_cli import run_cli


def _layers_result() -> VerifyResult:
    ref = np.linspace(-1, 1, 16, dtype=np.float32)
    long = "encoder.stage3.block12.attention.output.batchnorm_projection_out"
    ok = compare(long + "_a", "cpu", ref, ref)
    bad = compare(long + "_b", "cpu", ref, ref + 0.5)
    out = compare("y", "cpu", ref, ref)
    return VerifyResult(Path("m.onnx"), Path("f.onnx"), ["cpu"], [out], layers=[ok, bad])


def test_per_layer_chart_keeps_whole_names_and_marks_failures() -> None:
    page = html.render(None, _layers_result())
    start = page.index('aria-label="per-layer error"')
    chart = page[start : page.index("</svg>", start)]
    long = "encoder.stage3.block12.attention.output.batchnorm_projection_out"
    assert f"<title>{long}_a</title>" in chart and f"<title>{long}_b</title>" in chart
    failing = re.search(r'<text[^>]*fill="#cf222e"[^>]*><title>[^<]*_b</title>\u2717 ', chart)
    assert failing is not None, "the failing layer is not marked"
    assert 'fill="#cf222e"><title>' + long + "_b" in chart  # its bar is red too


def test_junit_failure_values_have_digits_enough_to_differ() -> None:
    ref = np.array([1.0, 2.0], dtype=np.float64)
    got = ref + np.array([0.0, 3e-7])  # 2.0 vs 2.0000003: equal at 3 significant digits
    c = compare("y", "cpu", ref, got, atol=1e-9, rtol=1e-9)
    v = VerifyResult(Path("m.onnx"), Path("f.onnx"), ["cpu"], [c])
    root = ET.fromstring(junit.render(None, v))
    text = root.find(".//failure").text or ""
    assert "worst_ref=2.0 " in text and "worst_got=2.0000003" in text


def test_batch_html_has_verdict_counts_date_and_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx.save(layer_bn("Conv"), tmp_path / "a.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    report = tmp_path / "batch.html"
    code, _, _ = run_cli(
        [str(tmp_path), "-o", str(tmp_path / "out"), "--report", str(report)], capsys
    )
    assert code == 2
    page = report.read_text()
    assert '<span class="verdict fail">ERROR</span>' in page
    assert "1 passed, 0 failed verification, 1 error(s)" in page
    assert re.search(r"Made \d{4}-\d\d-\d\d \d\d:\d\d UTC with bnfuse \S+, onnx \S+", page)


def test_health_flags_show_in_the_fuse_output_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Statistics never updated (mean 0, var 1): said by fuse, not only by inspect."""
    model = with_initializer(layer_bn("Conv"), "bn.mean", np.zeros(8, np.float32))
    model = with_initializer(model, "bn.var", np.ones(8, np.float32))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    args = [str(src), "-o", str(tmp_path / "f.onnx"), "--report", str(md), "--report", str(page)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "health: 1 flag(s)" in out and "never" in out
    assert "health: 1 flag(s)" in md.read_text()
    assert "Health: 1 flag(s)" in page.read_text()


def test_an_error_report_says_error(tmp_path: Path) -> None:
    page = html.render(None, None, "m.onnx: not a readable ONNX model")
    assert "ERROR" in page and "not a readable ONNX model" in page
    root = ET.fromstring(junit.render(None, None, "boom"))
    assert root.get("errors") == "1"


def test_an_output_passed_by_the_noise_floor_says_so_in_every_report() -> None:
    """Under --atol 0 an output whose error is within the noise floor passes with elements
    beyond tolerance: "pass" beside "131/320 beyond tolerance" read as a contradiction."""
    import dataclasses

    from bnfuse.report import line, markdown

    ref = np.linspace(-1, 1, 8, dtype=np.float32)
    c = compare("y", "cpu", ref, ref + np.float32(1e-6), atol=0, rtol=0)
    excused = dataclasses.replace(c, floor_max_abs=2e-6)
    v = VerifyResult(Path("m.onnx"), Path("f.onnx"), ["cpu"], [excused])
    assert c.failed and not c.passed and excused.passed
    assert excused.verdict == "pass (noise floor)" and c.verdict == "FAIL"
    assert "beyond tolerance but within the noise floor" in line.one_line(None, v)
    assert "pass (noise floor)" in markdown.render(None, v)
    assert "pass (noise floor)" in html.render(None, v)
    exact = compare("y", "cpu", ref, ref)
    assert exact.verdict == "pass"
