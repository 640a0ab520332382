"""`pyguard eval` and `pyguard report` (docs/EVAL.md): a guard measured on labelled
conversations, the metrics recomputed from a results file, the HTML report.

eval runs the labelled file through the path of `classify --jsonl` (batched, resumable, the
same per-line errors), asking for every category's score, then measures the results file it
wrote exactly as `report RESULTS --labels LABELLED` does later: the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from typing import Any

from . import evaluate
from .cli import (EXIT_ERROR, _classify_jsonl, _load_guard, _open_input, _options, _same_file, _threads, check_jsonl_out,
                  check_output, done_results, id_text, parse_json, parse_line, run_id)
from .errors import PyguardError
from .guard.prompt import categories_of

SHOWN = 3  # lines named in an error about many


def _fraction(value: str) -> float:
    """argparse type of --max-fpr: a usage error (exit 2) before any work."""
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a false positive rate from 0 to 1, not {value!r}")
    return x


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", metavar="METRICS.json", help="write the metrics here (default: stdout)")
    p.add_argument("--html", metavar="REPORT.html", help="write the report here: one self-contained page "
                   "(pip install 'pyguard-lg3[report]')")
    p.add_argument("--max-fpr", type=_fraction, action="append", default=[], metavar="P",
                   help="also the lowest threshold whose false positive rate is at most P (repeat for several)")
    p.add_argument("--thresholds-out", metavar="THRESHOLDS.json",
                   help="write the chosen thresholds (the first --max-fpr target's, else F1's best) for classify --thresholds")
    p.add_argument("--partial", action="store_true", help="measure the lines that have both a label and a result even if "
                   "some have only one (marked partial; the exit status is still 2)")


def add_parsers(sub: Any) -> None:
    """The eval and report subcommands, on pyguard's subparsers."""
    e = sub.add_parser("eval", help="classify labelled conversations and measure the guard on them (docs/EVAL.md)")
    e.add_argument("-m", "--model", required=True, help="pyguard file")
    e.add_argument("--jsonl", required=True, metavar="LABELLED", help='file of {"id": ..., "messages": [...], "label": '
                   '"safe"|"unsafe", "categories": ["S1", ...]} lines (every line an id)')
    e.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="the results, as classify --jsonl writes them, "
                   "with every category's score: `pyguard report` measures them again without the model")
    e.add_argument("--resume", action="store_true", help="continue an interrupted eval: keep the results in --out")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs (--out, --metrics, --html, --thresholds-out)")
    _output_args(e)
    e.add_argument("--verify", action="store_true", help="check every checksum of the model file first")
    e.add_argument("--exclude", help="category codes to leave out, e.g. S6,S7")
    e.add_argument("--categories", metavar="JSON", help='file with {"code": "description"} replacing the default categories')
    e.add_argument("--threshold", type=float, help="unsafe when the score reaches this (default: greedy answer)")
    e.add_argument("--thresholds", metavar="JSON", help="a thresholds file (as --thresholds-out writes it): measure the "
                   "guard with those thresholds (docs/THRESHOLDS.md)")
    e.add_argument("--threads", type=_threads, help="kernel threads (default: PYGUARD_THREADS or all cores)")
    e.set_defaults(run=cmd_eval)
    r = sub.add_parser("report", help="metrics and an HTML report from a results file, without the model (docs/EVAL.md)")
    r.add_argument("results", metavar="RESULTS.jsonl", help="results of pyguard eval or classify --jsonl")
    r.add_argument("--labels", metavar="LABELLED", help="the labelled file the results were made from (without: rates only)")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _output_args(r)
    r.set_defaults(run=cmd_report)


def cmd_eval(a: argparse.Namespace) -> int:
    if a.jsonl == "-":
        raise PyguardError("--jsonl -: eval reads LABELLED twice (its labels, then its conversations): give a file")
    check_jsonl_out(a)
    _check_outputs(a, (("--jsonl", a.jsonl), ("-m", a.model), ("--out", a.out)))
    options = _options(a)
    labels = _read_labels(a.jsonl)
    guard = _load_guard(a)
    guard.check_policy(**options)  # a policy the model cannot answer: one error before any line
    codes = list(categories_of(options["categories"], options["exclude"], guard.family))
    _each_line(a.jsonl, [(n, lambda lab=lab: evaluate.check_codes(lab, codes)) for n, lab in _by_line(labels)])
    run = eval_run(run_id(a.model, options))
    done = done_results(a.out, run) if a.resume else None
    with _open_input(a.jsonl) as src:
        _classify_jsonl(guard, src, a.jsonl, a.out, done, options | {"category_scores": True}, run)
    return _measure(a, labels, a.jsonl, a.out, a.model)


