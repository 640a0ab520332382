"""Streaming moderation (Guard.stream, docs/STREAM.md) on the decisive model: every result is
the one a cold guard's classify gives however a reply was cut, checks come when and as often
as promised, `unsafe` is sticky, errors fail closed; and the command line's lines are the API's.
The token-prefix cache itself is tested in test_cache.py."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import Guard, PyguardError
from synth import reply_of, result_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = [{"role": "user", "content": "Tell me a story about a dragon."}]
# words, multi-byte characters, an emoji built with a joiner, a combining accent, digits, newlines
PIECES = ["Once", " upon", " a", " time", ",", " dragon", " 🐉", " 👩‍🚀", " Ünsal", " cafe\u0301", " 日本語", " 42", "\n\n",
          " the", " address", " of", " a", " celebrity", ".", " ", "!"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def warm(decisive_path):
    return Guard.load(decisive_path, threads=2)


# ---------------------------------------------------------------- streaming

@SETTINGS
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=40), st.data())
def test_stream_results_equal_classify(warm, cold, pieces, data):
    """A reply cut into random byte chunks (inside characters and words), checks every few
    tokens and at random points: each result is classify of the reply so far, bit for bit."""
    raw = ("Sure" + "".join(pieces)).encode()
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=12)))) if len(raw) > 1 else []
    every = data.draw(st.integers(1, 12))
    s = warm.stream(USER, every=every)
    results, checked = [], 0
    for a, b in zip([0] + cuts, cuts + [len(raw)]):
        r = s.feed(raw[a:b])
        assert (r is not None) == (s.tokens - checked >= every)  # a check once `every` tokens arrived since the last
        if r is None and s.text.strip() and data.draw(st.booleans()):
            r = s.check()
        if r is not None:
            results.append((s.text, r))
            checked = s.tokens
    results.append((s.text, s.finish()))
    assert s.text == raw.decode()
    for text, r in results:
        assert result_key(r) == result_key(cold.classify(reply_of(USER, text)))
    assert s.unsafe == any(r.unsafe for _, r in results)


def test_stream_checks_every_n_tokens_and_reuses_the_reply(decisive_path, cold):
    g = Guard.load(decisive_path, threads=2)
    s = g.stream(USER, every=8)
    checks = []
    for word in ("Once upon a time, a dragon 🐉 named Ünsal lived in the mountains. " * 4).split(" "):
        r = s.feed(word + " ")
        if r is not None:
            checks.append((s.tokens, r))
    assert len(checks) >= 6
    last = 0
    for (n, r), (_, prev) in zip(checks[1:], checks):
        assert n - last >= 8 or last == 0
        last = n
        # the previous check's conversation came from the cache: only new tokens and the instructions ran
        assert r.cached_tokens >= prev.prompt_tokens - 70
    final = s.finish()
    assert result_key(final) == result_key(cold.classify(reply_of(USER, s.text)))


def test_stream_errors(warm):
    with pytest.raises(PyguardError, match="must be the user's"):
        warm.stream(reply_of(USER, "hi"))
    with pytest.raises(PyguardError, match="every must be an integer of at least 1"):
        warm.stream(USER, every=0)
    with pytest.raises(PyguardError, match="threshold"):
        warm.stream(USER, threshold=2)
    with pytest.raises(PyguardError, match="cannot exclude"):
        warm.stream(USER, exclude=["S99"])
    s = warm.stream(USER)
    with pytest.raises(PyguardError, match="^the reply is empty"):
        s.check()  # nothing to judge yet: the reply is named, not counted as a message
    with pytest.raises(PyguardError, match="not UTF-8"):
        s.feed(b"ok \xff")
    s = warm.stream(USER)
    s.feed("Caf".encode() + "é".encode()[:1])
    with pytest.raises(PyguardError, match="str chunk after bytes"):
        s.feed("x")
    with pytest.raises(PyguardError, match="ends inside a UTF-8 sequence"):
        s.finish()
    with pytest.raises(PyguardError, match="finished"):
        s.feed("more")
    with pytest.raises(PyguardError, match="str or bytes"):
        warm.stream(USER).feed(3)
    conv = [dict(m) for m in USER]
    s = warm.stream(conv, every=1000)
    conv[0]["content"] = "changed"  # the stream judges the conversation it was given
    s.feed("Sure.")
    assert s.finish().prompt_tokens == warm.classify(reply_of(USER, "Sure.")).prompt_tokens


def test_stream_honours_the_length_limit(decisive_path):
    g = Guard.load(decisive_path, threads=2, max_tokens=400)
    s = g.stream(USER, every=10_000)
    s.feed("word " * 300)
    with pytest.raises(PyguardError, match="over the limit"):
        s.check()


# A reply whose prefixes the decisive model judges differently (which, is measured, not assumed)
WORDS = "Sure, here is how to hurt people. Once upon a time, a dragon named Ünsal lived in the mountains.".split(" ")


def prefix(i: int) -> str:
    return " ".join(WORDS[:i])


@pytest.fixture(scope="module")
def judged(cold):
    """A cold guard's result for every prefix of WORDS (index i: the first i words)."""
    return [None] + [cold.classify(reply_of(USER, prefix(i))) for i in range(1, len(WORDS) + 1)]


