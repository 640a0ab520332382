"""Argument checks shared by the Python API, the service and the Ray layer: each returns the
value or raises PyguardError naming the argument, before any work is done."""

from __future__ import annotations

from typing import Any

from .errors import PyguardError


def integer(value: Any, name: str, low: int) -> int:
    """An int (not a bool) of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PyguardError(f"{name} must be an integer of at least {low}, not {value!r:.60}")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise PyguardError(f"{name} must be True or False, not {value!r:.60}")
    return value


def threshold(value: Any) -> float | None:
    """None, or a number from 0 to 1 (NaN fails the range too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PyguardError(f"threshold must be a number from 0 to 1 (or None), not {value!r:.60}")
    return float(value)
