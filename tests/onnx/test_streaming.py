"""Weights read as mapped byte ranges and written as byte ranges (bnfuse.onnx.io, .wire, .mapped).

The reference for every byte written is protobuf's own: the whole file parsed
(onnx.load), the same fold, the folded weights put into their messages, and
the whole model serialised by protobuf.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfuse
from bnfuse.api import fold_all
from bnfuse.errors import InputError
from bnfuse.onnx import io, light, mapped, wire
from bnfuse.onnx.graph import Model
from bnfuse.onnx.tensors import Arrays
from sample_models.models import layer_bn

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
SAMPLE_FILES = sorted(p.name for p in SAMPLES.glob("*.onnx"))


def reference_fuse(src: Path, out: Path) -> None:
    """Parse everything, fold, serialise everything: what bnfuse would write without
    streaming (external data read into the messages)."""
    model = Model(onnx.load(str(src)), Arrays())
    fold_all(model)
    for _, tensor in io.graph_tensors(model):
        data = model.arrays.bytes_of(tensor)
        if data is not None:
            assert isinstance(data, np.ndarray)
            tensor.raw_data = np.ascontiguousarray(data).tobytes()
    out.write_bytes(model.proto.SerializeToString())


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_fused_file_is_byte_identical_to_whole_model_serialisation(
    name: str, tmp_path: Path
) -> None:
    src = SAMPLES / name
    bnfuse.fuse(src, tmp_path / "streamed.onnx")
    reference_fuse(src, tmp_path / "reference.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()


def test_large_weights_are_views_of_the_file_not_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(light, "LIGHT_FROM", 0)  # a small file: parsed whole unless told
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv", cin=16, cout=32), src)
    model = io.load(src).model
    weight = model.arrays.mapped(model.graph.inits["layer.W"])
    assert weight is not None and weight.file.path == src
    stored = onnx.load(str(src)).graph.initializer
    raw = next(t for t in stored if t.name == "layer.W").raw_data
    assert src.read_bytes()[weight.offset : weight.offset + len(raw)] == raw
    array = weight.array  # a view of the mapping: no copy, not writable
    assert not array.flags.owndata and not array.flags.writeable
    assert array.tobytes() == raw
    small = model.graph.inits["bn.mean"]  # 32 floats: parsed as usual
    assert small is not None and model.arrays.mapped(small) is None


def test_unchanged_model_round_trips_to_the_same_bytes(tmp_path: Path) -> None:
    src = SAMPLES / "torch_resnet_opset17.onnx"
    io.save(io.load(src).model, tmp_path / "a.onnx", external_data=False)
    assert (tmp_path / "a.onnx").read_bytes() == src.read_bytes()


def test_external_data_in_and_out(tmp_path: Path) -> None:
    model = layer_bn("Conv", cin=64, cout=64)  # W: 147 kB, aligned in the data file
    src = tmp_path / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "f.onnx"
    result = bnfuse.fuse(src, out)
    assert [p.name for p in result.outputs] == ["f.onnx", "f.onnx.data"]
    reference_fuse(src, tmp_path / "ref.onnx")
    fused = onnx.load(str(out))
    expected = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "ref.onnx")).graph.initializer
    }
    got = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    assert got.keys() == expected.keys()
    for key in got:
        assert np.array_equal(got[key], expected[key]), key
    header = onnx.load(str(out), load_external_data=False)
    offsets = {
        t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
        for t in header.graph.initializer
        if t.external_data
    }
    assert offsets["layer.W"] % io.ALIGNMENT == 0


def test_external_tensor_shorter_than_its_shape_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(
        layer_bn("Conv", cin=16, cout=16),
        src,
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"run past the end of m\.data"):
        io.load(src)


@pytest.mark.parametrize(
    "blob",
    [b"\x0a", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x3a\x05ab"],
    ids=["truncated_length", "overlong_varint", "graph_runs_past_end"],
)
def test_malformed_outer_levels_fall_back_to_protobufs_own_error(
    blob: bytes, tmp_path: Path
) -> None:
    with pytest.raises(wire.WireError):
        list(wire.fields(blob, 0, len(blob)))
    src = tmp_path / "bad.onnx"
    src.write_bytes(blob)
    with pytest.raises(InputError, match=r"not a readable ONNX model|not an ONNX model"):
        io.load(src)


def test_varints_round_trip() -> None:
    for value in [0, 1, 127, 128, 300, 2**31, 2**63 - 1]:
        encoded = wire.encode_varint(value)
        assert wire.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    # Against protobuf's own encoding of a length-delimited field.
    tensor = onnx.TensorProto(name="x" * 200)
    assert tensor.SerializeToString() == wire.len_prefix(8, 200) + b"x" * 200


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import bnfuse.api, bnfuse.onnx.io, bnfuse.onnx.match, bnfuse.onnx.rewrite
    def rss_mb(key="VmRSS"):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    base = rss_mb()
    bnfuse.api.fuse_onnx(Path(sys.argv[1]), Path(sys.argv[2]))
    print(base, rss_mb("VmHWM"))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_memory_grows_by_a_layer_not_by_the_model(tmp_path: Path) -> None:
    """64 MB of conv weights: fusing must not hold the model (or its fold) in memory."""
    from benchmarks.peers import chain

    src = tmp_path / "chain.onnx"
    onnx.save(chain(256, 28), src)  # 28 layers of 256x256x3x3 float32: 2.4 MB each
    size_mb = src.stat().st_size / 2**20
    assert size_mb > 60
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(src), str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = map(float, probe.stdout.split())
    # ~10 MB here (a 2.4 MB layer folded by blocks, plus the graph); one copy of the
    # weights, parsed or folded, would be 61 MB.
    assert peak - base < 0.5 * size_mb, (base, peak, size_mb)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_over_2gb_of_external_data_fuses_in_bounded_memory(tmp_path: Path) -> None:
    """2.2 GB of weights in external data: peak memory far below the model (pytest -m slow)."""
    from benchmarks import big_external

    depth = 58  # x 37.7 MB of float32 weights
    src = big_external.build(tmp_path, depth)
    assert (tmp_path / "model.onnx.data").stat().st_size > 2 * 2**30
    out = tmp_path / "fused.onnx"
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(src), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = map(float, probe.stdout.split())
    assert peak < 2048, (base, peak)
    assert peak - base < 400, (base, peak)  # a few layers' worth, not 2.2 GB
    big_external.check(src, out, depth)  # no BN left; folds exact, from the files


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external_data"])
def test_without_copy_file_range_the_bytes_are_the_same(
    external: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel cannot copy between the files, weights go through memory, unchanged."""
    src = tmp_path / "m.onnx"
    model = onnx.load(str(SAMPLES / "shared_weight.onnx"))  # its shared 1152-byte weight is copied
    if external:
        onnx.save(model, src, save_as_external_data=True, location="m.data", size_threshold=0)
    else:
        onnx.save(model, src)
    bnfuse.fuse(src, tmp_path / "kernel.onnx")

    def unsupported(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(mapped.os, "copy_file_range", unsupported)
    bnfuse.fuse(src, tmp_path / "memory.onnx")
    named = (tmp_path / "kernel.onnx").read_bytes().replace(b"kernel.onnx", b"memory.onnx")
    assert named == (tmp_path / "memory.onnx").read_bytes()  # external data names its file
    if external:
        kernel, memory = (tmp_path / f"{n}.onnx.data" for n in ("kernel", "memory"))
        assert kernel.read_bytes() == memory.read_bytes()


def _strip_names(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.ClearField("name")
    onnx.save(model, dst)
    return dst


def _fuse_as(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, light_from: int) -> bytes:
    """Decisions, sentences, op counts and output bytes, with the graph read whole up to
    ``light_from`` bytes and without its weights (memory-mapped) from there."""
    with monkeypatch.context() as patch:
        patch.setattr(light, "LIGHT_FROM", light_from)
        result = bnfuse.fuse(src, out, force=True)
    return (
        repr((result.candidates, result.ops_before, result.ops_after)).encode() + out.read_bytes()
    )


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize(
    "make",
    [lambda: layer_bn("Conv"),  # under 1 MB
     lambda: layer_bn("Conv", cin=1024, cout=1024)],  # 38 MB: past the whole-parse limit
    ids=["1MB", "38MB"],
)  # fmt: skip
def test_decisions_and_output_do_not_depend_on_how_the_model_is_read(
    make: object, named: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's reading (parsed whole, or graph-only with its weights mapped) is the I/O
    layer's business: nothing that comes out depends on it, nor on whether the nodes have
    names."""
    src = tmp_path / "m.onnx"
    onnx.save(make(), src)  # type: ignore[operator]
    if not named:
        src = _strip_names(src, tmp_path / "unnamed.onnx")
    whole = _fuse_as(src, tmp_path / "whole.onnx", monkeypatch, light_from=2**40)
    mapped_ = _fuse_as(src, tmp_path / "mapped.onnx", monkeypatch, light_from=0)
    assert whole == mapped_


def test_a_shared_weight_is_released_once_its_copy_is_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight two layers read is folded into a new initializer; the pages dropped after
    the fold (computed as the file is written) must be the original's, the one read from
    the file, not the copy's."""
    from bnfuse.onnx.tensors import Arrays

    monkeypatch.setattr(light, "LIGHT_FROM", 0)  # weights mapped, as for a large file
    released: list[str] = []
    writing: list[bool] = []
    real, real_save = Arrays.release, io.save

    def recording(self: Arrays, tensor: object) -> None:
        if writing and tensor is not None and self.mapped(tensor) is not None:
            released.append(tensor.name)  # type: ignore[attr-defined]
        real(self, tensor)

    def save(*args: object, **kwargs: object) -> list[Path]:
        writing.append(True)
        return real_save(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Arrays, "release", recording)
    monkeypatch.setattr(io, "save", save)
    src = SAMPLES / "shared_weight.onnx"
    bnfuse.fuse(src, tmp_path / "f.onnx")
    shared = {t.name for t in onnx.load(str(src)).graph.initializer if t.name.endswith("W")}
    assert shared and shared <= set(released), (shared, released)
