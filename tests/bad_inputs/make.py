"""Write the bad-input corpus: each file is made here, from code (no hand-edited binaries).

    python tests/bad_inputs/make.py OUTDIR

Each case is (file name, what bnfuse must do): "error" (one line, exit 2,
nothing written) or "skip" (the model is valid; the pair is skipped with a
reason, exit 0). tests/test_bad_inputs.py runs every case through the CLI.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sample_models.models import layer_bn, with_initializer


def _valid() -> onnx.ModelProto:
    return layer_bn("Conv")


def truncated(path: Path) -> None:
    data = _valid().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def empty(path: Path) -> None:
    path.write_bytes(b"")


def json_named_onnx(path: Path) -> None:
    path.write_text(json.dumps({"ir_version": 8, "graph": {"node": [{"op_type": "Conv"}]}}))


def other_message(path: Path) -> None:
    """A valid protobuf, but a TensorProto, not a ModelProto."""
    path.write_bytes(numpy_helper.from_array(np.ones((4, 4), np.float32), "t").SerializeToString())


def cycle(path: Path) -> None:
    m = _valid()
    relu = m.graph.node[-1]
    conv = m.graph.node[0]
    conv.input[0] = "y"  # the conv reads the relu's output: a cycle
    del relu  # (the graph input x is now unused)
    path.write_bytes(m.SerializeToString())


def dangling_input(path: Path) -> None:
    m = _valid()
    m.graph.node[0].input[1] = "no_such_weight"
    path.write_bytes(m.SerializeToString())


def duplicate_outputs(path: Path) -> None:
    m = _valid()
    m.graph.node[0].output[0] = "z"  # Conv and BN both produce 'z'
    m.graph.node[1].input[0] = "z"
    path.write_bytes(m.SerializeToString())


def nan_params(path: Path) -> None:
    var = np.array([1, np.nan, 1, 1, 1, np.inf, 1, 1], np.float32)
    onnx.save(with_initializer(_valid(), "bn.var", var), path)


def _epsilon(path: Path, value: float) -> None:
    m = _valid()
    (bn,) = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    del bn.attribute[:]
    bn.attribute.append(onnx.helper.make_attribute("epsilon", value))
    onnx.save(m, path)


def nan_epsilon(path: Path) -> None:
    _epsilon(path, float("nan"))


def inf_epsilon(path: Path) -> None:
    _epsilon(path, float("inf"))


def negative_variance(path: Path) -> None:
    var = np.array([1, 1, -2, 1, 1, 1, 1, 1], np.float32)
    onnx.save(with_initializer(_valid(), "bn.var", var), path)


def channel_mismatch(path: Path) -> None:
    m = _valid()
    rng = np.random.default_rng(1)
    for name in ("bn.scale", "bn.bias", "bn.mean", "bn.var"):
        m = with_initializer(m, name, rng.uniform(0.5, 1.5, 6).astype(np.float32))
    path.write_bytes(m.SerializeToString())


def missing_external_data(path: Path) -> None:
    onnx.save(
        _valid(), path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    (path.parent / f"{path.name}.data").unlink()


def external_data_outside(path: Path) -> None:
    m = _valid()
    onnx.save(m, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save(m, path)
    (path.parent / f"{path.name}.data").unlink()


def _external_with(path: Path, key: str, value: str, new_key: str | None = None) -> None:
    """A model with external data whose first tensor's ``key`` entry is rewritten."""
    onnx.save(
        _valid(), path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    m = onnx.load(str(path), load_external_data=False)
    for entry in m.graph.initializer[0].external_data:
        if entry.key == key:
            entry.key, entry.value = new_key or key, value
    onnx.save(m, path)


def external_key_mangled(path: Path) -> None:
    """'offset' spelled wrong: read naively, the weight would come from offset 0."""
    onnx.save(
        _valid(), path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "offset" and entry.value != "0":
                entry.key = "ofset"
    onnx.save(m, path)


def external_location_nul(path: Path) -> None:
    _external_with(path, "location", f"{path.name}.data\0.txt")


def unknown_opset(path: Path) -> None:
    m = _valid()
    m.opset_import[0].version = 999
    path.write_bytes(m.SerializeToString())


def absurd_dims(path: Path) -> None:
    m = _valid()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 10**12
    del m.graph.value_info[:]
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    path.write_bytes(m.SerializeToString())


def zero_channel_conv(path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.zeros((0, 4, 3, 3), np.float32), "W")]
    inits += [numpy_helper.from_array(np.zeros(0, np.float32), n) for n in ("s", "b", "m", "v")]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
        helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 0, 3, 3])], inits,
    )  # fmt: skip
    del rng
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8), path
    )


