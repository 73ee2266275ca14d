"""How numbers are written in rac's tables (reports, comparisons, model cards, the CLI)."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    """A number with `digits` decimals for tables; "-" for a missing one."""
    return "-" if x is None else f"{float(x):.{digits}f}"
