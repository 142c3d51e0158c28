"""The verifier as a pipeline gate: verdicts, exit codes, and the reports naming what failed."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sample_models.models import conv_chain, layer_bn
from tests.test_cli import run_cli


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """The original chain, its fusion, and the fusion with conv2's weight perturbed."""
    src = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), src)
    fused = tmp_path / "fused.onnx"
    import bnfuse

    bnfuse.fuse(src, fused)
    broken = onnx.load(str(fused))
    for t in broken.graph.initializer:
        if t.name == "conv2.W":
            w = numpy_helper.to_array(t).copy()
            w[3, 2, 1, 1] += 0.5
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(broken, bad)
    return {"src": src, "fused": fused, "bad": bad}


def test_correct_fusion_passes_with_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(), src)
    report = tmp_path / "r.json"
    code, out, err = run_cli(
        [str(src), "-o", str(tmp_path / "f.onnx"), "--report", str(report)], capsys
    )
    assert code == 0, err
    assert "verify PASS" in out
    data = json.loads(report.read_text())
    assert data["schema"] == "bnfuse-report" and data["schema_version"] == 2
    assert data["passed"] is True
    assert data["fusion"]["folded"] == 3
    (logits,) = data["verification"]["outputs"]
    assert logits["name"] == "logits" and logits["passed"] is True
    assert 0 < logits["max_abs"] < 1e-5 and logits["argmax_agreement"] == 1.0
    assert data["verification"]["noise_floor"][0]["device"] == "cpu: onnxruntime optimised vs not"


