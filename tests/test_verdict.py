"""The answer grammar and grammar-constrained greedy decoding, on synthetic heads and logits."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyguard.errors import PyguardError
from pyguard.guard.verdict import AnswerDecoder, Grammar

CODES = [f"S{i}" for i in range(1, 14)]
# A head like a pruned Llama 3 one, plus distractors the grammar must never pick.
HEAD_TEXT = ["safe", "unsafe", "\n", "S", ",S", ",", "un", "s", "1", "2", "3", "4", "5", "6", "7", "8", "9",
             "10", "11", "12", "13", "14", "0", None, "hello", "\n\n", " safe", "S1"]
EOT = 128009
HEAD_IDS = np.array([1000 + i if t is not None else EOT for i, t in enumerate(HEAD_TEXT)])


def test_grammar_accepts_exactly_valid_answers():
    g = Grammar(CODES)
    for text in ["safe", "unsafe\nS1", "unsafe\nS1,S10", "unsafe\nS13,S2,S7"]:
        assert g.complete(text) and all(g.viable(text[:i]) for i in range(len(text) + 1))
    for text in ["unsafe", "unsafe\n", "unsafe\nS", "unsafe\nS1,", "s", "un"]:
        assert g.viable(text) and not g.complete(text)
    for text in ["safex", "unsafe\nS14", "unsafe\nS1,S1", "unsafe\nS1,,S2", "Safe", " safe", "unsafe\n\n"]:
        assert not g.complete(text)
    assert not g.viable("unsafe\nS14") and not g.viable("unsafe\nS1,S1,")


def test_custom_and_excluded_codes():
    g = Grammar(["S1", "S3", "X9"])
    assert g.complete("unsafe\nX9,S3") and not g.viable("unsafe\nS2") and not g.viable("unsafe\nS10")


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 100.0))
def test_decoding_always_parses(seed, scale):
    rng = np.random.default_rng(seed)
    grammar = Grammar(CODES)
    dec = AnswerDecoder(grammar, HEAD_IDS, HEAD_TEXT, [EOT])
    fed = []

    def step(ids):
        fed.extend(ids)
        return rng.standard_normal(len(HEAD_TEXT)) * scale

    out = dec.decode(rng.standard_normal(len(HEAD_TEXT)) * scale, step)
    assert grammar.complete(out.text), out.text
    assert "".join(HEAD_TEXT[int(np.flatnonzero(HEAD_IDS == t)[0])] for t in out.tokens) == out.text
    # The model is asked only for tokens whose continuation was still open.
    assert fed == out.tokens[: len(fed)] and len(fed) <= len(out.tokens)


def test_safe_stops_without_another_step():
    logits = np.full(len(HEAD_TEXT), -5.0)
    logits[HEAD_TEXT.index("safe")] = 10
    logits[HEAD_TEXT.index("hello")] = 50  # not allowed by the grammar
    out = AnswerDecoder(Grammar(CODES), HEAD_IDS, HEAD_TEXT, [EOT]).decode(logits, lambda t: 1 / 0)
    assert out.text == "safe" and out.tokens == [1000]


def test_unsafe_categories_follow_the_model_until_eot():
    seq = iter(["S", "1", ",S", "10", None])  # no step chooses "\n": it is forced after "unsafe"

    def favour(text):
        logits = np.zeros(len(HEAD_TEXT))
        logits[HEAD_TEXT.index(text) if text else HEAD_TEXT.index(None)] = 9
        return logits

    fed = []

    def step(ids):
        fed.append([HEAD_TEXT[int(np.flatnonzero(HEAD_IDS == t)[0])] for t in ids])
        return favour(next(seq))

    out = AnswerDecoder(Grammar(CODES), HEAD_IDS, HEAD_TEXT, [EOT]).decode(favour("unsafe"), step)
    assert out.text == "unsafe\nS1,S10"
    # "unsafe" and the "\n" it forces go to the model in one step
    assert fed == [["unsafe", "\n"], ["S"], ["1"], [",S"], ["10"]]


def test_forced_rows_follow_a_choice():
    dec = AnswerDecoder(Grammar(["S1", "S2"]), HEAD_IDS, HEAD_TEXT, [EOT])
    unsafe, nl = HEAD_TEXT.index("unsafe"), HEAD_TEXT.index("\n")
    logits = np.zeros(len(HEAD_TEXT))
    logits[unsafe] = 5
    assert dec.advance("", logits) == [unsafe, nl]
    logits[HEAD_TEXT.index(",")] = 9  # then "S" and "2" are the only way on: S1 is taken
    assert dec.advance("unsafe\nS1", logits) == [HEAD_TEXT.index(t) for t in (",", "S", "2")]
    assert dec.finished("unsafe\nS1,S2")
    assert dec.advance("safe", logits) == []


def test_threshold_forces_the_first_word():
    logits = np.zeros(len(HEAD_TEXT))
    logits[HEAD_TEXT.index("safe")] = 10
    dec = AnswerDecoder(Grammar(["S1"]), HEAD_IDS, HEAD_TEXT, [EOT])
    out = dec.decode(logits, lambda t: np.zeros(len(HEAD_TEXT)), force_first="unsafe")
    assert out.text == "unsafe\nS1"  # only code left: decided without asking for <|eot_id|>


def test_long_answers_decode_without_recursion():
    """A head of single characters spells a 2,000-character code one token at a time: the
    search for completable answers is iterative (it was recursive: RecursionError at ~800)."""
    code = "x" * 2000
    text = ["safe", "unsafe", "\n", "x", "y", ","]
    ids = np.arange(len(text) + 1)
    dec = AnswerDecoder(Grammar([code, "y"]), ids, text + [None], [len(text)])
    logits = np.zeros(len(text) + 1)
    logits[text.index("unsafe")] = logits[text.index("x")] = 5
    out = dec.decode(logits, lambda t: logits)
    assert out.text == "unsafe\n" + code + ",y" and len(out.tokens) == 2 + 2000 + 2
    assert Grammar([code, "y"]).budget() == len(out.text) + 1 >= len(out.tokens) + 1


def test_budget_bounds_every_answer():
    codes = [f"code{i:06d}" for i in range(20)]  # twenty 10-letter codes
    g = Grammar(codes)
    assert g.budget() == len("unsafe\n" + ",".join(codes)) + 1 == 227
    assert Grammar(CODES).budget() == 50  # more than the fixed 48 positions of old


def test_unspellable_codes_are_found():
    dec = AnswerDecoder(Grammar(CODES + ["S15", "O1", "X1", "S"]), HEAD_IDS, HEAD_TEXT, [EOT])
    assert dec.unspellable() == ["O1", "X1"]  # S15: "S" then "1", "5"; no token spells O or X
    joined = ["safe", "unsafe", "\n", "S1", ",T", "2", "afe"]  # T2 only after a code, through ",T"
    dec = AnswerDecoder(Grammar(["S1", "T2"]), np.arange(8), joined + [None], [7])
    assert dec.unspellable() == []
    dec = AnswerDecoder(Grammar(["T2"]), np.arange(8), joined + [None], [7])
    assert dec.unspellable() == ["T2"]
    dec = AnswerDecoder(Grammar(["S1"]), np.arange(3), ["unsafe", "\n", "S1"], [99])
    assert dec.unspellable() == ["safe"]


def test_forcing_a_word_the_head_cannot_spell_is_an_error():
    text = ["safe", "\n", "S1", None]
    dec = AnswerDecoder(Grammar(["S1"]), np.arange(4), text, [3])
    with pytest.raises(PyguardError, match="cannot spell the answer 'unsafe'"):
        dec.decode(np.zeros(4), lambda t: np.zeros(4), force_first="unsafe")


# ---- Llama Guard 2: answers start with a space that belongs to the first word's token

LG2_CODES = [f"S{i}" for i in range(1, 12)]
# a pruned Llama Guard 2 head (" safe", " unsafe"), the words without the space, a bare space,
# and two ends: <|eot_id|> and <|end_of_text|>
LG2_TEXT = [" safe", " unsafe", "safe", "unsafe", " ", "\n", "S", ",S", ",", "1", "2", "3", "4", "5", "6", "7", "8", "9",
            "10", "11", "0", "  safe", None, None]
LG2_IDS = np.array([2000 + i for i in range(len(LG2_TEXT) - 2)] + [128009, 128001])


def test_lead_grammar():
    g = Grammar(LG2_CODES, lead=" ")
    for text in [" safe", " unsafe\nS1", " unsafe\nS11,S10,S1"]:
        assert g.complete(text) and all(g.viable(text[:i]) for i in range(len(text) + 1))
    for text in ["safe", "unsafe\nS1", "  safe", " unsafe\nS12", " Safe"]:
        assert not g.complete(text)
    assert not g.viable("s") and not g.viable("  ") and g.viable(" ") and g.viable("")
    assert g.verdict(" unsafe\nS2") == "unsafe" and g.verdict(" safe") == "safe" and g.categories(" unsafe\nS2,S3") == ["S2", "S3"]
    assert g.budget() == len(" unsafe\n" + ",".join(LG2_CODES)) + 1 == Grammar(LG2_CODES).budget() + 1


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 100.0), force=st.sampled_from([None, "safe", "unsafe"]))
def test_lead_decoding_always_parses_and_stops_at_either_end(seed, scale, force):
    rng = np.random.default_rng(seed)
    grammar = Grammar(LG2_CODES, lead=" ")
    dec = AnswerDecoder(grammar, LG2_IDS, LG2_TEXT, [128009, 128001])
    out = dec.decode(rng.standard_normal(len(LG2_TEXT)) * scale, lambda ids: rng.standard_normal(len(LG2_TEXT)) * scale,
                     force_first=force)
    assert grammar.complete(out.text) and out.text.startswith(" ") and not out.text.startswith("  "), out.text
    assert force is None or grammar.verdict(out.text) == force
    assert not set(out.tokens) & {128009, 128001}  # an end stops the answer, it is not part of it


def test_lead_ends():
    """After a complete code list either end may stop it (Llama Guard 2's checkpoint names
    <|end_of_text|>), whichever the model prefers to going on."""
    dec = AnswerDecoder(Grammar(LG2_CODES, lead=" "), LG2_IDS, LG2_TEXT, [128009, 128001])
    logits = np.zeros(len(LG2_TEXT))
    logits[LG2_TEXT.index(" unsafe")] = 9
    for end in (-1, -2):
        after = np.zeros(len(LG2_TEXT))
        after[LG2_TEXT.index("S")], after[LG2_TEXT.index("1")], after[end] = 5, 6, 8
        assert dec.decode(logits, lambda ids: after).text == " unsafe\nS1"
    assert dec.unspellable() == []
    no_lead_safe = [None if t in (" safe", " ") else t for t in LG2_TEXT]  # "safe" alone is not the answer
    assert AnswerDecoder(Grammar(LG2_CODES, lead=" "), LG2_IDS, no_lead_safe, [128009]).unspellable() == ["safe"]
