"""The engine against Hugging Face transformers (LlamaForCausalLM, float32, CPU).

The oracle holds the dequantized int4 weights, so the engine differs from it only by its
int8 activations and float rounding. Three comparisons, each with its own tolerance:

- Same rounding decisions (oracle.quantized_activations with the engine's recorded inputs):
  only float32 rounding differs (summation order, BLAS), measured at ~2e-6 of the logit
  standard deviation; the bound is 1e-4 of it, and every linear layer's input must agree to
  1e-3 of its range (a quarter of one int8 step: no code may differ).
- Plain oracle (float activations): the engine's error is int8 activation rounding, nothing
  more. Per linear layer that rounding adds noise of range / (255 sqrt(12)) ~ 0.8% of the
  input's rms; through the network it is 2-4% of the logit std here. An oracle rounding its
  own activations shows the expected error; the engine's rms error may exceed it by 10%,
  its largest by 50% (they are not the same rounding realisation: one ulp can flip a code).
- Argmax: identical top token on >= 99% of positions of models with decisive outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import oracle  # noqa: E402
import synth  # noqa: E402
from pyguard.engine import model as pgmodel  # noqa: E402
from pyguard.formats import quant  # noqa: E402
from pyguard.formats.config import ModelConfig  # noqa: E402
from pyguard.errors import PyguardError  # noqa: E402
from pyguard.engine.model import Model  # noqa: E402


def llama3(factor: float, original: int) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": original}


# name: (config, group size, pruned head rows or None)
GEOMETRIES = {
    # head_dim 64, GQA ratio 1, untied, plain rope
    "mha": (ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=64, hidden_dim=512, vocab_size=512), 64, None),
    # GQA 4, tied embeddings, Llama 3 scaling whose ramp falls inside the sequence
    "gqa4-tied-llama3": (
        ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1024, vocab_size=384,
                    tie_embeddings=True, rope_scaling=llama3(8.0, 64)), 32, None),
    # head_dim 128 with n_heads * head_dim != dim, GQA 8, Llama 3 scaling as Guard 1B, pruned head
    "gqa8-hd128-pruned": (
        ModelConfig(dim=512, n_layers=3, n_heads=8, n_kv_heads=1, head_dim=128, hidden_dim=768, vocab_size=320,
                    rope_theta=500000.0, rope_scaling=llama3(32.0, 8192), max_seq_len=131072), 128, list(range(1, 320, 3))),
}
SEQ = 300


@dataclasses.dataclass
class Case:
    cfg: ModelConfig
    model: Model
    hf: object
    head: list | None
    ids: np.ndarray
    logits: np.ndarray  # engine, every position
    inputs: dict  # the engine's linear-layer inputs for those logits


def build(cfg: ModelConfig, group: int, head, ids) -> Case:
    tensors, deq = synth.quantize_checkpoint(cfg, synth.random_weights(cfg), group, head)
    model = Model(cfg, tensors, head)
    with oracle.linear_inputs() as inputs:
        logits = model.logits(ids)
    return Case(cfg, model, oracle.hf_model(cfg, deq), head, ids, logits, inputs)


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def case(request) -> Case:
    cfg, group, head = GEOMETRIES[request.param]
    rng = np.random.default_rng(1)
    # a pruned head can only be decisive about tokens it has: draw the text from them
    ids = rng.choice(head, SEQ) if head else rng.integers(0, cfg.vocab_size, SEQ)
    return build(cfg, group, head, ids)


def same_rounding_logits(c: Case) -> np.ndarray:
    with oracle.quantized_activations(c.hf, c.model, c.inputs):
        return oracle.oracle_logits(c.hf, c.ids, c.head)


def test_equals_oracle_with_same_rounding(case):
    expected = same_rounding_logits(case)
    assert case.logits.shape == (SEQ, case.model.head_size)
    assert np.abs(case.logits - expected).max() <= 1e-4 * expected.std()
    assert (case.logits.argmax(1) == expected.argmax(1)).all()


def test_error_is_int8_rounding(case):
    exact = oracle.oracle_logits(case.hf, case.ids, case.head)
    with oracle.quantized_activations(case.hf):
        rounded = oracle.oracle_logits(case.hf, case.ids, case.head)
    expected, got = rounded - exact, case.logits - exact
    rms = lambda d: np.sqrt(np.mean(d**2))  # noqa: E731
    assert rms(got) <= 1.1 * rms(expected)
    assert np.abs(got).max() <= 1.5 * np.abs(expected).max()
    assert rms(got) <= 0.05 * exact.std()
    assert np.mean(case.logits.argmax(1) == exact.argmax(1)) >= 0.99


def test_prefill_then_decode_equals_one_prefill(case):
    state = case.model.new_state(SEQ)
    first = case.model.prefill(state, case.ids[:100], all_logits=True)
    rest = [case.model.decode(state, t) for t in case.ids[100:]]
    assert state.pos == SEQ
    assert np.array_equal(np.concatenate([first, np.stack(rest)]), case.logits)  # bit for bit: tests/test_exact.py


def test_chunked_prefill_equals_one_pass(case, monkeypatch):
    monkeypatch.setattr(pgmodel, "PREFILL_CHUNK", 48)
    assert np.array_equal(case.model.prefill(case.model.new_state(SEQ), case.ids, all_logits=True), case.logits)
    # without all_logits: the last position's logits only
    assert case.model.prefill(case.model.new_state(SEQ), case.ids).shape == (case.model.head_size,)


def test_same_logits_for_any_thread_count(case, monkeypatch):
    """Kernels and the numpy work spread over threads (SwiGLU rows) compute every element
    alike however they are split: models of 1 and 3 threads give identical bits."""
    monkeypatch.setattr(pgmodel, "SPREAD_MIN", 0)  # spread even the tiny geometry's work
    m = case.model
    tensors = {"tok_embeddings": m.tok_embeddings, "norm": m.norm, "output": m.output}
    for i, layer in enumerate(m.layers):
        tensors.update({f"layers.{i}.{k}": getattr(layer, k) for k in ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")})
    got = [Model(case.cfg, tensors, case.head, threads=n).logits(case.ids) for n in (1, 3)]
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], case.logits)
    # without all_logits the last layer's output product and MLP run for the last row only
    last = m.prefill(m.new_state(SEQ), case.ids)
    assert np.array_equal(last, got[0][-1])


def test_snapshot_restore_is_exact(case):
    m, ids = case.model, case.ids
    state = m.new_state(SEQ)
    m.prefill(state, ids[:120])
    snap = state.snapshot()
    assert snap.pos == 120 and snap.kv.shape[3] == 120  # only the filled positions are copied
    a = m.prefill(state, ids[120:200], all_logits=True)
    b = m.decode(state, ids[200])
    state.restore(snap)
    np.testing.assert_array_equal(m.prefill(state, ids[120:200], all_logits=True), a)
    np.testing.assert_array_equal(m.decode(state, ids[200]), b)
    longer = m.new_state(SEQ + 50)  # restoring into a fresh, longer state
    longer.restore(snap)
    np.testing.assert_array_equal(m.prefill(longer, ids[120:200], all_logits=True), a)


def test_float16_cache_within_int8_noise(case):
    state = case.model.new_state(SEQ, kv_dtype=np.float16)
    with oracle.linear_inputs(replay=case.inputs, rtol=1e-2):
        got = case.model.prefill(state, case.ids, all_logits=True)
    # fp16 keeps 11 bits: ~5e-4 relative on keys and values, well below int8's 1/255 steps
    assert np.abs(got - case.logits).max() <= 5e-3 * case.logits.std()


def test_positions_beyond_8192():
    """A long sequence on a one-layer model with Guard 1B's rope (theta 500000, Llama 3
    scaling around 8192 positions): float32 angles of ~10^4 radians, as in the oracle."""
    cfg = ModelConfig(dim=128, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64, hidden_dim=256, vocab_size=256,
                      rope_theta=500000.0, rope_scaling=llama3(32.0, 8192), max_seq_len=131072)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 8400)
    c = build(cfg, 32, None, ids)
    expected = same_rounding_logits(c)
    assert np.abs(c.logits - expected).max() <= 1e-4 * expected.std()
    state = c.model.new_state(len(ids))
    c.model.prefill(state, ids[:8300])
    with oracle.linear_inputs(replay={k: [np.concatenate(v)[8300:]] for k, v in c.inputs.items()}):
        tail = np.stack([c.model.decode(state, t) for t in ids[8300:]])
    np.testing.assert_allclose(tail, c.logits[8300:], rtol=0, atol=1e-5 * c.logits.std())


def test_guard_1b_geometry():
    """Llama Guard 3 1B (16 layers, 2048 wide, GQA 4, 128256 tokens, llama3 rope), random
    int4 weights, guard head of 21 rows, 300 tokens (two prefill chunks)."""
    cfg, head = synth.GUARD_1B, synth.GUARD_HEAD
    tensors, deq = synth.random_int4_checkpoint(cfg, 256, head_ids=head, dequantized=True)
    model = Model(cfg, tensors, head)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 300)
    with oracle.linear_inputs() as inputs:
        got = model.logits(ids)
    # the oracle's own head is not needed (1 GB): its last hidden state goes through the rows
    hf = oracle.hf_model(dataclasses.replace(cfg, tie_embeddings=True), deq)
    rows = torch.from_numpy(quant.dequantize(tensors["output"]))
    with oracle.quantized_activations(hf, model, inputs), torch.inference_mode():
        hidden = hf.model(torch.from_numpy(ids)[None]).last_hidden_state[0]
    head_input = torch.from_numpy(np.concatenate(inputs[id(model.output)]))
    oracle._agree(hidden.numpy(), head_input.numpy(), 1e-3, "final norm")
    expected = (oracle._fake_quant(head_input) @ rows.T).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * expected.std()


def test_tied_model_without_output_tensor():
    cfg, group, _ = GEOMETRIES["gqa4-tied-llama3"]
    tensors, _ = synth.quantize_checkpoint(cfg, synth.random_weights(cfg), group)
    ids = np.arange(40)
    with_output = Model(cfg, tensors).logits(ids)
    del tensors["output"]
    np.testing.assert_array_equal(Model(cfg, tensors).logits(ids), with_output)


def test_bad_input():
    cfg, group, head = GEOMETRIES["gqa8-hd128-pruned"]
    tensors, _ = synth.quantize_checkpoint(cfg, synth.random_weights(cfg), group, head)
    with pytest.raises(PyguardError, match="vocabulary ids"):
        Model(cfg, tensors)  # a pruned head needs its ids
    with pytest.raises(PyguardError, match="shape"):
        Model(cfg, {**tensors, "layers.1.w2": tensors["layers.1.wo"]}, head)
    with pytest.raises(PyguardError, match="missing"):
        Model(cfg, {k: v for k, v in tensors.items() if k != "layers.2.ffn_norm"}, head)
    m = Model(cfg, tensors, head)
    state = m.new_state(8)
    with pytest.raises(PyguardError, match="token ids"):
        m.prefill(state, [1, cfg.vocab_size])
    with pytest.raises(PyguardError, match="exceed"):
        m.prefill(state, list(range(9)))
    with pytest.raises(PyguardError, match="no tokens"):
        m.prefill(state, [])
    assert state.pos == 0  # nothing was consumed by the failed calls
    m.prefill(state, range(8))
    with pytest.raises(PyguardError, match="exceed"):
        m.decode(state, 1)
    with pytest.raises(PyguardError, match="does not fit"):
        m.new_state(4).restore(state.snapshot())
