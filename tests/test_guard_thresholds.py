"""Per-category thresholds (guard/thresholds.py): the verdict rule itself (hypothesis), the guard
applying it on the decisive model (synth.decisive_guard: mid-range scores, so each side of a
threshold is reached), alone, batched and streamed, and bad thresholds and thresholds files
failing closed in one line. The CLI, the service and Ray are checked against Guard.classify in
test_cli.py, test_serve.py and test_ray.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import Guard, PyguardError
from pyguard.guard import thresholds as th
from pyguard.guard.prompt import CATEGORIES_1B
from synth import SAMPLES, decisive_guard

CODES = list(CATEGORIES_1B)


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "decisive-shared"  # shared with test_guard.py within a session
    d.mkdir(exist_ok=True)
    return Guard.load(decisive_guard(str(d), "guard"), threads=2)


@pytest.fixture(scope="module")
def plain(guard):
    """Each sample's result without thresholds, with its category scores."""
    return [guard.classify(c, category_scores=True) for c in SAMPLES]


def expected(r, threshold, limits):
    """The rule as docs/THRESHOLDS.md states it, from a result without thresholds."""
    reached = [c for c in CODES if c in limits and r.category_scores[c] >= limits[c]]
    if reached or threshold is not None:
        return "unsafe" if reached or r.score >= threshold else "safe", reached
    return r.verdict, reached


# ---- the rule

_P = st.floats(0, 1)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1), st.dictionaries(st.sampled_from(CODES), _P, max_size=13), st.one_of(st.none(), _P),
       st.dictionaries(st.sampled_from(CODES), _P, max_size=5), st.lists(st.sampled_from(CODES), unique=True, max_size=3))
def test_the_rule(score, cat, threshold, limits, answer):
    cat = {c: cat.get(c, 0.0) for c in CODES}
    v = th.impose(score, cat, threshold, limits or None)
    reached = any(cat[c] >= t for c, t in limits.items())
    assert v == ("unsafe" if reached else None if threshold is None else "unsafe" if score >= threshold else "safe")
    got = th.listed(answer, cat, limits or None, CODES)
    assert got[: len(answer)] == answer and len(set(got)) == len(got)  # the answer's first, no code twice
    assert set(got) == set(answer) | {c for c, t in limits.items() if cat[c] >= t}
    extra = got[len(answer):]
    assert extra == sorted(extra, key=CODES.index)  # in the policy's order


# ---- the guard

def test_category_thresholds_decide_and_list(guard, plain):
    """Below, at and just above each sample's largest category score: at or below, unsafe with
    that code listed; just above, the greedy verdict. Scores bit for bit as without thresholds."""
    for c, r in list(zip(SAMPLES, plain))[:6]:
        top = max(CODES, key=r.category_scores.get)
        s = r.category_scores[top]
        for t in (0.0, np.nextafter(s, 0), s, np.nextafter(s, 1), 1.0):
            x = guard.classify(c, thresholds={top: float(t)})
            verdict, reached = expected(r, None, {top: t})
            assert (x.verdict, x.score, x.category_scores) == (verdict, r.score, r.category_scores), (t, s)
            assert (top in x.categories) == (t <= s or top in r.categories)
            answer = x.answer.split("\n")[1].split(",") if x.unsafe else []
            assert x.categories == th.listed(answer, r.category_scores, {top: t}, CODES)
            assert x.category_names == [CATEGORIES_1B[k] for k in x.categories]
            assert x.unsafe == bool(x.categories)


def test_with_the_overall_threshold(guard, plain):
    for c, r in list(zip(SAMPLES, plain))[:8]:
        for threshold in (0.0, r.score, np.nextafter(r.score, 1), 1.0):
            limits = {"S9": 0.06, "S1": 0.05}
            x = guard.classify(c, threshold=float(threshold), thresholds=limits)
            assert x.verdict == expected(r, threshold, limits)[0] and x.score == r.score


def test_batched_and_streamed_equal_alone(guard):
    limits = {"S1": 0.04, "S10": 0.05, "S12": 0.05}
    alone = [guard.classify(c, thresholds=limits) for c in SAMPLES]
    assert {r.verdict for r in alone} == {"safe", "unsafe"}
    key = lambda r: (r.verdict, r.categories, r.score, r.answer, r.category_scores, r.generated_tokens)
    assert [key(r) for r in guard.classify_many(SAMPLES, thresholds=limits, batch_size=5)] == [key(r) for r in alone]
    user = "Tell me about locks."
    s = guard.stream(user, every=4, thresholds=limits)
    s.feed("Pick the pin stack one at a time with a tension wrench.")
    r = s.finish()
    assert key(r) == key(guard.classify([{"role": "user", "content": user}, {"role": "assistant", "content": s.text}],
                                        thresholds=limits))


