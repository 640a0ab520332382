"""The HTML report of an evaluation (docs/EVAL.md): one self-contained page, its plots PNG data
URIs, no script and nothing fetched. The only module that imports matplotlib (the optional
`report` extra), when a report is made; the Agg backend, a fixed size and resolution and no
metadata, so that the same evaluation gives the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping

import numpy as np

from .errors import PyguardError
from .evaluate import Curve, Evaluation, Task

DPI = 100
SAFE_COLOR, UNSAFE_COLOR = "#3b75af", "#c8463b"
BINS = np.linspace(0, 1, 41)
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; max-width: 1040px;
       margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.meta { color: #555; margin: 0 0 12px; } .meta code { color: #222; }
.warn { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; border-radius: 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 4px 10px; border-bottom: 1px solid #e3e3e3; }
th { text-align: left; background: #f5f5f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.big td.n { font-size: 18px; } .none { color: #999; }
table.cm th { white-space: nowrap; } table.cm td { width: 130px; height: 48px; text-align: center; font-size: 18px; border: 1px solid #ccc; }
td.ok { background: #e3f1e3; } td.bad { background: #f8e1de; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; } p.note { color: #555; font-size: 13px; }
"""


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display, the same pixels everywhere
        from matplotlib.figure import Figure
    except ImportError:
        raise PyguardError("the HTML report needs matplotlib: pip install 'pyguard-lg3[report]'") from None
    return Figure


