"""What the ``bnfuse`` command does to its own process before it starts: nothing that a
program importing bnfuse as a library would see.

onnx-ir imports sympy at module level for symbolic dimensions, which bnfuse never
builds; sympy is about 0.35 s of a 1 s start (measured with ``python -X importtime``).
The command puts stand-ins for it in sys.modules (``defer_imports``); a library's
caller gets the real modules as imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is first used.

    ``import sympy`` finds this stand-in; the first attribute anyone reads (torch
    reads many) imports the real module, which takes the stand-in's place in
    sys.modules and lends it its names.
    """

    def __init__(self, name: str, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(name)
        self.__spec__ = spec  # the import system reads it; it must not trigger a load

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def _defer_import(name: str) -> None:
    """Put a stand-in for ``name`` in sys.modules, found without importing its package."""
    if name in sys.modules:
        return
    package, _, _ = name.rpartition(".")
    if package:
        parent = importlib.util.find_spec(package)  # finds a top-level package; runs nothing
        if parent is None or parent.submodule_search_locations is None:
            return
        spec = importlib.machinery.PathFinder.find_spec(name, parent.submodule_search_locations)
    else:
        spec = importlib.util.find_spec(name)
    if spec is not None:
        sys.modules[name] = _Deferred(name, spec)


def defer_imports() -> None:
    """Stand-ins for sympy and the onnx-ir module that fills a table with its functions
    when imported (onnx-ir only calls it to parse a symbolic dimension's expression)."""
    _defer_import("sympy")
    _defer_import("onnx_ir._symbolic_shapes")
