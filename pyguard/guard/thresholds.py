"""Score thresholds: the one verdict rule, applied identically by the API, CLI, service and Ray.

A guard computes `score` (P(unsafe) as the first answer word) and, per category, `category_scores`
(score x P(that code is named first)). Thresholds turn them into the verdict:

- `threshold` (overall, 0 to 1): the verdict is unsafe exactly when score >= threshold;
  without it the model's greedy first word decides;
- `thresholds` ({code: 0 to 1}): the verdict is also unsafe when any category's score reaches
  its own threshold (they only ever add unsafe verdicts; the category scores are then computed
  for every conversation, before the answer is decoded).

The verdict so decided is imposed on the answer's first word (the model then names the
categories greedily after it), and the listed categories are the answer's, followed by those
whose score reached their threshold and that the answer did not name, in the policy's order.
docs/THRESHOLDS.md has the rule, the file format and worked cases.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from ..errors import PyguardError
from .verdict import SAFE, UNSAFE


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


def check(thresholds: Any, codes: Iterable[str] | None = None, name: str = "thresholds") -> dict[str, float] | None:
    """None, or {code: threshold} with every threshold a number from 0 to 1 and, when codes
    (the policy's) are given, every code among them: a threshold that could never apply is an
    error, not ignored. An empty mapping is no thresholds (None)."""
    if thresholds is None:
        return None
    if not isinstance(thresholds, Mapping):
        raise PyguardError(f"{name} must be a mapping {{code: threshold}}, not {type(thresholds).__name__}")
    out = {}
    for code, t in thresholds.items():
        if not isinstance(code, str):
            raise PyguardError(f"{name}: the code {code!r:.40} is not a str")
        if not _number(t):
            raise PyguardError(f"{name}: {code[:40]} must be a number from 0 to 1, not {t!r:.40}")
        out[code] = float(t)
    if codes is not None:
        codes = list(codes)
        unknown = [c for c in out if c not in codes]
        if unknown:
            raise PyguardError(f"{name}: {', '.join(c[:40] for c in unknown[:5])} not among the categories judged "
                               f"({', '.join(codes)})")
    return out or None


def impose(score: float, category_scores: Mapping[str, float], threshold: float | None,
           thresholds: Mapping[str, float] | None) -> str | None:
    """The verdict the thresholds decide, or None when the model's greedy answer decides."""
    if thresholds and any(category_scores[c] >= t for c, t in thresholds.items()):
        return UNSAFE
    if threshold is not None:
        return UNSAFE if score >= threshold else SAFE
    return None


def listed(answer_codes: list[str], category_scores: Mapping[str, float], thresholds: Mapping[str, float] | None,
           policy: Iterable[str]) -> list[str]:
    """The categories of a result: the answer's, then those whose score reached their threshold
    that the answer did not name, in the policy's order."""
    reached = [c for c in policy if thresholds and c in thresholds and category_scores[c] >= thresholds[c]]
    return answer_codes + [c for c in reached if c not in answer_codes]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read(path: str) -> tuple[float | None, dict[str, float] | None]:
    """(threshold, thresholds) of a thresholds file, as `pyguard eval` writes it:
    {"threshold": number or null, "categories": {"S1": number, ...}}. Anything else (not JSON,
    NaN, another key, a threshold outside 0..1 or not a number) raises PyguardError naming the
    file, in one line. Category codes are checked against the policy where it is known."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(), parse_constant=_no_constant)
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PyguardError(f"{path}: not UTF-8 (byte {e.start + 1})") from None
    except RecursionError:
        raise PyguardError(f"{path}: not JSON (nested too deeply)") from None
    except ValueError as e:
        raise PyguardError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or "categories" not in data:
        raise PyguardError(f'{path}: expected {{"threshold": number or null, "categories": {{"S1": number, ...}}}}')
    other = [k for k in data if k not in ("threshold", "categories")]
    if other:
        raise PyguardError(f"{path}: unknown key {other[0]!r:.40} (the keys are threshold and categories)")
    threshold = data.get("threshold")
    if threshold is not None and not _number(threshold):
        raise PyguardError(f"{path}: threshold must be a number from 0 to 1 or null, not {threshold!r:.40}")
    return (None if threshold is None else float(threshold)), check(data["categories"], name=f"{path}: categories")
