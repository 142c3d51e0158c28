"""Verification's memory is known before it runs, and a model that would take more than
the bound is refused with the figure: a few hundred bytes of ONNX can declare eight
inputs of 2^26 floats, or an output of 2^31 elements (Expand to a constant shape)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _eight_inputs(path: Path, n: int) -> Path:
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [n]) for i in range(8)]
    nodes = [helper.make_node("Add", ["x0", "x1"], ["s1"])]
    nodes += [helper.make_node("Add", [f"s{i}", f"x{i + 1}"], [f"s{i + 1}"]) for i in range(1, 7)]
    out = [helper.make_tensor_value_info("s7", TensorProto.FLOAT, [n])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", ins, out), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, path)
    return path


def _expand(path: Path) -> Path:
    """An 84-byte model whose only output is 2^31 floats."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**31])
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("build", "words"),
    [(lambda p: _eight_inputs(p, 2**26), "input 'x0' alone is 256 MiB"),
     (_expand, "output 'y' alone is 8 GiB")],
    ids=["eight_inputs", "expand_output"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["verify", "fuse"])
def test_a_verification_beyond_the_bound_is_refused_before_it_runs(
    build: object, words: str, command: str, tmp_path: Path
) -> None:
    model = build(tmp_path / "m.onnx")  # type: ignore[operator]
    args = (
        ["verify", str(model), str(model)]
        if command == "verify"
        else [str(model), "-o", str(tmp_path / "f.onnx")]
    )
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bnfuse", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # this run's peak (its child too)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode()
    peak_mb = usage.ru_maxrss / 1024
    assert proc.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert "verification would hold about" in line and words in line, line
    assert "over the bound of 4 GiB" in line and "--max-memory" in line
    assert not (tmp_path / "f.onnx").exists()
    assert peak_mb < 1024, f"{peak_mb:.0f} MB used to find out"


def test_the_bound_is_the_users_to_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _eight_inputs(tmp_path / "m.onnx", 2**18)  # 8 MiB of inputs, about 35 MiB in all
    code, out, err = run_cli(["verify", str(model), str(model), "--max-memory", "0.01"], capsys)
    assert code == 2 and "over the bound of 10.2 MiB" in err, err
    code, out, err = run_cli(["verify", str(model), str(model)], capsys)
    assert code == 0, out + err
