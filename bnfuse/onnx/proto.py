"""ONNX's protobuf messages, and whether it knows an opset, without ``import onnx`` where it can.

A fuse of a model under 32 MB needs of the onnx package only the messages
protoc generated for it (``onnx/onnx_ml_pb2.py``) and, for a model of a recent
opset, whether onnx knows that opset. ``import onnx`` runs its helper,
compose, serialization, external-data and version modules as well: numpy
aside, about 0.1 s, as long as onnxruntime's whole offline optimisation of an
8 MB model.

So the generated module is run on its own, found in onnx's folder without
running the package. It is not entered in ``sys.modules``: a later
``import onnx`` runs it again as onnx's own submodule, and protobuf, finding
the same file already in its default pool, hands out the same descriptors and
so the same message classes (tests/onnx/test_proto.py holds it to that).
Where onnx is imported already, or its folder is not laid out so (a zipped or
unusual install), or running the module fails in any way, this is plain
``import onnx``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

# The newest ai.onnx opset of the oldest onnx bnfuse installs with (pyproject.toml:
# onnx>=1.16 knows opset 21). A model at or below it needs no question to onnx.
OPSET_EVERY_ONNX_KNOWS = 21


def _generated_alone() -> ModuleType | None:
    """onnx's ``onnx_ml_pb2`` run without running the onnx package; None where it cannot be."""
    try:
        package = importlib.util.find_spec("onnx")  # finds a top-level package; runs nothing
        if package is None or not package.submodule_search_locations:
            return None
        name = "onnx.onnx_ml_pb2"
        spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)
        if spec is None or spec.loader is None or not Path(spec.origin or "").is_file():
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # anything at all: onnx itself then loads it
        return None


def _generated() -> ModuleType:
    if "onnx" not in sys.modules:
        module = _generated_alone()
        if module is not None:
            return module
    import onnx

    return onnx.onnx_ml_pb2


if TYPE_CHECKING:
    from onnx import AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto
else:
    _pb2 = _generated()
    AttributeProto = _pb2.AttributeProto
    ModelProto = _pb2.ModelProto
    NodeProto = _pb2.NodeProto
    TensorProto = _pb2.TensorProto
    ValueInfoProto = _pb2.ValueInfoProto

__all__ = [
    "AttributeProto", "ModelProto", "NodeProto", "TensorProto", "ValueInfoProto", "knows_opset"
]  # fmt: skip


def knows_opset(version: int) -> bool:
    """True where the installed onnx knows ``ai.onnx`` opset ``version``: onnx.defs is asked
    only above the opset every supported onnx knows."""
    if 0 < version <= OPSET_EVERY_ONNX_KNOWS:
        return True
    import onnx.defs

    return 0 < version <= onnx.defs.onnx_opset_version()
