"""The verdict on models outside plain fp32: no false FAIL, and a real defect still FAILs.

Each correct fusion here was judged FAIL before the verdict weighed the
precision the model computes in and its noise floor; each defect must FAIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfuse
from bnfuse.verify.compare import verify_models
from bnfuse.verify.options import VerifyOptions
from sample_models.models import deep_chain
from tests.test_cli import run_cli


def _fused(tmp_path: Path, model: onnx.ModelProto) -> tuple[Path, Path]:
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    bnfuse.fuse(src, out)
    return src, out


def _damaged(out: Path, weight: str, factor: float, row: int | None = None) -> Path:
    """The fused model with one weight (or one output row of it) scaled by ``factor``."""
    model = onnx.load(str(out))
    for i, t in enumerate(model.graph.initializer):
        if t.name == weight:
            w = numpy_helper.to_array(t).astype(np.float64)
            if row is None:
                w *= factor
            else:
                w[row] *= factor
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(w.astype(numpy_helper.to_array(t).dtype), t.name)
            )
    bad = out.with_name("damaged.onnx")
    onnx.save(model, bad)
    return bad


def test_deep_fp32_chain_fusion_passes(tmp_path: Path) -> None:
    """40 Conv+BN, outputs ~3e3: the fusion error is within onnxruntime's own."""
    src, out = _fused(tmp_path, deep_chain(40))
    result = verify_models(src, out, VerifyOptions(device="cpu"))
    (c,) = result.outputs
    assert result.passed, (c.max_abs, c.failed, c.floor_max_abs)
    assert c.max_abs > 1e-4  # the case is real: a float32 absolute tolerance alone fails it
    assert c.floor_max_abs is not None and c.floor_max_abs > 0


def test_deep_fp32_chain_with_one_row_off_by_2_percent_fails(tmp_path: Path) -> None:
    src, out = _fused(tmp_path, deep_chain(40))
    bad = _damaged(out, "conv20.W", 1.02, row=3)
    result = verify_models(src, bad, VerifyOptions(device="cpu"))
    (c,) = result.outputs
    assert not result.passed and c.failed > 0 and not c.within_floor


@pytest.mark.parametrize("depth", [4, 16])
def test_fp16_model_with_float32_output_passes(tmp_path: Path, depth: int) -> None:
    src, out = _fused(tmp_path, deep_chain(depth, dtype=np.float16, cast_to_float32=True))
    result = verify_models(src, out, VerifyOptions(device="cpu"))
    (c,) = result.outputs
    assert c.dtype == "float32" and c.compute_dtype == "float16"
    assert result.passed, (c.max_abs, c.failed, c.floor_max_abs)


def test_fp16_model_with_float32_output_and_a_weight_off_by_half_fails(tmp_path: Path) -> None:
    src, out = _fused(tmp_path, deep_chain(4, dtype=np.float16, cast_to_float32=True))
    bad = _damaged(out, "conv2.W", 1.5)
    result = verify_models(src, bad, VerifyOptions(device="cpu"))
    assert not result.passed


def test_per_layer_on_fp16_model_with_float32_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Intermediate tensors are fp16 there, not the graph output's float32."""
    src, out = _fused(tmp_path, deep_chain(4, dtype=np.float16, cast_to_float32=True))
    code, text, err = run_cli(["verify", str(src), str(out), "--per-layer"], capsys)
    assert code == 0, err
    assert "layers compared" in text


def test_fp64_model_is_verified_with_the_reference_evaluator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """onnxruntime has no float64 Conv: the README's command must still verify (and keep) it."""
    src = Path(__file__).resolve().parents[2] / "sample_models" / "conv_bn_fp64.onnx"
    out = tmp_path / "f.onnx"
    code, text, err = run_cli([str(src), "-o", str(out)], capsys)
    assert code == 0, err
    assert out.exists() and "onnx reference evaluator" in text
    result = verify_models(src, out, VerifyOptions(device="cpu"))
    assert result.passed and result.runtime == "onnx reference evaluator"
    (c,) = result.outputs
    assert c.dtype == "float64" and c.max_abs < 1e-12


def test_fp64_defect_fails_under_the_reference_evaluator(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "sample_models" / "conv_bn_fp64.onnx"
    out = tmp_path / "f.onnx"
    bnfuse.fuse(src, out)
    weight = next(t.name for t in onnx.load(str(out)).graph.initializer if len(t.dims) == 4)
    bad = _damaged(out, weight, 1.0 + 1e-6, row=0)
    assert not verify_models(src, bad, VerifyOptions(device="cpu")).passed


def test_batch_over_the_sample_models_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = Path(__file__).resolve().parents[2] / "sample_models"
    code, _, err = run_cli([str(samples), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_torch_models_verify(
    dtype: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bf16 .pt2 crashed the verifier; an fp16 TorchScript was fed float32 inputs."""
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, dtype)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval().to(tdtype)
    x = torch.randn(1, 3, 8, 8, dtype=tdtype)
    pt2, script = tmp_path / "m.pt2", tmp_path / "m.pt"
    torch.export.save(torch.export.export(net, (x,)), str(pt2))
    traced = torch.jit.trace(net, x)
    torch.jit.save(traced, str(script))
    name = [v.debugName() for v in traced.graph.inputs()][1].split(".")[0]
    for src, extra in ((pt2, []), (script, ["--input-shape", f"{name}:1x3x8x8"])):
        out = tmp_path / f"f{src.suffix}"
        code, text, err = run_cli(
            [str(src), "-o", str(out), *extra, "--report", str(tmp_path / "r.json"), "--force"],
            capsys,
        )
        assert code == 0, err
        assert "verify PASS" in text
    import json

    (c,) = json.loads((tmp_path / "r.json").read_text())["verification"]["outputs"]
    assert c["dtype"] == dtype and c["compute_dtype"] == dtype
    if dtype == "float16":  # the user's own fp16 arrays are taken (they were refused)
        np.savez(tmp_path / "in.npz", **{name: np.ones((1, 3, 8, 8), np.float16)})
        args = ["verify", str(script), str(tmp_path / "f.pt"), "--inputs", str(tmp_path / "in.npz")]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