def test_perturbed_weight_fails_with_exit_1_and_reports_name_the_output(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rj, rx = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, _ = run_cli(
        [
            "verify",
            str(models["src"]),
            str(models["bad"]),
            "--report",
            str(rj),
            "--report",
            str(rx),
        ],
        capsys,
    )
    assert code == 1
    assert "verify FAIL" in out
    data = json.loads(rj.read_text())
    assert data["passed"] is False
    failing = [o["name"] for o in data["verification"]["outputs"] if not o["passed"]]
    assert failing == ["logits"]
    suite = ET.parse(rx).getroot()
    failures = suite.findall(".//testcase/failure/..")
    assert [f.get("name") for f in failures] == ["logits"]
    assert "logits" in failures[0].find("failure").get("message", "")  # type: ignore[union-attr]


def test_per_layer_names_the_perturbed_layer(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rj = tmp_path / "r.json"
    code, out, _ = run_cli(
        ["verify", str(models["src"]), str(models["bad"]), "--per-layer", "--report", str(rj)],
        capsys,
    )
    assert code == 1
    layers = json.loads(rj.read_text())["verification"]
    assert [entry["name"] for entry in layers["layers"]] == ["bn1_out", "bn2_out", "bn3_out"]
    assert [entry["passed"] for entry in layers["layers"]] == [True, False, False]
    assert layers["first_failing_layer"] == "bn2_out"
    assert "first failing layer: bn2_out" in out


def test_junit_parses_and_counts_match(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    multi = tmp_path / "two_outputs.onnx"
    m = onnx.load(str(models["src"]))
    m.graph.output.append(
        onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None)
    )
    onnx.save(m, multi)
    fused = tmp_path / "two_fused.onnx"
    rx = tmp_path / "r.xml"
    code, _, err = run_cli([str(multi), "-o", str(fused), "--report", str(rx)], capsys)
    assert code == 0, err
    root = ET.parse(rx).getroot()
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(root.get("tests", -1)) == int(suite.get("tests", -1)) == len(cases) == 2
    assert int(suite.get("failures", -1)) == sum(c.find("failure") is not None for c in cases) == 0
    assert sorted(c.get("name") for c in cases) == ["logits", "pooled"]
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props == {"bn_found": "3", "bn_folded": "3", "bn_skipped": "0"}


def test_html_report_is_self_contained(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = tmp_path / "r.html"
    code, _, _ = run_cli(
        ["verify", str(models["src"]), str(models["bad"]), "--per-layer", "--report", str(html)],
        capsys,
    )
    assert code == 1
    text = html.read_text()
    assert not re.search(r"(https?:)?//[a-z0-9]", text, re.I), "no external URL"
    assert "<script" not in text and "<link" not in text
    assert "FAIL" in text and "logits" in text and "bn2_out" in text
    assert text.count("<svg") == 2  # one histogram (one output, cpu) + the per-layer chart


@pytest.mark.parametrize(
    ("content", "words"),
    [("npy", "one array (.npy), not an .npz of input name to array"),
     ("text", "not an .npz file (a zip of arrays)")],
)  # fmt: skip
def test_inputs_that_are_not_an_npz_end_in_one_line(
    content: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(), src)
    given = tmp_path / "in.data"
    if content == "npy":
        with open(given, "wb") as fh:
            np.save(fh, np.zeros((1, 3, 8, 8), np.float32))
    else:
        given.write_text("x = 1, 2, 3\n")
    code, _, err = run_cli(["verify", str(src), str(src), "--inputs", str(given)], capsys)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert words in line and "numpy.savez" in line and "Error" not in line, line


def test_inputs_file_is_used_as_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The .npz arrays are fed exactly: batch 3 and values checked against onnxruntime on them."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(dynamic_batch=True), src)
    fused = tmp_path / "f.onnx"
    x = np.random.default_rng(7).normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rj = tmp_path / "r.json"
    code, _, err = run_cli(
        [str(src), "-o", str(fused), "--inputs", str(tmp_path / "in.npz"), "--report", str(rj)],
        capsys,
    )
    assert code == 0, err
    v = json.loads(rj.read_text())["verification"]
    assert v["input_source"].startswith("file ")
    assert v["outputs"][0]["shape"] == [3, 10]  # batch 3: the file's, not a generated 1
    # The worst element's reference value is what onnxruntime computes on exactly x.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    i = tuple(v["outputs"][0]["worst_index"])
    assert v["outputs"][0]["worst_ref"] == pytest.approx(float(ref[i]), rel=1e-6)


def test_dynamic_dimension_needs_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, _, err = run_cli(["verify", str(src), str(src)], capsys)
    assert code == 2
    assert "dynamic dimension 'H' on axis 2" in err and "--input-shape x:4x3xNx8" in err
    code, _, err = run_cli(["verify", str(src), str(src), "--input-shape", "x:4x3x8x8"], capsys)
    assert code == 0, err


def test_dynamic_batch_defaults_to_one_and_samples_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(dynamic_batch=True), src)
    rj = tmp_path / "r.json"
    code, _, err = run_cli(
        ["verify", str(src), str(src), "--samples", "3", "--report", str(rj)], capsys
    )
    assert code == 0, err
    out = json.loads(rj.read_text())["verification"]["outputs"][0]
    assert out["shape"] == [3, 1, 10] and out["max_abs"] == 0.0
    assert out["argmax_agreement"] == 1.0  # [N, C] logits per sample: class scores


def test_cuda_asked_for_where_there_is_none_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, _, err = run_cli(["verify", str(src), str(src), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: not available" in err


def test_unknown_report_suffix_exits_2_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, _, err = run_cli(
        [str(src), "-o", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.txt")], capsys
    )
    assert code == 2 and "unknown report type '.txt'" in err
    assert not (tmp_path / "f.onnx").exists()


def test_markdown_report_is_appended_to_github_step_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, _, _ = run_cli(
        [str(src), "-o", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.md")], capsys
    )
    assert code == 0
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "## bnfuse: :white_check_mark: PASS" in text
    assert (tmp_path / "r.md").read_text() in text


def test_no_verify_skips_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, out, _ = run_cli([str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify"], capsys)
    assert code == 0 and "verify PASS" not in out and "Outputs" not in out


@pytest.mark.gpu
def test_cuda_runner_agrees_with_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime")
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(), src)
    rj = tmp_path / "r.json"
    code, _, err = run_cli(
        [str(src), "-o", str(tmp_path / "f.onnx"), "--device", "all", "--report", str(rj)], capsys
    )
    assert code == 0, err
    v = json.loads(rj.read_text())["verification"]
    assert v["devices"] == ["cpu", "cuda"]
    assert {f["device"] for f in v["noise_floor"]} == {
        "cpu: onnxruntime optimised vs not",
        "cpu vs cuda",
    }