def cmd_report(a: argparse.Namespace) -> int:
    if a.labels is None and (a.max_fpr or a.thresholds_out or a.partial):
        raise PyguardError("--max-fpr, --thresholds-out and --partial need --labels: without labels there is nothing to measure")
    _check_outputs(a, (("RESULTS", a.results), ("--labels", a.labels)))
    labels = None if a.labels is None else _read_labels(a.labels)
    return _measure(a, labels, a.labels, a.results, None)


def eval_run(run: str) -> str:
    """The "run" of eval's results: classify's (run_id: the model and the options) with every
    category's score asked for, so that neither command resumes the other's results."""
    return hashlib.sha256(f"{run} category_scores".encode()).hexdigest()[:16]


def _outputs(a: argparse.Namespace) -> list[tuple[str, str]]:
    return [(flag, path) for flag, path in (("--metrics", a.metrics), ("--html", a.html), ("--thresholds-out", a.thresholds_out))
            if path is not None]


def _check_outputs(a: argparse.Namespace, inputs: tuple[tuple[str, str | None], ...]) -> None:
    """Each output writable, not an input or another output, and new unless --overwrite."""
    seen = [(w, p) for w, p in inputs if p is not None]
    for what, path in _outputs(a):
        check_output(path, what)
        for other, p in seen:
            if os.path.abspath(path) == os.path.abspath(p) or _same_file(path, p):
                raise PyguardError(f"{what} {path}: the same file as {other} {p}")
        if not a.overwrite and os.path.exists(path):
            raise PyguardError(f"{what} {path}: exists already: --overwrite to replace it")
        seen.append((what, path))


def _each_line(path: str, checks: list[tuple[int, Any]]) -> None:
    """Run every line's check; each failure is reported on stderr with its line number, then
    one error for all (a labelled file is measured whole or not at all)."""
    bad = 0
    for n, check in checks:
        try:
            check()
        except PyguardError as e:
            print(f"pyguard: {path}: line {n}: {' '.join(str(e).split())}", file=sys.stderr)
            bad += 1
    if bad:
        raise PyguardError(f"{path}: {bad} bad line{'s' * (bad > 1)} (above): every line needs a conversation, an id and a label")


def _read_labels(path: str) -> dict[str, evaluate.Label]:
    """The labels of LABELLED by id (id_text), every line checked before any work."""
    labels: dict[str, evaluate.Label] = {}
    checks = []

    def read(n: int, raw: bytes) -> None:
        item = parse_line(raw)
        if "id" not in item:
            raise PyguardError('no "id": labels and results are joined by id')
        key = id_text(item["id"])
        if key in labels:
            raise PyguardError(f"id {key} also on line {labels[key].line}: ids must be distinct")
        labels[key] = evaluate.parse_label(item, n)

    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    checks.append((n, lambda n=n, raw=raw: read(n, raw)))
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    _each_line(path, checks)
    return labels


def _by_line(labels: dict[str, evaluate.Label]) -> list[tuple[int, evaluate.Label]]:
    return sorted((lab.line, lab) for lab in labels.values())


def _read_results(path: str) -> tuple[str, dict[str, evaluate.Judged], list[str]]:
    """(run, results by id, category codes) of a results file: every line a complete result
    with an id, all of one run; the codes in the policy's order (those of category_scores)."""
    results: dict[str, evaluate.Judged] = {}
    runs: set[str] = set()
    codes: dict[str, None] = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                if not raw.endswith(b"\n"):
                    raise PyguardError("cut short (an interrupted run? eval --resume completes it)")
                item = parse_json(raw)
                r = evaluate.parse_result(item, n)
                if "id" not in item:
                    raise PyguardError('no "id": results are joined to labels by id')
                key = id_text(item["id"])
                if key in results:
                    raise PyguardError(f"id {key} also on line {results[key].line}")
            except PyguardError as e:
                raise PyguardError(f"{path}: line {n}: {e}") from None
            results[key] = r
            runs.add(item["run"])
            codes.update(dict.fromkeys(r.category_scores))
            codes.update(dict.fromkeys(r.categories))
    if not results:
        raise PyguardError(f"{path}: no results: nothing to measure")
    if len(runs) > 1:
        raise PyguardError(f"{path}: results of {len(runs)} runs (other models or options) mixed: cannot be measured together")
    return runs.pop(), results, list(codes)


