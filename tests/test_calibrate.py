"""Calibration in the converter (pyguard/calibrate.py): deterministic, streamed, exact folding,
importance-weighted scales, and a converted file that is still the model it claims to be."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from pyguard.convert import calibrate, checkpoint
from pyguard.formats import file, quant
from pyguard.formats.config import ModelConfig, expected_shapes
from pyguard.convert.hf import convert
from pyguard.errors import PyguardError
from pyguard.engine import kernels
from pyguard.engine.model import Model
from pyguard.formats.safetensors import Checkpoint

# GQA 2 (so the v-row folding is shared by two query heads), untied, 3 layers
TINY = ModelConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=512,
                   rope_theta=10000.0, max_seq_len=4096)
PROMPTS = [list(range(3, 60)), list(range(100, 170, 2)), [7] * 20 + list(range(400, 440))]


def outliers(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with a few loud input channels, as trained models have (norm weights
    of 10-30 on some channels, a large up row): the case folding exists for."""
    w = checkpoint.random_weights(cfg, seed)
    rng = np.random.default_rng(seed)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[p + n + ".weight"][rng.choice(cfg.dim, 4, replace=False)] *= 20
        w[p + "mlp.up_proj.weight"][rng.choice(cfg.hidden_dim, 3, replace=False)] *= 15
    return w


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("cal") / "hf")
    checkpoint.write_checkpoint(d, TINY, outliers(TINY), dtype="F32")
    return d


def convert_quiet(hf: str, out: str, **kw) -> file.PgFile:
    with pytest.warns(UserWarning, match="tokenizer not converted"):
        convert(hf, out, threads=2, **kw)
    return file.load(out)


@pytest.mark.parametrize("gptq", [False, True])
def test_same_bytes_twice(hf, tmp_path, monkeypatch, gptq):
    monkeypatch.setattr(calibrate, "GPTQ", gptq)
    a, b = str(tmp_path / "a.pgw"), str(tmp_path / "b.pgw")
    fa = convert_quiet(hf, a, calibration=PROMPTS)
    convert_quiet(hf, b, calibration=PROMPTS)
    with open(a, "rb") as x, open(b, "rb") as y:
        assert x.read() == y.read()
    assert fa.meta["quant"]["calibration"]["tokens"] == sum(map(len, PROMPTS))
    assert "the same bytes on every CPU" in fa.meta["quant"]["calibration"]["arithmetic"]  # what made the file, recorded


def test_no_calibration_is_the_plain_searched_quantization(hf, tmp_path):
    f = convert_quiet(hf, str(tmp_path / "p.pgw"), calibration=False)
    assert f.meta["quant"]["calibration"] is None
    w = Checkpoint(hf).read("model.layers.0.mlp.down_proj.weight")
    ref = quant.quantize_weights(w, 32, search=True)
    assert np.array_equal(f.tensors["layers.0.w2"].qs, ref.qs) and np.array_equal(f.tensors["layers.0.w2"].scales, ref.scales)


def fold_all(hf: str, cfg: ModelConfig, cal: calibrate.Calibration) -> dict[str, np.ndarray]:
    ck = Checkpoint(hf)
    return {n: cal.fold(n, slice(None), ck.read(n)) for n in expected_shapes(cfg)}


@pytest.mark.parametrize("tied", [False, True])
def test_folding_is_exact_in_float(hf, tmp_path, monkeypatch, tied):
    """With every input folded (alpha 0.5 forced), the folded float checkpoint computes the
    original function: the scales are powers of two, so every folded weight is exact and the
    logits agree to float32 summation order (the same here: equal bits)."""
    cfg = dataclasses.replace(TINY, tie_embeddings=tied)
    d = str(tmp_path / "hf")
    checkpoint.write_checkpoint(d, cfg, outliers(cfg, 1), dtype="F32")
    monkeypatch.setattr(calibrate, "ALPHAS", (0.5,))
    cal = calibrate.calibrate(Checkpoint(d), cfg, PROMPTS, 32)
    assert set(cal.alphas.values()) == {0.5} and len(cal.alphas) == 4 * cfg.n_layers
    assert all(np.ptp(s) > 0.5 for s in cal.col.values())  # the folding really moves scale around
    ids = np.arange(5, 90)
    before = oracle.oracle_logits(oracle.hf_model(cfg, fold_all(d, cfg, calibrate.Calibration(0))), ids)
    after = oracle.oracle_logits(oracle.hf_model(cfg, fold_all(d, cfg, cal)), ids)
    cal.close()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6 * before.std())


