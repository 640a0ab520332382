"""A token's logits are bit-for-bit the same however its sequence is computed: whole or in
pieces (split anywhere, around the 64-token chunk edges, single tokens through the GEMV),
alone or batched with other sequences (prefill_many), from a restored snapshot or not, on 1 or
3 threads, with every group size, a full or a pruned head, a float32 or a float16 cache.

Why it holds by construction: every kernel computes a row from that row's inputs alone, in a
fixed order (the GEMM's tile sequence is the same for every tile shape and the GEMV is a
one-row GEMM; attention sums each query's keys in a fixed order, model.attention_reference),
and the numpy steps between them are elementwise or per row."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synth
from pyguard.engine import model as pgmodel
from pyguard.formats.config import ModelConfig
from pyguard.engine.model import Model

CFG = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=600)
HEAD = list(range(3, 600, 7))
EDGES = [1, 2, 63, 64, 65, 127, 128, 129, 190]  # prompt lengths and split points around the chunk edges
MAX_LEN = 260


@pytest.fixture(scope="module")
def models():
    """(group, head) -> {threads: Model}, the same weights at 1 and 3 threads."""
    weights = synth.random_weights(CFG, seed=4)
    out = {}
    for group in (32, 64, 128, 256):
        for head in (None, HEAD):
            tensors, _ = synth.quantize_checkpoint(CFG, weights, group, head)
            out[group, head is not None] = {t: Model(CFG, tensors, head, threads=t) for t in (1, 3)}
    return out


lengths = st.one_of(st.sampled_from(EDGES), st.integers(1, 190))
kinds = st.tuples(st.sampled_from((32, 64, 128, 256)), st.booleans(), st.sampled_from((1, 3)),
                  st.sampled_from((np.float32, np.float16)))
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n)


def whole(model: Model, ids: np.ndarray, kv_dtype) -> np.ndarray:
    return model.prefill(model.new_state(MAX_LEN, kv_dtype), ids, all_logits=True)


@SETTINGS
@given(kinds, lengths, st.lists(st.one_of(st.sampled_from(EDGES), st.integers(1, 189)), max_size=6), st.integers(0, 99))
def test_any_split_gives_the_whole_prompts_logits(models, kind, n, cuts, seed):
    group, pruned, threads, kv_dtype = kind
    model = models[group, pruned][threads]
    ids = tokens(seed, n)
    expected = whole(models[group, pruned][1], ids, kv_dtype)  # one pass, one thread
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    state, got = model.new_state(MAX_LEN, kv_dtype), []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a == 1 and a % 2:  # single tokens both ways: decode and a one-token prefill
            got.append(model.decode(state, int(ids[a]))[None])
        else:
            got.append(model.prefill(state, ids[a:b], all_logits=True))
    assert np.array_equal(np.concatenate(got), expected)


@SETTINGS
@given(kinds, st.lists(st.tuples(lengths, st.integers(0, 60)), min_size=1, max_size=5), st.integers(0, 99))
def test_batches_give_each_sequences_own_logits(models, kind, seqs, seed):
    """prefill_many over sequences with different cached prefixes (restored from snapshots)
    and different lengths: each one's logits are those it gets alone."""
    group, pruned, threads, kv_dtype = kind
    model = models[group, pruned][threads]
    states, lists, expected = [], [], []
    for i, (n, cached) in enumerate(seqs):
        ids = tokens(seed * 10 + i, n + cached)
        expected.append(whole(models[group, pruned][1], ids, kv_dtype)[-1])
        state = model.new_state(MAX_LEN + 60, kv_dtype)
        if cached:
            prefix = model.new_state(cached, kv_dtype)
            model.prefill(prefix, ids[:cached])
            state.restore(prefix.snapshot())
        states.append(state)
        lists.append(ids[cached:])
    assert np.array_equal(model.prefill_many(states, lists), np.stack(expected))


def test_small_chunks_change_nothing(models, monkeypatch):
    """The chunk size itself: 5-token passes give the 64-token passes' bits."""
    model = models[64, True][3]
    ids = tokens(1, 150)
    expected = whole(model, ids, np.float32)
    monkeypatch.setattr(pgmodel, "PREFILL_CHUNK", 5)
    assert np.array_equal(whole(model, ids, np.float32), expected)
    states = [model.new_state(MAX_LEN) for _ in range(3)]
    got = model.prefill_many(states, [ids, ids[:77], ids[:3]])
    assert np.array_equal(got, expected[[149, 76, 2]])
