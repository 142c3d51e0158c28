"""Hostile or broken models get a bounded, clear refusal: little memory, little time, one line.

Cases that only need "one line, exit 2" live in the corpus (tests/bad_inputs);
these measure what a refusal costs, or check the reason given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sample_models.models import layer_bn
from tests.bad_inputs.make import expand_bomb
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# Runs the command in-process (argv given) and prints its exit code and peak memory.
_MEASURED = """
import json, sys, time
sys.path.insert(0, {root!r})
from bnfuse.cli import main
start = time.perf_counter()
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across exec
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"code": code, "seconds": time.perf_counter() - start,
                  "peak_mb": int(hwm.split()[1]) / 1024}}))
"""


def _measured(args: list[str]) -> tuple[dict[str, float], str]:
    code = _MEASURED.format(root=str(ROOT), args=args)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def test_expand_bomb_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    """Before the bound: inspect took 20 s and 14.7 GB of memory on this 2 KB model."""
    src = tmp_path / "bomb.onnx"
    expand_bomb(src)
    assert src.stat().st_size < 4096
    figures, text = _measured(["inspect", str(src)])
    assert figures["code"] == 0, text
    assert "more than bnfuse evaluates" in text
    assert figures["peak_mb"] < 600, figures
    assert figures["seconds"] < 10, figures


def test_corrupt_3gb_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A 3 GB file (sparse: no disk used) whose protobuf breaks at byte 0."""
    src = tmp_path / "huge.onnx"
    with open(src, "wb") as fh:
        fh.write(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # a varint that never ends
        fh.truncate(3 * 2**30)
    figures, text = _measured([str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify"])
    assert figures["code"] == 2, text
    assert "not a readable ONNX model" in text and "malformed protobuf" in text
    assert figures["peak_mb"] < 600, figures
    assert not (tmp_path / "f.onnx").exists()


def test_string_bn_parameter_is_skipped_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.bad_inputs.make import string_bn_parameter

    src = tmp_path / "s.onnx"
    string_bn_parameter(src)
    code, out, err = run_cli([str(src), "--dry-run"], capsys)
    assert code == 0, err
    assert "is a STRING tensor; BatchNorm parameters are floating point" in out


def test_duplicate_initializer_is_refused_even_without_verification(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written anyway, the model would compute something else than the input."""
    from tests.bad_inputs.make import duplicate_initializer

    src = tmp_path / "d.onnx"
    duplicate_initializer(src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify"], capsys)
    assert code == 2 and "two initializers named 'bn.scale'" in err
    assert not (tmp_path / "f.onnx").exists()


def _nested_sequence(depth: int) -> onnx.TypeProto:
    t = helper.make_tensor_type_proto(TensorProto.FLOAT, [1])
    for _ in range(depth):
        t = helper.make_sequence_type_proto(t)
    return t


def test_the_deepest_readable_nesting_stays_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input protobuf can read (47 nested sequence types) gives an output it can read."""
    model = layer_bn("Conv")
    model.graph.input.append(helper.make_value_info("deep", _nested_sequence(47)))
    src = tmp_path / "deep.onnx"
    src.write_bytes(model.SerializeToString())
    onnx.load(str(src))  # protobuf reads the input
    out = tmp_path / "f.onnx"
    code, _, err = run_cli([str(src), "-o", str(out), "--no-verify"], capsys)
    assert code == 0, err
    onnx.load(str(out))  # and the output


def test_library_warnings_stay_off_stderr(tmp_path: Path) -> None:
    """A parameter computed as 1/0 (numpy warns) through the real command: stderr is empty."""
    model = layer_bn("Conv")
    var = next(t for t in model.graph.initializer if t.name == "bn.var")
    var.name = "var_num"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "zero"))
    model.graph.node.insert(0, helper.make_node("Div", ["var_num", "zero"], ["bn.var"]))
    src = tmp_path / "w.onnx"
    src.write_bytes(model.SerializeToString())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bnfuse", str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "invalid BatchNorm parameters" in proc.stdout
    assert time.perf_counter() - start < 60


def test_memory_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnfuse import fold

    def out_of_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(fold, "check_fits", out_of_memory)  # on either path
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, _, err = run_cli([str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"bnfuse: error: {src}: not enough memory; nothing was written"
    ]
    assert not (tmp_path / "f.onnx").exists()


def test_torch_warnings_stay_off_stderr(tmp_path: Path) -> None:
    """A TorchScript run (torch warns on load, save and .to(float64)) through the real command."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    src = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 8, 8)), str(src))
    from bnfuse.torch.files import load_script, script_input_names

    shape = f"{script_input_names(load_script(src))[0]}:1x3x8x8"
    args = [str(src), "-o", str(tmp_path / "f.pt"), "--input-shape", shape]
    proc = subprocess.run(
        [sys.executable, "-m", "bnfuse", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