def test_folded_weights_differ_from_unfolded(hf, monkeypatch):
    """The exactness test above must be able to fail: folding only the columns (not the norm or
    the rows that absorb the division) changes the function."""
    monkeypatch.setattr(calibrate, "ALPHAS", (0.5,))
    cal = calibrate.calibrate(Checkpoint(hf), TINY, PROMPTS, 32)
    ids = np.arange(5, 90)
    good = oracle.oracle_logits(oracle.hf_model(TINY, fold_all(hf, TINY, cal)), ids)
    cal.row.clear()
    bad = oracle.oracle_logits(oracle.hf_model(TINY, fold_all(hf, TINY, cal)), ids)
    cal.close()
    assert np.abs(bad - good).max() > 0.1 * good.std()


@pytest.mark.parametrize("head", ["full", "guard"])
def test_converted_model_matches_transformers_on_its_weights(hf, tmp_path, head, monkeypatch):
    """The engine on the calibrated file equals transformers holding the file's dequantized
    (folded) weights, given the same int8 rounding decisions, as for any converted file
    (error feedback on: matrices quantized in the pass, an int4 head by the converter; the
    table, and a pruned head, int8)."""
    monkeypatch.setattr(calibrate, "GPTQ", True)
    if head == "guard":  # a pruned head needs a tokenizer: give the checkpoint Llama 3's
        pytest.importorskip("llama_models", reason="the Llama 3 tokenizer ships in llama-models")
        cfg = dataclasses.replace(TINY, vocab_size=128256)
        d = str(tmp_path / "hf")
        checkpoint.write_checkpoint(d, cfg, outliers(cfg), dtype="F32", tokenizer_model=checkpoint.reference_tokenizer_model())
        out = str(tmp_path / "g.pgw")
        monkeypatch.setattr(calibrate, "MAX_TOKENS", 600)  # the built-in set, cut short
        convert(d, out, head="guard", threads=2)
        f = file.load(out)
    else:
        cfg, f = TINY, convert_quiet(hf, str(tmp_path / "f.pgw"), calibration=PROMPTS)
    assert f.meta["quant"]["calibration"] is not None
    assert f.meta["quant"]["int8"] == (["tok_embeddings", "output"] if head == "guard" else ["tok_embeddings"])
    model = Model(f.config, f.tensors, f.head_ids, threads=2)
    ids = np.arange(3, 80)
    with oracle.linear_inputs() as inputs:
        got = model.logits(ids)
    ref = oracle.hf_model(cfg, calibrate.float_checkpoint(cfg, f.tensors, f.head_ids))
    with oracle.quantized_activations(ref, model, inputs):
        want = oracle.oracle_logits(ref, ids, model.head_ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * want.std())


def test_calibration_memory_is_bounded_by_a_layer(tmp_path, monkeypatch):
    """The float pass streams: its peak allocation stays within a few layers' weights plus the
    activations, far below the whole float model (here 24 layers), error feedback included
    (its matrices go to the store as they are quantized)."""
    monkeypatch.setattr(calibrate, "GPTQ", True)
    cfg = dataclasses.replace(TINY, n_layers=24, dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2, vocab_size=512)
    d = str(tmp_path / "hf")
    checkpoint.write_checkpoint(d, cfg, dtype="F32")
    shapes = expected_shapes(cfg)
    layer = sum(4 * np.prod(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    whole = sum(4 * np.prod(s) for s in shapes.values())
    tokens = sum(map(len, PROMPTS))
    acts = 4 * tokens * (cfg.hidden_dim * 2 + cfg.dim * 8)  # a few [tokens, width] float32 buffers
    tracemalloc.start()
    cal = calibrate.calibrate(Checkpoint(d), cfg, PROMPTS, 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cal.stored("layers.23.w2") is not None
    cal.close()
    # a layer's weights, its folded copies and their quantization's temporaries on two threads
    bound = 8 * layer + acts + (4 << 20)
    assert peak < bound, (peak, layer, whole)
    assert bound < whole / 2  # the bound says something


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.sampled_from([32, 64]), st.floats(0.1, 30))
def test_weighted_scales_never_worse_than_absmax(seed, group, loud):
    """On the error they minimise (activation-weighted), the searched scales beat or tie
    absmax in every group, and beat plain MSE scales in total."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    a = rng.exponential(1, 128).astype(np.float32)
    a[rng.choice(128, 3)] *= loud**2

    def err(scales):
        r = quant.dequantize(quant.pack_weights(quant.quantize_with_scales(w, scales), scales)) - w
        return (r * r * a).reshape(8, -1, group).sum(axis=2)

    got = err(quant.mse_scales(w, group, a))
    assert np.all(got <= err(quant.absmax_scales(w, group)) * (1 + 1e-6))
    assert got.sum() <= err(quant.mse_scales(w, group)).sum() * (1 + 1e-6)


def correlated_inputs(n: int, k: int, seed: int) -> np.ndarray:
    """n samples (drawn with `seed`) of activations with correlated channels of very different
    sizes, as a trained model's (one distribution for every seed)."""
    dist = np.random.default_rng(k)
    mix = (dist.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)) * dist.exponential(1, k) ** 2
    return (np.random.default_rng([k, seed]).standard_normal((n, k)) @ mix).astype(np.float32)


def test_inverse_factors(monkeypatch):
    """The columns by decreasing mean square, and per span of SPAN columns in that order
    U^T U = (H_b + damp I)^-1, H_b the span's Hessian (600 columns: a full span and a short one)."""
    monkeypatch.setattr(calibrate, "SPAN", 512)
    k = 600
    x, s = correlated_inputs(1000, k, 0), np.exp2(np.arange(k) % 5 - 2.0).astype(np.float32)
    xs = x / s
    h = xs.T.astype(np.float64) @ xs / len(xs)
    order, factors = calibrate.inverse_factors(x, s)
    assert np.array_equal(order, np.argsort(-np.diag(h), kind="stable")) and not np.array_equal(order, np.arange(k))
    assert [len(u) for u in factors] == [512, 88]
    for u, span in zip(factors, (order[:512], order[512:])):
        assert np.abs(np.tril(u, -1)).max() < 1e-6 * np.abs(u).max() and np.all(np.diag(u) > 0)  # GPTQ reads the upper part
        damped = h[np.ix_(span, span)] + calibrate.DAMP * np.mean(np.diag(h)) * np.eye(len(span))
        np.testing.assert_allclose(u.T.astype(np.float64) @ u @ damped, np.eye(len(span)), atol=1e-3)


@pytest.mark.parametrize("group", [32, 64])
def test_gptq_without_correlation_is_weighted_rounding(group, monkeypatch):
    """With uncorrelated inputs no error has anywhere to go: GPTQ's values and scales are then
    exactly the importance-weighted rounding's (the bookkeeping of the column order, spans and
    sub-blocks is right: the mean squares are not sorted, so the order is not the identity)."""
    monkeypatch.setattr(calibrate, "SPAN", 128)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 320)).astype(np.float32)
    a = rng.exponential(1, 320).astype(np.float32)
    x = np.diag(np.sqrt(320 * a)).astype(np.float32)  # X^T X / n = diag(a)
    q, scales = calibrate.gptq(w, *calibrate.inverse_factors(x, None), group, a)
    want = quant.mse_scales(w, group, a)
    assert np.array_equal(scales, want) and np.array_equal(q, quant.quantize_with_scales(w, want))


@pytest.mark.parametrize("group", [32, 256])
def test_gptq_lowers_the_output_error(group, monkeypatch):
    """On correlated inputs, error feedback brings the products X W^T closer than weighted
    rounding alone does, on inputs it was not fitted on (same distribution, other samples;
    1024 independent samples: GPTQ's usual light damping; two spans)."""
    monkeypatch.setattr(calibrate, "DAMP", 0.01)
    monkeypatch.setattr(calibrate, "SPAN", 256)
    k = 512
    x, held = correlated_inputs(1024, k, 2), correlated_inputs(1024, k, 3)
    w = np.random.default_rng(4).standard_normal((64, k)).astype(np.float32)
    a = np.mean(x * x, axis=0)
    q, scales = calibrate.gptq(w, *calibrate.inverse_factors(x, None), group, a)
    rtn = quant.mse_scales(w, group, a)

    def err(q, scales):
        deq = quant.dequantize(quant.pack_weights(q, scales))
        return float(np.sum((held @ (deq - w).T) ** 2))

    assert np.array_equal(scales, rtn)  # static groups: the scales are chosen before any error is fed back
    assert err(q, scales) < 0.95 * err(quant.quantize_with_scales(w, rtn), rtn)


