"""The int8 embedding table and head (quant.Q8Tensor): the reference arithmetic, the engine's
lookup and exact head product against it (bit for bit, alone or in a batch, any thread
count), and the converter writing them. Hostile files: tests/test_file_fuzz.py."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard.convert import checkpoint
from pyguard.convert.hf import convert
from pyguard.engine import kernels
from pyguard.engine import model as pgmodel
from pyguard.engine.model import Model
from pyguard.errors import PyguardError
from pyguard.formats import file, quant
from pyguard.formats.config import ModelConfig
from pyguard.formats.safetensors import Checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import oracle  # noqa: E402
import synth  # noqa: E402

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=640,
                  rope_theta=10000.0, max_seq_len=4096)
HEAD = list(range(3, 640, 7))  # a pruned head of 92 rows


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.floats(1e-30, 1e30), st.integers(1, 40), st.sampled_from([64, 192]))
def test_quantize8_rounds_each_row_to_its_absmax_grid(seed, magnitude, rows, k):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, k)) * magnitude * np.exp(rng.standard_normal((rows, 1)))).astype(np.float32)
    w[0] = 0  # a zero row: scale 0, values 0
    t = quant.quantize8(w)
    assert t.q.dtype == np.int8 and t.scales.dtype == np.float32 and t.scales.shape == (rows,)
    assert np.abs(t.q.astype(np.int16)).max(initial=0) <= 127 and t.scales[0] == 0 and not t.q[0].any()
    peak = np.abs(w).max(axis=1)
    assert np.array_equal(t.scales, (peak / np.float32(127)).astype(np.float32))
    assert (np.abs(t.q[1:]).max(axis=1) == 127).all()  # each row's largest value is on the grid's end
    err = np.abs(quant.dequantize8(t) - w)
    assert (err <= 0.5001 * t.scales[:, None] + 1e-6 * peak[:, None]).all()  # rounding, no clipping
    assert np.array_equal(quant.dequantize8(t, np.array([2, 0, 2]) % rows), quant.dequantize8(t)[np.array([2, 0, 2]) % rows])


def worst_case(k: int) -> tuple[quant.Q8Tensor, np.ndarray]:
    """Integer sums as large as they get (q_w = +-127 against codes 0 or 255 and zero points
    at the ends): every float32 partial sum would round here; float64's does not."""
    q = np.full((5, k), 127, np.int8)
    q[1] = -127
    q[2, ::2] = -127
    q[3, : k // 3] = 1
    x = np.full((3, k), 7.0, np.float32)
    x[1] = -7.0
    x[2, ::3] = -1e-3
    return quant.Q8Tensor(q, np.array([1.0, 3e-3, 0.5, 7.0, 0.0], np.float32)), x


@pytest.mark.parametrize("threads", [1, 2])
def test_head_product_is_the_reference_bit_for_bit(threads, monkeypatch):
    """linear8 (float64 BLAS over parts of the rows) gives quant.gemm8's bits (int64 sums), for
    any batch, row chunking and thread split; a row of NaN activations gives NaN, alone."""
    monkeypatch.setattr(pgmodel, "SPREAD_MIN", 0)
    monkeypatch.setattr(pgmodel, "HEAD_ROWS", 100)
    pool = kernels.Pool(threads)
    rng = np.random.default_rng(threads)
    t = quant.quantize8(rng.standard_normal((1000, 256)).astype(np.float32))
    x = (rng.standard_normal((9, 256)) * rng.uniform(0.01, 100, (9, 1))).astype(np.float32)
    x[4, 7] = np.nan
    want = quant.gemm8(t, quant.quantize_acts(x))
    got = pgmodel.linear8(t, x, pool)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(got[4]).all() and np.isfinite(np.delete(got, 4, 0)).all()
    for i in (0, 8):  # alone (the decode path) = in the batch
        assert np.array_equal(pgmodel.linear8(t, x[i : i + 1], pool)[0], got[i])
    t, x = worst_case(16384)
    assert np.array_equal(pgmodel.linear8(t, x, pool), quant.gemm8(t, quant.quantize_acts(x)))


def test_float32_sums_would_not_be_exact():
    """The worst case above can fail: float32 accumulation of the same integers differs."""
    t, x = worst_case(16384)
    a = quant.quantize_acts(x)
    xi = (a.q.astype(np.int64) - a.zp[:, None])
    f32 = (xi.astype(np.float32) @ t.q.astype(np.float32).T).astype(np.float64)
    assert not np.array_equal(f32, (xi @ t.q.astype(np.int64).T).astype(np.float64))


def int8_model(cfg: ModelConfig, head: list[int] | None, group: int = 32):
    """(engine, transformers oracle) with the int8 table and, pruned or tied, the int8 head."""
    weights = synth.random_weights(cfg)
    tensors, deq = synth.quantize_checkpoint(cfg, weights, group)
    tensors["tok_embeddings"] = quant.quantize8(weights["model.embed_tokens.weight"])
    deq["model.embed_tokens.weight"] = quant.dequantize8(tensors["tok_embeddings"])
    if cfg.tie_embeddings:
        del tensors["output"]  # the table is the head
    else:
        rows = np.asarray(HEAD if head else range(cfg.vocab_size))
        tensors["output"] = quant.quantize8(weights["lm_head.weight"][rows])
        deq["lm_head.weight"] = np.zeros_like(weights["lm_head.weight"])
        deq["lm_head.weight"][rows] = quant.dequantize8(tensors["output"])
    return Model(cfg, tensors, head, threads=2), oracle.hf_model(cfg, deq)


@pytest.mark.parametrize("tied", [False, True])
def test_engine_with_int8_table_and_head(tied):
    """The engine's lookup and head against transformers holding the dequantized int8 table
    and head, with the engine's int8 activation decisions (as test_model does for int4), and
    the head's output against quant.gemm8 of its recorded input, bit for bit."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    head = None if tied else HEAD
    model, ref = int8_model(cfg, head)
    ids = np.random.default_rng(0).choice(HEAD, 150)
    with oracle.linear_inputs() as inputs:
        got = model.logits(ids)
    with oracle.quantized_activations(ref, model, inputs):
        want = oracle.oracle_logits(ref, ids, head)
    assert np.abs(got - want).max() <= 1e-4 * want.std()
    head_input = np.concatenate(inputs[id(model.output)])
    assert np.array_equal(got, quant.gemm8(model.output, quant.quantize_acts(head_input)))


def test_int8_head_same_bits_alone_batched_and_threaded(monkeypatch):
    monkeypatch.setattr(pgmodel, "SPREAD_MIN", 0)
    model, _ = int8_model(dataclasses.replace(CFG, tie_embeddings=True), None)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, CFG.vocab_size, n) for n in (5, 70, 1, 33)]
    alone = [model.logits(s) for s in seqs]
    states = [model.new_state(100) for _ in seqs]
    batched = model.prefill_many(states, seqs)
    for a, b in zip(alone, batched):
        assert np.array_equal(a[-1], b)
    decoded = model.prefill_many(states, [[7]] * len(seqs))  # a batched decode
    for s, d in zip(seqs, decoded):
        assert np.array_equal(model.logits(np.append(s, 7))[-1], d)
    one = Model(model.config, {"tok_embeddings": model.tok_embeddings, "norm": model.norm,
                               **{f"layers.{i}.{k}": getattr(layer, k) for i, layer in enumerate(model.layers)
                                  for k in ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")}}, threads=1)
    assert np.array_equal(one.logits(seqs[1]), alone[1])


def test_model_refuses_malformed_int8_tensors():
    weights = synth.random_weights(CFG)
    tensors, _ = synth.quantize_checkpoint(CFG, weights, 32)
    t = quant.quantize8(weights["model.embed_tokens.weight"])
    for bad in (quant.Q8Tensor(t.q.view(np.uint8), t.scales), quant.Q8Tensor(t.q, t.scales.astype(np.float16)),
                quant.Q8Tensor(t.q, t.scales[:-1]), quant.Q8Tensor(t.q[:, :64], t.scales)):
        with pytest.raises(PyguardError, match="tok_embeddings"):
            Model(CFG, {**tensors, "tok_embeddings": bad})


def convert_quiet(hf: str, out: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in these checkpoints
        return convert(hf, out, threads=2, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_converter_writes_the_int8_table(tmp_path, tied):
    """By default the table is int8 (a full untied head stays int4; a tied one is the table),
    exactly quantize8 of the checkpoint's rows, recorded in the file and the summary line;
    table="int4" writes every matrix int4 as before."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    hf = str(tmp_path / "hf")
    checkpoint.write_checkpoint(hf, cfg, dtype="F32")
    summary = convert_quiet(hf, str(tmp_path / "a.pgw"))
    f = file.load(str(tmp_path / "a.pgw"))
    assert f.meta["quant"]["int8"] == ["tok_embeddings"] and file.verify(str(tmp_path / "a.pgw")) > 0
    emb = quant.quantize8(Checkpoint(hf).read("model.embed_tokens.weight"))
    got = f.tensors["tok_embeddings"]
    assert np.array_equal(got.q, emb.q) and np.array_equal(got.scales, emb.scales)
    assert ("int8 embedding table (also the head)," if tied else "int8 embedding table,") in summary.text()
    assert ("output" not in f.tensors) if tied else isinstance(f.tensors["output"], quant.QTensor)
    assert Model.load(str(tmp_path / "a.pgw")).logits([1, 2, 3]).shape == (3, cfg.vocab_size)
    summary = convert_quiet(hf, str(tmp_path / "b.pgw"), table="int4")
    f = file.load(str(tmp_path / "b.pgw"))
    assert "int8" not in f.meta["quant"] and "int8" not in summary.text()
    assert isinstance(f.tensors["tok_embeddings"], quant.QTensor)
    with pytest.raises(PyguardError, match="table must be 'int8' or 'int4'"):
        convert_quiet(hf, str(tmp_path / "c.pgw"), table="int2")
