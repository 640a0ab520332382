"""The token-prefix cache and streaming moderation: every result is the one a cold guard's
classify gives, whatever the cache held, evicted or shared, and however a reply was cut."""

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
from pyguard.engine.cache import PrefixCache
from pyguard.formats.config import ModelConfig
from pyguard.engine.model import State
from synth import decisive_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = [{"role": "user", "content": "Tell me a story about a dragon."}]
# words, multi-byte characters, an emoji built with a joiner, a combining accent, digits, newlines
PIECES = ["Once", " upon", " a", " time", ",", " dragon", " 🐉", " 👩‍🚀", " Ünsal", " cafe\u0301", " 日本語", " 42", "\n\n",
          " the", " address", " of", " a", " celebrity", ".", " ", "!"]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def key(r):
    """What a result is, apart from timings and cache hits."""
    return r.verdict, r.categories, r.category_names, r.score, r.answer, r.prompt_tokens, r.generated_tokens, r.category_scores


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return decisive_guard(str(tmp_path_factory.mktemp("stream")), "guard")


@pytest.fixture(scope="module")
def cold(path):
    return Guard.load(path, threads=2, cache_bytes=0)


@pytest.fixture(scope="module")
def warm(path):
    return Guard.load(path, threads=2)


def reply_of(conv, text):
    return conv + [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- the cache alone

TINY = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, vocab_size=64, hidden_dim=32, max_seq_len=64)


def filled(ids: np.ndarray) -> State:
    """A state whose position p holds a fingerprint of ids[:p + 1] (what a model's cache depends on)."""
    s = State(TINY, max(len(ids), 1))
    for p in range(len(ids)):
        s.kv[:, :, :, p] = np.float32(hash(tuple(ids[: p + 1].tolist())) % 1000003)
    s.pos = len(ids)
    return s


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=12),
       st.integers(0, 30))
def test_cache_restores_exactly_what_was_stored(sequences, positions):
    """Random inserts under a budget of `positions` positions: every restore is the longest
    prefix still held (never more than was inserted, never a wrong position), the byte count
    is what the tree holds and stays within budget."""
    per_position = filled(np.zeros(1, np.int64)).kv[:, :, :, :1].nbytes
    cache, inserted = PrefixCache(positions * per_position), []
    for seq in sequences:
        ids = np.array(seq, np.int64)
        probe = State(TINY, len(ids) + 1)
        n = cache.restore(probe, ids, len(ids))
        assert n <= max((len(os.path.commonprefix([list(ids), list(x)])) for x in inserted), default=0)
        assert np.array_equal(probe.kv[:, :, :, :n], filled(ids).kv[:, :, :, :n])
        cache.insert(ids, filled(ids))
        inserted.append(ids)
        assert cache.bytes == len(cache) * per_position <= cache.budget
    if positions >= len(sequences[-1]):  # the latest insert is the most recently used: still there whole
        assert cache.restore(State(TINY, 13), inserted[-1], 12) == len(inserted[-1])


def test_default_budget_is_4096_positions(warm):
    assert warm.cache.budget == 4096 * warm.model.new_state(1).kv.nbytes


def test_cache_of_zero_bytes_holds_nothing():
    cache = PrefixCache(0)
    ids = np.arange(5, dtype=np.int64)
    cache.insert(ids, filled(ids))
    assert cache.restore(State(TINY, 5), ids, 5) == 0 and cache.bytes == 0


# ---------------------------------------------------------------- the guard's cache

def test_multi_turn_reuse_matches_a_cold_guard(path, cold):
    g = Guard.load(path, threads=2)
    turns = ["Hi, can you help me plan a trip?", "Sure! Where would you like to go?", "Somewhere warm in March.",
             "The Canary Islands are warm then.", "What should I pack?", "Light clothes, sunscreen, a jacket.",
             "Give me the home address of a celebrity there."]
    conv = []
    for i, text in enumerate(turns):
        conv.append({"role": ("user", "assistant")[i % 2], "content": text})
        r = g.classify(conv, category_scores=True)
        assert key(r) == key(cold.classify(conv, category_scores=True))
        if i >= 2:  # the conversation so far (same role: two messages back) came from the cache
            assert r.cached_tokens > g.prepare(conv).policy
    prefixes = [conv[:k] for k in range(1, 8)]  # batched, each one's earlier turns cached
    assert [key(r) for r in g.classify_many(prefixes, batch_size=3)] == [key(cold.classify(c)) for c in prefixes]


@SETTINGS
@given(st.lists(st.integers(0, 6), min_size=1, max_size=10), st.integers(1, 400))
def test_eviction_under_a_tiny_budget_never_changes_a_result(path, cold, picks, positions):
    """Conversations sharing prefixes in random order through a cache of a few positions."""
    g = Guard.load(path, threads=2, cache_bytes=positions * 64 * 1024 // 64)
    convs = [USER, "hello", reply_of(USER, "Once upon a time"), reply_of(USER, "Once upon a time, a dragon."),
             reply_of(USER, "Once"), "hello there", [{"role": "user", "content": "hello there"}]]
    for i in picks:
        assert key(g.classify(convs[i])) == key(cold.classify(convs[i]))
        assert g.cache.bytes <= g.cache.budget
    got = g.classify_many([convs[i] for i in picks], batch_size=4)
    assert [key(r) for r in got] == [key(cold.classify(convs[i])) for i in picks]


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
        assert key(r) == key(cold.classify(reply_of(USER, text)))
    assert s.unsafe == any(r.unsafe for _, r in results)


def test_stream_checks_every_n_tokens_and_reuses_the_reply(path, cold):
    g = Guard.load(path, threads=2)
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
    assert key(final) == key(cold.classify(reply_of(USER, s.text)))


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
    with pytest.raises(PyguardError, match="empty content"):
        s.check()  # nothing to judge yet
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


def test_stream_honours_the_length_limit(path):
    g = Guard.load(path, threads=2, max_tokens=400)
    s = g.stream(USER, every=10_000)
    s.feed("word " * 300)
    with pytest.raises(PyguardError, match="over the limit"):
        s.check()


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
def test_cli_stream_prints_each_check_and_stops_at_the_first_unsafe(path, cold, threshold):
    every = 4
    want, unsafe = expected_lines(Guard.load(path, threads=2), every, threshold)
    args = ["--every", str(every), "--json"] + ([] if threshold is None else ["--threshold", str(threshold)])
    p = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "classify", "-m", path, USER[0]["content"], "--stream",
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


def test_cli_stream_both_outcomes_are_covered(path):
    """The decisive model says unsafe at some check by default and never at threshold 0.99, so
    the test above sees both exits (it is computed, not assumed)."""
    g = Guard.load(path, threads=2)
    assert expected_lines(g, 4, None)[1] and not expected_lines(g, 4, 0.99)[1]


def test_cli_stream_usage_errors(path):
    for args, words in ((["--stream", "--response", "x"], "no --response"), (["--every", "3"], "--every goes with --stream"),
                        (["--stream", "--every", "0"], "positive integer")):
        r = subprocess.run([sys.executable, "-m", "pyguard.cli", "classify", "-m", path, "hi", *args], capture_output=True,
                           cwd=ROOT, input=b"")
        assert r.returncode == 2 and words in r.stderr.decode().splitlines()[-1], r.stderr  # argparse: usage, then the error
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "classify", "-m", path, "hi", "--stream"], capture_output=True,
                       cwd=ROOT, input=b"ok \xff")
    assert r.returncode == 2 and "not UTF-8" in r.stderr.decode() and r.stdout == b""
