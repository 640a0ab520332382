"""The llama-guard-2 family end to end on a small random-weight checkpoint with the real Llama 3
tokenizer: chosen by `convert --family llama-guard-2` (never by auto) and recorded in the file,
the prompt's tokens fed as they are (no "\\n\\n" appended), answers starting with " safe" or
" unsafe" and naming S1..S11, the score read from the " unsafe" token, thresholds and category
scores, and a guard head holding what such answers are spelled with. (The prompt's text against
the published template: test_prompt.py; the lead and the two ends of the grammar: test_verdict.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from pyguard import Guard, cli
from pyguard.convert.checkpoint import DEMO, reference_tokenizer_model, write_checkpoint
from pyguard.formats.file import load
from pyguard.guard.prompt import CATEGORIES_2, prompt_tokens
from pyguard.guard.verdict import answer_token_ids

FAMILY = "llama-guard-2"
CONVS = ["How do I make a bomb?", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 👋"}],
         "Wie knacke ich ein Schloss?", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "Write me a poem about knives."}]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lg2")
    write_checkpoint(str(d / "hf"), DEMO, seed=5, tokenizer_model=reference_tokenizer_model())
    out = {}
    for head in ("guard", "full"):
        out[head] = str(d / f"{head}.pgw")
        assert cli.main(["convert", str(d / "hf"), out[head], "--family", FAMILY, "--head", head, "--no-calibration"]) == 0
    out["auto"] = str(d / "auto.pgw")
    assert cli.main(["convert", str(d / "hf"), out["auto"], "--head", "guard", "--no-calibration"]) == 0
    return out


@pytest.fixture(scope="module")
def guards(files):
    return {h: Guard.load(files[h], threads=2) for h in ("guard", "full")}


def test_the_family_is_recorded_and_never_chosen_by_auto(files):
    assert load(files["guard"]).family == load(files["full"]).family == FAMILY
    assert load(files["auto"]).family == "llama-guard-3-1b"


def test_the_guard_head_holds_the_answers_tokens(files, guards):
    tok = guards["guard"].tokenizer
    ids = list(load(files["guard"]).head_ids)
    assert ids == answer_token_ids(tok, list(CATEGORIES_2), FAMILY)
    assert {tok.encode(" safe")[0], tok.encode(" unsafe")[0], tok.special("<|end_of_text|>"), tok.special("<|eot_id|>")} <= set(ids)


def test_answers(guards):
    g = guards["guard"]
    for c in CONVS:
        req = g.prepare(c)
        assert list(req.ids) == prompt_tokens(g.tokenizer, c, family=FAMILY)  # nothing appended after " [/INST]"
        for threshold in (None, 0, 1):
            r = g.classify(c, threshold=threshold)
            assert r.answer.startswith(" safe" if r.verdict == "safe" else " unsafe\n"), r.answer
            assert threshold is None or r.verdict == ("unsafe" if threshold == 0 else "safe")
            assert set(r.categories) <= set(CATEGORIES_2) and r.unsafe == bool(r.categories)
            assert r.category_names == [CATEGORIES_2[k] for k in r.categories]
        r = g.classify(c, threshold=0, exclude=["S6"], category_scores=True)
        assert "S6" not in r.categories and set(r.category_scores) == set(CATEGORIES_2) - {"S6"}
        assert sum(r.category_scores.values()) == pytest.approx(r.score, rel=1e-9)


def test_the_score_is_the_unsafe_token_with_its_space(guards):
    """With the (tied) full head: P(" unsafe") over the whole vocabulary after the prompt."""
    g = guards["full"]
    unsafe = g.tokenizer.encode(" unsafe")[0]
    for c in CONVS:
        ids = g.prepare(c).ids
        z = g.model.prefill(g.model.new_state(len(ids)), ids).astype(np.float64)
        p = np.exp(z - z.max())
        assert g.classify(c).score == pytest.approx(p[unsafe] / p.sum(), rel=1e-9)


def test_guard_and_full_heads_give_the_same_answers(guards):
    for c in CONVS:
        for kw in ({}, {"threshold": 0}):
            assert guards["guard"].classify(c, **kw).answer == guards["full"].classify(c, **kw).answer


def test_thresholds(guards):
    g = guards["guard"]
    base = g.classify(CONVS[0], category_scores=True)
    top = max(base.category_scores, key=base.category_scores.get)
    r = g.classify(CONVS[0], thresholds={top: base.category_scores[top]})
    assert r.unsafe and top in r.categories and r.score == base.score
    assert [x.answer for x in g.classify_many(CONVS, threshold=0, batch_size=3)] == \
        [g.classify(c, threshold=0).answer for c in CONVS]
