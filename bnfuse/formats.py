"""What kind of model file this is, from its content (and suffix), without heavy imports."""

from __future__ import annotations

import zipfile
from enum import Enum
from pathlib import Path

from bnfuse.errors import InputError


class Format(Enum):
    ONNX = "ONNX"
    TORCHSCRIPT = "TorchScript"
    EXPORTED = "torch.export ExportedProgram"
    PICKLE = "torch.save pickle"


TORCH_FORMATS = (Format.TORCHSCRIPT, Format.EXPORTED, Format.PICKLE)

# What a file name says: a PyTorch file (TorchScript .pt, torch.export .pt2, a .pth
# pickle), a model file of any kind, and what batch mode collects from a folder or a
# glob (not .pth, which is mostly state_dicts: weights with no architecture to fuse).
TORCH_SUFFIXES = (".pt", ".pt2", ".pth")
MODEL_SUFFIXES = (".onnx", *TORCH_SUFFIXES)
BATCH_SUFFIXES = (".onnx", ".pt", ".pt2")
# Older torch.save pickles go by these too.
_PICKLE_SUFFIXES = (*TORCH_SUFFIXES, ".pkl", ".bin")


def is_pattern(text: str) -> bool:
    """Whether a command-line word is a glob (batch mode expands it) rather than a path."""
    return any(c in text for c in "*?[")


def detect(path: Path) -> Format:
    """The format of ``path``: PyTorch archives by their entries, otherwise ONNX.

    ONNX has no magic number, so anything that is not a PyTorch archive or
    pickle is handed to the ONNX loader, which says clearly when it is not ONNX.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError):
        # not a zip; or a damaged one (zipfile raises UnicodeDecodeError for a mangled
        # name, NotImplementedError for a mangled version)
        with open(path, "rb") as fh:
            head = fh.read(2)
        torch_suffix = path.suffix.lower() in _PICKLE_SUFFIXES
        if head[:1] == b"\x80" and torch_suffix:
            return Format.PICKLE  # a legacy (non-zip) torch.save pickle
        if head == b"PK":
            raise InputError(f"{path}: a damaged zip archive (truncated or corrupt)") from None
        if torch_suffix:
            raise InputError(
                f"{path}: not a PyTorch archive (TorchScript, .pt2 or torch.save) and the "
                "name says it is not ONNX",
                hint="bnfuse reads .onnx, TorchScript .pt and torch.export .pt2",
            ) from None
        return Format.ONNX
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if any(n.endswith("/archive_format") for n in names):
        return Format.EXPORTED
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return Format.PICKLE
    raise InputError(
        f"{path}: a zip archive that is neither TorchScript, a .pt2 ExportedProgram nor a "
        "torch.save file",
        hint="bnfuse reads .onnx, TorchScript .pt and torch.export .pt2",
    )


def require_torch(path: Path, fmt: Format) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"{path}: a {fmt.value} file; reading it needs PyTorch",
            hint="pip install 'bnfuse[torch]'",
        ) from exc
