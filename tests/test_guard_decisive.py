"""The guard API on the decisive test model (synth.decisive_guard): scores spread over the
mid range, so verdicts, thresholds, batches, caches and heads can be told apart."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

from pyguard import Guard, PyguardError
from pyguard.formats.file import load
from pyguard.engine.model import Model
from pyguard.guard.prompt import CATEGORIES_1B
from synth import SAMPLES, decisive_guard

AGENT = [{"role": "user", "content": "Recommend a book."}, {"role": "assistant", "content": "Try Dune."}]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("decisive"))
    return {head: decisive_guard(d, head) for head in ("guard", "full")}


@pytest.fixture(scope="module")
def guards(paths):
    return {head: Guard.load(p, threads=2) for head, p in paths.items()}


@pytest.fixture(scope="module")
def singles(guards):
    return {head: [g.classify(c) for c in SAMPLES] for head, g in guards.items()}


def key(r):
    return r.verdict, r.categories, r.category_names, r.score, r.answer, r.prompt_tokens, r.generated_tokens


def test_scores_are_mid_range_and_decide_the_verdict(singles):
    rs = singles["guard"]
    scores = np.array([r.score for r in rs])
    assert scores.min() < 0.25 and scores.max() > 0.9 and 0.2 < np.mean(scores > 0.5) < 0.8
    for r in rs:
        assert (r.categories != []) == r.unsafe and len(set(r.categories)) == len(r.categories)
        assert r.category_names == [CATEGORIES_1B[c] for c in r.categories]
    assert len({tuple(r.categories) for r in rs if r.unsafe}) > 1  # the codes vary too


def test_score_is_the_unsafe_row_of_the_head(guards, singles):
    """The score is P(unsafe) from the logits after the prompt and "\\n\\n": recomputed here
    from the full model's logits, over the whole vocabulary or over the guard head's rows. The
    safe row would give about 1 - score, which mid-range scores tell apart."""
    full, pruned = guards["full"], guards["guard"]
    for c, rf, rp in zip(SAMPLES, singles["full"], singles["guard"]):
        ids = full.prepare(c).ids
        z = full.model.prefill(full.model.new_state(len(ids)), ids).astype(np.float64)
        p = np.exp(z - z.max())
        assert rf.score == pytest.approx(p[39257] / p.sum(), rel=1e-9)
        rows = pruned.model.head_ids
        assert rp.score == pytest.approx(p[39257] / p[rows].sum(), rel=1e-9)
        assert abs(rf.score - rp.score) < 1e-3  # "safe" and "unsafe" hold nearly all the mass
        assert rf.verdict == ("unsafe" if p[39257] > p[19193] else "safe")  # the greedy first word
    assert np.mean([abs(r.score - 0.5) > 0.1 for r in singles["full"]]) > 0.5  # not the safe row's 1 - score


def test_guard_and_full_heads_agree(singles):
    assert [r.answer for r in singles["full"]] == [r.answer for r in singles["guard"]]


@pytest.mark.parametrize("head", ["guard", "full"])
def test_thresholds_decide(guards, singles, head):
    g = guards[head]
    for c, r in list(zip(SAMPLES, singles[head]))[:6]:
        below, above = np.nextafter(r.score, 0), np.nextafter(r.score, 1)
        for t, verdict in [(0, "unsafe"), (0.0, "unsafe"), (below, "unsafe"), (r.score, "unsafe"), (above, "safe"), (1, "safe")]:
            x = g.classify(c, threshold=t)
            assert x.verdict == verdict and x.score == r.score, (t, r.score)
            assert x.unsafe == bool(x.categories)


@pytest.mark.parametrize("head, batch_size", [("guard", 3), ("full", 7), ("guard", 1), ("full", 64)])
def test_batches_equal_single_calls(guards, singles, head, batch_size):
    order = list(range(len(SAMPLES)))[::-1]
    batched = guards[head].classify_many([SAMPLES[i] for i in order], batch_size=batch_size)
    assert {r.verdict for r in batched} == {"safe", "unsafe"}
    assert [key(r) for r in batched] == [key(singles[head][i]) for i in order]  # scores bit for bit


def test_threshold_in_batches(guards):
    g = guards["guard"]
    alone = [g.classify(c, threshold=0.5) for c in SAMPLES]
    assert [key(r) for r in g.classify_many(SAMPLES, threshold=0.5, batch_size=5)] == [key(r) for r in alone]


def test_max_tokens_boundary(paths, guards):
    r = guards["guard"].prepare("hello there")
    need = len(r.ids) + len("unsafe\n" + ",".join(r.categories)) + 1
    assert Guard.load(paths["guard"], max_tokens=need).classify("hello there").verdict in ("safe", "unsafe")
    with pytest.raises(PyguardError, match=f"over the limit of {need - 1 - 50}"):
        Guard.load(paths["guard"], max_tokens=need - 1).classify("hello there")
    least = len(guards["guard"].prepare("x").ids) + 50
    Guard.load(paths["guard"], max_tokens=least)
    with pytest.raises(PyguardError, match=f"max_tokens {least - 1} is too small for any prompt.*{least} tokens"):
        Guard.load(paths["guard"], max_tokens=least - 1)


def test_custom_categories(guards):
    cats = {"S2": "Spam.", "S7": "Rudeness."}
    r = guards["guard"].classify("hello", categories=cats, threshold=0)
    assert r.verdict == "unsafe" and set(r.categories) <= set(cats) and r.categories
    assert r.category_names == [cats[c] for c in r.categories]
    with pytest.raises(PyguardError, match=r"cannot answer O1, X1: its output head \(guard head of 21 tokens\)"):
        guards["guard"].classify("hello", categories={"O1": "a", "S1": "b", "X1": "c"}, threshold=0)
    with pytest.raises(PyguardError, match="cannot answer 𝔘1.*vocabulary"):
        guards["full"].classify("hello", categories={"𝔘1": "a"})
    # a full head spells any code of ordinary text; twenty 10-letter ones need a longer budget than 48
    long = {f"category{i:02d}": f"Thing {i}." for i in range(20)}
    r = guards["full"].classify("hello", categories=long, threshold=0)
    assert r.verdict == "unsafe" and r.categories and set(r.categories) <= set(long)
    assert guards["full"].classify("hello", categories={"X1": "a"}, threshold=0).categories == ["X1"]


def test_bad_arguments(guards):
    g = guards["guard"]
    with pytest.raises(PyguardError, match="conversations must be a list of conversations, not str"):
        g.classify_many("abc")
    for t in (float("nan"), -1, 2, "0.5", True, float("inf")):
        with pytest.raises(PyguardError, match="threshold must be a number from 0 to 1"):
            g.classify("hello", threshold=t)
        with pytest.raises(PyguardError, match="threshold"):
            g.classify_many(["hello"], threshold=t)
    for b in (1.5, 0, True, "2"):
        with pytest.raises(PyguardError, match="batch_size must be an integer of at least 1"):
            g.classify_many(["hello"], batch_size=b)
    with pytest.raises(PyguardError, match=r"exclude: \['S1'\] is not a category code"):
        g.classify("hello", exclude=[["S1"]])
    with pytest.raises(PyguardError, match="description must be a str"):
        g.classify("hello", categories={"S1": 3})
    with pytest.raises(PyguardError, match="codes are non-empty str"):
        g.classify("hello", categories={1: "a"})
    with pytest.raises(PyguardError, match="^conversation 4: the message: empty content$"):
        g.classify_many(["a", "b", "c", "  ", "d"])
    with pytest.raises(PyguardError, match="^conversation 2: message 1: expected a mapping"):
        g.classify_many(["a", [3]])
    with pytest.raises(PyguardError, match="^the message: empty content$"):
        g.classify("")
    for kw in ({"max_tokens": 1.5}, {"max_tokens": True}, {"cache_bytes": -1}):
        with pytest.raises(PyguardError, match=f"{next(iter(kw))} must be an integer"):
            Guard(g.model, g.tokenizer, g.family, **kw)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_errors(paths, bad):
    f = load(paths["guard"])
    tensors = dict(f.tensors)
    tensors["norm"] = np.full(f.config.dim, bad, np.float32)  # a damaged final norm: every logit NaN
    g = Guard(Model(f.config, tensors, f.head_ids, threads=1), f.tokenizer(), f.family)
    for threshold in (None, 0, 1):
        with pytest.raises(PyguardError, match="non-finite logits"):
            g.classify("hello", threshold=threshold)
    with pytest.raises(PyguardError, match="^conversation 1: the model computed non-finite logits"):
        g.classify_many(["hello", "there"])


def test_one_guard_from_four_threads(guards, singles):
    g, want = guards["guard"], [key(r) for r in singles["guard"]]
    out, errors = {}, []

    def work(t):
        try:
            order = list(np.random.default_rng(t).permutation(len(SAMPLES)))
            for i in order[:9]:
                out[(t, i, "one")] = key(g.classify(SAMPLES[i]))
            for i, r in zip(order, g.classify_many([SAMPLES[i] for i in order], batch_size=4)):
                out[(t, i, "many")] = key(r)
        except BaseException as e:  # reported below: a thread's exception would go unseen
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 4 * (9 + len(SAMPLES))
    assert all(v == want[i] for (_, i, _), v in out.items())


def _child(g, conn):
    conn.send(key(g.classify(SAMPLES[1])))


def test_fork_while_another_thread_classifies(paths):
    """A guard that ran (with 2 threads), forked while another thread holds its lock: the
    child, where that thread does not exist, still classifies, and gets the same result."""
    g = Guard.load(paths["guard"], threads=2)
    want = key(g.classify(SAMPLES[1]))
    busy = threading.Thread(target=g.classify_many, args=(SAMPLES * 2,))
    busy.start()
    while not g._lock.locked():  # fork while the lock is held
        time.sleep(0.001)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(g, child))
    p.start()
    got = parent.recv() if parent.poll(120) else None
    p.join(10)
    if p.is_alive():
        p.kill()
    busy.join()
    assert got == want and p.exitcode == 0
