"""A TorchScript or .pt2 file runs only tensor arithmetic, unless the user trusts it.

Each crafted file below would write a marker file (through ``aten::from_file``
with ``shared=True``, ``aten::save``, or Python that torch evaluates) when
loaded, inspected, fused or verified. bnfuse must refuse it before torch
opens it, in one line naming what it calls, with exit 2, and the marker must
not appear; with ``--trust-pickle`` the same file loads. Real networks'
TorchScript (LSTM, Transformer, attention, interpolation, string and dict
code) and exported programs with dynamic shapes must still load.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfuse.torch import archive, script_archive
from sample_models.torch_nets import ConvBN
from tests.test_cli import run_cli


def _setstate_writer(marker: str) -> nn.Module:
    class Marker(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mark = torch.zeros(4, dtype=torch.uint8)
            self.path = marker

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, bool, str]:
            return (self.mark, self.training, self.path)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool, str]) -> None:
            self.mark = torch.from_file(state[2], shared=True, size=4, dtype=torch.uint8)
            self.mark.fill_(88)
            self.training = state[1]
            self.path = state[2]

    class SetState(ConvBN):
        def __init__(self) -> None:
            super().__init__()
            self.marker = Marker()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.marker(self.bn(self.conv(x)))

    return SetState()


def _forward_writer(marker: str) -> nn.Module:
    class Forward(ConvBN):
        def __init__(self) -> None:
            super().__init__()
            self.path = marker

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8).fill_(88)
            return self.bn(self.conv(x)) + m.sum().to(x.dtype) * 0

    return Forward()


def _save_writer(marker: str) -> nn.Module:
    class Save(ConvBN):
        def __init__(self) -> None:
            super().__init__()
            self.path = marker

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            torch.save(y, self.path)
            return y

    return Save()


SCRIPTS: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    "setstate_from_file": (_setstate_writer, "defines __getstate__"),
    "forward_from_file": (_forward_writer, "aten::from_file"),
    "forward_save": (_save_writer, "aten::save"),
}


def _scripted(case: str, folder: Path) -> tuple[Path, Path]:
    marker = folder / "MARKER"
    build, _ = SCRIPTS[case]
    path = folder / f"{case}.pt"
    torch.jit.save(torch.jit.script(build(str(marker)).eval()), str(path))
    return path, marker


def _commands(model: Path, clean: Path, folder: Path, suffix: str) -> dict[str, list[str]]:
    shape = ["--input-shape", "x:1x3x8x8"]
    return {
        "inspect": ["inspect", str(model)],
        "dry_run": [str(model), "--dry-run"],
        "no_verify": [str(model), "-o", str(folder / f"f{suffix}"), "--no-verify"],
        "fuse": [str(model), "-o", str(folder / f"g{suffix}"), *shape],
        "verify": ["verify", str(clean), str(model), *shape],
    }


@pytest.fixture(scope="module")
def clean_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "clean.pt"
    torch.jit.save(torch.jit.script(ConvBN().eval()), str(path))
    return path


@pytest.mark.parametrize("command", ["inspect", "dry_run", "no_verify", "fuse", "verify"])
@pytest.mark.parametrize("case", list(SCRIPTS))
def test_torchscript_that_writes_a_file_is_refused(
    case: str,
    command: str,
    clean_script: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, marker = _scripted(case, tmp_path)
    args = _commands(model, clean_script, tmp_path, ".pt")[command]
    code, out, err = run_cli(args, capsys)
    assert not marker.exists(), "the model's own code ran"
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "would run code stored in the file" in lines[0] and SCRIPTS[case][1] in lines[0]
    assert "--trust-pickle" in lines[0]
    assert not list(tmp_path.glob("f.*")) and not list(tmp_path.glob("g.*"))


def test_trusted_torchscript_runs_its_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, marker = _scripted("setstate_from_file", tmp_path)
    code, out, err = run_cli(["inspect", str(model), "--trust-pickle"], capsys)
    assert code == 0, out + err
    assert marker.read_bytes() == b"XXXX"  # it ran: the flag is what lets it


def test_the_python_api_refuses_it_too(tmp_path: Path) -> None:
    import bnfuse
    from bnfuse.errors import InputError

    model, marker = _scripted("setstate_from_file", tmp_path)
    with pytest.raises(InputError, match="__getstate__"):
        bnfuse.fuse(model, dry_run=True)
    assert not marker.exists()


class _Everyday(nn.Module):
    """What real TorchScript holds: recurrent and attention layers, interpolation, norms,
    loops over submodules, dicts, strings, asserts and exceptions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
        self.mha = nn.MultiheadAttention(8, 2)
        self.ln = nn.LayerNorm(8)
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear")
        self.acts = nn.ModuleList([nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.GELU()])

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.gn(self.up(self.bn(self.conv(x))))
        y = F.interpolate(y, size=[4, 4], mode="nearest")
        for act in self.acts:
            y = act(y)
        assert y.dim() == 4, "expected NCHW"
        if y.shape[0] > 100:
            raise ValueError("batch too large")
        t = y.flatten(2).transpose(1, 2)
        t, _ = self.lstm(t)
        t = self.enc(t)
        a, _ = self.mha(t, t, t)
        parts: list[torch.Tensor] = [v * 2 for v in extra.values()]
        if "abc".upper().startswith("A") and len(parts) > 0:
            t = t + torch.stack(parts).sum()
        return self.ln(a + t) + torch.einsum("bij->b", y[:, 0]).sum()


