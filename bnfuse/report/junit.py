"""JUnit XML: one testcase per output and device; failures carry the metrics.

GitHub (via test-reporter actions), GitLab (artifacts:reports:junit) and
Jenkins read this format.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bnfuse.errors import printable
from bnfuse.report.fmt import db, num
from bnfuse.result import Comparison, FuseResult, VerifyResult


def _metrics(c: Comparison) -> str:
    """The metrics; the worst element's values in full (repr: the shortest that round-trips),
    so that two values that differ print differently."""
    return (
        f"max_abs={num(c.max_abs)} max_rel={num(c.max_rel)} mean_abs={num(c.mean_abs)} "
        f"rmse={num(c.rmse)} cosine={num(c.cosine, 8)} snr={db(c.snr_db)} "
        f"beyond_tolerance={c.failed}/{c.total} atol={c.atol:g} rtol={c.rtol:g} "
        f"compute_dtype={c.compute_dtype} noise_floor={num(c.floor_max_abs)} "
        f"worst_index={list(c.worst_index)} worst_ref={c.worst_ref!r} worst_got={c.worst_got!r} "
        f"nan={c.nan_ref}/{c.nan_got} inf={c.inf_ref}/{c.inf_got}"
    )


def _suite_name(fusion: FuseResult | None, verification: VerifyResult | None, run: str) -> str:
    """``bnfuse fuse model.onnx``, ``bnfuse verify fused.onnx``; where the run ended before
    it had a result, the run as the command names it."""
    if fusion is not None and fusion.input is not None:
        said = f"fuse {fusion.input.name}"
    elif verification is not None:
        said = f"verify {verification.candidate.name}"
    else:
        said = run
    return printable(f"bnfuse {said}".strip())


def render(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    error: str | None = None,
    run: str = "",
) -> str:
    cases = verification.ordered_outputs() if verification is not None else []
    failures = sum(not c.passed for c in cases)
    errors = int(error is not None)
    counts = {
        "tests": str(len(cases) + errors),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
    }
    suites = ET.Element("testsuites", {"name": "bnfuse", **counts})
    suite = ET.SubElement(
        suites, "testsuite", {"name": _suite_name(fusion, verification, run), **counts}
    )
    if fusion is not None:
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("bn_found", len(fusion.candidates)),
            ("bn_folded", len(fusion.folded)),
            ("bn_skipped", len(fusion.skipped)),
        ):
            ET.SubElement(props, "property", name=key, value=str(value))
    if error is not None:
        case = ET.SubElement(suite, "testcase", classname="bnfuse", name="run", time="0")
        ET.SubElement(case, "error", message=printable(error), type="BnfuseError")
    for c in cases:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"bnfuse.verify.{c.device}",
            name=printable(c.name),
            time="0",
        )
        if c.passed:
            ET.SubElement(case, "system-out").text = _metrics(c)
            continue
        failure = ET.SubElement(
            case,
            "failure",
            message=(
                f"output '{printable(c.name)}' on {c.device}: {c.failed} of {c.total} elements beyond "
                f"tolerance (max abs {c.max_abs!r}, noise floor {num(c.floor_max_abs)})"
            ),
            type="ToleranceExceeded",
        )
        failure.text = _metrics(c)
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )
