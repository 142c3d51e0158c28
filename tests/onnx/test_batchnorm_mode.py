"""A BatchNormalization that computes batch statistics is never folded, however its opset
spells the mode: ``is_test`` (opsets 1-6, whose default 0 means training), the number
of declared outputs (opsets 7-13: five means training, read or not) or
``training_mode`` (14 on). Each case runs the real command, with and without
verification (the fast path and the full one), and through ``inspect --json``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from sample_models.models import layer_bn
from tests.test_cli import run_cli


def _model(opset: int, *, is_test: int | None = None, outputs: int = 1) -> onnx.ModelProto:
    attrs = {} if is_test is None else {"is_test": is_test}
    model = layer_bn("Conv", opset=opset, bn_attrs=attrs)
    (bn,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    bn.output.extend(f"stat{i}" for i in range(1, outputs))
    return model


TRAINING = {
    "opset6_is_test_unset": (_model(6), "is_test is not set, which in opset 6 means training"),
    "opset6_is_test_0": (_model(6, is_test=0), "is_test=0, which in opset 6 means training"),
    "opset9_five_outputs": (_model(9, outputs=5), "it declares 5 outputs, which in opset 9"),
    "opset13_five_outputs": (_model(13, outputs=5), "it declares 5 outputs, which in opset 13"),
}
INFERENCE = {
    "opset6_is_test_1": _model(6, is_test=1),
    "opset9_one_output": _model(9),
    "opset13_one_output": _model(13),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
@pytest.mark.parametrize("case", list(TRAINING))
def test_batchnorm_in_training_mode_is_not_folded(
    case: str, verify: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, words = TRAINING[case]
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    code, stdout, err = run_cli(
        [str(src), "-o", str(out), *([] if verify else ["--no-verify"])], capsys
    )
    assert code == 0, stdout + err
    assert [n.op_type for n in onnx.load(out).graph.node].count("BatchNormalization") == 1
    code, stdout, err = run_cli(["inspect", str(src), "--json"], capsys)
    assert code == 0, err
    (cand,) = json.loads(stdout)["candidates"]
    assert cand["skip_code"] == "training_mode" and words in cand["reason"], cand


@pytest.mark.parametrize("case", list(INFERENCE))
def test_batchnorm_in_inference_mode_folds(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(INFERENCE[case], src)
    code, stdout, err = run_cli([str(src), "-o", str(out)], capsys)
    assert code == 0, stdout + err
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]