def test_hessian_that_overflows_is_an_error():
    """Finite inputs whose products overflow float32 (|x| ~ 1e20) give an infinite Hessian:
    an error, never factors (and int4 values) rounded from NaN."""
    x = correlated_inputs(64, 32, 0)
    x[5, 3] = 1e20
    with pytest.raises(PyguardError, match=r"a Hessian is not finite \(inputs up to 1e\+20: products that overflow\)"):
        calibrate.inverse_factors(x, None)


def test_non_finite_error_feedback_is_an_error(monkeypatch):
    """A factor holding NaN never reaches the int8 cast (where NaN becomes any value): the
    Hessians and factors are checked, and so is every sub-block of weights before it is rounded."""
    x = correlated_inputs(256, 64, 1)
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    order, factors = calibrate.inverse_factors(x, None)
    bad = factors[0].copy()
    bad[0, 40] = np.nan  # column 0's error reaches column 40 of the span (another sub-block)
    with pytest.raises(PyguardError, match="the error feedback left non-finite weights"):
        calibrate.gptq(w, order, [bad], 32)
    monkeypatch.setattr(calibrate, "gram", lambda x, pool=None: np.full((x.shape[1],) * 2, np.nan, np.float32))
    with pytest.raises(PyguardError, match=r"a Hessian is not finite \(inputs up to [0-9.]+\)"):
        calibrate.inverse_factors(x, None)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "upper_inverse", lambda h: np.full_like(h, np.nan))
    with pytest.raises(PyguardError, match="an inverse Hessian factor is not finite"):
        calibrate.inverse_factors(x, None)


@pytest.mark.parametrize("k", [1, 5, 64, 200])
def test_upper_inverse_factor(k):
    """U^T U = H^-1 with U upper triangular, as LAPACK's Cholesky and inverse give it (to
    float32 rounding), for well and badly conditioned H, and the C kernel the converter runs
    gives the reference's bits; a matrix that is not positive definite (or holds NaN) is an
    error in both."""
    rng = np.random.default_rng(k)
    for cond in (1.0, 1e4):
        x = rng.standard_normal((k + 8, k)) * np.geomspace(1, cond**0.5, k)
        h = (x.T @ x / len(x) + 0.01 * np.eye(k)).astype(np.float32)
        u = calibrate.upper_inverse_factor(h)
        assert u.dtype == np.float32 and np.array_equal(u, np.triu(u))
        want = np.linalg.inv(np.linalg.cholesky(h.astype(np.float64)[::-1, ::-1]))[::-1, ::-1]
        assert np.abs(u - want).max() <= 1e-5 * np.abs(want).max()
        assert np.array_equal(kernels.upper_inverse(h).view(np.int32), u.view(np.int32))
    for bad in (-np.eye(k, dtype=np.float32), np.full((k, k), np.nan, np.float32)):
        for fn in (calibrate.upper_inverse_factor, kernels.upper_inverse):
            with pytest.raises(PyguardError, match="a Hessian is not positive definite"):
                fn(bad)


@pytest.mark.parametrize("threads", [1, 2])
def test_calibration_fault_fails_the_conversion(hf, tmp_path, monkeypatch, threads):
    """A fault in the error feedback's linear algebra (here a span's Hessian refused by the
    Cholesky factorisation) fails the conversion with the matrix named, on the pass's thread or
    the quantizing one, and leaves no file."""
    monkeypatch.setattr(calibrate, "GPTQ", True)
    real = kernels.upper_inverse
    monkeypatch.setattr(kernels, "upper_inverse", lambda h: real(-h))
    with pytest.warns(UserWarning), pytest.raises(PyguardError, match=r"calibration of layers\.0\.wqkv: a Hessian is not "
                                                                          r"positive definite \(convert with --no-calibration\)"):
        convert(hf, str(tmp_path / "m.pgw"), calibration=PROMPTS, threads=threads)
    assert not list(tmp_path.glob("m.pgw*"))


