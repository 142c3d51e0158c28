"""Beyond BN-after-a-layer: BN before a Conv, constant Mul/Add chains, constant sub-expressions.

Each pattern is checked against the unfused model in onnxruntime (optimisations
off), and each has a negative twin that must be skipped with its reason.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfuse import Skip
from sample_models.models import bn_then_conv, layer_bn, layer_scale_shift, random_feeds
from tests.helpers import assert_same_outputs, fuse_proto, op_types, run_reference


def fuse_and_compare(
    model: onnx.ModelProto, tmp_path: Path, rel: float = 1e-5
) -> tuple[onnx.ModelProto, Any]:
    fused, result, _ = fuse_proto(model, tmp_path)
    onnx.checker.check_model(fused, full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(model, feeds), run_reference(fused, feeds), rel)
    return fused, result


@pytest.mark.parametrize(
    ("groups", "attrs"),
    [
        (1, {"pads": [0, 0, 0, 0]}),
        (2, {}),
        (4, {"auto_pad": "VALID"}),
        (1, {"auto_pad": "SAME_UPPER", "kernel": 1}),
    ],
    ids=["pads0", "g2-default-pads", "depthwise-valid", "same-1x1"],
)
def test_bn_folds_into_following_unpadded_conv(
    groups: int, attrs: dict[str, Any], tmp_path: Path
) -> None:
    model = bn_then_conv(groups=groups, **attrs)
    fused, result = fuse_and_compare(model, tmp_path)
    (cand,) = result.candidates
    assert (
        cand.fusable and cand.into == "following" and cand.pattern == "BatchNormalization -> Conv"
    )
    assert op_types(fused) == ["Conv", "Relu"]
    conv = fused.graph.node[0]
    assert conv.input[0] == "x"  # the conv now reads the BN's input


@pytest.mark.parametrize(
    "attrs",
    [{"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 0, 0]}, {"auto_pad": "SAME_UPPER"}],
    ids=["pads1", "one-side", "same-3x3"],
)
def test_bn_before_padded_conv_is_skipped(attrs: dict[str, Any], tmp_path: Path) -> None:
    model = bn_then_conv(**attrs)
    fused, result = fuse_and_compare(model, tmp_path, rel=0.0)
    (cand,) = result.candidates
    assert not cand.fusable
    assert "padding would read 0 where the BatchNorm's shift should be" in (cand.reason or "")
    assert op_types(fused) == ["BatchNormalization", "Conv", "Relu"]


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
@pytest.mark.parametrize("mul_first", [True, False], ids=["mul-add", "add-mul"])
def test_mul_add_chain_folds(op: str, mul_first: bool, tmp_path: Path) -> None:
    shapes = {"mul_shape": (1, 8), "add_shape": (8,)} if op == "Gemm" else {}
    model = layer_scale_shift(op, mul_first=mul_first, **shapes)
    fused, result = fuse_and_compare(model, tmp_path)
    assert sorted(c.op for c in result.folded) == ["Add", "Mul"]
    assert not result.skipped
    layer = "Conv" if op != "Gemm" else "Gemm"
    assert op_types(fused) == [op if op != "Gemm" else layer, "Relu"]


@pytest.mark.parametrize(
    ("mul_shape", "add_shape"),
    [((), None), (None, ()), ((8, 1, 1), None), (None, (1, 8, 1, 1)), ((1, 1, 1), (1, 1))],
    ids=["mul-scalar", "add-scalar", "mul-C11", "add-1C11", "broadcast-ones"],
)
def test_single_mul_or_add_folds(
    mul_shape: tuple[int, ...] | None, add_shape: tuple[int, ...] | None, tmp_path: Path
) -> None:
    model = layer_scale_shift("Conv", mul_shape=mul_shape, add_shape=add_shape)
    fused, result = fuse_and_compare(model, tmp_path)
    assert [c.fusable for c in result.candidates] == [True] * len(result.candidates)
    assert op_types(fused) == ["Conv", "Relu"]


def test_c_shaped_mul_on_nchw_is_skipped(tmp_path: Path) -> None:
    """[8] on an [N, 8, 8, 8] output broadcasts along the last axis: valid ONNX, not per channel."""
    model = layer_scale_shift("Conv", mul_shape=(8,), add_shape=None)
    fused, result = fuse_and_compare(model, tmp_path, rel=0.0)
    (cand,) = result.candidates
    assert cand.skip is Skip.SHAPE_MISMATCH
    assert "broadcasts along axis 3, not only along the channel axis 1" in (cand.reason or "")
    assert op_types(fused) == ["Conv", "Mul", "Relu"]


def test_runtime_mul_is_skipped(tmp_path: Path) -> None:
    model = layer_scale_shift("Conv", mul_shape=(1, 8, 1, 1), add_shape=None, mul_runtime=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    fused, result, _ = fuse_proto(model, tmp_path)
    (cand,) = result.candidates
    assert cand.skip is Skip.NOT_CONSTANT and "computed at run time" in (cand.reason or "")
    assert op_types(fused) == ["Conv", "Mul", "Relu"]


def test_residual_add_is_not_a_candidate(tmp_path: Path) -> None:
    model = layer_bn("Conv", cin=8, conv_attrs={"pads": [1, 1, 1, 1]})
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.input[0] = "res"
    model.graph.node.insert(
        len(model.graph.node) - 1, helper.make_node("Add", ["z", "x"], ["res"], name="residual")
    )
    model = onnx.shape_inference.infer_shapes(model)
    _, result = fuse_and_compare(model, tmp_path)
    assert [(c.op, c.fusable) for c in result.candidates] == [("BatchNormalization", True)]


def test_conv_bn_then_mul_folds_both(tmp_path: Path) -> None:
    """Once the BN is gone the Mul follows the Conv directly: matching repeats."""
    model = layer_bn("Conv", spatial=(10, 10))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.input[0] = "scaled"
    model.graph.initializer.append(
        numpy_helper.from_array(np.full((8, 1, 1), 0.5, np.float32), "half")
    )
    model.graph.node.insert(
        len(model.graph.node) - 1, helper.make_node("Mul", ["z", "half"], ["scaled"], name="mul")
    )
    model = onnx.shape_inference.infer_shapes(model)
    fused, result = fuse_and_compare(model, tmp_path)
    assert sorted(c.op for c in result.folded) == ["BatchNormalization", "Mul"]
    assert op_types(fused) == ["Conv", "Relu"]


def test_dynamo_export_constant_bias_subexpression(tmp_path: Path) -> None:
    """torch's exporter with optimize=False writes the zero conv bias as Shape -> Expand -> CastLike."""
    torch = pytest.importorskip("torch")
    from sample_models.torch_nets import NETS, build

    spec = next(s for s in NETS if s.name == "resnet")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            build(spec),
            (torch.randn(*spec.input_shape),),
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    model = program.model_proto
    before = op_types(model)
    assert {"Shape", "Expand", "CastLike"} <= set(before)
    fused, result, _ = fuse_proto(model, tmp_path)
    assert len(result.folded) == 10 and not result.skipped
    after = op_types(fused)
    assert not {"BatchNormalization", "Shape", "Expand", "CastLike"} & set(after)
    assert after.count("Conv") == before.count("Conv")
    conv_weights = {n.input[1] for n in fused.graph.node if n.op_type == "Conv"}
    assert not any(w.endswith("_bnfused") for w in conv_weights)  # rewritten in place, names kept
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(0).normal(size=spec.input_shape).astype(np.float32)
    name = model.graph.input[0].name
    assert_same_outputs(run_reference(model, {name: x}), run_reference(fused, {name: x}), 1e-5)
