"""A crafted .pt2 never runs its code without --trust-pickle, whatever member carries it.

Each case puts a payload (a pickle whose unpickling creates a marker file)
in one member that torch.export.load would unpickle, and runs it through
every command. The marker must never appear; the run ends in one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bnfuse.errors import InputError
from bnfuse.torch import archive
from bnfuse.torch.files import load_exported
from sample_models.torch_nets import ConvBN
from tests.test_cli import run_cli


class _Payload:
    """Unpickling this creates ``marker`` and yields a valid (args, kwargs) pair."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        code = f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), ((), {{}}))[1]"
        return (eval, (code,))


def _good(folder: Path) -> Path:
    path = folder / "good.pt2"
    ep = torch.export.export(ConvBN().eval(), (torch.randn(1, 3, 8, 8),))
    torch.export.save(ep, str(path))
    return path


def _rewrite(
    good: Path,
    out: Path,
    replace: dict[str, bytes] | None = None,
    add: dict[str, bytes] | None = None,
) -> Path:
    """A copy of ``good`` with members (names below the archive's folder) replaced or added."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            dst.writestr(info.filename, replace.get(rel, src.read(info.filename)))
        for rel, data in add.items():
            dst.writestr(f"{root}/{rel}", data)
    return out


def _with_config_entry(good: Path, out: Path, payload: bytes, *, opaque: bool) -> Path:
    """A weight marked use_pickle, or a constant stored as an opaque Python object."""
    with zipfile.ZipFile(good) as src:
        root = src.namelist()[0].split("/", 1)[0]
        if opaque:
            name = "data/constants/model_constants_config.json"
            config = json.loads(src.read(f"{root}/{name}"))
            config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False}
            member = "data/constants/opaque_obj_0"
        else:
            name = "data/weights/model_weights_config.json"
            config = json.loads(src.read(f"{root}/{name}"))
            fqn = next(iter(config["config"]))
            config["config"][fqn]["use_pickle"] = True
            member = "data/weights/" + config["config"][fqn]["path_name"]
    return _rewrite(good, out, replace={name: json.dumps(config).encode(), member: payload})


def _stray_root_member(good: Path, out: Path, payload: bytes) -> Path:
    """The old layout's members at the zip's top level, where torch's fallback reads them."""
    _rewrite(good, out)
    with zipfile.ZipFile(out, "a") as dst:
        dst.writestr("version", "1.0")
        dst.writestr("serialized_state_dict.pt", payload)
    return out


CASES: dict[str, Callable[[Path, Path, bytes], Path]] = {
    "sample_inputs": lambda g, o, p: _rewrite(g, o, {"data/sample_inputs/model.pt": p}),
    "legacy_weights": lambda g, o, p: _rewrite(g, o, add={"data/weights/model.pt": p}),
    "legacy_constants": lambda g, o, p: _rewrite(g, o, add={"data/constants/model.pt": p}),
    "use_pickle_weight": lambda g, o, p: _with_config_entry(g, o, p, opaque=False),
    "opaque_constant": lambda g, o, p: _with_config_entry(g, o, p, opaque=True),
    "stray_root_member": _stray_root_member,
    "aoti_library": lambda g, o, p: _rewrite(g, o, add={"data/aotinductor/model/m.so": p}),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _good(tmp_path_factory.mktemp("good"))


def _crafted(case: str, good: Path, folder: Path) -> tuple[Path, Path]:
    marker = folder / "MARKER"
    payload = pickle.dumps(_Payload(marker), protocol=2)
    return CASES[case](good, folder / "model.pt2", payload), marker


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_pt2_is_refused_and_runs_nothing(
    case: str, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crafted, marker = _crafted(case, good, tmp_path)
    code, out, err = run_cli([str(crafted), "-o", str(tmp_path / "f.pt2")], capsys)
    assert not marker.exists(), "the payload ran"
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "would run code stored in the file" in lines[0], err
    assert "--trust-pickle" in lines[0]
    assert not (tmp_path / "f.pt2").exists()


@pytest.mark.parametrize("command", ["fuse", "inspect", "verify", "batch"])
def test_every_command_refuses_a_crafted_pt2(
    command: str, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crafted, marker = _crafted("sample_inputs", good, tmp_path)
    args = {
        "fuse": [str(crafted), "-o", str(tmp_path / "f.pt2")],
        "inspect": ["inspect", str(crafted)],
        "verify": ["verify", str(good), str(crafted)],
        "batch": [str(crafted), str(good), "-o", str(tmp_path / "out")],
    }[command]
    code, out, err = run_cli(args, capsys)
    assert not marker.exists(), "the payload ran"
    assert code == 2, out + err
    assert "would run code stored in the file" in out + err


def test_a_plain_pt2_still_loads(good: Path) -> None:
    assert archive.check(good) is None
    load_exported(good)


def test_the_guard_alone_stops_a_payload(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the check fooled (or the file swapped after it), torch still cannot unpickle."""
    for case in ("sample_inputs", "legacy_weights"):
        crafted, marker = _crafted(case, good, tmp_path)
        monkeypatch.setattr(archive, "check", lambda path: None)
        with pytest.raises(InputError):
            load_exported(crafted)
        assert not marker.exists(), f"{case}: the payload ran"


def test_trust_pickle_opts_in(good: Path, tmp_path: Path) -> None:
    crafted, marker = _crafted("sample_inputs", good, tmp_path)
    with contextlib.suppress(InputError):  # this payload is no valid archive afterwards
        load_exported(crafted, trust_pickle=True)
    assert marker.exists()  # what --trust-pickle opens, shown
