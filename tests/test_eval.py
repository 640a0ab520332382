"""pyguard eval and pyguard report: the metrics against scikit-learn (a test-only oracle) on
random and adversarial scores, labels and their errors, and the commands end to end on the
decisive model (the same bytes from eval and report, resume, partial sets, thresholds that go
back into classify)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings, strategies as st

import synth
from pyguard import PyguardError, cli, evaluate
from pyguard.cli_eval import eval_run

# ---------------------------------------------------------------- the metrics against scikit-learn

# scores on a coarse grid make ties common; 0 and 1 exactly are among them
SCORES = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0, 1, allow_nan=False))


@st.composite
def tasks(draw) -> evaluate.Task:
    n = draw(st.integers(0, 40))
    kind = draw(st.sampled_from(["random", "one class", "all tied"]))
    y = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    if kind == "one class":
        y[:] = draw(st.booleans())
    s = np.array(draw(st.lists(SCORES, min_size=n, max_size=n)), np.float64)
    if kind == "all tied" and n:
        s[:] = s[0]
    flagged = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    return evaluate.Task(s, flagged, y)


def near(ours, theirs) -> bool:
    """Equal to the last bits (the sums are taken in another order); None where the oracle
    gives NaN or nothing (undefined)."""
    if ours is None or theirs is None or np.isnan(theirs):
        return ours is None and (theirs is None or np.isnan(theirs))
    return abs(ours - theirs) <= 1e-12


@settings(max_examples=300, deadline=None)
@given(tasks(), st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]), max_size=3))
def test_metrics_match_scikit_learn(task, targets):
    m = evaluate.binary(task, targets)
    y, s, f = task.positive, task.score, task.flagged
    P, N = int(y.sum()), int((~y).sum())
    assert m["support"] == {"positive": P, "negative": N}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's warnings about undefined values, which we check are None
        if len(y):
            tn, fp, fn, tp = skm.confusion_matrix(y, f, labels=[False, True]).ravel()
            assert m["confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
            assert near(m["precision"], skm.precision_score(y, f, zero_division=np.nan))
            assert near(m["recall"], skm.recall_score(y, f, zero_division=np.nan))
            assert near(m["f1"], skm.f1_score(y, f, zero_division=np.nan))
        assert near(m["fpr"], fp / N if N else None)
        assert near(m["auprc"], skm.average_precision_score(y, s) if P else None)  # scikit-learn says 0.0 without positives
        assert near(m["roc_auc"], skm.roc_auc_score(y, s) if P and N else None)
    # the best F1 over every distinct score as the threshold, by scikit-learn's F1
    if P:
        f1 = {t: skm.f1_score(y, s >= t) for t in np.unique(s)}
        best = max(f1.values())
        assert near(m["best_f1"]["f1"], best) and m["best_f1"]["threshold"] == max(t for t, v in f1.items() if v == best)
    else:
        assert m["best_f1"] is None
    # the lowest threshold within each FPR target, on scikit-learn's ROC curve (every threshold kept)
    for target, got in zip(targets, m["max_fpr"]):
        assert got["target"] == target
        if not N or not len(y):
            assert got["threshold"] is None
            continue
        fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False) if P else (np.array([0.0]), None, None)
        if not P:  # roc_curve needs both classes: count directly
            thr = np.unique(s)[::-1]
            fpr = np.array([np.sum(~y & (s >= t)) / N for t in thr])
        else:
            fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # scikit-learn's first point is the threshold +inf
        ok = np.flatnonzero(fpr <= target)
        if len(ok):
            k = ok[-1]
            assert got["threshold"] == thr[k] and near(got["fpr"], fpr[k])
            assert near(got["recall"], tpr[k] if P else None)
        else:
            assert got["threshold"] is None


def test_undefined_values_are_null_in_the_json():
    """No positives, no negatives, nothing at all: JSON null (never NaN), and deterministic text."""
    for y in ([], [False, False], [True, True]):
        t = evaluate.Task(np.full(len(y), 0.5), np.zeros(len(y), bool), np.array(y, bool))
        text = evaluate.dumps(evaluate.binary(t, [0.1]))
        assert "NaN" not in text and "null" in text
        assert text == evaluate.dumps(json.loads(text))


def test_a_single_example_and_the_order_of_examples():
    one = evaluate.binary(evaluate.Task(np.array([1.0]), np.array([True]), np.array([True])), [0.0])
    assert one["precision"] == one["recall"] == one["f1"] == one["auprc"] == 1.0 and one["fpr"] is None
    assert one["best_f1"]["threshold"] == 1.0 and one["max_fpr"][0]["threshold"] is None  # no negatives: no FPR
    rng = np.random.default_rng(0)
    s, y, f = rng.random(200).round(2), rng.random(200) < 0.3, rng.random(200) < 0.4
    p = rng.permutation(200)
    assert evaluate.dumps(evaluate.binary(evaluate.Task(s, f, y), [0.1])) == \
        evaluate.dumps(evaluate.binary(evaluate.Task(s[p], f[p], y[p]), [0.1]))


def test_the_thresholds_written():
    """The first --max-fpr target's threshold, else the best F1's; a category without positives
    gets none (it could only add false positives)."""
    rng = np.random.default_rng(1)
    s, y = rng.random(50), rng.random(50) < 0.5
    task = evaluate.Task(s, s > 0.5, y)
    empty = evaluate.Task(s, s > 0.9, np.zeros(50, bool))
    ev = evaluate.Evaluation("r", ["S1", "S2"], task, {"S1": task, "S2": empty},
                             {"labels_without_result": 0, "results_without_label": 0})
    doc = evaluate.metrics(ev, [0.1, 0.2])
    assert evaluate.thresholds(doc) == {"threshold": doc["verdict"]["max_fpr"][0]["threshold"],
                                        "categories": {"S1": doc["verdict"]["max_fpr"][0]["threshold"]}}
    doc = evaluate.metrics(ev, [])
    assert evaluate.thresholds(doc)["threshold"] == doc["verdict"]["best_f1"]["threshold"]


@pytest.mark.parametrize("item, words", [
    ({"label": "bad"}, ['"label" must be "safe" or "unsafe"']),
    ({}, ["no label"]),
    ({"label": "safe", "categories": ["S1"]}, ['a "safe" line cannot violate categories (S1)']),
    ({"label": "unsafe", "categories": "S1"}, ['"categories" must be a list']),
    ({"label": "unsafe", "categories": ["S1", "S1"]}, ["lists a code twice"]),
])
def test_bad_labels(item, words):
    with pytest.raises(PyguardError) as e:
        evaluate.parse_label(item, 1)
    assert all(w in str(e.value) for w in words)


def test_label_codes_must_be_the_policys():
    assert evaluate.parse_label({"label": "unsafe", "categories": []}, 3).categories is None  # the verdict only
    with pytest.raises(PyguardError, match="S14 is not in the policy"):
        evaluate.check_codes(evaluate.parse_label({"label": "unsafe", "categories": ["S14"]}, 3), ["S1", "S2"])


# ---------------------------------------------------------------- the commands on the decisive model

CATEGORIES = {1: ["S9"], 4: ["S1"], 6: ["S2"], 8: ["S7"], 10: None, 15: ["S2", "S3"]}  # sample index: unsafe label


def labelled_line(i: int, sample=None, **extra) -> str:
    c = synth.SAMPLES[i] if sample is None else sample
    item = {"id": f"c{i}", "messages": [{"role": "user", "content": c}] if isinstance(c, str) else c,
            "label": "unsafe" if i in CATEGORIES else "safe"}
    if CATEGORIES.get(i):
        item["categories"] = CATEGORIES[i]
    return json.dumps(item | extra) + "\n"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "labelled.jsonl"
    path.write_text("".join(labelled_line(i) for i in range(len(synth.SAMPLES))))
    return path


def main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_then_report_give_the_same_bytes(decisive_path, labelled, tmp_path, capsys):
    out, metrics = tmp_path / "results.jsonl", tmp_path / "metrics.json"
    code, stdout, err = main(capsys, "eval", "-m", decisive_path, "--jsonl", str(labelled), "--out", str(out),
                             "--metrics", str(metrics), "--max-fpr", "0.1", "--max-fpr", "0.3", "--threads", "2")
    assert code == 0 and stdout == "", err
    assert "18 labelled results: precision" in err
    doc = json.loads(metrics.read_text())
    assert doc["counts"] == {"labels": 18, "results": 18, "joined": 18, "labels_without_result": 0,
                                  "results_without_label": 0, "unsafe_without_categories": 1, "partial": False}
    assert doc["verdict"]["support"] == {"positive": 6, "negative": 12} and doc["max_fpr"] == [0.1, 0.3]
    assert list(doc["categories"]) == sorted(f"S{k}" for k in range(1, 14))
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(r["category_scores"]) == 13 for r in results)  # every category's score, safe verdicts too
    assert {r["run"] for r in results} == {eval_run(cli.run_id(decisive_path, cli._options(cli.parser().parse_args(
        ["classify", "-m", decisive_path, "x"]))))}
    # the metrics of the results written, by an independent count
    y = np.array([i in CATEGORIES for i in range(18)])
    flagged = np.array([r["verdict"] == "unsafe" for r in results])
    assert doc["verdict"]["confusion"]["tp"] == int(np.sum(y & flagged))
    assert doc["verdict"]["auprc"] == pytest.approx(skm.average_precision_score(y, [r["score"] for r in results]), abs=1e-12)
    code, again, _ = main(capsys, "report", str(out), "--labels", str(labelled), "--max-fpr", "0.1", "--max-fpr", "0.3")
    assert code == 0 and again == metrics.read_text()


def test_eval_resumes_an_interrupted_run(decisive_path, labelled, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["eval", "-m", decisive_path, "--jsonl", str(labelled), "--out", str(out)]
    code, whole, _ = main(capsys, *argv)
    assert code == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:30])  # killed while writing line 6
    code, resumed, err = main(capsys, *argv, "--resume")
    assert code == 0 and resumed == whole, err
    assert "13 conversations classified" in err and "5 already in --out" in err
    # classify's results (no category scores when safe) are another run: not resumed from
    code, _, err = main(capsys, "classify", "-m", decisive_path, "--jsonl", str(labelled), "--out", str(out), "--overwrite")
    code, _, err = main(capsys, *argv, "--resume")
    assert code == 2 and "cannot resume" in err


def test_a_partial_set_is_refused_or_marked(decisive_path, labelled, tmp_path, capsys):
    src = tmp_path / "labelled.jsonl"
    text = labelled.read_text().splitlines(keepends=True)
    text[2] = labelled_line(2, [{"role": "assistant", "content": "no user message"}])  # cannot be judged
    src.write_text("".join(text))
    out, metrics = tmp_path / "results.jsonl", tmp_path / "metrics.json"
    argv = ["eval", "-m", decisive_path, "--jsonl", str(src), "--out", str(out), "--metrics", str(metrics)]
    code, _, err = main(capsys, *argv)
    assert code == 2 and f"{src}: line 3:" in err
    assert 'line 3 id "c2"' in err and "partial set refused" in err and not metrics.exists()
    code, _, err = main(capsys, "report", str(out), "--labels", str(src), "--partial", "--metrics", str(metrics))
    assert code == 2 and "warning: partial" in err
    doc = json.loads(metrics.read_text())
    assert doc["counts"]["partial"] and doc["counts"]["joined"] == 17 and doc["counts"]["labels_without_result"] == 1
    # a result without a label: refused too
    (tmp_path / "fewer.jsonl").write_text("".join(text[:10]))
    code, _, err = main(capsys, "report", str(out), "--labels", str(tmp_path / "fewer.jsonl"))
    assert code == 2 and "results in" in err and "without a label" in err


def test_bad_labels_stop_eval_before_the_model_runs(decisive_path, labelled, tmp_path, capsys):
    src, out = tmp_path / "labelled.jsonl", tmp_path / "results.jsonl"
    text = labelled.read_text().splitlines(keepends=True)
    text[1] = labelled_line(1, label="maybe")
    text[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}], "label": "safe"}) + "\n"  # no id
    text[5] = labelled_line(5, categories=["S99"], label="unsafe")
    src.write_text("".join(text))
    code, _, err = main(capsys, "eval", "-m", decisive_path, "--jsonl", str(src), "--out", str(out))
    assert code == 2 and not out.exists()
    assert f"{src}: line 2: \"label\" must be" in err and f"{src}: line 4: no \"id\"" in err
    text[1], text[3] = labelled_line(1), labelled_line(3)
    src.write_text("".join(text))
    code, _, err = main(capsys, "eval", "-m", decisive_path, "--jsonl", str(src), "--out", str(out), "--exclude", "S9")
    assert code == 2 and not out.exists() and "line 2: category S9 is not in the policy" in err and "line 6: category S99" in err


def test_outputs_are_checked_first_and_never_overwritten(decisive_path, labelled, tmp_path, capsys):
    out, metrics = tmp_path / "results.jsonl", tmp_path / "metrics.json"
    metrics.write_text("mine")
    code, _, err = main(capsys, "eval", "-m", decisive_path, "--jsonl", str(labelled), "--out", str(out), "--metrics", str(metrics))
    assert code == 2 and "exists already: --overwrite" in err and not out.exists() and metrics.read_text() == "mine"
    code, _, err = main(capsys, "report", str(labelled), "--labels", str(labelled), "--html", str(labelled))
    assert code == 2 and "the same file as RESULTS" in err
    code, _, err = main(capsys, "report", str(labelled), "--max-fpr", "0.1")
    assert code == 2 and "need --labels" in err
    with pytest.raises(SystemExit) as e:  # a usage error
        cli.main(["report", str(labelled), "--labels", str(labelled), "--max-fpr", "2"])
    assert e.value.code == 2 and "--max-fpr: expected a false positive rate from 0 to 1" in capsys.readouterr().err


def test_thresholds_go_back_into_classify(decisive_path, labelled, tmp_path, capsys):
    """The thresholds file eval writes is read by classify --thresholds, whose verdicts follow
    the rule on the same scores: unsafe when score >= threshold or a category's score >= its own."""
    out, th = tmp_path / "results.jsonl", tmp_path / "thresholds.json"
    code, _, err = main(capsys, "eval", "-m", decisive_path, "--jsonl", str(labelled), "--out", str(out),
                        "--max-fpr", "0.25", "--thresholds-out", str(th))
    assert code == 0, err
    t = json.loads(th.read_text())
    assert set(t) == {"threshold", "categories"} and isinstance(t["threshold"], float)
    assert set(t["categories"]) == {"S1", "S2", "S3", "S7", "S9"}  # those with labelled examples
    scores = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    code, judged, err = main(capsys, "classify", "-m", decisive_path, "--jsonl", str(labelled), "--thresholds", str(th))
    for r in map(json.loads, judged.splitlines()):
        s = scores[r["id"]]
        expected = s["score"] >= t["threshold"] or any(s["category_scores"][c] >= x for c, x in t["categories"].items())
        assert (r["verdict"] == "unsafe") == expected, (r, s)
