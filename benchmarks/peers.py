"""bnfuse side by side with the peers, on the same files, as whole processes.

    python benchmarks/peers.py                       # generated chains (4 sizes + fp16),
                                                     # 8 and 24 MB MobileNetV2s, ResNet-50,
                                                     # graphs of 3,000 and 30,000 nodes
    python benchmarks/peers.py model.onnx other.onnx # your own models too
    python benchmarks/peers.py --runs 5 --sizes 12 50 100 200 400 --out table.md
    python benchmarks/peers.py --sizes --everyday graph_3k --unnamed \
        --tools ort-basic --checkout before=../old --checkout after=.   # two bnfuse trees

Tools, each run as its own process on the same input (runs alternate between
tools, so drift in the machine's load hits them all alike, and each starts
after a ``sync``, so no tool pays for the previous one's writeback):

  bnfuse        bnfuse IN -o OUT --no-verify -q
  onnxoptimizer onnx.load -> onnxoptimizer.optimize(["fuse_bn_into_conv"]) -> onnx.save
  onnxsim       onnxsim IN OUT (its own checks and BN fusion)
  onnxslim      onnxslim IN OUT
  ort-basic     onnxruntime offline optimizer, ORT_ENABLE_BASIC, optimized_model_filepath
  onnxscript    onnxscript.rewriter with its fuse-batchnorm rules
  cp            copying the file, the floor for any tool that reads and writes it

``--unnamed`` runs each model a second time with its node names removed (ONNX
names are optional; onnx.helper writes none). ``--checkout NAME=DIR`` adds the
tool ``bnfuse@NAME``: bnfuse as the checkout in DIR has it (``bnfuse`` itself is
the installed one), to pair two versions in one run.

Per model and tool: BatchNorms left, nodes added (by op type, counted against
the input), the max abs and RMS error of the outputs on 8 random inputs
against the unfused model evaluated in float64 (onnx's reference evaluator:
the exact function), how the folded weights compare with the exact fold, the
median wall time and the peak RSS of the process (GNU time's %M). The ``cp``
row's errors are those of the unfused model itself run in onnxruntime: the
floor that computing in float32 (or float16) sets for every tool.
"""

from __future__ import annotations

import argparse
import compileall
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PY = sys.executable
ONNXOPT = (
    "import sys, onnx, onnxoptimizer; m = onnx.load(sys.argv[1]); "
    "m = onnxoptimizer.optimize(m, ['fuse_bn_into_conv']); onnx.save(m, sys.argv[2])"
)
ORT_BASIC = (
    "import sys, onnxruntime as ort; o = ort.SessionOptions(); "
    "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC; "
    "o.optimized_model_filepath = sys.argv[2]; "
    "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])"
)
ONNXSCRIPT = (
    "import sys, onnx, onnx_ir as ir; from onnxscript import rewriter; "
    "from onnxscript.rewriter.rules.common import _fuse_batchnorm as f; "
    "rules = [f.fuse_batchnorm_into_conv_rule, f.fuse_batchnorm_into_conv_transpose_rule, "
    "f.fuse_batchnorm_into_gemm_rule]; m = ir.load(sys.argv[1]); "
    "m = rewriter.rewrite(m, pattern_rewrite_rules=rules); ir.save(m, sys.argv[2])"
)
# bnfuse from a checkout's folder, ahead of the installed one (sys.path before the finder
# of an editable install), run as the console script runs it.
CHECKOUT = (
    "import sys; sys.path.insert(0, {root!r}); from bnfuse.cli import main; "
    "sys.argv = ['bnfuse', *sys.argv[1:]]; main()"
)
# Console scripts from this interpreter's environment: a bare name could find
# another installation first (a pyenv shim adds a bash script and ~0.1 s).
BIN = Path(sys.executable).parent