def test_store_is_removed(hf, tmp_path, monkeypatch):
    """The matrices quantized during the pass are kept on disk until written, then removed:
    after a conversion and after a failed one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(calibrate, "GPTQ", True)
    (tmp_path / "tmp").mkdir()
    f = convert_quiet(hf, str(tmp_path / "m.pgw"), calibration=PROMPTS)
    assert f.meta["quant"]["calibration"]["error_feedback"] and not list((tmp_path / "tmp").iterdir())
    monkeypatch.setattr(calibrate, "MAX_TOKENS", 10**6)
    monkeypatch.setattr(calibrate.Calibration, "keep", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        convert(hf, str(tmp_path / "n.pgw"), calibration=PROMPTS)
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("threads", [1, 2])
def test_error_feedback_threads_follow_the_conversion(hf, tmp_path, monkeypatch, threads):
    """`convert(threads=1)` quantizes on the pass's own thread; more threads put error feedback
    on its own threads. The file is the same either way."""
    seen, real = set(), calibrate.gptq

    def spy(*a):
        seen.add(threading.get_ident())
        return real(*a)

    monkeypatch.setattr(calibrate, "GPTQ", True)
    monkeypatch.setattr(calibrate, "gptq", spy)
    out = str(tmp_path / "m.pgw")
    with pytest.warns(UserWarning, match="tokenizer not converted"):
        convert(hf, out, threads=threads, calibration=PROMPTS)
    assert seen and (seen == {threading.get_ident()}) == (threads == 1)
    ref = str(tmp_path / "ref.pgw")
    convert_quiet(hf, ref, calibration=PROMPTS)
    with open(out, "rb") as x, open(ref, "rb") as y:
        assert x.read() == y.read()


def test_error_on_the_quantizing_thread(hf, tmp_path, monkeypatch):
    """Error feedback runs on a second thread: its errors reach the conversion, and the store
    is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def broken(*a):
        raise ValueError("gptq failed")

    monkeypatch.setattr(calibrate, "gptq", broken)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="gptq failed"):
        convert(hf, str(tmp_path / "n.pgw"), calibration=PROMPTS)
    assert not list((tmp_path / "tmp").iterdir())


