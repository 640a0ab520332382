"""The token-prefix cache (pyguard/engine/cache.py, docs/STREAM.md): the radix tree alone on a
fingerprint model (restores exact and within their limit, least recently used leaves out
first, the byte budget kept to the byte, every array a copy of its own), then a guard's cache on
the decisive model (results bit for bit those of a cold guard, what goes in and what comes back)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import Guard
from pyguard.engine.cache import PrefixCache
from pyguard.engine.model import State
from pyguard.formats.config import ModelConfig
from synth import reply_of, result_key

TINY = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, vocab_size=64, hidden_dim=32, max_seq_len=64)
P = State(TINY, 1).kv[:, :, :, :1].nbytes  # bytes of one position
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
USER = [{"role": "user", "content": "Tell me a story about a dragon."}]


def seq(*tokens) -> np.ndarray:
    return np.array(tokens, np.int64)


def filled(ids: np.ndarray) -> State:
    """A state whose position p holds a fingerprint of ids[:p + 1] (what a model's cache
    depends on), different in every element, never 0 (the value of an unfilled position)."""
    s = State(TINY, max(len(ids), 1))
    shape = s.kv[:, :, :, 0].shape
    for p in range(len(ids)):
        s.kv[:, :, :, p] = 1 + hash(tuple(ids[: p + 1].tolist())) % 10007 + np.arange(np.prod(shape)).reshape(shape) / 16
    s.pos = len(ids)
    return s


def held(cache: PrefixCache, ids: np.ndarray, limit: int | None = None) -> int:
    """Tokens of ids the cache restores (checking that they are the right ones)."""
    limit = len(ids) if limit is None else limit
    probe = State(TINY, len(ids) + 2)
    n = cache.restore(probe, ids, limit)
    assert probe.pos == n <= limit
    assert np.array_equal(probe.kv[:, :, :, :n], filled(ids).kv[:, :, :, :n])
    assert not probe.kv[:, :, :, n:].any()  # nothing written past what it returns
    return n


def depth(cache: PrefixCache, ids: np.ndarray) -> int:
    """Tokens of ids held in the tree, read without using the cache (no node marked used)."""
    node, pos = cache._root, 0
    while pos < len(ids) and int(ids[pos]) in node.children:
        node = node.children[int(ids[pos])]
        n = min(len(node.ids), len(ids) - pos)
        m = n if np.array_equal(node.ids[:n], ids[pos : pos + n]) else int(np.flatnonzero(node.ids[:n] != ids[pos : pos + n])[0])
        pos += m
        if m < len(node.ids):
            break
    return pos


def nodes(cache: PrefixCache):
    stack, out = list(cache._root.children.values()), []
    while stack:
        node = stack.pop()
        out.append(node)
        stack += node.children.values()
    return out


def test_restore_stops_at_its_limit():
    """Every limit from 0 to past the end, over a path of three nodes (a split edge and an
    extension): exactly min(limit, held) positions, none beyond."""
    long = seq(*range(10))
    cache = PrefixCache(100 * P)
    cache.insert(long[:4], filled(long[:4]))
    cache.insert(long, filled(long))  # a child after the first 4
    fork = seq(0, 1, 2, 3, 4, 5, 6, 9)
    cache.insert(fork, filled(fork))  # splits the child after 3 more tokens
    assert len(nodes(cache)) == 4 and len(cache) == 11
    for ids in (long, fork):
        for limit in range(len(ids) + 3):
            assert held(cache, ids, limit) == min(limit, len(ids))
    assert held(cache, seq(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 11) == 10  # the longest cached prefix
    assert held(cache, seq(0, 1, 2, 7), 4) == 3  # diverging inside an edge
    assert held(cache, seq(5, 1), 2) == 0


def test_a_lookup_stops_where_it_diverges_inside_an_edge():
    """Past a partial match, the edge's children hold positions the lookup did not reach: a
    request whose next token starts one of them must not take it."""
    a, b = seq(0, 1, 2, 3), seq(0, 1, 2, 3, 5, 5)
    cache = PrefixCache(100 * P)
    cache.insert(a, filled(a))
    cache.insert(b, filled(b))  # a child [5, 5] under [0, 1, 2, 3]
    assert held(cache, seq(0, 5, 5, 9), 4) == 1
    c = seq(0, 5, 5, 9)
    cache.insert(c, filled(c))
    assert [held(cache, x, 8) for x in (a, b, c)] == [4, 6, 4] and len(cache) == 9


def test_least_recently_used_leaf_goes_first_not_the_oldest():
    """Three 2-token leaves fill the budget; using the oldest (by restore, by inserting it
    again, by a lookup that passes through it, or by one that ends inside its edge) makes the
    next insert drop another."""
    a, b, c, d = seq(0, 1), seq(1, 1), seq(2, 1), seq(3, 1)
    for touch in (lambda x, cache: cache.restore(State(TINY, 4), x, 2),
                  lambda x, cache: cache.insert(x, filled(x)),
                  lambda x, cache: cache.restore(State(TINY, 4), np.append(x, [7, 7]), 4),
                  lambda x, cache: cache.restore(State(TINY, 4), x[:1], 1)):
        cache = PrefixCache(6 * P)
        for x in (a, b, c):
            cache.insert(x, filled(x))
        touch(a, cache)
        cache.insert(d, filled(d))
        assert [depth(cache, x) for x in (a, b, c, d)] == [2, 0, 2, 2]
        touch(a, cache)
        cache.insert(b, filled(b))  # c is now the least recently used
        assert [depth(cache, x) for x in (a, b, c, d)] == [2, 2, 0, 2]


@SETTINGS
@given(st.permutations(range(6)), st.integers(1, 6))
def test_eviction_follows_recency(order, k):
    """Six leaves used in a random order, then a leaf that needs k of their places: exactly
    the k least recently used go, the others stay whole."""
    leaves = [seq(i, 9, 9) for i in range(6)]
    cache = PrefixCache(18 * P)
    for x in leaves:
        cache.insert(x, filled(x))
    for i in order:
        assert held(cache, leaves[i]) == 3
    new = seq(*([7] * (3 * k)))
    cache.insert(new, filled(new))
    gone = set(order[:k])
    assert [depth(cache, x) for x in leaves] == [0 if i in gone else 3 for i in range(6)]
    assert depth(cache, new) == 3 * k and cache.bytes == 18 * P


def test_parents_outlive_their_children():
    """A shared prefix is evicted only after every leaf under it, and then in its own turn by
    its own use: the tree stays connected."""
    trunk = seq(0, 1, 2)
    x, y, z = np.append(trunk, [3, 3]), np.append(trunk, [4, 4]), seq(5, 5, 5)
    cache = PrefixCache(10 * P)
    for s in (z, x, y):  # y splits x's edge: the trunk and two 2-token leaves
        cache.insert(s, filled(s))
    assert cache.bytes == 10 * P and len(nodes(cache)) == 4
    cache.restore(State(TINY, 5), y, 5)
    cache.restore(State(TINY, 5), z, 3)  # least recently used first: x's leaf, y's (and the trunk), z
    w = seq(6, 6)
    cache.insert(w, filled(w))
    assert [depth(cache, s) for s in (x, y, z, w)] == [3, 5, 3, 2] and cache.bytes == 10 * P
    cache.insert(seq(6, 6, 6, 6), filled(seq(6, 6, 6, 6)))  # 2 positions more: y's leaf goes, the trunk stays
    assert [depth(cache, s) for s in (x, y, z)] == [3, 3, 3] and cache.bytes == 10 * P
    cache.insert(seq(8, 8, 8), filled(seq(8, 8, 8)))  # 3 more: the trunk, now the least recently used leaf
    assert [depth(cache, s) for s in (x, z, seq(6, 6, 6, 6), seq(8, 8, 8))] == [0, 3, 4, 3] and cache.bytes == 10 * P


def test_a_split_edges_unreached_part_keeps_its_age():
    """A request that diverges inside an edge uses its upper part only: the lower part keeps
    its old use and goes before the request's own new leaf and before a leaf used since (it
    once took the new leaf's turn: the latest request was evicted first)."""
    a, b, c = seq(1, 0, 0, 0), seq(2, 2), seq(1, 1)
    cache = PrefixCache(6 * P)
    for x in (a, b, c):  # c splits a after its first token: 7 positions for 6
        cache.insert(x, filled(x))
    assert [depth(cache, x) for x in (a, b, c)] == [1, 2, 2] and cache.bytes == 4 * P


@pytest.mark.parametrize("slack", [-1, 0, 1])
def test_the_budget_is_kept_to_the_byte(slack):
    """Contents of exactly the budget (or a byte less) stay whole; one byte more than the
    budget drops the least recently used leaf, and only it."""
    a, b, c = seq(0, 1), seq(1, 1), seq(2, 1)
    cache = PrefixCache(6 * P + slack)
    for x in (a, b, c):
        cache.insert(x, filled(x))
    if slack < 0:
        assert [depth(cache, x) for x in (a, b, c)] == [0, 2, 2] and cache.bytes == 4 * P
    else:
        assert [depth(cache, x) for x in (a, b, c)] == [2, 2, 2] and cache.bytes == 6 * P


def test_a_leaf_larger_than_the_budget_keeps_nothing():
    cache = PrefixCache(4 * P)
    cache.insert(seq(0, 1, 2), filled(seq(0, 1, 2)))
    cache.insert(seq(5, 1, 2, 3, 4), filled(seq(5, 1, 2, 3, 4)))
    assert cache.bytes == 0 and len(cache) == 0 and held(cache, seq(0, 1, 2)) == 0


def test_arrays_are_copies():
    """The cache keeps copies: a state written after an insert (a decode overwrites positions)
    changes nothing held, and a split edge's halves share no memory (dropping one frees it)."""
    ids = seq(*range(8))
    state = filled(ids)
    cache = PrefixCache(100 * P)
    cache.insert(ids, state)
    state.kv[:] = -1
    other = seq(0, 1, 2, 3, 9, 9)
    cache.insert(other, filled(other))
    assert held(cache, ids) == 8 and held(cache, other) == 6
    arrays = [n.kv for n in nodes(cache)]
    assert len(arrays) == 3 and all(a.base is None for a in arrays)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])
    assert sum(a.nbytes for a in arrays) == cache.bytes == 10 * P
    assert all(n.kv.shape[3] == len(n.ids) for n in nodes(cache))


