"""PyTorch files from the command line: each format round-trips, fused and verified."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfuse  # noqa: E402
from bnfuse import Skip  # noqa: E402
from bnfuse.api import fuse_file  # noqa: E402
from sample_models.models import layer_bn  # noqa: E402
from sample_models.torch_nets import NETS, build, trained  # noqa: E402
from tests.test_cli import run_cli  # noqa: E402

SPECS = {s.name: s for s in NETS}
FILE_NETS = ["resnet", "mobilenet", "dcgan_generator", "bn1d_mlp", "conv1d_audio", "levit_mlp"]


def shape_arg(shape: tuple[int, ...], name: str) -> list[str]:
    return ["--input-shape", f"{name}:{'x'.join(map(str, shape))}"]


def forward_arg(model: nn.Module) -> str:
    """The name of forward's first parameter (what TorchScript calls the input)."""
    import inspect

    return next(iter(inspect.signature(model.forward).parameters))


def script_bn_count(path: Path) -> int:
    from bnfuse.torch.script_fuse import freeze

    graph = freeze(torch.jit.load(str(path))).graph
    return sum(n.kind() == "aten::batch_norm" for n in graph.nodes())


def exported_bn_count(path: Path) -> int:
    graph = torch.export.load(path).graph
    return sum("batch_norm" in str(n.target) for n in graph.nodes if n.op == "call_function")


def verified(report: Path) -> dict[str, object]:
    data = json.loads(report.read_text())
    assert data["passed"] is True
    return data


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "scripted"])
@pytest.mark.parametrize("net", FILE_NETS)
def test_torchscript_round_trip(
    net: str, traced: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = SPECS[net]
    model = build(spec)
    x = torch.randn(*spec.input_shape)
    script = torch.jit.trace(model, x) if traced else torch.jit.script(model)
    src, out, report = tmp_path / "m.pt", tmp_path / "fused.pt", tmp_path / "r.json"
    torch.jit.save(script, str(src))
    code, _, err = run_cli(
        [
            str(src),
            "-o",
            str(out),
            *shape_arg(spec.input_shape, forward_arg(model)),
            "--report",
            str(report),
        ],
        capsys,
    )
    assert code == 0, err
    data = verified(report)
    assert data["fusion"]["skipped"] == 0 and data["fusion"]["folded"] > 0  # type: ignore[index]
    assert script_bn_count(out) == 0
    assert data["verification"]["noise_floor"][0]["device"] == "cpu: float32 vs float64"  # type: ignore[index]
    with torch.no_grad():
        want, got = model(x), torch.jit.load(str(out))(x)
    assert float((want - got).abs().max() / (want.max() - want.min())) < 1e-5


@pytest.mark.parametrize("net", FILE_NETS)
def test_exported_program_round_trip(
    net: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = SPECS[net]
    model = build(spec)
    x = torch.randn(*spec.input_shape)
    batch = torch.export.Dim("batch", min=2, max=64)
    src, out, report = tmp_path / "m.pt2", tmp_path / "fused.pt2", tmp_path / "r.json"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), src)
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(report)], capsys)
    assert code == 0, err
    verified(report)
    assert exported_bn_count(out) == 0
    fused = torch.export.load(out).module()
    bigger = torch.randn(5, *spec.input_shape[1:])  # the batch stayed dynamic
    with torch.no_grad():
        want, got = model(bigger), fused(bigger)
    assert float((want - got).abs().max() / (want.max() - want.min())) < 1e-5


def test_exported_program_to_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = SPECS["resnet"]
    model = build(spec)
    src, out, report = tmp_path / "m.pt2", tmp_path / "fused.onnx", tmp_path / "r.json"
    torch.export.save(torch.export.export(model, (torch.randn(*spec.input_shape),)), src)
    code, _, err = run_cli([str(src), "-o", str(out), "--report", str(report)], capsys)
    assert code == 0, err
    data = verified(report)
    assert data["fusion"]["folded"] == 10  # type: ignore[index]
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}


