"""`bnfuse inspect`: every BatchNorm, whether it folds and why, and its health flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from sample_models.models import (
    bn_after_concat,
    bn_then_conv,
    layer_bn,
    layer_scale_shift,
    with_initializer,
)
from tests.test_cli import run_cli


def inspect_json(
    model: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> dict:  # type: ignore[type-arg]
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, out, err = run_cli(["inspect", str(src), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["schema"] == "bnfuse-inspect" and data["schema_version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing written
    return data


def test_never_updated_statistics_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = with_initializer(layer_bn("Conv"), "bn.mean", np.zeros(8, np.float32))
    model = with_initializer(model, "bn.var", np.ones(8, np.float32))
    (cand,) = inspect_json(model, tmp_path, capsys)["candidates"]
    assert cand["fused"] is True and cand["layer"] == "layer" and cand["consumers"] == ["relu"]
    assert cand["health"]["never_updated"] is True
    assert any("never updated" in f for f in cand["health"]["flags"])


def test_tiny_variance_dead_channel_and_fp16_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = layer_bn("Conv", dtype=np.float16)
    model = with_initializer(model, "bn.var", np.array([1e-6, 1, 1, 1, 1, 1, 1, 0.02], np.float16))
    model = with_initializer(model, "bn.scale", np.array([1, 0, 1, 1, 1, 1, 1, 1], np.float16))
    w = onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "layer.W")
    ).copy()
    w[7, 0, 0, 0] = 900  # 900 / sqrt(0.02 + 1e-3) = 6210: about 9% of fp16's 65504
    model = with_initializer(model, "layer.W", w)
    (cand,) = inspect_json(model, tmp_path, capsys)["candidates"]
    health = cand["health"]
    assert health["tiny_variance_channels"] == [0] and health["dead_channels"] == [1]
    want = 900 / np.sqrt(np.float64(np.float16(0.02)) + np.float64(np.float32(1e-3)))
    assert health["fused_peak"] == pytest.approx(want, rel=1e-3)
    assert health["dtype"] == "float16" and health["dtype_max"] == 65504.0
    assert health["range_fraction"] == pytest.approx(want / 65504.0, rel=1e-3)
    assert any("overflow risk" in f for f in health["flags"])


def test_skips_and_patterns_are_listed_with_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sub in "abc":
        (tmp_path / sub).mkdir()
    (cand,) = inspect_json(bn_after_concat(), tmp_path / "a", capsys)["candidates"]
    assert cand["fused"] is False and cand["skip_code"] == "no_layer" and "Concat" in cand["reason"]
    (cand,) = inspect_json(bn_then_conv(), tmp_path / "b", capsys)["candidates"]
    assert cand["fused"] is True and cand["into"] == "following"
    data = inspect_json(layer_scale_shift(), tmp_path / "c", capsys)
    assert data["by_op"] == {
        "Mul": {"found": 1, "fusable": 1, "skipped": 0},
        "Add": {"found": 1, "fusable": 1, "skipped": 0},
    }


def test_terminal_inspect_prints_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = with_initializer(layer_bn("Conv"), "bn.scale", np.zeros(8, np.float32))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, out, _ = run_cli(["inspect", str(src)], capsys)
    assert code == 0
    assert "BatchNormalization 'bn'" in out and "folds into the preceding Conv" in out
    assert "dead channel(s) (gamma ~ 0) [0, 1, 2, 3, 4, 5, 6, 7]" in out


def test_inspect_torch_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from sample_models.torch_nets import NETS, build

    spec = next(s for s in NETS if s.name == "mobilenet")
    model = build(spec)
    x = torch.randn(*spec.input_shape)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    for name in ("m.pt2", "m.pt"):
        code, out, err = run_cli(["inspect", str(tmp_path / name), "--json"], capsys)
        assert code == 0, err
        cands = json.loads(out)["candidates"]
        assert len(cands) == 11 and all(c["fused"] for c in cands)
        assert all(c["health"] is not None and c["health"]["channels"] > 0 for c in cands)


def test_inspect_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["inspect", str(tmp_path / "missing.onnx")], capsys)
    assert code == 2 and "no such file" in err
