"""The HTML report: one self-contained page that parses, every image an embedded PNG that
decodes at a sane size, nothing fetched, the same bytes twice; labelled and unlabelled; a
clear error without matplotlib."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest

from pyguard import PyguardError, cli
from pyguard.report import render

CODES = [f"S{k}" for k in range(1, 14)]


def write_run(tmp_path, n: int = 300, seed: int = 0) -> tuple[str, str]:
    """A labelled file and results for it, as eval writes them (random, some categories never
    labelled, one unsafe line without categories)."""
    rng = np.random.default_rng(seed)
    labels, results = [], []
    for i in range(n):
        unsafe = bool(rng.random() < 0.35)
        cats = sorted(rng.choice(["S1", "S2", "S9", "S10"], size=rng.integers(1, 3), replace=False).tolist()) if unsafe else []
        item = {"id": i, "messages": [{"role": "user", "content": f"message {i}"}], "label": "unsafe" if unsafe else "safe"}
        if cats and i != 7:
            item["categories"] = cats
        labels.append(item)
        score = float(np.clip(rng.normal(0.7 if unsafe else 0.3, 0.2), 0, 1).round(3))  # ties, 0 and 1 among them
        split = rng.dirichlet(np.ones(len(CODES)))
        judged = score >= 0.5
        results.append({"id": i, "verdict": "unsafe" if judged else "safe",
                        "categories": [CODES[int(np.argmax(split))]] if judged else [],
                        "score": score, "category_scores": {c: float(score * p) for c, p in zip(CODES, split)},
                        "run": "0123456789abcdef"})
    lab, res = tmp_path / "labelled.jsonl", tmp_path / "results.jsonl"
    lab.write_text("".join(json.dumps(x) + "\n" for x in labels))
    res.write_text("".join(json.dumps(x) + "\n" for x in results))
    return str(lab), str(res)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        assert not any(k in a for k in ("href", "srcset")) or tag == "a"


def check_page(html: bytes, images: int) -> Page:
    p = Page()
    p.feed(html.decode("utf-8"))
    p.close()
    assert p.tags[:3] == ["html", "head", "meta"] and "script" not in p.tags and "link" not in p.tags
    assert b"http://" not in html and b"https://" not in html  # nothing fetched
    assert len(p.images) == images
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        h, w = pixels.shape[:2]
        assert 600 <= w <= 1200 and 250 <= h <= 600, (w, h)
        assert pixels[..., :3].std() > 0.05  # something drawn, not a blank image
    return p


def test_labelled_report(tmp_path, capsys):
    lab, res = write_run(tmp_path)
    out = tmp_path / "report.html"
    assert cli.main(["report", res, "--labels", lab, "--max-fpr", "0.05", "--max-fpr", "0.2", "--html", str(out)]) == 0
    html = out.read_bytes()
    check_page(html, images=3)  # the curves, the histograms, the category bars
    text = html.decode()
    for words in ("Guard evaluation", "run <code>0123456789abcdef</code>", "Confusion matrix", "lowest threshold with FPR &le; 0.05",
                  "threshold of best F1", "No labelled unsafe example of S3", "1 unsafe without categories"):
        assert words in text, words
    metrics = json.loads(capsys.readouterr().out)
    assert f">{metrics['verdict']['confusion']['tp']}<br><small>true positives" in text
    # the same bytes again
    again = tmp_path / "again.html"
    assert cli.main(["report", res, "--labels", lab, "--max-fpr", "0.05", "--max-fpr", "0.2", "--html", str(again)]) == 0
    assert again.read_bytes() == html


def test_unlabelled_report(tmp_path, capsys):
    _, res = write_run(tmp_path)
    out = tmp_path / "report.html"
    assert cli.main(["report", res, "--html", str(out)]) == 0
    check_page(out.read_bytes(), images=2)  # the rates, the histogram
    doc = json.loads(capsys.readouterr().out)
    assert doc["labelled"] is False and doc["counts"] == {"results": 300}
    flagged = sum(r["verdict"] == "unsafe" for r in map(json.loads, open(res)))
    assert doc["verdict"] == {"flagged": flagged, "rate": flagged / 300}


def test_a_report_of_a_degenerate_set_still_renders(tmp_path, capsys):
    """A single result, labelled safe, scored exactly 0: no positives anywhere, every curve and
    most metrics undefined."""
    lab, res = tmp_path / "labelled.jsonl", tmp_path / "results.jsonl"
    lab.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}], "label": "safe"}) + "\n")
    res.write_text(json.dumps({"id": "a", "verdict": "safe", "categories": [], "score": 0.0, "run": "r",
                               "category_scores": dict.fromkeys(CODES, 0.0)}) + "\n")
    out = tmp_path / "report.html"
    assert cli.main(["report", str(res), "--labels", str(lab), "--max-fpr", "0.1", "--html", str(out)]) == 0
    check_page(out.read_bytes(), images=2)  # the (empty) curves and the histogram: no category has a positive
    assert 'title="undefined: no examples to divide by">n/a' in out.read_text()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    from pyguard import evaluate

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    ev = evaluate.unlabelled([evaluate.Judged(1, False, 0.2, (), {})], [], "r")
    with pytest.raises(PyguardError, match=r"pip install 'pyguard-lg3\[report\]'"):
        render(ev, evaluate.metrics(ev))


def test_the_core_never_imports_matplotlib():
    import subprocess

    code = "import sys, pyguard, pyguard.cli, pyguard.evaluate, pyguard.cli_eval; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
