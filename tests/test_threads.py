"""Models under concurrency: several models and threads at once give exactly the results of
sequential use; a forked child computes with a model its parent already ran on threads.
(The Guard's own thread and fork tests are in test_guard*.py; the C pool alone runs under
ThreadSanitizer in test_sanitize.py.)"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import synth
from pyguard.formats import file
from pyguard.formats.config import ModelConfig
from pyguard.engine.model import Model

CFG = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=500)
TIMEOUT = 120  # seconds: a hang fails the test instead of stalling CI


@pytest.fixture(scope="module")
def tensors():
    return synth.quantize_checkpoint(CFG, synth.random_weights(CFG, seed=9), 64)[0]


def prompts(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, CFG.vocab_size, int(rng.integers(1, 150))) for _ in range(n)]


def run(model: Model, ids: np.ndarray) -> np.ndarray:
    state = model.new_state(len(ids) + 2)
    model.prefill(state, ids[:-1]) if len(ids) > 1 else None
    return np.stack([model.decode(state, int(ids[-1])), model.decode(state, 7)])


def test_one_model_from_many_threads(tensors):
    model = Model(CFG, tensors, threads=2)
    work = prompts(24)
    expected = [run(model, ids) for ids in work]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda ids: run(model, ids), work))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_several_models_with_their_own_thread_counts(tensors):
    """Thread counts belong to models (no process-wide setting for the last one to win)."""
    models = [Model(CFG, tensors, threads=t) for t in (1, 2, 3, 2)]
    assert [m.pool.threads for m in models] == [1, 2, 3, 2]
    work = prompts(8)
    expected = [run(models[0], ids) for ids in work]
    jobs = [(m, ids) for m in models for ids in work]
    with ThreadPoolExecutor(len(models)) as ex:
        got = list(ex.map(lambda job: run(*job), jobs))
    assert all(np.array_equal(g, expected[i % len(work)]) for i, g in enumerate(got))


def test_loading_while_another_thread_computes(tensors, tmp_path):
    path = str(tmp_path / "m.pgw")
    file.save(path, CFG, tensors)
    model = Model.load(path, threads=2)
    ids = prompts(1)[0]
    expected = run(model, ids)
    stop, results = threading.Event(), []

    def busy():
        while not stop.is_set():
            results.append(run(model, ids))

    t = threading.Thread(target=busy)
    t.start()
    try:
        loaded = [Model.load(path, threads=2) for _ in range(3)]
    finally:
        stop.set()
        t.join(TIMEOUT)
    assert not t.is_alive() and results
    assert all(np.array_equal(r, expected) for r in results)
    assert np.array_equal(run(loaded[-1], ids), expected)


def _child(model: Model, ids: np.ndarray, queue) -> None:
    queue.put(run(model, ids))


def test_fork_after_threads_ran(tensors):
    """A model whose pool already ran with 2 threads, then fork (gunicorn --preload,
    multiprocessing): the child's pool is rebuilt on first use instead of waiting for workers
    that do not exist there."""
    model = Model(CFG, tensors, threads=2)
    ids = prompts(3)[2]
    expected = run(model, ids)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(model, ids, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=TIMEOUT) for _ in procs]
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    assert all(np.array_equal(g, expected) for g in got)
    assert np.array_equal(run(model, ids), expected)  # the parent's pool still works