def test_calibration_file(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "hello"}]}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    assert len(calibrate.read_conversations(str(good))) == 2
    for text, why in [("{\"messages\": []}\n", "line 1"), ("\n[1]\n", "line 2: expected an object"),
                      ('{"messages": [{"role": "bot", "content": "x"}]}', "line 1: message 1: unknown role"),
                      (b"\xff\n", "line 1: not a JSON object"), ("", "no conversations")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(PyguardError, match=f"bad.jsonl.*{why}" if "line" in why else why):
            calibrate.read_conversations(str(bad))
    with pytest.raises(PyguardError, match="missing.jsonl: cannot read"):
        calibrate.read_conversations(str(tmp_path / "missing.jsonl"))


def test_calibration_needs_the_tokenizer_or_token_ids(hf, tmp_path):
    """Without a tokenizer the built-in set cannot be rendered: plain scales, with a warning and
    the metadata saying so; a calibration file cannot be read either: an error."""
    with pytest.warns(UserWarning, match="no calibration without a tokenizer"):
        convert(hf, str(tmp_path / "x.pgw"))
    assert file.load(str(tmp_path / "x.pgw")).meta["quant"]["calibration"] is None
    with pytest.warns(UserWarning), pytest.raises(PyguardError, match="calibration needs the tokenizer"):
        convert(hf, str(tmp_path / "y.pgw"), calibration="c.jsonl")
    with pytest.warns(UserWarning), pytest.raises(PyguardError, match="token ids must be in 0..511"):
        convert(hf, str(tmp_path / "x.pgw"), calibration=[[1, 2, 512]])


def test_folding_keeps_weights_within_fp16_scales(tmp_path, monkeypatch):
    """A weight near the largest int4 x fp16 value on a loud channel: folding would push it
    beyond (and the conversion would refuse the checkpoint), so that input is not folded
    (alpha 0.5 forced everywhere else)."""
    monkeypatch.setattr(calibrate, "ALPHAS", (0.5,))
    w = outliers(TINY)
    loud = int(np.argmax(w["model.layers.0.post_attention_layernorm.weight"]))
    w["model.layers.0.mlp.gate_proj.weight"][1, loud] = 0.9 * quant.MAX_WEIGHT  # a row alpha's search does not sample
    d = str(tmp_path / "hf")
    checkpoint.write_checkpoint(d, TINY, w, dtype="F32")
    f = convert_quiet(d, str(tmp_path / "m.pgw"), calibration=PROMPTS)
    assert f.meta["quant"]["calibration"]["folded"].startswith(f"{4 * TINY.n_layers - 1} of {4 * TINY.n_layers} ")


def test_cli_calibration_options(tmp_path, capsys):
    """--calibration FILE replaces the built-in set (a bad line is one error naming file and
    line, exit 2, no file left); --no-calibration writes plain scales; not both."""
    from pyguard import cli

    pytest.importorskip("llama_models", reason="the Llama 3 tokenizer ships in llama-models")
    cfg = dataclasses.replace(TINY, vocab_size=128256, n_layers=1)
    d = str(tmp_path / "hf")
    checkpoint.write_checkpoint(d, cfg, dtype="F32", tokenizer_model=checkpoint.reference_tokenizer_model())
    conv = tmp_path / "cal.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "Wie spät ist es?"}]}) + "\n")
    out = str(tmp_path / "a.pgw")
    assert cli.main(["convert", d, out, "--calibration", str(conv)]) == 0
    assert 0 < file.load(out).meta["quant"]["calibration"]["tokens"] < 400  # one prompt, not the built-in set
    assert cli.main(["convert", d, out, "--no-calibration"]) == 0
    assert file.load(out).meta["quant"]["calibration"] is None
    conv.write_text(conv.read_text() + "{oops\n")
    capsys.readouterr()
    assert cli.main(["convert", d, str(tmp_path / "b.pgw"), "--calibration", str(conv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cal.jsonl, line 2: not a JSON object" in err and not list(tmp_path.glob("b.pgw*"))
    with pytest.raises(SystemExit):
        cli.main(["convert", d, out, "--calibration", str(conv), "--no-calibration"])


def test_float_overflow_is_an_error(tmp_path):
    """A checkpoint whose float forward overflows (a norm weight of 1e30: products beyond
    float32) cannot be calibrated: an error saying where (the first matrix whose output error
    is not finite), not statistics of NaN that would silently fall back to absmax scales."""
    w = outliers(TINY)
    w["model.layers.1.input_layernorm.weight"][:] = 1e30
    d = str(tmp_path / "hf")
    checkpoint.write_checkpoint(d, TINY, w, dtype="F32")
    with pytest.warns(UserWarning), pytest.raises(PyguardError, match=r"calibration: the float model overflows at layers\.1\.wqkv \(its output error is not finite"):
        convert(d, str(tmp_path / "m.pgw"), calibration=PROMPTS)
    assert not list(tmp_path.glob("m.pgw*"))


def test_shared_prefixes_are_run_once(hf, monkeypatch):
    """Prompts sharing a prefix (the guard's policy text): the prefix's rows are run once and
    its keys and values reused, so the pass sees exactly the distinct rows, each with the
    activations it has when its own prompt runs alone (same values to float32 rounding); a
    repeated prompt adds nothing, and MAX_TOKENS counts distinct rows."""
    monkeypatch.setattr(calibrate, "ALPHAS", (0.0,))  # no folding: the inputs are the activations
    seen: list[np.ndarray] = []
    original = calibrate._mean_square
    monkeypatch.setattr(calibrate, "_mean_square", lambda x: seen.append(x.copy()) or original(x))

    def inputs(prompts) -> tuple[calibrate.Calibration, list[np.ndarray]]:
        seen.clear()
        cal = calibrate.calibrate(Checkpoint(hf), TINY, prompts, 32)
        cal.close()
        return cal, list(seen)

    policy, a, b = list(range(10, 90)), list(range(200, 230)), list(range(300, 345))
    cal, shared = inputs([policy + a, policy + b, policy + a, policy[:40]])
    assert (cal.tokens, cal.prompts) == (80 + 30 + 45, 2)
    alone_a, alone_b = inputs([policy + a])[1], inputs([policy + b])[1]
    assert len(shared) == len(alone_a) == 4 * TINY.n_layers + 1  # every matrix's input, then the head's
    for x, xa, xb in zip(shared, alone_a, alone_b):
        want = np.concatenate([xa, xb[80:]])
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-4 * np.abs(want).max())  # float32 sums: ~2e-5
    monkeypatch.setattr(calibrate, "MAX_TOKENS", 120)
    cal, cut = inputs([policy + a, policy + b])
    assert (cal.tokens, cal.prompts) == (120, 2) and len(cut[-1]) == 120
    np.testing.assert_allclose(cut[-1], shared[-1][:120], rtol=0, atol=1e-4 * np.abs(shared[-1]).max())
