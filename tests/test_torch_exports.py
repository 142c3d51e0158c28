"""Must-show: networks exported by torch.onnx lose every BN that follows a layer.

ResNet-, MobileNet-, DenseNet-, DCGAN-generator-shaped networks and a BN1d
MLP, built in code, exported with the TorchScript-based exporter (eval mode,
do_constant_folding=False) at opsets 13 and 17. Outputs must agree with the
unfused export run in onnxruntime with optimisations off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import bnfuse  # noqa: E402
from bnfuse import Skip  # noqa: E402
from sample_models.torch_nets import NETS, NetSpec, build, export_onnx  # noqa: E402
from tests.helpers import assert_same_outputs, run_reference  # noqa: E402


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("spec", NETS, ids=[s.name for s in NETS])
def test_exported_network_loses_every_foldable_bn(
    spec: NetSpec, opset: int, tmp_path: Path
) -> None:
    model = build(spec)
    src, out = tmp_path / f"{spec.name}.onnx", tmp_path / f"{spec.name}.fused.onnx"
    src.write_bytes(export_onnx(model, spec.input_shape, opset))
    bn_before = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    n_bn_modules = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
    assert bn_before == n_bn_modules

    result = bnfuse.fuse(src, out)

    assert len(result.candidates) == bn_before
    assert len(result.skipped) == spec.bn_not_after_layer
    for cand in result.skipped:
        assert cand.skip is Skip.NO_LAYER, cand
        assert cand.layer_op in ("Concat", "MaxPool", "AveragePool"), cand
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused, full_check=True)
    assert (
        sum(n.op_type == "BatchNormalization" for n in fused.graph.node) == spec.bn_not_after_layer
    )
    assert len(fused.graph.node) == len(onnx.load(str(src)).graph.node) - len(result.folded)

    x = np.random.default_rng(0).normal(size=spec.input_shape).astype(np.float32)
    before = run_reference(src, {"input": x})
    after = run_reference(out, {"input": x})
    assert_same_outputs(before, after, 1e-5)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    assert_same_outputs([eager], after, 1e-5)
