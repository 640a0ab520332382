"""A guard's results measured against labels (docs/EVAL.md): pure numpy, the standard
definitions, deterministic output.

A binary task is examples with a true class (positive: unsafe, or violates a category), a score
(`score`, or `category_scores[code]`) and the decision actually made (the verdict, or the code
listed in `categories`). Thresholds are scores seen in the data: an example is flagged at
threshold t when its score >= t. Counts are exact integers; every ratio is one correctly
rounded division (sums with math.fsum), so the output does not depend on the order of the
examples. A value that is undefined (0/0, no positives) is None, never NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import PyguardError

SAFE, UNSAFE = "safe", "unsafe"


@dataclass(frozen=True)
class Label:
    line: int  # in the labelled file, from 1
    unsafe: bool
    categories: tuple[str, ...] | None  # the violated codes; None: not given (the verdict only)


@dataclass(frozen=True)
class Judged:
    """The fields of a result line that metrics use."""

    line: int  # in the results file, from 1
    unsafe: bool
    score: float
    categories: tuple[str, ...]
    category_scores: Mapping[str, float]


@dataclass
class Task:
    """One binary problem: arrays over its examples."""

    score: np.ndarray  # float64
    flagged: np.ndarray  # bool: the decision the results made
    positive: np.ndarray | None = None  # bool: the label; None for unlabelled results


@dataclass
class Evaluation:
    """Results joined to their labels (or results alone), ready for metrics() and the report."""

    run: str
    codes: list[str]  # the policy's category codes, in the policy's order
    verdict: Task
    categories: dict[str, Task]
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.verdict.positive is not None


def parse_label(item: Mapping[str, Any], line: int) -> Label:
    """The label of a labelled --jsonl line: "label": "safe"|"unsafe", optional "categories"."""
    label = item.get("label")
    if label not in (SAFE, UNSAFE):
        raise PyguardError('"label" must be "safe" or "unsafe"' + (f", not {json.dumps(label)[:40]}" if "label" in item else
                                                                  ": the line has no label"))
    if "categories" not in item:
        return Label(line, label == UNSAFE, None)
    cats = item["categories"]
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise PyguardError('"categories" must be a list of category codes, e.g. ["S1", "S10"]')
    if len(set(cats)) != len(cats):
        raise PyguardError(f'"categories" lists a code twice: {", ".join(cats)}')
    if label == SAFE and cats:
        raise PyguardError(f'a "safe" line cannot violate categories ({", ".join(cats)}): label it "unsafe" or drop them')
    return Label(line, label == UNSAFE, tuple(cats) if cats else None)


def check_codes(label: Label, codes: Sequence[str]) -> None:
    """A label's codes must be the policy's: other codes could never be predicted."""
    bad = [c for c in label.categories or () if c not in codes]
    if bad:
        raise PyguardError(f"category {', '.join(bad)} is not in the policy ({', '.join(codes)})")


def _probability(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1:
        raise PyguardError(f"{what} must be a number from 0 to 1, not {json.dumps(x)[:40]}")
    return float(x)


def parse_result(item: Any, line: int) -> Judged:
    """A result line as `classify --jsonl` and `eval` write it (Result.to_dict() and "run")."""
    if not isinstance(item, dict) or item.get("verdict") not in (SAFE, UNSAFE) or not isinstance(item.get("run"), str):
        raise PyguardError('not a pyguard result (an object with "verdict" and "run")')
    cats = item.get("categories")
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise PyguardError('"categories" must be a list of codes')
    scores = item.get("category_scores", {})
    if not isinstance(scores, dict):
        raise PyguardError('"category_scores" must be an object')
    return Judged(line, item["verdict"] == UNSAFE, _probability(item.get("score"), '"score"'), tuple(cats),
                  {c: _probability(s, f'"category_scores" of {c}') for c, s in scores.items()})


def join(labels: Mapping[str, Label], results: Mapping[str, Judged], codes: Sequence[str], run: str) -> Evaluation:
    """The examples that have both a label and a result (by id), in the labelled file's order;
    counts say what was left out. Every result used for a category must have that category's
    score (results made by `pyguard eval` have all of them)."""
    keys = sorted(labels.keys() & results.keys(), key=lambda k: labels[k].line)
    lab, res = [labels[k] for k in keys], [results[k] for k in keys]
    for r in res:
        if set(r.category_scores) != set(codes):
            raise PyguardError(f"results line {r.line} has no category scores for {', '.join(sorted(set(codes) - set(r.category_scores)))}"
                               ": metrics need results made by `pyguard eval`, which asks for every category's score")
    verdict = Task(np.array([r.score for r in res], np.float64), np.array([r.unsafe for r in res], bool),
                   np.array([x.unsafe for x in lab], bool))
    categories = {}
    for c in codes:
        # an unsafe label without categories says nothing of any category: left out of theirs
        used = [i for i, x in enumerate(lab) if not x.unsafe or x.categories is not None]
        categories[c] = Task(np.array([res[i].category_scores[c] for i in used], np.float64),
                             np.array([c in res[i].categories for i in used], bool),
                             np.array([c in (lab[i].categories or ()) for i in used], bool))
    counts = {"labels": len(labels), "results": len(results), "joined": len(keys),
              "labels_without_result": len(labels.keys() - results.keys()),
              "results_without_label": len(results.keys() - labels.keys()),
              "unsafe_without_categories": sum(x.unsafe and x.categories is None for x in lab)}
    return Evaluation(run, list(codes), verdict, categories, counts)


def unlabelled(results: Sequence[Judged], codes: Sequence[str], run: str) -> Evaluation:
    """Results alone: the verdict's and the categories' decisions and scores (NaN where a
    result has no category scores: classify leaves them out of safe verdicts)."""
    verdict = Task(np.array([r.score for r in results], np.float64), np.array([r.unsafe for r in results], bool))
    categories = {c: Task(np.array([r.category_scores.get(c, math.nan) for r in results], np.float64),
                          np.array([c in r.categories for r in results], bool)) for c in codes}
    return Evaluation(run, list(codes), verdict, categories, {"results": len(results)})


@dataclass(frozen=True)
class Curve:
    """Counts at every distinct score taken as the threshold, highest first: tp[k] and fp[k]
    are the positives and negatives with score >= thresholds[k]."""

    thresholds: np.ndarray
    tp: np.ndarray  # int64, cumulative
    fp: np.ndarray
    positives: int
    negatives: int

    @classmethod
    def of(cls, task: Task) -> "Curve":
        distinct, where = np.unique(task.score, return_inverse=True)
        n = len(distinct)
        tp = np.cumsum(np.bincount(where[task.positive], minlength=n)[::-1])
        fp = np.cumsum(np.bincount(where[~task.positive], minlength=n)[::-1])
        return cls(distinct[::-1], tp.astype(np.int64), fp.astype(np.int64), int(task.positive.sum()),
                   int((~task.positive).sum()))

    def average_precision(self) -> float | None:
        """sum over thresholds of (recall gained) x (precision there), scikit-learn's AP: no
        interpolation between points."""
        if not self.positives:
            return None
        gained = np.diff(self.tp, prepend=0)
        return math.fsum(int(g) * int(t) / int(t + f) for g, t, f in zip(gained, self.tp, self.fp) if g) / self.positives

    def roc_auc(self) -> float | None:
        """Area under the ROC curve through (0, 0) and every threshold's (FPR, TPR), by
        trapezoids: tied scores make a diagonal step, counted as half (scikit-learn's way)."""
        if not self.positives or not self.negatives:
            return None
        tp = np.concatenate([[0], self.tp])
        area = int(np.sum(np.diff(np.concatenate([[0], self.fp])) * (tp[1:] + tp[:-1])))  # exact, in twice the unit
        return area / (2 * self.positives * self.negatives)

    def point(self, k: int) -> dict[str, float | None]:
        tp, fp = int(self.tp[k]), int(self.fp[k])
        return {"threshold": float(self.thresholds[k]), **rates(tp, fp, self.positives - tp, self.negatives - fp)}

    def best_f1(self) -> dict[str, float | None] | None:
        """The threshold of highest F1 (the highest threshold among equals), None without positives."""
        if not self.positives:
            return None
        f1 = 2 * self.tp / (self.tp + self.fp + self.positives)
        return self.point(int(np.argmax(f1)))

    def at_fpr(self, target: float) -> dict[str, float | None]:
        """The lowest threshold whose FPR is at most target; None when there are no negatives or
        when even the highest score flags too many of them."""
        ok = np.flatnonzero(self.fp / max(self.negatives, 1) <= target) if self.negatives else []
        none = {"threshold": None, **dict.fromkeys(("precision", "recall", "f1", "fpr"))}
        return {"target": target, **(self.point(int(ok[-1])) if len(ok) else none)}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | None]:
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "fpr": _ratio(fp, fp + tn)}