def test_torchscript_to_onnx_needs_and_uses_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = SPECS["mobilenet"]
    src, out = tmp_path / "m.pt", tmp_path / "fused.onnx"
    model = build(spec)
    torch.jit.save(torch.jit.script(model), str(src))
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify"], capsys)
    assert code == 2 and "--input-shape" in err and not out.exists()
    code, _, err = run_cli(
        [str(src), "-o", str(out), *shape_arg(spec.input_shape, forward_arg(model))], capsys
    )
    assert code == 0, err
    proto = onnx.load(str(out))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    # Named outputs and a dynamic batch, as a user exporting by hand would write them.
    assert [o.name for o in proto.graph.output] == ["output_0"]
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *spec.input_shape[1:])  # not the batch size it was exported with
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_exported_program_to_onnx_is_tidy_and_keeps_a_skipped_batchnorm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Constant sub-expressions folded away, as torch's optimize=True does, but a BN
    bnfuse skips (its fp16 fold would overflow) is not folded by onnxscript's rules."""
    spec = SPECS["mobilenet"]
    model = trained(build(spec)).eval()
    with torch.no_grad():  # the last block's BN: gamma/sigma * W beyond 65504 in fp16
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        bns[-1].weight.fill_(3e4)
        bns[-1].running_var.fill_(1e-4)
    model = model.half()
    src, out = tmp_path / "m.pt2", tmp_path / "fused.onnx"
    x = torch.randn(*spec.input_shape).half()
    torch.export.save(torch.export.export(model, (x,)), src)
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify"], capsys)
    assert code == 0, err
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("BatchNormalization") == 1, ops  # the skipped one, still there
    # No Shape/Expand/CastLike/Constant scaffolding left: the model's own ops only.
    assert set(ops) <= {"Conv", "BatchNormalization", "Clip", "Add", "ReduceMean", "Gemm",
                        "Reshape", "Flatten"}, sorted(set(ops))  # fmt: skip
    assert len(ops) <= len(bns) + 13, len(ops)


def test_train_mode_bn_in_torchscript_is_skipped(tmp_path: Path) -> None:
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).train()
    src = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(src))
    (cand,) = fuse_file(src, dry_run=True).candidates
    assert cand.skip is Skip.TRAINING_MODE


class TwoUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn(self.conv(x)), self.conv(x * 2)


def test_torchscript_shared_conv_keeps_other_use(tmp_path: Path) -> None:
    model = trained(TwoUses())
    src, out = tmp_path / "m.pt", tmp_path / "f.pt"
    torch.jit.save(torch.jit.script(model), str(src))
    result = fuse_file(src, out)
    assert [c.fusable for c in result.candidates] == [True]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        (a1, a2), (b1, b2) = model(x), torch.jit.load(str(out))(x)
    assert torch.equal(a2, b2)
    assert float((a1 - b1).abs().max()) < 1e-5


