"""Build the sample ONNX models, write their index, and optionally fuse and check them.

    python sample_models/build.py            # (re)write sample_models/*.onnx and README.md
    python sample_models/build.py --check    # also fuse each and print BN counts and errors

Every file is small (under 2 MB) and made by the builders in models.py and
torch_nets.py; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sample_models import models as m  # noqa: E402

Builder = Callable[[], onnx.ModelProto]

SAMPLES: list[tuple[str, str, Builder]] = [
    ("conv2d_bn", "Conv 2-D with bias -> BN -> Relu (fp32, opset 15)", lambda: m.layer_bn("Conv")),
    (
        "conv1d_nobias_bn",
        "Conv 1-D without bias -> BN",
        lambda: m.layer_bn("Conv", dims=1, bias=False),
    ),
    ("conv3d_bn", "Conv 3-D -> BN", lambda: m.layer_bn("Conv", dims=3)),
    (
        "conv_depthwise_bn",
        "depthwise Conv (group = input channels) -> BN",
        lambda: m.layer_bn("Conv", groups=4),
    ),
    (
        "conv_pads_strides_dilations_bn",
        "Conv with asymmetric pads, strides and dilations -> BN",
        lambda: m.layer_bn(
            "Conv", conv_attrs={"pads": [1, 2, 0, 1], "strides": [2, 1], "dilations": [1, 2]}
        ),
    ),
    (
        "conv_auto_pad_same_bn",
        "Conv with auto_pad=SAME_UPPER, stride 2 -> BN",
        lambda: m.layer_bn("Conv", conv_attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ),
    (
        "convtranspose_g4_nobias_bn",
        "ConvTranspose with 4 groups, no bias -> BN (peers scale the wrong axis here)",
        lambda: m.layer_bn("ConvTranspose", groups=4, bias=False, conv_attrs={"strides": [2, 2]}),
    ),
    ("convtranspose_bn", "ConvTranspose with bias -> BN", lambda: m.layer_bn("ConvTranspose")),
    (
        "gemm_transb_alpha_beta_bn",
        "Gemm transB=1, alpha=0.7, beta=1.3, C [N] -> BN",
        lambda: m.layer_bn("Gemm", trans_b=1, alpha=0.7, beta=1.3),
    ),
    (
        "gemm_transa_noC_bn",
        "Gemm transA=1 without C -> BN (a C is added)",
        lambda: m.layer_bn("Gemm", trans_a=1, bias=False),
    ),
    (
        "matmul_bn",
        "MatMul with a constant [K, N] weight -> BN (an Add is added)",
        lambda: m.layer_bn("MatMul"),
    ),
    (
        "matmul_add_bn",
        "MatMul -> Add(constant bias) -> BN",
        lambda: m.layer_bn("MatMul", add_bias="right"),
    ),
    (
        "conv_bn_fp16",
        "fp16 Conv -> fp16 BN (folded in float64, rounded once)",
        lambda: m.layer_bn("Conv", dtype=np.float16),
    ),
    ("conv_bn_fp64", "fp64 Conv -> fp64 BN", lambda: m.layer_bn("Conv", dtype=np.float64)),
    (
        "conv_fp16_bn_fp32_params",
        "fp16 Conv -> BN with fp32 parameters (opset 15 mixed types)",
        lambda: m.layer_bn("Conv", dtype=np.float16, bn_dtype=np.float32),
    ),
    ("conv_bn_opset9", "Conv -> BatchNormalization-9 (IR 4)", lambda: m.layer_bn("Conv", opset=9)),
    (
        "conv_bn_opset14",
        "Conv -> BatchNormalization-14 (IR 7)",
        lambda: m.layer_bn("Conv", opset=14),
    ),
    (
        "conv_bn_ir3_opset8",
        "IR 3 / opset 8: BatchNormalization-7, initializers listed as inputs",
        lambda: m.layer_bn("Conv", opset=8, initializers_as_inputs=True),
    ),
    (
        "constant_node_params",
        "weight, bias and BN parameters given as Constant nodes",
        lambda: m.with_constant_nodes(
            m.layer_bn("Conv"), {"layer.W", "layer.B", "bn.scale", "bn.bias", "bn.mean", "bn.var"}
        ),
    ),
    (
        "identity_param",
        "BN variance read through Identity (as torch's exporter writes it)",
        lambda: m.with_identity_alias(m.layer_bn("Conv")),
    ),
    ("if_subgraphs", "If with Conv -> BN in each branch", m.if_branches),
    ("loop_subgraph", "Loop whose body runs Conv -> BN", m.loop_body),
    (
        "shared_weight",
        "one weight read by two convs, one followed by BN (copied, not rewritten)",
        m.shared_weight,
    ),
    ("skip_training_mode", "SKIP: BN with training_mode=1", m.training_mode_bn),
    (
        "skip_two_consumers",
        "SKIP: the conv output is read by the BN and a Sigmoid",
        lambda: m.with_extra_output(
            m.layer_bn("Conv"),
            onnx.helper.make_node("Sigmoid", ["h"], ["side"], name="side"),
            "side",
        ),
    ),
    (
        "skip_graph_output",
        "SKIP: the conv output is also a graph output",
        lambda: m.with_extra_output(m.layer_bn("Conv"), None, "h"),
    ),
    (
        "skip_params_as_inputs",
        "SKIP: BN mean and var are graph inputs",
        lambda: m.with_params_as_inputs(
            m.layer_bn("Conv"), {"bn.mean", "bn.var"}, keep_initializer=False
        ),
    ),
    (
        "skip_overridable_initializer",
        "SKIP: BN scale is an initializer also listed as a graph input (IR 8)",
        lambda: m.with_params_as_inputs(m.layer_bn("Conv"), {"bn.scale"}, keep_initializer=True),
    ),
    ("skip_fp16_overflow", "SKIP: the fp16 fold would pass 65504", m.fp16_overflow),
    ("skip_bn_after_concat", "SKIP: BN after Concat (DenseNet)", m.bn_after_concat),
    (
        "skip_matmul_3d",
        "SKIP: MatMul on a 3-D input (BN axis 1 is not the MatMul's channel)",
        m.matmul_3d,
    ),
    (
        "bn_then_conv",
        "BN -> Conv with no padding: folds into the following Conv",
        lambda: m.bn_then_conv(pads=[0, 0, 0, 0]),
    ),
    (
        "bn_then_depthwise_conv_valid",
        "BN -> depthwise Conv, auto_pad=VALID: folds forward",
        lambda: m.bn_then_conv(groups=4, auto_pad="VALID"),
    ),
    (
        "skip_bn_then_padded_conv",
        "SKIP: BN -> Conv with pads=1 (padding would see the BN's shift)",
        lambda: m.bn_then_conv(pads=[1, 1, 1, 1]),
    ),
    ("conv_mul_add", "Conv -> Mul([C,1,1]) -> Add([1,C,1,1]) constants", m.layer_scale_shift),
    (
        "convtranspose_add_mul",
        "ConvTranspose -> Add -> Mul constants",
        lambda: m.layer_scale_shift("ConvTranspose", mul_first=False),
    ),
    (
        "gemm_mul_add",
        "Gemm -> Mul([1,N]) -> Add([N]) constants",
        lambda: m.layer_scale_shift("Gemm", mul_shape=(1, 8), add_shape=(8,)),
    ),
    (
        "conv_mul_scalar",
        "Conv -> Mul(scalar)",
        lambda: m.layer_scale_shift(mul_shape=(), add_shape=None),
    ),
    (
        "skip_conv_mul_c_on_nchw",
        "SKIP: Conv -> Mul([C]) on NCHW: broadcasts along the last axis",
        lambda: m.layer_scale_shift(mul_shape=(8,), add_shape=None),
    ),
    (
        "skip_conv_mul_runtime",
        "SKIP: Conv -> Mul by a graph input (not a constant)",
        lambda: m.layer_scale_shift(mul_shape=(1, 8, 1, 1), add_shape=None, mul_runtime=True),
    ),
    (
        "layernorm_untouched",
        "Conv -> LayerNormalization: not a BatchNorm, left alone",
        lambda: m.per_sample_norm("LayerNormalization"),
    ),
    (
        "groupnorm_untouched",
        "Conv -> GroupNormalization: not a BatchNorm, left alone",
        lambda: m.per_sample_norm("GroupNormalization"),
    ),
]

EXTERNAL = (
    "external_data",
    "Conv 2-D -> BN with its weights in external data (external_data/weights.bin)",
)

TORCH_DESCRIPTIONS = {
    "resnet": "ResNet-shaped network (BasicBlocks, a Bottleneck, downsampling)",
    "mobilenet": "MobileNetV2-shaped network (depthwise inverted residuals)",
    "densenet": "DenseNet-shaped network (7 BNs after Concat/pooling stay)",
    "dcgan_generator": "DCGAN generator (ConvTranspose + BN, one grouped)",
    "bn1d_mlp": "MLP with Linear -> BatchNorm1d (exported as Gemm)",
    "conv1d_audio": "audio front end: strided Conv1d -> BatchNorm1d stack",
}
TORCH_OPSET = 17


def build_all(out: Path) -> list[tuple[str, str]]:
    """Write every sample under ``out``; returns (file, description) rows."""
    rows = []
    for name, description, builder in SAMPLES:
        model = builder()
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, out / f"{name}.onnx")
        rows.append((f"{name}.onnx", description))
    ext = out / EXTERNAL[0]
    ext.mkdir(exist_ok=True)
    (ext / "weights.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(
        m.layer_bn("Conv", cin=16, cout=32),
        str(ext / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    rows.append((f"{EXTERNAL[0]}/model.onnx", EXTERNAL[1]))
    try:
        from sample_models.torch_nets import NETS, build, export_onnx, export_onnx_dynamo
    except ImportError:
        print("torch is not installed: the exported networks were not rebuilt", file=sys.stderr)
        return rows
    dynamo = out / "torch_resnet_dynamo_unoptimized.onnx"
    resnet = next(s for s in NETS if s.name == "resnet")
    dynamo.write_bytes(export_onnx_dynamo(build(resnet), resnet.input_shape))
    rows.append(
        (
            dynamo.name,
            "ResNet-shaped, torch's torch.export-based exporter with optimize=False: "
            "zero conv biases as Shape -> Expand -> CastLike sub-expressions",
        )
    )
    for spec in NETS:
        path = out / f"torch_{spec.name}_opset{TORCH_OPSET}.onnx"
        path.write_bytes(export_onnx(build(spec), spec.input_shape, TORCH_OPSET))
        rows.append((path.name, f"{TORCH_DESCRIPTIONS[spec.name]}, torch.onnx opset {TORCH_OPSET}"))
    return rows


def write_index(out: Path, rows: list[tuple[str, str]]) -> None:
    lines = [
        "# Sample models",
        "",
        "Made by `python sample_models/build.py` (builders in `models.py` and `torch_nets.py`).",
        "Files named `skip_*` hold a BatchNorm that must not be folded; bnfuse says why.",
        "",
        "| file | what it exercises |",
        "| --- | --- |",
        *[f"| `{name}` | {desc} |" for name, desc in rows],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def check(out: Path, rows: list[tuple[str, str]]) -> None:
    """Fuse every sample and print the counts and the max error against the unfused model."""
    import bnfuse
    from tests.helpers import output_range, run_reference

    print(f"{'file':45} {'cand':>4} {'fold':>4} {'skip':>4} {'max abs err':>11} {'err/range':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, _ in rows:
            src = out / name
            dst = Path(tmp) / name.replace("/", "_")
            result = bnfuse.fuse(src, dst)
            feeds = _feeds(onnx.load(str(src), load_external_data=False))
            before, after = run_reference(src, feeds), run_reference(dst, feeds)
            err = max(_max_error(a, b) for a, b in zip(before, after, strict=True))
            rel = err / max(output_range(before), 1e-30)
            print(
                f"{name:45} {len(result.candidates):3} {len(result.folded):4} "
                f"{len(result.skipped):4} {err:11.3g} {rel:9.2g}"
            )


def _max_error(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| over finite elements; a differing inf/NaN pattern counts as inf."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_nonfinite = np.array_equal(a64[~finite], b64[~finite], equal_nan=True)
    if not same_nonfinite:
        return float("inf")
    return float(np.max(np.abs(a64[finite] - b64[finite]), initial=0.0))


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = m.random_feeds(model)
    if "bn.var" in feeds:  # statistics fed at run time must be valid variances
        feeds["bn.var"] = np.abs(feeds["bn.var"]) + 0.1
    for vi in model.graph.input:
        if vi.name == "cond":
            feeds["cond"] = np.array(True)
        if vi.name == "trips":
            feeds["trips"] = np.array(2, dtype=np.int64)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="fuse every sample and print counts and errors"
    )
    args = parser.parse_args()
    rows = build_all(HERE)
    write_index(HERE, rows)
    print(f"wrote {len(rows)} models and README.md in {HERE}")
    if args.check:
        check(HERE, rows)


if __name__ == "__main__":
    main()