def binary(task: Task, max_fpr: Sequence[float]) -> dict[str, Any]:
    """Every metric of a labelled task (docs/EVAL.md)."""
    y, flagged = task.positive, task.flagged
    tp, fp = int(np.sum(y & flagged)), int(np.sum(~y & flagged))
    fn, tn = int(np.sum(y & ~flagged)), int(np.sum(~y & ~flagged))
    curve = Curve.of(task)
    return {"support": {"positive": tp + fn, "negative": fp + tn}, "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
            **rates(tp, fp, fn, tn), "auprc": curve.average_precision(), "roc_auc": curve.roc_auc(),
            "best_f1": curve.best_f1(), "max_fpr": [curve.at_fpr(t) for t in max_fpr]}


def _flag_rate(task: Task) -> dict[str, float | int | None]:
    n, k = len(task.flagged), int(task.flagged.sum())
    return {"flagged": k, "rate": _ratio(k, n)}


def metrics(ev: Evaluation, max_fpr: Sequence[float] = ()) -> dict[str, Any]:
    """The metrics document: labelled, every metric of the verdict and of each category;
    unlabelled, how often each was flagged."""
    head = {"run": ev.run, "labelled": ev.labelled, "counts": ev.counts}
    if not ev.labelled:
        return head | {"verdict": _flag_rate(ev.verdict), "categories": {c: _flag_rate(t) for c, t in ev.categories.items()}}
    head["counts"] = ev.counts | {"partial": bool(ev.counts["labels_without_result"] or ev.counts["results_without_label"])}
    return head | {"max_fpr": list(max_fpr), "verdict": binary(ev.verdict, max_fpr),
                   "categories": {c: binary(t, max_fpr) for c, t in ev.categories.items()}}


def chosen(block: Mapping[str, Any]) -> float | None:
    """The threshold written to a thresholds file for a task: the first --max-fpr target's, else
    the F1-maximising one; None when undefined, or when no example is positive (a threshold
    could then only add false positives)."""
    point = block["max_fpr"][0] if block["max_fpr"] else block["best_f1"]
    return None if point is None or not block["support"]["positive"] else point["threshold"]


def thresholds(doc: Mapping[str, Any]) -> dict[str, Any]:
    """{"threshold": verdict's, "categories": {code: its own}}, the categories without one left
    out (no positives, or a target no score reaches)."""
    cats = {c: chosen(b) for c, b in doc["categories"].items()}
    return {"threshold": chosen(doc["verdict"]), "categories": {c: t for c, t in cats.items() if t is not None}}


def dumps(doc: Mapping[str, Any]) -> str:
    """Deterministic JSON: sorted keys, floats as repr (the shortest text that reads back the
    same), no NaN."""
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