def test_full_pickle_is_refused_unless_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build(SPECS["resnet"])
    src = tmp_path / "full.pt"
    torch.save(model, src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.pt"), "--no-verify"], capsys)
    assert code == 2 and "runs code" in err and "--trust-pickle" in err
    assert not (tmp_path / "f.pt").exists()
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.pt"), "--trust-pickle"], capsys)
    assert code == 2 and "--input-shape" in err  # the verifier needs the input's shape
    code, _, err = run_cli(
        [str(src), "-o", str(tmp_path / "f.pt"), "--trust-pickle", "--no-verify"], capsys
    )
    assert code == 2 and "never as a pickle" in err
    assert not (tmp_path / "f.pt").exists()
    shape = ["--input-shape", "x:2x3x32x32"]
    out = tmp_path / "f.pt2"
    code, text, err = run_cli([str(src), "-o", str(out), "--trust-pickle", *shape], capsys)
    assert code == 0, err
    assert "10 folded" in text and "verify PASS" in text
    assert exported_bn_count(out) == 0


def test_state_dict_is_refused_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "weights.pt"
    torch.save(build(SPECS["resnet"]).state_dict(), src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.pt")], capsys)
    assert code == 2 and "state_dict" in err and "bnfuse.fuse(module)" in err


def test_unknown_zip_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "thing.pt"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("thing/readme.txt", "hello")
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.pt")], capsys)
    assert code == 2 and "neither TorchScript" in err


def test_onnx_path_never_imports_torch(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code = (
        "import sys, bnfuse\n"
        f"bnfuse.fuse({str(src)!r}, {str(tmp_path / 'f.onnx')!r})\n"
        "from bnfuse.verify.compare import verify_models\n"
        f"assert verify_models(__import__('pathlib').Path({str(src)!r}), "
        f"__import__('pathlib').Path({str(tmp_path / 'f.onnx')!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


@pytest.mark.gpu
def test_torch_models_verify_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    spec = SPECS["resnet"]
    src, out, report = tmp_path / "m.pt2", tmp_path / "f.pt2", tmp_path / "r.json"
    torch.export.save(torch.export.export(build(spec), (torch.randn(*spec.input_shape),)), src)
    code, _, err = run_cli(
        [str(src), "-o", str(out), "--device", "all", "--report", str(report)], capsys
    )
    assert code == 0, err
    v = verified(report)["verification"]
    assert v["devices"] == ["cpu", "cuda"]  # type: ignore[index]
    assert any(f["device"] == "cpu vs cuda" for f in v["noise_floor"])  # type: ignore[index]


def test_pt2_with_pickled_entries_is_refused_unless_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.export.load would unpickle an entry marked use_pickle: refuse it by default."""
    spec = SPECS["bn1d_mlp"]
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(build(spec), (torch.randn(*spec.input_shape),)), clean)
    tampered = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    code, _, err = run_cli([str(tampered), "-o", str(tmp_path / "f.pt2")], capsys)
    assert (
        code == 2 and "would run code stored in the file" in err and "is stored as a pickle" in err
    )
    assert "--trust-pickle" in err and not (tmp_path / "f.pt2").exists()
    code, _, err = run_cli(["inspect", str(clean)], capsys)
    assert code == 0, err  # a plain archive loads without asking


def test_torchscript_that_fails_to_save_gives_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchScript reads some records of its input only when saving: a damaged one fails there."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    src = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 8, 8)), str(src))

    def damaged(*args: object, **kwargs: object) -> None:  # what a mangled record gave, fuzzed
        raise RuntimeError("Expected PROTO opcode at the start of pickle archive, found 32")

    monkeypatch.setattr(torch.jit, "save", damaged)
    with pytest.raises(bnfuse.BnfuseError, match="torch cannot write the fused model"):
        fuse_file(src, tmp_path / "f.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize(
    "error",
    [
        UnicodeDecodeError("utf-8", b"\xf1", 0, 1, "invalid"),
        NotImplementedError("zip file version 6.4"),
    ],
    ids=["mangled_name", "mangled_version"],
)
def test_zip_that_zipfile_cannot_parse_is_a_damaged_archive(
    error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.pt"
    src.write_bytes(b"PK\x03\x04" + bytes(60))

    class Broken:
        def __init__(self, *args: object) -> None:
            raise error

    monkeypatch.setattr(zipfile, "ZipFile", Broken)
    with pytest.raises(bnfuse.BnfuseError, match="a damaged zip archive"):
        fuse_file(src, tmp_path / "f.pt")


def test_pickle_of_a_class_from_user_code_says_where_the_code_must_be(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The class lives in a module only the user's process had: a hint, not a bare error."""
    (tmp_path / "usernet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n"
        "        self.bn = torch.nn.BatchNorm2d(4)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.conv(x))\n"
    )
    src = tmp_path / "full.pt"
    code = (
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import usernet; "
        f"torch.save(usernet.Net().eval(), {str(src)!r})"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True)
    args = [str(src), "-o", str(tmp_path / "f.pt2"), "--trust-pickle", "--no-verify"]
    code_, _, err = run_cli(args, capsys)
    assert code_ == 2
    assert "No module named 'usernet'" in err and "PYTHONPATH" in err


def test_a_torch_model_that_cannot_run_on_the_inputs_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong --input-shape for TorchScript, a failing guard of a .pt2: one line, exit 2."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 16, 16)
    script = tmp_path / "m.pt"
    traced = torch.jit.trace(net, x)
    torch.jit.save(traced, str(script))
    name = [v.debugName() for v in traced.graph.inputs()][1].split(".")[0]
    side = torch.export.Dim("side", min=8, max=64)
    program = tmp_path / "m.pt2"
    torch.export.save(
        torch.export.export(net, (x,), dynamic_shapes=({2: side, 3: side},)), str(program)
    )
    for src, shape in ((script, f"{name}:1x5x16x16"), (program, f"{name}:1x3x16x20")):
        out = tmp_path / f"f{src.suffix}"
        code, _, err = run_cli([str(src), "-o", str(out), "--input-shape", shape], capsys)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--debug" not in lines[0], err
        assert not out.exists()


class _Block(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


def test_batchnorms_are_named_by_module_path(tmp_path: Path) -> None:
    """.pt2: layer1.0.bn1, not batch_norm_11; no GuardsFn op."""
    net = nn.Sequential()
    net.add_module("layer1", nn.Sequential(_Block(3), _Block(4)))
    net.eval()
    x = torch.randn(1, 3, 16, 16)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(pt2))
    for src in (pt2,):
        result = bnfuse.fuse(src, tmp_path / f"f{src.suffix}")
        assert sorted(c.node for c in result.candidates) == ["layer1.0.bn1", "layer1.1.bn1"], src
        assert sorted(c.layer or "" for c in result.candidates) == [
            "layer1.0.conv1",
            "layer1.1.conv1",
        ]
        assert not any("guards" in op.lower() for op in result.ops_before), result.ops_before


class WithExtras(nn.Module):
    """A TorchScript user's module: exported methods, attributes, its own buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.version = 3
        self.labels = ["cat", "dog"]
        self.register_buffer("anchors", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()

    @torch.jit.export
    def describe(self) -> int:
        return self.version + len(self.labels)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_torchscript_keeps_exported_methods_and_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = trained(WithExtras())
    src, out, report = tmp_path / "m.pt", tmp_path / "fused.pt", tmp_path / "r.json"
    torch.jit.save(torch.jit.script(net), str(src))
    code, _, err = run_cli(
        [str(src), "-o", str(out), "--input-shape", "x:2x3x8x8", "--report", str(report)], capsys
    )
    assert code == 0, err
    fused, original = torch.jit.load(str(out)), torch.jit.load(str(src))
    assert fused.describe() == 5 and fused.version == 3 and fused.labels == ["cat", "dog"]
    assert torch.equal(fused.anchors, torch.arange(4.0)) and "anchors" in fused.state_dict()
    x = torch.randn(2, 3, 8, 8)
    for method in ("forward", "features"):
        graph = getattr(fused, method).graph
        assert "aten::batch_norm" not in str(graph), method  # folded in each method
        with torch.no_grad():
            ref, got = getattr(original, method)(x), getattr(fused, method)(x)
        assert torch.allclose(ref, got, rtol=1e-5, atol=1e-5), method
    (cand,) = json.loads(report.read_text())["fusion"]["candidates"]
    # A loaded module keeps no scopes: named by the modules holding the tensors.
    assert (cand["node"], cand["layer"], cand["fused"]) == ("bn", "conv", True)


_TORCH_214_WARNINGS = """
import warnings, torch
def _deprecated(real, name):
    def call(*args, **kwargs):  # what torch 2.14 prints on every TorchScript load and save
        warnings.warn(f"`torch.jit.{name}` is deprecated. Please switch to `torch.export`.",
                      FutureWarning, stacklevel=2)
        return real(*args, **kwargs)
    return call
torch.jit.load = _deprecated(torch.jit.load, "load")
torch.jit.save = _deprecated(torch.jit.save, "save")
"""


def test_torch_deprecation_warnings_stay_off_the_terminal(tmp_path: Path) -> None:
    """torch 2.14 warns on every torch.jit.load/save: a successful -q run still prints one
    line on stdout and nothing on stderr (the command's real process, as a user runs it)."""
    from tests.test_outputs import _bnfuse

    net = trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    src, out = tmp_path / "m.pt", tmp_path / "fused.pt"
    torch.jit.save(torch.jit.script(net), str(src))
    args = [str(src), "-o", str(out), "-q", "--input-shape", "input:1x3x8x8"]
    proc = _bnfuse(_TORCH_214_WARNINGS, args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and len(proc.stdout.strip().splitlines()) == 1, proc
    assert proc.stdout.startswith("PASS"), proc.stdout