def test_everyday_torchscript_passes_the_check(tmp_path: Path) -> None:
    for i, module in enumerate([_Everyday().eval(), ConvBN().eval()]):
        path = tmp_path / f"m{i}.pt"
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))
        assert script_archive.check(path) is None
        torch.jit.save(torch.jit.freeze(scripted), str(path))
        assert script_archive.check(path) is None
    traced = torch.jit.trace(ConvBN().eval(), torch.randn(1, 3, 8, 8))
    torch.jit.save(traced, str(tmp_path / "t.pt"))
    assert script_archive.check(tmp_path / "t.pt") is None


# .pt2: the graph is JSON, and torch evaluates three kinds of string in it.


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "clean.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(
        ConvBN().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(ep, str(path))
    return path


def _edit_graph(clean: Path, out: Path, edit: Callable[[dict[str, object]], None]) -> Path:
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            dst.writestr(info.filename, data)
    return out


def _python(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _node_target(target: str) -> Callable[[dict[str, object]], None]:
    def edit(program: dict[str, object]) -> None:
        nodes = program["graph_module"]["graph"]["nodes"]  # type: ignore[index]
        relu = next(n for n in nodes if n["target"] == "torch.ops.aten.batch_norm.default")
        relu["target"] = target

    return edit


def _guard(marker: Path) -> Callable[[dict[str, object]], None]:
    def edit(program: dict[str, object]) -> None:
        program["guards_code"] = [f"{_python(marker)} is None"]

    return edit


def _expression(marker: Path) -> Callable[[dict[str, object]], None]:
    def edit(program: dict[str, object]) -> None:
        text = json.dumps(program)
        start = text.index('"expr_str": "') + len('"expr_str": "')
        text = text[:start] + f"({_python(marker)}) or " + text[start:]
        program.clear()
        program.update(json.loads(text))

    return edit


PT2_CASES: dict[str, tuple[Callable[[Path], Callable[[dict[str, object]], None]], str]] = {
    "from_file_target": (lambda m: _node_target("torch.ops.aten.from_file.default"),
                         "torch.ops.aten.from_file.default"),
    "python_target": (lambda m: _node_target("torch.os.system"), "torch.os.system"),
    "custom_namespace": (lambda m: _node_target("torch.ops.mylib.evil.default"), "mylib"),
    "guard_code": (_guard, "guard"),
    "expression_code": (_expression, "symbolic expression"),
}  # fmt: skip


@pytest.mark.parametrize("command", ["inspect", "no_verify", "fuse", "verify"])
@pytest.mark.parametrize("case", list(PT2_CASES))
def test_pt2_graph_that_calls_more_than_tensor_arithmetic_is_refused(
    case: str,
    command: str,
    clean_pt2: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = tmp_path / "MARKER"
    make, named = PT2_CASES[case]
    model = _edit_graph(clean_pt2, tmp_path / "evil.pt2", make(marker))
    args = _commands(model, clean_pt2, tmp_path, ".pt2")[command]
    code, out, err = run_cli([a for a in args if a not in ("--input-shape", "x:1x3x8x8")], capsys)
    assert not marker.exists(), "the file's own code ran"
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], err
    assert "would run code stored in the file" in lines[0]


def test_pt2_json_beyond_the_bound_is_refused_before_it_is_read(
    clean_pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A few hundred KB of zip that unpacks to 300 MB of JSON (spaces after the graph)."""
    padded = tmp_path / "padded.pt2"
    with (
        zipfile.ZipFile(clean_pt2) as src,
        zipfile.ZipFile(padded, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            data = src.read(info.filename)
            if not info.filename.endswith("models/model.json"):
                dst.writestr(info.filename, data)
                continue
            with dst.open(info.filename, "w", force_zip64=True) as member:
                member.write(data)
                chunk = b" " * (1 << 24)
                for _ in range(18):
                    member.write(chunk)
    assert padded.stat().st_size < 4 << 20
    code, out, err = run_cli(["inspect", str(padded)], capsys)
    assert code == 2, out + err
    assert "MiB of JSON, over bnfuse's bound of 256 MiB" in err


def test_a_dynamic_shape_pt2_passes_the_check(clean_pt2: Path) -> None:
    assert archive.check(clean_pt2) is None


@pytest.mark.parametrize(
    ("operator", "allowed"),
    [("aten::conv2d", True), ("aten::batch_norm", True), ("aten::einsum", True),
     ("aten::gelu", True), ("aten::upper", True), ("prim::RaiseException", True),
     ("torchvision::nms", True),
     ("aten::from_file", False), ("aten::save", False), ("aten::_print", False),
     ("prim::Print", False), ("prim::rpc_async", False), ("aten::set_", False),
     ("aten::manual_seed", False), ("quantized::conv2d", False), ("mylib::evil", False)],
)  # fmt: skip
def test_operator_verdicts(operator: str, allowed: bool) -> None:
    from bnfuse.torch.allowed import operator_ok

    assert operator_ok(operator) is allowed


@pytest.mark.parametrize(
    ("text", "ok"),
    [("Symbol('s77', positive=True, integer=True)", True),
     ("Add(Mul(Integer(2), Symbol('s0')), Integer(-1))", True), ("s0*s1 + 3 >= 4", True),
     ("FloorDiv(s0, 2)", True), ("Max(1, s0)", True),
     ("__import__('os').system('x')", False), ("Symbol('s0').__class__", False),
     ("(lambda: 1)()", False), ("[c for c in ()]", False), ("eval('1')", False)],
)  # fmt: skip
def test_symbolic_expression_verdicts(text: str, ok: bool) -> None:
    from bnfuse.torch.allowed import sym_expr_ok

    assert sym_expr_ok(text) is ok


@pytest.mark.parametrize(
    ("text", "ok"),
    [("L['x'].size()[0] == 3", True), ("L['x'].stride()[1] <= Max(2, L['y'].size()[0])", True),
     ("L['x'].__class__", False), ("L['x'].numpy()", False), ("open('f').read()", False)],
)  # fmt: skip
def test_guard_verdicts(text: str, ok: bool) -> None:
    from bnfuse.torch.allowed import guard_ok

    assert guard_ok(text) is ok