def script(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


TOOLS: dict[str, list[str]] = {
    "bnfuse": [script("bnfuse"), "{in}", "-o", "{out}", "--no-verify", "-q", "--force"],
    "onnxoptimizer": [PY, "-c", ONNXOPT, "{in}", "{out}"],
    "onnxsim": [script("onnxsim"), "{in}", "{out}"],
    "onnxslim": [script("onnxslim"), "{in}", "{out}"],
    "ort-basic": [PY, "-c", ORT_BASIC, "{in}", "{out}"],
    "onnxscript": [PY, "-c", ONNXSCRIPT, "{in}", "{out}"],
    "cp": ["cp", "{in}", "{out}"],
}


def chain(width: int, depth: int, dtype: type = np.float32, seed: int = 0) -> onnx.ModelProto:
    """depth x (Conv 3x3 -> BN -> Relu), width channels: about 36*width^2*depth bytes (fp32)."""
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT16 if dtype is np.float16 else TensorProto.FLOAT
    nodes, inits = [], []
    prev, cin = "x", 3
    for i in range(depth):
        w = rng.normal(0, 1 / np.sqrt(9 * cin), (width, cin, 3, 3)).astype(dtype)
        inits.append(numpy_helper.from_array(w, f"c{i}.W"))
        stats = {
            "s": rng.uniform(0.5, 1.5, width),
            "b": rng.normal(0, 0.1, width),
            "m": rng.normal(0, 0.1, width),
            "v": rng.uniform(0.5, 1.5, width),
        }
        inits += [numpy_helper.from_array(a.astype(dtype), f"bn{i}.{k}") for k, a in stats.items()]
        nodes += [
            helper.make_node(
                "Conv", [prev, f"c{i}.W"], [f"h{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            ),
            helper.make_node(
                "BatchNormalization",
                [f"h{i}"] + [f"bn{i}.{k}" for k in "sbmv"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, cin = f"r{i}", width
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", elem, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(prev, elem, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)  # onnxsim insists on output shapes


def sized_chain(mb: int, folder: Path) -> Path:
    """A float32 chain of at least ``mb`` MB, saved in ``folder``."""
    width = 256 if mb <= 30 else 512
    # The first layer reads 3 channels (next to nothing); the rest make the size.
    depth = 1 + math.ceil(mb * 2**20 / (36 * width * width))
    path = folder / f"chain_{width}x{depth}_fp32.onnx"
    onnx.save(chain(width, depth), path)
    return path


def generated(sizes_mb: list[int], folder: Path) -> list[Path]:
    paths = [sized_chain(mb, folder) for mb in sizes_mb]
    path = folder / "chain_512x3_fp16.onnx"
    onnx.save(chain(512, 3, np.float16), path)
    paths.append(path)
    return paths


# Models of everyday shape: networks people ship, exported as torch.onnx.export writes
# them with constant folding off (BatchNorms kept), and graphs of many small nodes.
EVERYDAY = ["mobilenet_v2_0.5", "mobilenet_v2_1.4", "resnet50", "graph_3k", "graph_30k"]


def unnamed(model: Path, folder: Path) -> Path:
    """A copy of ``model`` with every node's name removed (inline weights only)."""
    proto = onnx.load(str(model))
    for node in proto.graph.node:
        node.ClearField("name")
    path = folder / f"{model.stem}-unnamed.onnx"
    onnx.save(proto, path)
    return path


def everyday(names: list[str], folder: Path) -> list[Path]:
    paths = []
    for name in names:
        path = folder / f"{name}.onnx"
        if name.startswith("graph_"):  # Conv -> BN -> Relu, 8 channels: 3 nodes a level
            levels = int(name.removeprefix("graph_").removesuffix("k")) * 1000 // 3
            onnx.save(chain(8, levels), path)
        else:
            path.write_bytes(_network(name))
        paths.append(path)
    return paths


def _network(name: str) -> bytes:
    """A network built in code, random BN statistics, exported to ONNX (opset 17)."""
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from inplace import mobilenet_v2
    from torch_eager import resnet50

    from sample_models.torch_nets import export_onnx, trained

    if name.startswith("mobilenet_v2_"):
        model = mobilenet_v2(width=float(name.removeprefix("mobilenet_v2_")))
    else:
        model = resnet50()
    return export_onnx(trained(model).eval(), (1, 3, 224, 224), 17)


@dataclass
class Run:
    seconds: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    error: str | None = None
    bn_left: int | None = None
    nodes_added: int | None = None
    max_abs: float | None = None
    rms: float | None = None
    weights: str | None = None  # folded weights against the exact fold, rounded once


TIMEOUT = 600.0  # seconds a tool may take on one model (--timeout)


def timed(cmd: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak RSS (KB), exit code, stderr.

    Peak RSS comes from GNU time, which forks the tool from its own small
    process: a child forked from this (large) Python process would report
    this process's pages as its own. A tool still running after TIMEOUT is
    stopped and reported as such.
    """
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss_file:
        wrapped = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *cmd]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
                timeout=TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return TIMEOUT, 0, -1, f"stopped after {TIMEOUT:.0f} s"
        elapsed = time.perf_counter() - start
        text = Path(rss_file.name).read_text().strip().splitlines()
    rss = int(text[-1]) if text and text[-1].isdigit() else 0
    return elapsed, rss, proc.returncode, proc.stderr.decode(errors="replace")


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


SAMPLES = 8  # inputs per model; errors are taken over all of their outputs


def sample_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(SAMPLES):
        feed = {}
        for vi in model.graph.input:
            tt = vi.type.tensor_type
            shape = [d.dim_value or 1 for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def exact_outputs(src: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The unfused model evaluated in float64 (onnx's reference evaluator): the exact function.

    Every tool's output, and the unfused model's own float32 (or float16) run
    in onnxruntime, is measured against this, so the error of the fold shows
    next to the error floor of computing in the model's dtype at all.
    """
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(src))
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for t in model.graph.initializer:
        if t.data_type in floats:
            wide = numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(numpy_helper.from_array(wide, t.name))
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.type.tensor_type.elem_type in floats:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    evaluator = ReferenceEvaluator(model)
    return [
        [
            np.asarray(y)
            for y in evaluator.run(None, {k: v.astype(np.float64) for k, v in f.items()})
        ]
        for f in feeds
    ]


def weight_check(src: Path, out: Path) -> str:
    """How the tool's Conv weights compare with the exact float64 fold rounded once.

    The generated chains have Conv i followed by BN i; the output's Convs are
    paired with the input's in order. A weight that is not an initializer is
    computed at run time (no fold was made).
    """
    a, b = onnx.load(str(src)), onnx.load(str(out))
    init_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    init_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    convs_a = [n for n in a.graph.node if n.op_type == "Conv"]
    convs_b = [n for n in b.graph.node if n.op_type == "Conv"]
    bns = [n for n in a.graph.node if n.op_type == "BatchNormalization"]
    if len(convs_a) != len(convs_b) or len(bns) != len(convs_a):
        return "n/a"
    worst, wrong, total = 0.0, 0, 0
    for conv_a, conv_b, bn in zip(convs_a, convs_b, bns, strict=True):
        if conv_b.input[1] not in init_b:
            return "computed at run time"
        w = init_a[conv_a.input[1]]
        gamma, _, _, var = (init_a[name].astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        exact = (
            w.astype(np.float64)
            * (gamma / np.sqrt(var + np.float64(np.float32(eps))))[:, None, None, None]
        )
        got = init_b[conv_b.input[1]]
        want = exact.astype(w.dtype)  # numpy rounds float64 -> fp16/fp32 once, to nearest even
        info = np.finfo(w.dtype)
        binade = np.floor(np.log2(np.maximum(np.abs(exact), float(info.smallest_normal))))
        ulp = 2.0 ** (binade - info.nmant)  # the ulp of the exact value's binade
        diff = np.abs(got.astype(np.float64) - exact) / ulp
        worst = max(worst, float(diff.max()))
        wrong += int(np.count_nonzero(got != want))
        total += got.size
    return f"max {worst:.2f} ulp, {wrong / total:.1%} not correctly rounded"


def evaluate(
    src: Path,
    out: Path,
    run: Run,
    feeds: list[dict[str, np.ndarray]],
    exact: list[list[np.ndarray]],
) -> None:
    a = onnx.load(str(src), load_external_data=False)
    b = onnx.load(str(out), load_external_data=False)
    before, after = (
        Counter(n.op_type for n in a.graph.node),
        Counter(n.op_type for n in b.graph.node),
    )
    run.bn_left = after["BatchNormalization"]
    run.nodes_added = sum(max(0, after[op] - before[op]) for op in after)
    diffs = [
        (y.astype(np.float64) - x).ravel()
        for feed, want in zip(feeds, exact, strict=True)
        for x, y in zip(want, outputs(out, feed), strict=True)
    ]
    errors = np.abs(np.concatenate(diffs))
    run.max_abs = float(errors.max())
    run.rms = float(np.sqrt(np.mean(errors**2)))
    if out.read_bytes() != src.read_bytes():
        run.weights = weight_check(src, out)


def bench(
    models: list[Path], tools: list[str], runs: int, scratch: Path
) -> dict[tuple[str, str], Run]:
    results: dict[tuple[str, str], Run] = {}
    for model in models:
        feeds = sample_feeds(onnx.load(str(model), load_external_data=False))
        exact = exact_outputs(model, feeds)
        for i in range(runs):
            for tool in tools:
                run = results.setdefault((model.name, tool), Run())
                if run.error:
                    continue
                out = scratch / f"{tool}_{model.name}"
                for leftover in (out, out.with_name(out.name + ".data")):
                    leftover.unlink(missing_ok=True)
                cmd = [
                    c.replace("{in}", str(model)).replace("{out}", str(out)) for c in TOOLS[tool]
                ]
                os.sync()  # the previous tool's writeback must not land on this one's time
                elapsed, rss, code, stderr = timed(cmd)
                if code != 0 or not out.exists():
                    run.error = (stderr.strip().splitlines() or [f"exit {code}"])[-1][:120]
                    continue
                run.seconds.append(elapsed)
                run.rss_kb.append(rss)
                if i == 0:
                    try:
                        evaluate(model, out, run, feeds, exact)
                    except Exception as exc:  # a peer's output that does not load
                        run.error = f"output does not run: {type(exc).__name__}"
        print(f"done {model.name}", file=sys.stderr)
    return results


def table(models: list[Path], tools: list[str], results: dict[tuple[str, str], Run]) -> str:
    lines = [
        "| model | size | tool | BN left | nodes added | max abs err | RMS err | folded weights | median s | x cp | peak RSS MB | RSS / size |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for model in models:
        size_mb = model.stat().st_size / 2**20
        cp = results.get((model.name, "cp"))
        cp_s = statistics.median(cp.seconds) if cp and cp.seconds else None
        for tool in tools:
            r = results[(model.name, tool)]
            if r.error:
                lines.append(
                    f"| {model.name} | {size_mb:.0f} MB | {tool} | failed: {r.error} | | | | | | | |"
                )
                continue
            med = statistics.median(r.seconds)
            rss = max(r.rss_kb) / 1024
            err = "-" if r.max_abs is None else f"{r.max_abs:.3g}"
            rms = "-" if r.rms is None else f"{r.rms:.3g}"
            ratio = f"{med / cp_s:.1f}" if cp_s else "-"
            lines.append(
                f"| {model.name} | {size_mb:.0f} MB | {tool} | {'-' if r.bn_left is None else r.bn_left} "
                f"| {'-' if r.nodes_added is None else r.nodes_added} | {err} | {rms} | {r.weights or '-'} | {med:.2f} | {ratio} "
                f"| {rss:.0f} | {rss / size_mb:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    global TIMEOUT
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", type=Path, help="extra models to run on")
    parser.add_argument(
        "--sizes", nargs="*", type=int, default=[12, 50, 100, 200], help="generated sizes, MB"
    )
    parser.add_argument(
        "--everyday", nargs="*", default=EVERYDAY, choices=EVERYDAY,
        help="networks and many-node graphs built here (needs torch)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per tool run")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS))
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--unnamed", action="store_true", help="each model without node names too")
    parser.add_argument(
        "--checkout", action="append", default=[], metavar="NAME=DIR",
        help="also run the bnfuse of the checkout in DIR, as tool bnfuse@NAME (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    TIMEOUT = args.timeout
    tools = [t for t in args.tools if t == "cp" or shutil.which(TOOLS[t][0]) or TOOLS[t][0] == PY]
    for item in args.checkout:
        name, _, folder = item.partition("=")
        root = Path(folder).resolve()
        compileall.compile_dir(root / "bnfuse", quiet=1)
        TOOLS[f"bnfuse@{name}"] = [PY, "-c", CHECKOUT.format(root=str(root)), *TOOLS["bnfuse"][1:]]
        tools.insert(0, f"bnfuse@{name}")
    # pip compiles an installed package's modules to bytecode; an editable checkout
    # under PYTHONDONTWRITEBYTECODE=1 would compile bnfuse's afresh on every run.
    import bnfuse

    compileall.compile_dir(Path(bnfuse.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        models = generated(args.sizes, scratch) + everyday(args.everyday, scratch)
        models += list(args.models)
        if args.unnamed:
            models = [m for model in models for m in (model, unnamed(model, scratch))]
        results = bench(models, tools, args.runs, scratch)
        text = table(models, tools, results)
    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.runs} runs per tool and model, alternating; median wall time.\n"
    )
    print(header)
    print(text)
    if args.out:
        args.out.write_text(header + "\n" + text + "\n")


if __name__ == "__main__":
    main()
