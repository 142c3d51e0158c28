"""A .pt2 archive checked member by member before torch.export.load sees it.

torch.export.load unpickles several members of an archive, and an unpickled
member can run any code stored in it. Which ones (torch 2.13/2.14):

- ``data/sample_inputs/<model>.pt``, and the legacy ``data/weights/<model>.pt``
  and ``data/constants/<model>.pt`` (preferred when present): ``torch.load``
  with ``weights_only=True``, then, if that fails, without it;
- weights and constants with ``use_pickle`` in their JSON config, and
  ``opaque_obj_``/``custom_obj_`` constants: unpickled outright;
- a zip that the current reader rejects is read again in the old layout,
  whose ``serialized_*.pt`` members are loaded like sample inputs;
- ``data/aotinductor/``: native libraries, loaded and run.

Beyond pickles, the graph itself (``models/*.json``) can run code: torch
resolves a node's target to any callable it reaches by name (``torch.os.system``
would do), hands each symbolic expression to ``sympy.sympify`` (an ``eval``)
and ``exec``s the guards. So every node target must be pure tensor
arithmetic, every expression and guard must be one and nothing more
(bnfuse.torch.allowed), and no JSON member may pass ``MAX_JSON_BYTES``
(torch reads it whole, and a megabyte of zip can hold a gigabyte of spaces).

``check`` walks every member of the archive. A member torch reads as raw
bytes (the weights and constants its configs list without ``use_pickle``),
as JSON or as text is fine; a member torch would ``torch.load`` must load
with torch's restricted unpickler (``weights_only=True``), which builds
tensors and containers and calls nothing else; anything else, and any member
this does not recognise, is refused by name. ``guard`` then keeps torch's
loader to the restricted unpickler while it reads the archive, so that the
file cannot be swapped between the check and the load.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnfuse.torch.allowed import guard_ok, pt2_target_ok, sym_expr_ok

# Members read as text or JSON, never unpickled (names below the archive's root folder).
_TEXT = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
)
_TEXT_PREFIXES = ("models/", "extra/")
_TORCH_LOADED = ("data/sample_inputs/",)
# A JSON member torch parses whole: far beyond real graphs (30,000 nodes: about 60 MB).
MAX_JSON_BYTES = 256 << 20


def check(path: Path) -> str | None:
    """Why torch.export.load would run code stored in ``path``, or None if it would not."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            stray = next((n for n in names if "/" not in n), sorted(roots)[-1])
            return (
                f"member '{stray}' lies outside the archive's folder, where torch's fallback "
                "for old archives would unpickle it"
            )
        root = roots.pop() + "/"
        members = {n[len(root) :]: n for n in names if not n.endswith("/")}
        for info in archive.infolist():
            if info.filename.endswith(".json") and info.file_size > MAX_JSON_BYTES:
                return (
                    f"'{info.filename[len(root) :]}' is {info.file_size / 2**20:.0f} MiB of "
                    f"JSON, over bnfuse's bound of {MAX_JSON_BYTES >> 20} MiB"
                )
        for rel, name in members.items():
            if rel.startswith("models/") and rel.endswith(".json"):
                why = _graph(rel, archive.read(name))
                if why is not None:
                    return why
        raw = _raw_payloads(archive, members)
        if isinstance(raw, str):
            return raw
        for rel, name in members.items():
            why = _member(archive, rel, name, raw)
            if why is not None:
                return why
    return None


def _graph(rel: str, data: bytes) -> str | None:
    """Why the serialized program ``rel`` could call more than tensor arithmetic, or None."""
    try:
        program = json.loads(data)
    except (ValueError, RecursionError):
        return f"'{rel}' is not readable JSON"
    if isinstance(program, dict):
        for guard in program.get("guards_code") or []:
            if not isinstance(guard, str) or not guard_ok(guard):
                return f"'{rel}' has a guard that is more than a shape check: {_short(guard)}"
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            target = item.get("target")
            called = "inputs" in item and target is not None
            if called and (not isinstance(target, str) or not pt2_target_ok(target)):
                return f"its graph calls {_short(target)}, which is not pure tensor arithmetic"
            expr = item.get("expr_str")
            if expr is not None and (not isinstance(expr, str) or not sym_expr_ok(expr)):
                return f"'{rel}' has a symbolic expression that is more than one: {_short(expr)}"
            stack.extend(item.values())
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _raw_payloads(archive: zipfile.ZipFile, members: dict[str, str]) -> set[str] | str:
    """Members the configs list as raw tensor bytes; or why a config needs unpickling."""
    from torch.export.pt2_archive import constants as pt2

    raw: set[str] = set()
    for rel, name in members.items():
        if not (rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".json")):
            continue
        folder = rel.rsplit("/", 1)[0] + "/"
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            return f"'{rel}' is not a readable JSON config"
        if not isinstance(config, dict):
            return f"'{rel}' is not a readable JSON config"
        for fqn, meta in config.items():
            if not isinstance(meta, dict):
                return f"'{rel}' is not a readable JSON config"
            stem = str(meta.get("path_name", ""))
            if meta.get("use_pickle"):
                return f"'{fqn}' is stored as a pickle ({folder}{stem})"
            if stem.startswith((pt2.OPAQUE_OBJ_FILENAME_PREFIX, pt2.CUSTOM_OBJ_FILENAME_PREFIX)):
                return f"'{fqn}' is a pickled Python object ({folder}{stem})"
            raw.add(folder + stem)
    return raw


def _member(archive: zipfile.ZipFile, rel: str, name: str, raw: set[str]) -> str | None:
    if rel in _TEXT or rel.startswith(_TEXT_PREFIXES) or rel in raw:
        return None
    if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".json"):
        return None  # configs, read above
    legacy = rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt")
    if rel.startswith(_TORCH_LOADED) or legacy:
        try:
            with _quiet():
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
        except Exception:
            return f"'{rel}' is a pickle that needs more than tensors to load"
        return None
    if rel.startswith("data/aotinductor/"):
        return f"'{rel}' is compiled native code (AOTInductor), which loading would run"
    return f"'{rel}' is a member bnfuse does not know, and cannot tell torch will not unpickle"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """While loading: torch.load only with the restricted unpickler; no other unpickling.

    Defence in depth behind ``check``: whatever torch reaches for, a full
    unpickle fails instead of running.
    """
    import pickle

    from torch.export.pt2_archive import _package

    real_load = torch.load

    def restricted_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise pickle.UnpicklingError("bnfuse: unpickling is refused without --trust-pickle")

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", restricted_load),
        (_package, "pickle", _NoPickle(refuse)),
        (torch._C, "_pickle_load_obj", refuse),
        (_package, "_load_aoti", refuse),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches if hasattr(obj, attr)]
    try:
        for obj, attr, value in patches:
            if hasattr(obj, attr):
                setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


class _NoPickle:
    """Stands for the pickle module inside torch's .pt2 loader: every load refuses."""

    def __init__(self, refuse: Any) -> None:
        self.loads = refuse
        self.load = refuse
        self.Unpickler = refuse
