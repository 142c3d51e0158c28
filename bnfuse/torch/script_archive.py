"""A TorchScript archive read as source before torch compiles it: what its code calls.

``torch.jit.load`` compiles the archive's ``code/`` (Python-syntax source that
``torch.jit.save`` printed) and runs ``__setstate__`` of any class that
defines one; verification then runs ``forward``. Printed code spells every
call in one of a few ways, and each is checked:

- ``torch.NAME(...)`` is the operator ``aten::NAME``, ``ops.NS.NAME(...)``
  is ``NS::NAME``: each must be pure tensor arithmetic (bnfuse.torch.allowed);
- ``__torch__.QUALIFIED(...)`` is a function or class of the archive itself
  (checked here like the rest), except ``__torch__.torch.classes``: TorchBind
  classes, native objects whose methods bnfuse cannot read;
- ``(obj).METHOD(...)`` must be a method some class of the archive defines;
- a bare ``NAME(...)`` must be a TorchScript builtin on ``_BUILTINS``
  (``print`` is not: it writes to bnfuse's own output) or a local of the
  function, which printed code only binds to the archive's own functions.

A class that defines ``__setstate__`` or ``__getstate__`` (run on load and
on save) is refused, as is any other spelling this does not know.
"""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

from bnfuse.torch.allowed import operator_ok, words

_BUILTINS = frozenset(
    words("""
    annotate uninitialized unchecked_cast isinstance range len getattr hasattr min max abs
    round divmod float int bool str complex list dict tuple sorted enumerate zip iter all
    any sum ord chr hash id hex oct bin fork wait
    """)
)
_LOAD_TIME = ("__setstate__", "__getstate__")
_ROOTS = ("torch", "ops", "__torch__", "CONSTANTS")
# Source a loader compiles: far more than any real network's code (ResNet-50: 40 KB).
MAX_CODE_BYTES = 64 << 20


def check(path: Path) -> str | None:
    """Why loading or running the TorchScript archive ``path`` could do more than tensor
    arithmetic, or None."""
    with zipfile.ZipFile(path) as archive:
        sources = [
            i for i in archive.infolist() if "/code/" in i.filename and i.filename.endswith(".py")
        ]
        total = sum(i.file_size for i in sources)
        if total > MAX_CODE_BYTES:
            return f"its code is {total / 2**20:.0f} MiB, over bnfuse's bound of 64 MiB"
        trees = []
        for info in sources:
            try:
                trees.append(ast.parse(archive.read(info).decode("utf-8"), info.filename))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                return f"'{info.filename}' is not TorchScript source bnfuse can read"
    methods = {
        f.name
        for tree in trees
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for f in cls.body
        if isinstance(f, ast.FunctionDef)
    }
    for tree in trees:
        why = _module(tree, methods)
        if why is not None:
            return why
    return None


def _module(tree: ast.Module, methods: set[str]) -> str | None:
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            why = _reference(node)
            if why is not None:
                return f"its code {why}"
        if isinstance(node, ast.ClassDef):
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name in _LOAD_TIME:
                    return f"class {node.name} defines {f.name}, which torch runs when it " + (
                        "loads the module" if f.name == "__setstate__" else "saves the module"
                    )
        if isinstance(node, ast.FunctionDef):
            why = _function(node, methods)
            if why is not None:
                return why
    return None


def _function(fn: ast.FunctionDef, methods: set[str]) -> str | None:
    local = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    local |= {
        n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in _BUILTINS and func.id not in local:
                return f"{fn.name} calls {func.id}(), which is not pure tensor arithmetic"
        elif isinstance(func, ast.Attribute):
            if _chain(func)[0] not in _ROOTS and func.attr not in methods:
                return (
                    f"{fn.name} calls the method {func.attr}(), which no class of the "
                    "archive defines (a native object's?)"
                )
        else:
            return f"{fn.name} calls an expression bnfuse cannot resolve"
    return None


def _reference(node: ast.Attribute) -> str | None:
    """Why the name ``node`` spells (torch.X, ops.NS.X, __torch__...) is not allowed."""
    chain = _chain(node)
    root = chain[0]
    if root == "torch":
        if len(chain) != 2:
            return f"uses {'.'.join(chain)}, which is not a tensor operator"
        if not operator_ok(f"aten::{chain[1]}"):
            return f"uses torch.{chain[1]} (aten::{chain[1]}), which is not pure tensor arithmetic"
    elif root == "ops":
        if len(chain) != 3 or not operator_ok(f"{chain[1]}::{chain[2]}"):
            return f"uses {'::'.join(chain[1:])}, which is not pure tensor arithmetic"
    elif root == "__torch__" and chain[1:3] == ["torch", "classes"]:
        return (
            f"uses the TorchBind class {'.'.join(chain[3:])}, native code that bnfuse cannot check"
        )
    return None


def _chain(node: ast.expr) -> list[str]:
    """``a.b.c`` as ["a", "b", "c"]; the root is "" where it is not a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "")
    return parts[::-1]