def feed_to(s, i: int) -> None:
    """Feed the words that make s.text the prefix of i words."""
    n = len(s.text.split(" ")) if s.text else 0
    for w in WORDS[n:i]:
        s.feed(w if not s.text else " " + w)
    assert s.text == prefix(i)


def test_unsafe_is_sticky(warm, judged):
    """An unsafe check followed by safe ones leaves the stream unsafe (through check(), feed's
    checks and finish()); safe checks alone leave it safe, and a later unsafe one makes it so.
    s.last is always the latest check's result."""
    v = [r is not None and r.unsafe for r in judged]
    n = len(WORDS)
    down = [(i, j) for i in range(1, n + 1) for j in range(i + 1, n + 1) if v[i] and not v[j]]
    up = [(i, j) for i in range(1, n + 1) for j in range(i + 1, n + 1) if not v[i] and v[j]]
    assert down and up, "the decisive model should judge some prefixes safe and later ones unsafe, and the reverse"
    i, j = down[0]
    s = warm.stream(USER, every=10**6)
    assert not s.unsafe and s.last is None
    feed_to(s, i)
    a = s.check()
    assert a.unsafe and s.unsafe and s.last is a
    feed_to(s, j)
    b = s.check()
    assert not b.unsafe and s.unsafe and s.last is b  # sticky
    f = s.finish()
    assert not f.unsafe and s.unsafe and s.last is f
    i, j = up[0]
    s = warm.stream(USER, every=10**6)
    feed_to(s, i)
    assert not s.check().unsafe and not s.unsafe
    feed_to(s, j)
    assert s.check().unsafe and s.unsafe
    # a check after every word (feed's own checks): unsafe from the first unsafe prefix on
    s = warm.stream(USER, every=1)
    for k, w in enumerate(WORDS, 1):
        r = s.feed(w if k == 1 else " " + w)
        assert r is not None and result_key(r) == result_key(judged[k]) and s.last is r
        assert s.unsafe == any(v[1 : k + 1])


def test_checks_come_every_n_tokens_exactly(warm):
    """One-token words: a check at exactly every `every` tokens (not one later), the count
    restarting at a check() made in between; white space at the end adds no tokens (the
    prompt strips the reply) and triggers no check, even at every=1."""
    tok = warm.tokenizer
    assert all(len(tok.encode(w)) == 1 for w in (" the", "The"))  # one token each, joined or not
    for every in (1, 2, 3, 5):
        s = warm.stream(USER, every=every)
        at = []
        for k in range(1, 13):
            r = s.feed("The" if k == 1 else " the")
            assert s.tokens == k
            if r is not None:
                at.append(k)
        assert at == list(range(every, 13, every))
        assert s.feed(" \n\n ") is None and s.feed("\t") is None and s.tokens == 12  # trailing white space
        s = warm.stream(USER, every=every)
        s.feed("The the")
        s.check()  # at 2 tokens
        got = [k for k in range(3, 3 + 2 * every) if s.feed(" the") is not None]
        assert got == [2 + every, 2 + 2 * every]


def test_each_check_computes_only_what_changed(decisive_path):
    """Each check restores from the cache the longest prefix any earlier check of the stream
    left there (the policy, the conversation and the reply up to the previous check), so it
    computes the reply's new tokens, the one or two whose tokenization changed, and the
    closing instructions."""
    g = Guard.load(decisive_path, threads=2)
    s = g.stream(USER, every=3)
    kept = [g.prepare(reply_of(USER, "x")).ids[: g.prepare(reply_of(USER, "x")).policy]]
    tokens_before = 0
    for piece in ("Once upon a time, a drag", "on 🐉 named Ünsal li", "ved in the moun", "tains, far away.", " The end."):
        r = s.feed(piece.encode()[:-1])  # the last byte waits: a chunk ending inside a character or a word
        r = s.feed(piece.encode()[-1:]) if r is None else r
        if r is None:
            r = s.check()
        req = g.prepare(reply_of(USER, s.text))
        want = max(len(os.path.commonprefix([list(k), list(req.ids)])) for k in kept)
        assert r.cached_tokens == min(want, len(req.ids) - 1) and r.prompt_tokens == len(req.ids)
        if len(kept) > 1:  # after the first check: the new tokens, two more at most, the instructions
            assert r.prompt_tokens - r.cached_tokens <= (s.tokens - tokens_before) + 2 + (len(req.ids) - req.conversation)
        kept.append(req.ids[: req.conversation])
        tokens_before = s.tokens
    assert r.cached_tokens > req.conversation - 10  # the reply came from the cache, not only the policy


def test_options_reach_every_check(warm, cold, judged):
    """categories, exclude and threshold are those of every check, in a conversation of
    several turns; each of them changes the result here, so a check without it would differ."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}] + USER
    cats = {"S1": "Violence.", "S2": "Crimes.", "S3": "Weapons.", "S4": "Privacy."}
    i = next(k for k in range(1, len(WORDS) + 1) if judged[k].unsafe)
    text = prefix(i)
    plain = cold.classify(reply_of(conv, text))
    t = np.nextafter(plain.score, 1)  # just above the score: safe at this threshold, whatever the greedy answer
    changed = []
    for opts in ({"categories": cats}, {"exclude": ["S1", "S13"]}, {"threshold": t}, {"threshold": plain.score},
                 {"categories": cats, "exclude": "S2", "threshold": 0}):
        s = warm.stream(conv, every=10**6, **opts)
        feed_to(s, i)
        got = s.check()
        want = cold.classify(reply_of(conv, text), **opts)
        assert result_key(got) == result_key(want) and result_key(s.finish()) == result_key(want)
        changed.append(result_key(want) != result_key(plain))
    assert changed[0] and changed[1] and (changed[2] or changed[3]) and changed[4]  # each option matters here


def test_a_check_that_fails_fails_every_later_check(decisive_path):
    """Fail closed: once a check raised (a prompt over max_tokens), every later feed with a
    check due raises again instead of returning None, finish() raises, and nothing safe is
    reported for the text that could not be judged (s.last stays the last judged result)."""
    g = Guard.load(decisive_path, threads=2, max_tokens=400)
    s = g.stream(USER, every=20)
    first = None
    while True:
        try:
            r = s.feed(" word" * 5)
        except PyguardError as e:
            assert "over the limit" in str(e)
            break
        first = r or first
    assert first is not None and s.last is first
    unsafe = s.unsafe
    for _ in range(3):
        with pytest.raises(PyguardError, match="over the limit"):
            s.feed(" more")
        assert s.last is first and s.unsafe == unsafe
    with pytest.raises(PyguardError, match="over the limit"):
        s.check()
    with pytest.raises(PyguardError, match="over the limit"):
        s.finish()
    assert s.last is first


def test_finish_always_checks_and_ends_the_stream(warm, cold):
    """finish() runs the final check even right after a check of the same text, completes a
    character whose bytes came apart, and takes no more: feed or finish again raise."""
    s = warm.stream(USER, every=1)
    r = s.feed("Sure, café".encode()[:-1])  # "Sure, caf" and the first byte of "é"
    assert s.text == "Sure, caf" and r is not None and result_key(r) == result_key(cold.classify(reply_of(USER, "Sure, caf")))
    s.feed("é".encode()[1:])
    assert s.text == "Sure, café"
    last = s.check()
    f = s.finish()
    assert f is not last and s.last is f and result_key(f) == result_key(last) == result_key(cold.classify(reply_of(USER, "Sure, café")))
    with pytest.raises(PyguardError, match="finished"):
        s.finish()
    with pytest.raises(PyguardError, match="finished"):
        s.feed("more")
    assert s.text == "Sure, café"
    s = warm.stream(USER, every=10**6)
    s.feed("   ")
    with pytest.raises(PyguardError, match="^the reply is empty"):
        s.finish()  # only white space cannot be judged
    s = warm.stream(USER, every=10**6)  # bytes-like chunks: bytes, bytearray, memoryview, cut inside a character
    raw = "Sure, café 🐉.".encode()
    for chunk in (raw[:10], bytearray(raw[10:14]), memoryview(raw)[14:]):
        s.feed(chunk)
    assert s.text == "Sure, café 🐉." and result_key(s.finish()) == result_key(cold.classify(reply_of(USER, "Sure, café 🐉.")))
    s = warm.stream(USER, every=10**6)
    s.feed("ok")
    with pytest.raises(PyguardError, match="not UTF-8"):
        s.feed(b"\xff")
    assert s.text == "ok" and result_key(s.finish()) == result_key(cold.classify(reply_of(USER, "ok")))  # the bad chunk left nothing


def test_utf8_errors_count_every_character_fed(warm):
    """A UTF-8 error names how many characters of the reply came before the bad byte: those of
    earlier chunks (str or bytes), of the failing chunk, and a character completed across chunks."""
    for chunks, bad, before in [
        ([], b"abc\xff", 3),  # the failing chunk's own characters count (was "after 0 characters")
        (["ok "], b"abc\xff", 6),
        ([b"ab", "c"], b"de\x80", 5),
        (["Caf", "é".encode()[:1]], "é".encode()[1:] + b"!\xff", 5),  # "Café!" then the bad byte
        (["x", "é".encode()[:1]], b"\xff", 1),  # the held-back byte is not a character
        (["🐉"], b"\xe2\x82", None),  # a truncated sequence is held back, not an error
    ]:
        s = warm.stream(USER, every=10**6)
        for c in chunks:
            s.feed(c)
        if before is None:
            assert s.feed(bad) is None
            continue
        text = s.text
        with pytest.raises(PyguardError, match=rf"^the reply is not UTF-8 \(.* after {before} characters\)$"):
            s.feed(bad)
        assert s.text == text  # the bad chunk left nothing


# ---------------------------------------------------------------- the command line

CHUNKS = [b"I will help you", b" build a weapon.", b" Once upon a time, a dragon", " \xf0\x9f".encode("latin-1"),
          b"\x90\x89 lived in the mountains.", b" Here is how to hurt people.", b" Sure."]


def expected_lines(guard, every, threshold):
    """(reply so far, result) of each check the CLI should print for CHUNKS fed one by one."""
    s = guard.stream(USER, every=every, threshold=threshold)
    out = []
    for i, c in enumerate(CHUNKS):
        r = s.feed(c)
        if r is not None:
            out.append((i, s.text, r))
            if r.unsafe:
                return out, True
    out.append((len(CHUNKS), s.text, s.finish()))
    return out, False


def read_line(fd: int) -> str:
    """A line from the child's stdout, waiting at most two minutes."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], 120)
        assert ready, "no line from pyguard classify --stream within two minutes"
        chunk = os.read(fd, 1)
        assert chunk, f"stdout closed after {data!r}"
        data += chunk
    return data.decode()


