"""Formatting shared by the text reports: numbers, and names made safe for each medium.

A node, output or file name comes from the model and may hold anything: a newline
and ``## PASS``, a Markdown link, an ESC sequence. Each report escapes it for its
medium: ``md_text`` and ``md_code`` here for Markdown, ``errors.printable`` for
terminals and XML, rich's markup escape where rich reads markup.
"""

from __future__ import annotations

import math
import re

from bnfuse.errors import printable

# What Markdown (GitHub's) reads as markup in running text.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|!~&:])")
_BACKTICKS = re.compile(r"`+")


def md_text(text: object) -> str:
    """``text`` as literal Markdown prose: no emphasis, link, heading, HTML or new line."""
    return _MD_SPECIAL.sub(r"\\\1", printable(str(text)))


def md_code(text: object, *, in_table: bool = False) -> str:
    """``text`` as one inline code span, whatever backticks it holds (in a table cell, its
    ``|`` escaped too: GitHub splits cells before it reads code)."""
    body = printable(str(text))
    if in_table:
        body = body.replace("|", "\\|")
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def db(x: float) -> str:
    return "exact" if math.isinf(x) else f"{x:.1f} dB"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
