"""A model with more than 2 GB of weights in external data, fused with bounded memory.

    python benchmarks/big_external.py                 # 2.2 GB, in a temporary folder
    python benchmarks/big_external.py --gb 4 --keep DIR

Writes a chain of Conv 3x3 (1024 channels, 37.7 MB of float32 weights each)
-> BatchNormalization -> Relu whose weights live in ``model.onnx.data``, one
layer at a time so the generator itself stays small. Then runs, as whole
processes under GNU time: ``cp`` of the data file, and
``bnfuse model.onnx -o fused.onnx --no-verify``. Prints wall time and peak
RSS of each, and checks the result: no BatchNormalization left, and the
folded weights of three layers equal to the exact float64 fold rounded once
(read straight from both data files, memory-mapped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

WIDTH = 1024
LAYER_BYTES = WIDTH * WIDTH * 9 * 4


def external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def build(folder: Path, depth: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data_name = "model.onnx.data"
    nodes, inits = [], []
    prev, cin, offset = "x", WIDTH, 0
    with open(folder / data_name, "wb") as data:
        for i in range(depth):
            w = rng.standard_normal((WIDTH, cin, 3, 3), dtype=np.float32)
            w *= np.float32(1 / np.sqrt(9 * cin))
            data.write(w.tobytes())
            inits.append(external(f"c{i}.W", list(w.shape), data_name, offset, w.nbytes))
            offset += w.nbytes
            stats = {
                "s": rng.uniform(0.5, 1.5, WIDTH),
                "b": rng.normal(0, 0.1, WIDTH),
                "m": rng.normal(0, 0.1, WIDTH),
                "v": rng.uniform(0.5, 1.5, WIDTH),
            }
            inits += [
                onnx.numpy_helper.from_array(a.astype(np.float32), f"bn{i}.{k}")
                for k, a in stats.items()
            ]
            nodes += [
                helper.make_node("Conv", [prev, f"c{i}.W"], [f"h{i}"], name=f"conv{i}", pads=[1] * 4),
                helper.make_node(
                    "BatchNormalization", [f"h{i}", *(f"bn{i}.{k}" for k in "sbmv")], [f"n{i}"],
                    name=f"bn{i}",
                ),
                helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
            ]  # fmt: skip
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "big_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH, 8, 8])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB, of ``cmd`` run under GNU time (peers.timed)."""
    elapsed, peak_kb, code, stderr = peers.timed(cmd)
    if code != 0:
        raise SystemExit(f"{cmd[0]} failed ({code}): {stderr.strip()[-500:]}")
    return elapsed, peak_kb / 1024


def weights(path: Path) -> dict[str, np.ndarray]:
    """Every initializer as an array; external ones memory-mapped, not read."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = np.memmap(
                path.parent / info["location"], np.float32, "r", int(info.get("offset", 0)),
                tuple(t.dims),
            )  # fmt: skip
        else:
            out[t.name] = onnx.numpy_helper.to_array(t)
    return out


def check(src: Path, fused: Path, depth: int) -> None:
    model = onnx.load(str(fused), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops, ops
    before, after = weights(src), weights(fused)
    for i in sorted({0, depth // 2, depth - 1}):
        s, b, m, v = (before[f"bn{i}.{k}"].astype(np.float64) for k in "sbmv")
        scale = s / np.sqrt(v + 1e-5)
        exact = (before[f"c{i}.W"].astype(np.float64) * scale[:, None, None, None]).astype(
            np.float32
        )
        assert np.array_equal(np.asarray(after[f"c{i}.W"]), exact), f"layer {i}"
        bias = (b - scale * m).astype(np.float32)
        fused_bias = after[f"conv{i}.bias_bnfused"]  # the conv had no bias: a new one
        assert np.array_equal(fused_bias, bias), f"bias {i}"
        print(f"layer {i}: folded weight and bias equal the exact fold rounded once")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=2.2, help="weights, in GB (10^9 bytes)")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep the files")
    args = parser.parse_args()
    depth = max(1, round(args.gb * 1e9 / LAYER_BYTES))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        src = build(folder, depth)
        data_gb = (folder / "model.onnx.data").stat().st_size / 1e9
        print(f"{depth} layers, {data_gb:.2f} GB of weights in external data")
        cp_s, cp_mb = timed(["cp", str(folder / "model.onnx.data"), str(folder / "copy.data")])
        (folder / "copy.data").unlink()
        bnfuse = [sys.executable, "-m", "bnfuse", str(src), "-o", str(folder / "fused.onnx")]
        fuse_s, fuse_mb = timed([*bnfuse, "--no-verify", "-q", "--force"])
        print(f"cp      {cp_s:6.2f} s  peak RSS {cp_mb:7.0f} MB")
        print(f"bnfuse  {fuse_s:6.2f} s  peak RSS {fuse_mb:7.0f} MB  ({fuse_s / cp_s:.1f}x cp)")
        check(src, folder / "fused.onnx", depth)


if __name__ == "__main__":
    main()
