"""Number formatting shared by the text reports."""

from __future__ import annotations

import math


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