def test_empty_thresholds_are_none(guard, plain):
    r = guard.classify(SAMPLES[0], thresholds={})
    assert (r.verdict, r.score) == (plain[0].verdict, plain[0].score)


@pytest.mark.parametrize("limits, words", [
    ({"S99": 0.5}, "thresholds: S99 not among the categories judged"),
    ({"S6": 0.5}, "thresholds: S6 not among the categories judged"),  # excluded below
    ({"S1": 1.5}, "thresholds: S1 must be a number from 0 to 1, not 1.5"),
    ({"S1": -0.1}, "thresholds: S1 must be a number from 0 to 1"),
    ({"S1": math.nan}, "thresholds: S1 must be a number from 0 to 1, not nan"),
    ({"S1": math.inf}, "thresholds: S1 must be a number"),
    ({"S1": True}, "thresholds: S1 must be a number from 0 to 1, not True"),
    ({"S1": "0.5"}, "thresholds: S1 must be a number"),
    ({"S1": None}, "thresholds: S1 must be a number"),
    ({1: 0.5}, "thresholds: the code 1 is not a str"),
    ([("S1", 0.5)], "thresholds must be a mapping"),
    (0.5, "thresholds must be a mapping"),
])
def test_bad_thresholds_fail_closed(guard, limits, words):
    for call in (lambda: guard.classify("hello", exclude=["S6"], thresholds=limits),
                 lambda: guard.classify_many(["hello", "hi"], exclude=["S6"], thresholds=limits),
                 lambda: guard.stream("hello", exclude=["S6"], thresholds=limits),
                 lambda: guard.check_policy(exclude=["S6"], thresholds=limits)):
        with pytest.raises(PyguardError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)


# ---- the file

def test_read_the_file_eval_writes(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"threshold": 0.4, "categories": {"S1": 0.3, "S10": 1}}))
    assert th.read(str(p)) == (0.4, {"S1": 0.3, "S10": 1.0})
    p.write_text(json.dumps({"threshold": None, "categories": {"S2": 0}}))
    assert th.read(str(p)) == (None, {"S2": 0.0})
    p.write_text(json.dumps({"categories": {}}))
    assert th.read(str(p)) == (None, None)


@pytest.mark.parametrize("text, words", [
    ("", "not JSON"),
    ("{", "not JSON"),
    ('{"threshold": NaN, "categories": {}}', "not JSON (NaN is not a JSON number"),
    ('{"threshold": 0.5, "categories": {"S1": Infinity}}', "not JSON (Infinity"),
    ("[1, 2]", 'expected {"threshold": number or null, "categories"'),
    ('{"threshold": 0.5}', 'expected {"threshold"'),
    ('{"threshold": 0.5, "categories": {}, "categoires": {}}', "unknown key 'categoires'"),
    ('{"threshold": 2, "categories": {}}', "threshold must be a number from 0 to 1 or null, not 2"),
    ('{"threshold": "0.5", "categories": {}}', "threshold must be a number from 0 to 1 or null"),
    ('{"threshold": true, "categories": {}}', "threshold must be a number"),
    ('{"categories": {"S1": 1.01}}', "categories: S1 must be a number from 0 to 1, not 1.01"),
    ('{"categories": {"S1": -1e-9}}', "categories: S1 must be a number from 0 to 1"),
    ('{"categories": {"S1": "high"}}', "categories: S1 must be a number"),
    ('{"categories": [0.5]}', "categories must be a mapping"),
    ('{"categories": {"S1": {"p": 0.5}}}', "categories: S1 must be a number"),
    ("[" * 100000 + "]" * 100000, "not JSON"),
])
def test_bad_files_fail_closed_in_one_line(tmp_path, text, words):
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(PyguardError) as e:
        th.read(str(p))
    assert str(e.value).startswith(str(p) + ": ") and words in str(e.value) and "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PyguardError, match="cannot read"):
        th.read(str(tmp_path / "missing.json"))
    (tmp_path / "latin1.json").write_bytes(b'{"categories": {"\xe9": 0.5}}')
    with pytest.raises(PyguardError, match="not UTF-8"):
        th.read(str(tmp_path / "latin1.json"))