def truncated_archive(path: Path) -> None:
    """A .pt2-looking zip cut in half."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/data/weights/weight_0", bytes(4096))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unknown_zip(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("thing/readme.txt", "not a model")


def text_named_pt(path: Path) -> None:
    path.write_text("def forward(x): return x\n")


def _replace(m: onnx.ModelProto, name: str, new: onnx.TensorProto | None) -> onnx.ModelProto:
    """``m`` with initializer ``name`` removed, and ``new`` appended if given."""
    old = next(t for t in m.graph.initializer if t.name == name)
    m.graph.initializer.remove(old)
    if new is not None:
        m.graph.initializer.append(new)
    return m


def expand_bomb(path: Path) -> None:
    """2 KB whose BN variance is Expand(var, [2**26, 8]): gigabytes if evaluated."""
    m = _valid()
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    var.name = "var_small"
    m.graph.initializer.append(numpy_helper.from_array(np.array([2**26, 8], np.int64), "shape"))
    m.graph.node.insert(0, helper.make_node("Expand", ["var_small", "shape"], ["bn.var"]))
    path.write_bytes(m.SerializeToString())


def duplicate_initializer(path: Path) -> None:
    """Two 'bn.scale': onnxruntime takes the first, onnx-ir the last."""
    m = _valid()
    scale = next(t for t in m.graph.initializer if t.name == "bn.scale")
    m.graph.initializer.append(
        numpy_helper.from_array(numpy_helper.to_array(scale) * 3, "bn.scale")
    )
    path.write_bytes(m.SerializeToString())


def shadowing_initializer(path: Path) -> None:
    """An If branch whose initializer is named like the outer graph's 'bn.scale'."""
    m = _valid()
    out = helper.make_tensor_value_info("r", TensorProto.FLOAT, [8])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["bn.scale"], ["r"])], "branch", [], [out],
        [numpy_helper.from_array(np.zeros(8, np.float32), "bn.scale")],
    )  # fmt: skip
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(
        helper.make_node("If", ["cond"], ["r_out"], then_branch=branch, else_branch=branch)
    )
    m.graph.output.append(helper.make_tensor_value_info("r_out", TensorProto.FLOAT, [8]))
    path.write_bytes(m.SerializeToString())


def sparse_initializer(path: Path) -> None:
    m = _valid()
    scale = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "bn.scale"))
    _replace(m, "bn.scale", None)
    values = numpy_helper.from_array(scale, "bn.scale")
    indices = numpy_helper.from_array(np.arange(scale.size, dtype=np.int64), "indices")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [scale.size]))
    path.write_bytes(m.SerializeToString())


def string_bn_parameter(path: Path) -> None:
    m = _replace(
        _valid(), "bn.scale", helper.make_tensor("bn.scale", TensorProto.STRING, [8], [b"a"] * 8)
    )
    path.write_bytes(m.SerializeToString())


def unknown_elem_type(path: Path) -> None:
    m = _valid()
    next(t for t in m.graph.initializer if t.name == "bn.scale").data_type = 99
    path.write_bytes(m.SerializeToString())