def test_inserting_what_is_held_changes_nothing():
    ids = seq(*range(6))
    cache = PrefixCache(100 * P)
    cache.insert(ids, filled(ids))
    for again in (ids, ids[:3], ids[:1]):
        cache.insert(again, filled(again))
        assert cache.bytes == 6 * P and len(cache) == 6 and len(nodes(cache)) == 1


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=12),
       st.integers(0, 30))
def test_cache_restores_exactly_what_was_stored(sequences, positions):
    """Random inserts under a budget of `positions` positions: every restore is the longest
    prefix still held (never more than was inserted, never a wrong position), the byte count
    is what the tree holds and stays within budget."""
    cache, inserted = PrefixCache(positions * P), []
    for s in sequences:
        ids = np.array(s, np.int64)
        n = held(cache, ids)
        assert n <= max((len(os.path.commonprefix([list(ids), list(x)])) for x in inserted), default=0)
        cache.insert(ids, filled(ids))
        inserted.append(ids)
        assert cache.bytes == len(cache) * P == sum(n.kv.nbytes for n in nodes(cache)) <= cache.budget
    if positions >= len(sequences[-1]):  # the latest insert is the most recently used: still there whole
        assert held(cache, inserted[-1]) == len(inserted[-1])
    if positions >= sum(len(s) for s in sequences):  # room for everything: nothing was evicted
        assert all(held(cache, x) == len(x) for x in inserted)