def _measure(a: argparse.Namespace, labels: dict[str, evaluate.Label] | None, labels_path: str | None, results_path: str,
             model: str | None) -> int:
    """The metrics of a results file (against labels, if any), written as asked. Exit status 0,
    or 2 when lines were missing (refused, or measured with --partial)."""
    run, results, codes = _read_results(results_path)
    partial = False
    if labels is None:
        ev = evaluate.unlabelled(list(results.values()), codes, run)
    else:
        _each_line(labels_path, [(n, lambda lab=lab: evaluate.check_codes(lab, codes)) for n, lab in _by_line(labels)])
        ev = evaluate.join(labels, results, codes, run)
        partial = _partial(labels, results, a.partial, labels_path, results_path)
        if not ev.counts["joined"]:
            raise PyguardError(f"no line has both a label and a result: nothing to measure (are {results_path}'s ids {labels_path}'s?)")
    doc = evaluate.metrics(ev, a.max_fpr)
    text = evaluate.dumps(doc)
    if a.metrics is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_file(a.metrics, text.encode("utf-8"))
    if a.html is not None:
        from .report import render  # matplotlib, the optional `report` extra

        write_file(a.html, render(ev, doc, model=model, results=results_path))
    print(f"pyguard: {_headline(doc)}", file=sys.stderr)
    if a.thresholds_out is not None:
        _write_thresholds(a.thresholds_out, doc)
    return EXIT_ERROR if partial else 0


def _partial(labels: dict, results: dict, allowed: bool, labels_path: str, results_path: str) -> bool:
    """Are lines missing on either side? Refused (one error naming the first few) unless allowed."""
    missing = sorted((labels[k].line, k) for k in labels.keys() - results.keys())
    extra = sorted((results[k].line, k) for k in results.keys() - labels.keys())
    if not missing and not extra:
        return False
    parts = []
    if missing:
        parts.append(f"{len(missing)} labelled line{'s' * (len(missing) > 1)} of {labels_path} without a result (" +
                     ", ".join(f"line {n} id {k}" for n, k in missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "") + ")")
    if extra:
        parts.append(f"{len(extra)} result{'s' * (len(extra) > 1)} in {results_path} without a label (" +
                     ", ".join(f"line {n} id {k}" for n, k in extra[:SHOWN]) + (", ..." if len(extra) > SHOWN else "") + ")")
    if not allowed:
        raise PyguardError(f"{' and '.join(parts)}: metrics over a partial set refused (fix the lines and eval --resume, "
                           "or --partial to measure what is there)")
    print(f"pyguard: warning: partial: {' and '.join(parts)}", file=sys.stderr)
    return True


def _headline(doc: dict) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    v, n = doc["verdict"], doc["counts"]
    if not doc["labelled"]:
        return f"{n['results']} results, {v['flagged']} unsafe ({f(v['rate'])})"
    return (f"{n['joined']} labelled results{' (partial)' if n['partial'] else ''}: precision {f(v['precision'])} "
            f"recall {f(v['recall'])} F1 {f(v['f1'])} FPR {f(v['fpr'])} AUPRC {f(v['auprc'])} ROC AUC {f(v['roc_auc'])}")


def _write_thresholds(path: str, doc: dict) -> None:
    t = evaluate.thresholds(doc)
    if t["threshold"] is None:
        why = "no score keeps the false positive rate within the first --max-fpr" if doc["max_fpr"] else "no unsafe label"
        raise PyguardError(f"--thresholds-out {path}: no threshold for the verdict ({why}): not written")
    left = [c for c in doc["categories"] if c not in t["categories"]]
    if left:
        print(f"pyguard: --thresholds-out: no threshold for {', '.join(left)} (no label of theirs, or the target out of reach): "
              "left out", file=sys.stderr)
    write_file(path, evaluate.dumps(t).encode("utf-8"))


def write_file(path: str, data: bytes) -> None:
    """Write PATH whole or not at all: a temporary file beside it, renamed over it when complete."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # a new file's usual mode, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
