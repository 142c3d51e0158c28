"""bnfuse.onnx.proto: onnx's messages without ``import onnx``, and the same classes after it.

Each case runs in a fresh interpreter, since what is imported already decides
which way the module loads them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfuse.onnx import light, proto

# After loading, the script imports onnx itself and checks that onnx still works whole:
# the same classes, its generated module in place, its checker and its shape inference.
_AFTERWARDS = """
import onnx, onnx.shape_inference
from onnx import helper, TensorProto as T
node = helper.make_node("Relu", ["x"], ["y"])
graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2])])
model = helper.make_model(graph)
onnx.checker.check_model(model, full_check=True)
same = [getattr(p, n) is getattr(onnx, n) is getattr(onnx.onnx_ml_pb2, n)
        for n in ("ModelProto", "TensorProto", "AttributeProto", "ValueInfoProto")]
print(json.dumps({
    "onnx_before": onnx_before,
    "same_classes": all(same),
    "generated_is_onnx_own": sys.modules["onnx.onnx_ml_pb2"] is onnx.onnx_ml_pb2,
    "parses": onnx.ModelProto.FromString(p.ModelProto.SerializeToString(model)) == model,
}))
"""


def _run(prelude: str) -> dict[str, object]:
    code = (
        "import json, sys\n"
        + prelude
        + "\nimport bnfuse.onnx.proto as p\n"
        + "onnx_before = 'onnx' in sys.modules\n"
        + _AFTERWARDS
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


_EXPECTED = {"same_classes": True, "generated_is_onnx_own": True, "parses": True}

# Ways the generated module cannot be run alone: each must end in plain `import onnx`.
_FALLBACKS = {
    "package-not-found": (
        "import importlib.util as u\n"
        "find = u.find_spec\n"
        "u.find_spec = lambda name, package=None: None if name == 'onnx' else find(name, package)"
    ),
    "loading-fails": (
        "import importlib.util as u\n"
        "make = u.module_from_spec\n"
        "def broken(spec):\n"
        "    if spec.name.startswith('onnx.'):\n"
        "        raise ImportError('simulated')\n"
        "    return make(spec)\n"
        "u.module_from_spec = broken"
    ),
}


def test_loads_the_messages_without_importing_onnx() -> None:
    result = _run("")
    assert result == {**_EXPECTED, "onnx_before": False}


def test_onnx_imported_first_lends_its_own_classes() -> None:
    result = _run("import onnx")
    assert result == {**_EXPECTED, "onnx_before": True}


@pytest.mark.parametrize("prelude", list(_FALLBACKS.values()), ids=list(_FALLBACKS))
def test_falls_back_to_import_onnx(prelude: str) -> None:
    """Whatever keeps the module from running alone, onnx is imported and serves instead."""
    result = _run(prelude)
    assert result == {**_EXPECTED, "onnx_before": True}


def test_opset_every_onnx_knows_is_that_of_the_oldest_supported_onnx() -> None:
    """pyproject's onnx floor, looked up in onnx's own release table: the opset it knows."""
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"onnx>=([0-9.]+)"', text)
    assert floor is not None
    release = floor.group(1) + ".0" * (2 - floor.group(1).count("."))
    opsets = {row[0]: row[2] for row in helper.VERSION_TABLE}
    assert opsets[release] == proto.OPSET_EVERY_ONNX_KNOWS


@pytest.mark.parametrize(
    ("version", "known"),
    [(1, True), (proto.OPSET_EVERY_ONNX_KNOWS, True), (onnx.defs.onnx_opset_version(), True),
     (onnx.defs.onnx_opset_version() + 1, False), (0, False), (-3, False)],
    ids=["first", "every-onnx-knows", "newest", "newer-than-onnx", "zero", "negative"],
)  # fmt: skip
def test_knows_opset(version: int, known: bool) -> None:
    assert proto.knows_opset(version) is known


def test_classes_are_onnx_own_in_this_process() -> None:
    assert proto.ModelProto is onnx.ModelProto
    assert proto.TensorProto is onnx.TensorProto


# Every element type onnx maps to a numpy dtype.
_TYPES = sorted(
    t for t in TensorProto.DataType.values() if t not in (TensorProto.UNDEFINED, TensorProto.STRING)
)


@pytest.mark.parametrize("data_type", _TYPES, ids=[TensorProto.DataType.Name(t) for t in _TYPES])
def test_numpy_dtype_is_onnx_helpers(data_type: int) -> None:
    """light's own table for numpy's types, onnx.helper's for the rest: the same dtypes."""
    assert light.numpy_dtype(data_type) == np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
