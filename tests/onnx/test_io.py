"""What the writer keeps, where it writes, and that it writes the same bytes every time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfuse
from bnfuse import outputs
from bnfuse.onnx import light
from sample_models.models import layer_bn, random_feeds
from tests.helpers import assert_same_outputs, run_reference


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decorated_model() -> onnx.ModelProto:
    """A Conv+BN model with everything a writer could lose."""
    model = layer_bn("Conv", opset=15)
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.model_version = 7
    model.domain = "com.example.models"
    helper.set_model_props(model, {"author": "bnfuse tests", "licence": "CC0"})
    for node in model.graph.node:
        node.doc_string = f"doc of {node.name}"
    model.graph.node[-1].metadata_props.add(key="origin", value="relu block")
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    # A model-local function (unused by the graph, so it must simply survive).
    fn = helper.make_function(
        "com.example",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 15)],
    )
    model.functions.append(fn)
    return model


def test_everything_else_is_preserved(tmp_path: Path) -> None:
    model = decorated_model()
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    bnfuse.fuse(src, out)
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused, full_check=True)
    for field in ("doc_string", "model_version", "domain", "producer_name", "ir_version"):
        assert getattr(fused, field) == getattr(model, field), field
    assert fused.graph.doc_string == "graph doc"
    assert list(fused.metadata_props) == list(model.metadata_props)
    assert {(o.domain, o.version) for o in fused.opset_import} == {
        (o.domain, o.version) for o in model.opset_import
    }
    assert list(fused.functions) == list(model.functions)
    kept = {n.name: n for n in model.graph.node if n.op_type != "BatchNormalization"}
    assert [n.name for n in fused.graph.node] == list(kept)
    for node in fused.graph.node:
        assert node.doc_string == kept[node.name].doc_string
        assert list(node.metadata_props) == list(kept[node.name].metadata_props)
    assert list(fused.graph.input) == list(model.graph.input)
    assert list(fused.graph.output) == list(model.graph.output)
    # value_info of surviving tensors: z (the BN output, now the Conv's) keeps its entry.
    before = {v.name: v for v in model.graph.value_info}
    after = {v.name: v for v in fused.graph.value_info}
    assert after["z"] == before["z"]
    assert "h" not in after  # the Conv's old output name is gone with the BN


def test_same_input_gives_byte_identical_output(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(decorated_model(), src)
    bnfuse.fuse(src, tmp_path / "a.onnx")
    bnfuse.fuse(src, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_fusing_the_output_again_changes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(decorated_model(), src)
    bnfuse.fuse(src, tmp_path / "once.onnx")
    result = bnfuse.fuse(tmp_path / "once.onnx", tmp_path / "twice.onnx")
    assert result.candidates == []
    assert (tmp_path / "once.onnx").read_bytes() == (tmp_path / "twice.onnx").read_bytes()


def test_input_is_never_modified(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(decorated_model(), src)
    digest = sha256(src)
    bnfuse.fuse(src, tmp_path / "f.onnx")
    assert sha256(src) == digest


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def test_external_data_is_written_beside_the_output(tmp_path: Path) -> None:
    model = layer_bn("Conv", cin=16, cout=32)
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    src = indir / "m.onnx"
    save_external(model, src, "weights.bin")
    hashes = {p.name: sha256(p) for p in indir.iterdir()}
    out = outdir / "fused.onnx"
    result = bnfuse.fuse(src, out)
    assert result.outputs == [out, outdir / "fused.onnx.data"]
    assert {p.name for p in outdir.iterdir()} == {"fused.onnx", "fused.onnx.data"}
    assert {p.name: sha256(p) for p in indir.iterdir()} == hashes
    fused = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"fused.onnx.data"}
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_feeds(model)
    assert_same_outputs(run_reference(src, feeds), run_reference(out, feeds), 1e-5)


def test_model_past_the_protobuf_limit_gets_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The >2 GB rule, with the limit lowered so the test stays small."""
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    monkeypatch.setattr(light, "PROTOBUF_LIMIT", 0)
    result = bnfuse.fuse(src, tmp_path / "f.onnx")
    assert result.outputs == [tmp_path / "f.onnx", tmp_path / "f.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "f.onnx"), full_check=True)


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    save_external(layer_bn("Conv"), src, "f.onnx.data")
    digest = sha256(tmp_path / "f.onnx.data")
    with pytest.raises(bnfuse.BnfuseError, match="would overwrite the input's external data file"):
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert sha256(tmp_path / "f.onnx.data") == digest
    assert not (tmp_path / "f.onnx").exists()


def test_output_whose_data_file_is_the_input_model_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f.onnx.data"  # an ONNX model with an unlucky name...
    save_external(layer_bn("Conv"), src, "weights.bin")  # ...so f.onnx gets external data
    digest = sha256(src)
    with pytest.raises(bnfuse.BnfuseError, match="would overwrite the input model"):
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert sha256(src) == digest
    assert not (tmp_path / "f.onnx").exists()


def test_existing_external_data_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    save_external(layer_bn("Conv"), src, "m.data")
    (tmp_path / "f.onnx.data").write_bytes(b"someone else's")
    with pytest.raises(bnfuse.BnfuseError, match=r"f\.onnx\.data: already exists"):
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert (tmp_path / "f.onnx.data").read_bytes() == b"someone else's"
    assert not (tmp_path / "f.onnx").exists()
    bnfuse.fuse(src, tmp_path / "f.onnx", force=True)
    assert onnx.load(str(tmp_path / "f.onnx")).graph.initializer


@pytest.mark.parametrize(
    ("external", "route", "fails_at"),
    [(False, "whole", 2), (False, "mapped", 2), (True, "mapped", 2)],
    ids=["inline-parsed-whole", "inline-mapped", "external_data"],
)
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool, route: str, fails_at: int
) -> None:
    """The writer writes the model in several pieces (each folded or mapped weight as a
    byte range), and fails here after the first: parsed whole, or its weights mapped."""
    src = tmp_path / "m.onnx"
    model = layer_bn("Conv", cin=16, cout=16)  # weights large enough to be written as byte ranges
    if external:
        onnx.save(model, src, save_as_external_data=True, location="m.data", size_threshold=0)
    else:
        onnx.save(model, src)
    if route == "mapped":
        monkeypatch.setattr(light, "LIGHT_FROM", 0)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_write = outputs.write_all
    calls = []

    def disk_fills(fd: int, data: bytes | memoryview) -> None:
        calls.append(len(data))
        if len(calls) == fails_at:
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(outputs, "write_all", disk_fills)
    with pytest.raises(bnfuse.BnfuseError, match="the disk is full"):
        bnfuse.fuse(src, tmp_path / "f.onnx")
    assert len(calls) == fails_at
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fp16_values_survive_the_round_trip(tmp_path: Path) -> None:
    model = layer_bn("Conv", dtype=np.float16)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    bnfuse.fuse(src, tmp_path / "f.onnx")
    fused = onnx.load(str(tmp_path / "f.onnx"))
    assert {t.data_type for t in fused.graph.initializer} == {onnx.TensorProto.FLOAT16}