def test_cache_of_zero_bytes_holds_nothing():
    cache = PrefixCache(0)
    ids = np.arange(5, dtype=np.int64)
    cache.insert(ids, filled(ids))
    assert held(cache, ids) == 0 and cache.bytes == 0 and len(cache) == 0


# ---------------------------------------------------------------- a guard's cache (the decisive model)

def test_default_budget_is_4096_positions(decisive_path):
    g = Guard.load(decisive_path, threads=2)
    assert g.cache.budget == 4096 * g.model.new_state(1).kv.nbytes


def test_what_goes_in_and_what_comes_back(decisive_path, cold):
    """A first request computes the policy prefix alone (cached_tokens = the policy) and keeps
    its conversation, not the closing instructions; the same request again restores exactly
    the conversation; a cold guard restores nothing."""
    g = Guard.load(decisive_path, threads=2)
    conv = reply_of(USER, "Once upon a time, a dragon.")
    r = g.prepare(conv)
    first, again = g.classify(conv), g.classify(conv)
    assert (first.cached_tokens, again.cached_tokens) == (r.policy, r.conversation)
    assert len(g.cache) == r.conversation and g.cache.bytes == r.conversation * g.model.new_state(1).kv.nbytes
    assert result_key(first) == result_key(again) == result_key(cold.classify(conv))
    assert cold.classify(conv).cached_tokens == 0 and len(cold.cache) == 0 == cold.cache.bytes


def test_a_batch_shares_the_policy_prefix(decisive_path, cold):
    g = Guard.load(decisive_path, threads=2)
    convs = ["hello", "How do I pick a lock?", reply_of(USER, "Sure.")]
    got = g.classify_many(convs, batch_size=3)
    assert [r.cached_tokens for r in got] == [g.prepare(c).policy for c in convs]
    assert [result_key(r) for r in got] == [result_key(cold.classify(c)) for c in convs]


def test_multi_turn_reuse_matches_a_cold_guard(decisive_path, cold):
    g = Guard.load(decisive_path, threads=2)
    turns = ["Hi, can you help me plan a trip?", "Sure! Where would you like to go?", "Somewhere warm in March.",
             "The Canary Islands are warm then.", "What should I pack?", "Light clothes, sunscreen, a jacket.",
             "Give me the home address of a celebrity there."]
    conv = []
    for i, text in enumerate(turns):
        conv.append({"role": ("user", "assistant")[i % 2], "content": text})
        r = g.classify(conv, category_scores=True)
        assert result_key(r) == result_key(cold.classify(conv, category_scores=True))
        if i >= 2:  # the conversation so far (same role: two messages back) came from the cache
            assert r.cached_tokens > g.prepare(conv).policy
    prefixes = [conv[:k] for k in range(1, 8)]  # batched, each one's earlier turns cached
    assert [result_key(r) for r in g.classify_many(prefixes, batch_size=3)] == [result_key(cold.classify(c)) for c in prefixes]
    assert len({r.verdict for r in g.classify_many(prefixes)}) == 2  # results that can differ, compared


@SETTINGS
@given(st.lists(st.integers(0, 6), min_size=1, max_size=10), st.integers(1, 400))
def test_eviction_under_a_tiny_budget_never_changes_a_result(decisive_path, cold, picks, positions):
    """Conversations sharing prefixes in random order through a cache of a few positions."""
    per_position = cold.model.new_state(1).kv.nbytes
    g = Guard.load(decisive_path, threads=2, cache_bytes=positions * per_position)
    convs = [USER, "hello", reply_of(USER, "Once upon a time"), reply_of(USER, "Once upon a time, a dragon."),
             reply_of(USER, "Once"), "hello there", [{"role": "user", "content": "hello there"}]]
    for i in picks:
        assert result_key(g.classify(convs[i])) == result_key(cold.classify(convs[i]))
        assert g.cache.bytes <= g.cache.budget
    got = g.classify_many([convs[i] for i in picks], batch_size=4)
    assert [result_key(r) for r in got] == [result_key(cold.classify(convs[i])) for i in picks]