def fp16_in_float_data(path: Path) -> None:
    m = layer_bn("Conv", dtype=np.float16)
    weight = next(t for t in m.graph.initializer if t.name == "layer.W")
    values = numpy_helper.to_array(weight).astype(np.float32).ravel().tolist()
    weight.ClearField("raw_data")
    weight.float_data.extend(values)
    path.write_bytes(m.SerializeToString())


def dim_minus_one(path: Path) -> None:
    m = _valid()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path.write_bytes(m.SerializeToString())


def constant_external_outside(path: Path) -> None:
    """A Constant node's tensor whose external data lies outside the model's folder."""
    m = _valid()
    _replace(m, "bn.scale", None)
    value = onnx.TensorProto(name="bn.scale", data_type=TensorProto.FLOAT, dims=[8])
    value.data_location = TensorProto.EXTERNAL
    for key, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "32")):
        entry = value.external_data.add()
        entry.key, entry.value = key, v
    m.graph.node.insert(0, helper.make_node("Constant", [], ["bn.scale"], value=value))
    path.write_bytes(m.SerializeToString())


# Valid to protobuf and to bnfuse's reader, but rejected by onnxruntime: without
# verification they are written as they are (their pair skipped), with it they exit 2.
RUNTIME_REJECTS = {
    "channel_mismatch.onnx",
    "absurd_dims.onnx",
    "expand_bomb.onnx",
    "string_bn_parameter.onnx",
    "dim_minus_one.onnx",
}

CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated.onnx": (truncated, "error"),
    "random_bytes.onnx": (random_bytes, "error"),
    "empty.onnx": (empty, "error"),
    "json.onnx": (json_named_onnx, "error"),
    "tensor_not_model.onnx": (other_message, "error"),
    "cycle.onnx": (cycle, "error"),
    "dangling_input.onnx": (dangling_input, "error"),
    "duplicate_outputs.onnx": (duplicate_outputs, "error"),
    "nan_params.onnx": (nan_params, "skip"),
    "negative_variance.onnx": (negative_variance, "skip"),
    "nan_epsilon.onnx": (nan_epsilon, "skip"),
    "inf_epsilon.onnx": (inf_epsilon, "skip"),
    "channel_mismatch.onnx": (channel_mismatch, "error"),
    "missing_external_data.onnx": (missing_external_data, "error"),
    "external_data_outside.onnx": (external_data_outside, "error"),
    "external_key_mangled.onnx": (external_key_mangled, "error"),
    "external_location_nul.onnx": (external_location_nul, "error"),
    "unknown_opset.onnx": (unknown_opset, "error"),
    "absurd_dims.onnx": (absurd_dims, "error"),
    "zero_channel_conv.onnx": (zero_channel_conv, "skip"),
    "truncated_archive.pt2": (truncated_archive, "error"),
    "unknown_zip.pt": (unknown_zip, "error"),
    "text_named.pt": (text_named_pt, "error"),
    "expand_bomb.onnx": (expand_bomb, "error"),
    "duplicate_initializer.onnx": (duplicate_initializer, "error"),
    "shadowing_initializer.onnx": (shadowing_initializer, "error"),
    "sparse_initializer.onnx": (sparse_initializer, "error"),
    "string_bn_parameter.onnx": (string_bn_parameter, "error"),
    "unknown_elem_type.onnx": (unknown_elem_type, "error"),
    "fp16_in_float_data.onnx": (fp16_in_float_data, "error"),
    "dim_minus_one.onnx": (dim_minus_one, "error"),
    "constant_external_outside.onnx": (constant_external_outside, "error"),
}


def make(folder: Path) -> dict[str, str]:
    """Write every case into ``folder``; returns file name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (build, _) in CASES.items():
        build(folder / name)
    return {name: expected for name, (_, expected) in CASES.items()}


if __name__ == "__main__":
    for name, expected in make(Path(sys.argv[1])).items():
        print(f"{expected:6} {name}")
