"""bnfuse: fold inference-time BatchNormalization into the neighbouring linear layer.

>>> import bnfuse
>>> result = bnfuse.fuse("model.onnx", "fused.onnx")  # doctest: +SKIP

Attributes load lazily: ``import bnfuse`` stays cheap (the CLI's ``--help``
must not pay for onnx, onnxruntime or torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BnfuseError", "Candidate", "FuseResult", "Skip", "fuse"]

_HOMES = {
    "fuse": "bnfuse.api",
    "BnfuseError": "bnfuse.errors",
    "Candidate": "bnfuse.result",
    "FuseResult": "bnfuse.result",
    "Skip": "bnfuse.result",
}

if TYPE_CHECKING:
    from bnfuse.api import fuse
    from bnfuse.errors import BnfuseError
    from bnfuse.result import Candidate, FuseResult, Skip


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'bnfuse' has no attribute {name!r}")
