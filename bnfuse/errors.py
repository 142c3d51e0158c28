"""Errors a user can act on. Each carries a one-line message and a hint.

The CLI prints ``message`` (and ``hint`` when there is one) and exits with
``exit_code``; nothing else in bnfuse decides exit codes.
"""

from __future__ import annotations


class BnfuseError(Exception):
    """Base class: something the user can fix. Exit code 2 (bad usage or input)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


# A hint's command-line flags, as a caller of bnfuse.fuse() passes them.
_AS_ARGUMENTS = (("--force", "force=True"), ("--trust-pickle", "trust_pickle=True"))


def python_hint(hint: str | None) -> str | None:
    """``pass --force to replace it`` as ``pass force=True to replace it``."""
    if hint is None:
        return None
    for flag, argument in _AS_ARGUMENTS:
        hint = hint.replace(flag, argument)
    return hint


def first_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong ("" when it has none).

    Libraries' messages run to tracebacks and dumps, and bnfuse reports on one
    line: the first, except for TorchScript's interpreter, whose first line is
    "The following operation failed..." and whose last says what failed.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1]
    return lines[0]


_CONTROL = (
    {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160))}
    | {10: "\\n", 13: "\\r", 9: "\\t"}
    # line separators and the marks that reorder text (bidirectional overrides)
    | {c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F))}
    | {c: f"\\u{c:04x}" for c in range(0x2066, 0x206A)}
)


def printable(text: str) -> str:
    """``text`` on one line, shown as it is: control characters (a newline or an ESC in a
    node name), line separators and bidirectional overrides escaped (``\\x1b``)."""
    return text.translate(_CONTROL)


class InputError(BnfuseError):
    """The input file is missing, unreadable, or not a model bnfuse can read."""


class OutputError(BnfuseError):
    """The output path cannot be written as asked."""


class ModelError(BnfuseError):
    """The model is readable but invalid in a way that stops the fusion."""