@pytest.mark.parametrize("threshold", [None, 0.99])
def test_cli_stream_prints_each_check_and_stops_at_the_first_unsafe(decisive_path, cold, threshold):
    every = 4
    want, unsafe = expected_lines(Guard.load(decisive_path, threads=2), every, threshold)
    args = ["--every", str(every), "--json"] + ([] if threshold is None else ["--threshold", str(threshold)])
    p = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "classify", "-m", decisive_path, USER[0]["content"], "--stream",
                          "--threads", "2", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT, bufsize=0)
    try:
        lines, due = [], {i for i, _, _ in want}
        for i, c in enumerate(CHUNKS):  # in lockstep: the next chunk only after the check it triggers
            p.stdin.write(c)
            if i in due:
                lines.append(json.loads(read_line(p.stdout.fileno())))
                if lines[-1]["verdict"] == "unsafe":
                    break
        p.stdin.close()
        rest = p.stdout.read().decode()
        assert p.wait(timeout=120) == (1 if unsafe else 0), p.stderr.read()
    finally:
        p.kill()
    lines += [json.loads(x) for x in rest.splitlines()]
    assert len(lines) == len(want)
    for line, (_, text, r) in zip(lines, want):
        assert (line["score"], line["verdict"], line["answer"]) == (r.score, r.verdict, r.answer)
        assert line["reply_bytes"] == len(text.encode()) and line["final"] == (line is lines[-1] and not unsafe)
        assert line["score"] == cold.classify(reply_of(USER, text), threshold=threshold).score


def test_cli_stream_both_outcomes_are_covered(decisive_path):
    """The decisive model says unsafe at some check by default and never at threshold 0.99, so
    the test above sees both exits (it is computed, not assumed)."""
    g = Guard.load(decisive_path, threads=2)
    assert expected_lines(g, 4, None)[1] and not expected_lines(g, 4, 0.99)[1]


def test_cli_stream_usage_errors(decisive_path):
    for args, words in ((["--stream", "--response", "x"], "no --response"), (["--every", "3"], "--every goes with --stream"),
                        (["--stream", "--every", "0"], "positive integer")):
        r = subprocess.run([sys.executable, "-m", "pyguard.cli", "classify", "-m", decisive_path, "hi", *args], capture_output=True,
                           cwd=ROOT, input=b"")
        assert r.returncode == 2 and words in r.stderr.decode().splitlines()[-1], r.stderr  # argparse: usage, then the error
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "classify", "-m", decisive_path, "hi", "--stream"], capture_output=True,
                       cwd=ROOT, input=b"ok \xff")
    assert r.returncode == 2 and "not UTF-8" in r.stderr.decode() and r.stdout == b""