def _png(fig) -> str:
    """The figure as an <img> with a PNG data URI (no metadata: the same bytes each time)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _num(x: float | int | None, threshold: bool = False) -> str:
    """A cell: a count, a rate to 3 decimals, a threshold to 4 significant digits (scores of a
    poor model can be 1e-90), n/a for undefined."""
    if x is None:
        return '<span class="none" title="undefined: no examples to divide by">n/a</span>'
    return str(x) if isinstance(x, int) else f"{x:.4g}" if threshold else f"{x:.3f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _marks(block: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], str]]:
    """(label, point, style) of the operating point used and of the chosen thresholds."""
    used = {"threshold": None, **{k: block[k] for k in ("precision", "recall", "fpr")}}
    marks = [("used (the results' verdicts)", used, "ko")]
    if block["best_f1"]:
        marks.append((f"best F1, threshold {block['best_f1']['threshold']:.4g}", block["best_f1"], "D"))
    for p in block["max_fpr"]:
        if p["threshold"] is not None:
            marks.append((f"FPR <= {p['target']:g}, threshold {p['threshold']:.4g}", p, "s"))
    return marks


def _curves(Figure, block: Mapping[str, Any], task: Task, title: str) -> str:
    """Precision-recall and ROC curves side by side, the chosen points marked."""
    c = Curve.of(task)
    fig = Figure(figsize=(10, 4.2))
    pr, roc = fig.subplots(1, 2)
    if c.positives:
        recall = np.concatenate([[0], c.tp / c.positives])
        precision = np.concatenate([[1], c.tp / (c.tp + c.fp)])
        pr.plot(recall, precision, drawstyle="steps-pre", color=UNSAFE_COLOR, lw=2)
        pr.axhline(c.positives / (c.positives + c.negatives), color="#999", ls=":", lw=1, label="chance (share of unsafe)")
    if c.positives and c.negatives:
        roc.plot(np.concatenate([[0], c.fp / c.negatives]), np.concatenate([[0], c.tp / c.positives]), color=UNSAFE_COLOR, lw=2)
        roc.plot([0, 1], [0, 1], color="#999", ls=":", lw=1, label="chance")
    for label, p, style in _marks(block):
        if p["recall"] is not None and p["precision"] is not None:
            pr.plot(p["recall"], p["precision"], style, ms=8, mfc="none" if style != "ko" else "k", label=label)
        if p["recall"] is not None and p["fpr"] is not None:
            roc.plot(p["fpr"], p["recall"], style, ms=8, mfc="none" if style != "ko" else "k", label=label)
    auprc, auc = block["auprc"], block["roc_auc"]
    pr.set(xlabel="recall (unsafe found)", ylabel="precision (flagged that are unsafe)", xlim=(0, 1.01), ylim=(0, 1.03),
           title=f"{title}: precision-recall (AUPRC {_plain(auprc)})")
    roc.set(xlabel="false positive rate (safe flagged)", ylabel="recall (true positive rate)", xlim=(-0.01, 1), ylim=(0, 1.03),
            title=f"{title}: ROC (AUC {_plain(auc)})")
    for ax in (pr, roc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left" if ax is pr else "lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _plain(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _histogram(Figure, task: Task, lines: list[tuple[str, float]], xlabel: str) -> str:
    """Score histograms, safe against unsafe labels (or all results), thresholds as lines."""
    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    if task.positive is None:
        ax.hist(task.score, bins=BINS, color="#777", label=f"all results ({len(task.score)})")
    else:
        for mask, name, color in ((~task.positive, "labelled safe", SAFE_COLOR), (task.positive, "labelled unsafe", UNSAFE_COLOR)):
            ax.hist(task.score[mask], bins=BINS, color=color, alpha=0.55, label=f"{name} ({int(mask.sum())})")
    for (label, x), style in zip(lines, ("-", "--", ":", "-.")):
        ax.axvline(x, color="k", ls=style, lw=1.2, label=label)
    ax.set(xlabel=xlabel, ylabel="conversations", xlim=(0, 1))
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts: no 0.25 of a conversation
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _category_bars(Figure, doc: Mapping[str, Any], codes: list[str]) -> str:
    """F1, precision and recall at the verdicts used, and AUPRC, per category with labelled
    examples, each bar's value written on it (n/a: undefined); the support under each."""
    fig = Figure(figsize=(10, 3.8))
    ax = fig.subplots()
    x = np.arange(len(codes))
    keys = (("f1", "F1", "#333"), ("precision", "precision", "#3b75af"), ("recall", "recall", "#e19c24"),
            ("auprc", "AUPRC (from the scores)", "#9a9a9a"))
    for i, (key, name, color) in enumerate(keys):
        values = [doc["categories"][c][key] for c in codes]
        bars = ax.bar(x + (i - 1.5) * 0.2, [0 if v is None else v for v in values], 0.2, color=color, label=name)
        ax.bar_label(bars, ["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, [f"{c}\n{doc['categories'][c]['support']['positive']} unsafe" for c in codes], fontsize=8)
    ax.set(ylim=(0, 1.25), yticks=np.linspace(0, 1, 6), ylabel="0 to 1")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _rate_bars(Figure, doc: Mapping[str, Any], codes: list[str]) -> str:
    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    names = ["unsafe"] + codes
    rates = [doc["verdict"]["rate"]] + [doc["categories"][c]["rate"] for c in codes]
    bars = ax.bar(names, [r or 0 for r in rates], color=[UNSAFE_COLOR] + ["#777"] * len(codes))
    ax.bar_label(bars, [f"{(r or 0) * 100:.1f}%" for r in rates], fontsize=8)
    ax.set(ylabel="share of results flagged", ylim=(0, max([r or 0 for r in rates] + [0.01]) * 1.2))
    ax.yaxis.set_major_formatter(lambda y, _: f"{y * 100:.0f}%")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _headline(block: Mapping[str, Any]) -> str:
    rows = [("at the verdicts used", {"threshold": None, **block})]
    if block["best_f1"]:
        rows.append(("threshold of best F1", block["best_f1"]))
    rows += [(f"lowest threshold with FPR &le; {p['target']:g}", p) for p in block["max_fpr"]]
    out = ["<table class=big><tr><th></th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th><th>FPR</th></tr>"]
    for name, p in rows:
        t = "verdict" if name.startswith("at the") else _num(p["threshold"], threshold=True)
        out.append(f"<tr><th>{name}</th><td class=n>{t}</td>" + "".join(f"<td class=n>{_num(p[k])}</td>" for k in
                                                                            ("precision", "recall", "f1", "fpr")) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _confusion(block: Mapping[str, Any]) -> str:
    m = block["confusion"]
    return ("<table class=cm><tr><th></th><th>judged unsafe</th><th>judged safe</th></tr>"
            f"<tr><th>labelled unsafe</th><td class=ok>{m['tp']}<br><small>true positives</small></td>"
            f"<td class=bad>{m['fn']}<br><small>missed</small></td></tr>"
            f"<tr><th>labelled safe</th><td class=bad>{m['fp']}<br><small>false positives</small></td>"
            f"<td class=ok>{m['tn']}<br><small>true negatives</small></td></tr></table>")


def _category_table(doc: Mapping[str, Any], codes: list[str]) -> str:
    head = ["code", "labelled with it", "others", "TP", "FP", "FN", "precision", "recall", "F1", "AUPRC", "ROC AUC", "best-F1 threshold"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for c in codes:
        b = doc["categories"][c]
        cells = [b["support"]["positive"], b["support"]["negative"], b["confusion"]["tp"], b["confusion"]["fp"],
                 b["confusion"]["fn"], b["precision"], b["recall"], b["f1"], b["auprc"], b["roc_auc"],
                 b["best_f1"]["threshold"] if b["best_f1"] else None]
        out.append(f"<tr><th>{_e(c)}</th>" + "".join(f"<td class=n>{_num(x)}</td>" for x in cells[:-1])
                   + f"<td class=n>{_num(cells[-1], threshold=True)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def render(ev: Evaluation, doc: Mapping[str, Any], model: str | None = None, results: str | None = None) -> bytes:
    """The report page of an evaluation and its metrics document (evaluate.metrics)."""
    Figure = _matplotlib()
    import matplotlib

    with matplotlib.rc_context({"font.size": 10, "svg.hashsalt": "pyguard", "axes.spines.top": False,
                                "axes.spines.right": False}):
        body = _labelled(Figure, ev, doc) if ev.labelled else _unlabelled(Figure, ev, doc)
    n = doc["counts"]
    facts = [("model", model), ("results", results), ("run", ev.run)]
    meta = " &middot; ".join(f"{k} <code>{_e(v)}</code>" for k, v in facts if v is not None)
    if ev.labelled:
        counts = (f"{n['joined']} labelled conversations measured ({int(ev.verdict.positive.sum())} labelled unsafe, "
                  f"{int((~ev.verdict.positive).sum())} safe; {n['unsafe_without_categories']} unsafe without categories "
                  "count for the verdict only)")
        if n["partial"]:
            counts += (f'<p class=warn><b>Partial:</b> {n["labels_without_result"]} labelled lines have no result and '
                       f'{n["results_without_label"]} results have no label; the metrics cover only the lines with both.</p>')
    else:
        counts = f"{n['results']} results, no labels: how often the guard flagged, and its scores"
    title = "Guard evaluation" if ev.labelled else "Guard results"
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
            f"<title>pyguard: {title}</title><style>{STYLE}</style></head><body>"
            f"<h1>{title}</h1><p class=meta>{meta}</p><p>{counts}</p>{body}</body></html>\n").encode("utf-8")


def _labelled(Figure, ev: Evaluation, doc: Mapping[str, Any]) -> str:
    v = doc["verdict"]
    lines = ([(f"best F1 {v['best_f1']['threshold']:.4g}", v["best_f1"]["threshold"])] if v["best_f1"] else [])
    lines += [(f"FPR <= {p['target']:g}: {p['threshold']:.4g}", p["threshold"]) for p in v["max_fpr"] if p["threshold"] is not None]
    scored = [c for c in ev.codes if doc["categories"][c]["support"]["positive"]]
    unscored = [c for c in ev.codes if c not in scored]
    parts = [
        "<h2>The verdict</h2>",
        f"<p>AUPRC <b>{_num(v['auprc'])}</b> &middot; ROC AUC <b>{_num(v['roc_auc'])}</b> "
        f"&middot; {v['support']['positive']} unsafe, {v['support']['negative']} safe</p>",
        _headline(v),
        '<p class=note>A threshold t flags a conversation when its score &ge; t; the thresholds are scores seen in the data. '
        "FPR: the share of safe conversations flagged.</p>",
        _curves(Figure, v, ev.verdict, "verdict"),
        "<h2>Scores</h2>",
        _histogram(Figure, ev.verdict, lines, "score: P(unsafe)"),
        "<h2>Confusion matrix (the verdicts used)</h2>",
        _confusion(v),
        "<h2>Categories</h2>",
        "<p class=note>Over the safe lines and the unsafe lines that list their categories; a category's score is "
        "its <code>category_scores</code> entry.</p>",
    ]
    if scored:
        parts.append(_category_bars(Figure, doc, scored))
    if unscored:
        parts.append(f"<p class=note>No labelled unsafe example of {', '.join(_e(c) for c in unscored)}: "
                     "their recall, F1 and curves are undefined.</p>")
    parts.append(_category_table(doc, ev.codes))
    return "".join(parts)


def _unlabelled(Figure, ev: Evaluation, doc: Mapping[str, Any]) -> str:
    v = doc["verdict"]
    return "".join([
        "<h2>How often the guard flagged</h2>",
        f"<p><b>{v['flagged']}</b> of {doc['counts']['results']} unsafe ({_num(v['rate'])})</p>",
        _rate_bars(Figure, doc, ev.codes),
        "<h2>Scores</h2>",
        _histogram(Figure, ev.verdict, [], "score: P(unsafe)"),
    ])
