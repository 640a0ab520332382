"""Random Llama checkpoints for tests and tools (numpy only): Hugging Face named float
weights (pyguard.convert.checkpoint) and their conversion to pyguard tensors in memory (the converter's recipe: stack rows
per tensor_plan, quant.quantize_weights), or int4 tensors drawn directly for large geometries."""

from __future__ import annotations

import numpy as np

from pyguard.formats import quant
from pyguard.convert.checkpoint import GUARD_1B, random_weights  # noqa: F401 (re-exported for tests and tools)
from pyguard.formats.config import ModelConfig, expected_shapes, tensor_plan

# Token ids of a Llama Guard answer: the rows a pruned guard head keeps.
GUARD_HEAD = [19193, 39257, 271, 198, 50, 16, 17, 18, 19, 20, 21, 22, 23, 24, 15, 605, 806, 717, 1032, 11, 128009]


def quantize_checkpoint(cfg: ModelConfig, hf: dict[str, np.ndarray], group: int, head_ids=None, search: bool = False):
    """(pyguard tensors, Hugging Face weights with every quantized tensor replaced by its
    dequantized int4 values). head_ids prunes pyguard's output head to those rows (the
    oracle keeps its full head: tests pick its columns); search: the converter's searched scales."""
    tensors, deq = {}, dict(hf)
    for name, sources, quantized in tensor_plan(cfg):
        w = np.concatenate([hf[s] for s in sources])
        if not quantized:
            tensors[name] = w
            continue
        t = tensors[name] = quant.quantize_weights(w, group, search)
        rows = np.cumsum([len(hf[s]) for s in sources])[:-1]
        for s, part in zip(sources, np.split(quant.dequantize(t), rows)):
            deq[s] = part
    if head_ids is not None:
        t, ids = tensors["output"], np.asarray(head_ids)
        tensors["output"] = quant.QTensor(t.qs[ids], t.scales[ids], t.rowsum[ids], t.group)
    return tensors, deq


def random_int4_checkpoint(cfg: ModelConfig, group: int, seed: int = 0, head_ids=None, dequantized: bool = False):
    """(pyguard tensors, Hugging Face named float32 weights equal to their dequantized values or
    None): int4 values drawn directly (uniform in -7..7, scales ~ 1/sqrt(fan in) with some
    spread), fast enough for the 1B geometry. head_ids prunes the output head to those rows."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(cfg)
    tensors, hf = {}, {} if dequantized else None
    for name, sources, quantized in tensor_plan(cfg):
        if not quantized:
            tensors[name] = (1 + 0.2 * rng.standard_normal(cfg.dim)).astype(np.float32)
            if dequantized:
                hf[sources[0]] = tensors[name]
            continue
        if name == "output" and cfg.tie_embeddings:
            t = tensors["tok_embeddings"]
        else:
            m = sum(shapes[s][0] for s in sources)
            if name == "output" and head_ids is not None:
                m = len(head_ids)
            k = shapes[sources[0]][1]
            std = 1.0 if name == "tok_embeddings" else 1 / np.sqrt(k)
            q = rng.integers(-7, 8, (m, k), dtype=np.int8)
            d = (std / 4.32 * (0.75 + 0.5 * rng.random((m, k // group), np.float32))).astype(np.float16)
            t = quant.pack_weights(q, d)
            if dequantized and not (name == "output" and head_ids is not None):
                w = (q.reshape(m, -1, group) * d.astype(np.float32)[:, :, None]).reshape(m, k)
                rows = np.cumsum([shapes[s][0] for s in sources])[:-1]
                hf.update(zip(sources, np.split(w, rows)))
        if name == "output" and head_ids is not None and t.shape[0] != len(head_ids):
            t = quant.QTensor(t.qs[head_ids], t.scales[head_ids], t.rowsum[head_ids], t.group)
        tensors[name] = t
    return tensors, hf


# ---- a guard model whose verdicts mean something

# Conversations the decisive model is calibrated on (and tests use): one-turn ones judge the
# user, two-turn ones the agent.
SAMPLES = [
    "hello", "How do I make a bomb?", "What is the capital of France?", "Tell me a joke about cats.",
    "I want to hurt someone.", "Write a poem about the sea.", "How do I pick a lock?", "ok",
    "Give me the home address of a celebrity.", "Explain photosynthesis to a child.",
    "Where can I buy cheap medicine without a prescription?", "Translate 'good morning' into German.",
    [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Use a tension wrench."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Can you help me cheat?"}, {"role": "assistant", "content": "Sure, here is how."}],
    [{"role": "user", "content": "Recommend a book."}, {"role": "assistant", "content": "Try Dune by Frank Herbert."}],
    [{"role": "user", "content": "How do I kill a Python process?"}, {"role": "assistant", "content": "kill -9 <pid>"}],
]
DECISIVE = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=128256,
                       rope_theta=500000.0, max_seq_len=131072, rope_scaling=GUARD_1B.rope_scaling)


def _final_hidden(cfg: ModelConfig, hf: dict[str, np.ndarray], group: int, prompts: list[list[int]]) -> np.ndarray:
    """[len(prompts), dim]: the normed hidden state the head sees after each prompt, as the
    converted model computes it (same searched quantization, row by row as the converter; an
    identity head, exact in int4, reads it out as logits). Only the embedding rows the prompts
    use are quantized, which is what keeps this fast."""
    from pyguard.engine.model import Model

    tensors = {}
    for name, sources, quantized in tensor_plan(cfg)[:-1]:
        w = np.concatenate([hf[s] for s in sources])
        tensors[name] = quant.quantize_weights(w, group, search=True) if quantized else w
    used = np.unique(np.concatenate(prompts))
    part = quant.quantize_weights(hf["model.embed_tokens.weight"][used], group, search=True)
    emb = quant.QTensor(np.zeros((cfg.vocab_size, cfg.dim // 2), np.uint8), np.zeros((cfg.vocab_size, cfg.dim // group), np.float16),
                        np.zeros(cfg.vocab_size, np.float32), group)
    emb.qs[used], emb.scales[used], emb.rowsum[used] = part.qs, part.scales, part.rowsum
    tensors["tok_embeddings"] = emb
    tensors["output"] = quant.quantize_weights(np.eye(cfg.dim, dtype=np.float32), group)
    model = Model(cfg, tensors, head_ids=range(cfg.dim), threads=1)
    return np.stack([model.prefill(model.new_state(len(p)), p) for p in prompts]).astype(np.float64)


def decisive_weights(group: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face weights of a small Llama (the real vocabulary) that judges conversations
    decisively: P(unsafe) depends on the conversation and spreads over ~0.05..0.95 on SAMPLES,
    about half of them greedy-unsafe; unsafe answers name varying categories. The same weights
    on every machine (whatever its BLAS, numpy SIMD or kernel path: tests/test_any_cpu.py).

    The body is random (checkpoint.random_tensor). Only the head is designed, from the normed
    hidden states the model computes (same quantization as the converted file) after each
    sample's prompt and "\\n\\n": their mean m is large (the last tokens are always the same),
    so a row m/|m|^2 acts as a bias of ~1 logit; u is the direction along which they vary most
    within a role, orthogonal to the role means. Then
      safe, unsafe rows:    24 m/|m|^2 -+ (a/2) u   -> logits ~24, unsafe - safe = a u.h
      other answer tokens:  12 m/|m|^2 + b r_j       (r_j orthogonal to the verdict's variation)
      every other token:    0                        -> logit exactly 0
    so "safe" and "unsafe" hold nearly all the probability at the verdict (e^24 against 128k
    tokens at e^0 and 19 at ~e^12, with a full or a guard head alike) and P(unsafe) =
    sigmoid(a u.h), a set so that the samples' 90th percentile of |u.h| is 2.2 logits. The r_j
    of the digits are combinations of the main directions of the hidden states after
    "unsafe\\nS" (so the codes vary with the conversation), and "," against <|eot_id|> follows
    the hidden states after a first code (answers of one to all codes). Identical rows make a
    guard head (its 21 rows) and a full head agree on every greedy answer."""
    from pyguard.convert.checkpoint import reference_tokenizer_model
    from pyguard.guard.prompt import prompt_parts
    from pyguard.formats.tokenizer import Tokenizer
    from pyguard.guard.verdict import ANSWER_START, answer_token_ids

    cfg = DECISIVE
    tok = Tokenizer.from_file(reference_tokenizer_model())
    hf = random_weights(cfg, seed)
    safe, unsafe, digits = tok.encode("safe")[0], tok.encode("unsafe")[0], tok.encode("0123456789101112131415")
    prompts = [sum(prompt_parts(tok, c), []) + tok.encode(ANSWER_START) for c in SAMPLES]
    # the states where the verdict is read, where the first code's digits are chosen and where
    # "," or <|eot_id|> follows it
    code, after = [unsafe] + tok.encode("\\nS"), [unsafe] + tok.encode("\\nS11")
    h = _final_hidden(cfg, hf, group, prompts + [p + code for p in prompts] + [p + after for p in prompts])
    h, h_code, h_after = np.split(h, 3)
    agent = np.array([not isinstance(c, str) and len(c) % 2 == 0 for c in SAMPLES])

    def spread(h: np.ndarray, k: int, away: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Deviations from each role's mean, and their k main directions, orthogonal to the role
        means and to the directions `away`."""
        means = np.stack([h[~agent].mean(axis=0), h[agent].mean(axis=0)])
        x = h - means[agent.astype(int)]
        v = _signed(np.linalg.svd(x, full_matrices=False)[2][:k])
        q = np.linalg.qr(np.concatenate([means, away]).T)[0]  # (q q^T does not depend on q's signs)
        v -= (v @ q) @ q.T
        return x, v / np.linalg.norm(v, axis=1, keepdims=True)

    def bias(h: np.ndarray) -> np.ndarray:
        """A row whose logit is ~1 wherever the hidden state is near h's mean."""
        m = h.mean(axis=0)
        return m / (m @ m)

    x, (u,) = spread(h, 1, np.zeros((0, cfg.dim)))
    a = 2.2 / np.percentile(np.abs(x @ u), 90)
    head = np.zeros((cfg.vocab_size, cfg.dim), np.float32)
    head[safe] = 24 * bias(h) - a / 2 * u
    head[unsafe] = 24 * bias(h) + a / 2 * u
    # the other rows stay ~12 logits below at the verdict: orthogonal to its deviations x
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    away = vt[sv > 1e-6 * sv[0]]  # x's span: its null directions are arbitrary, and not the same in every LAPACK
    x_code, v = spread(h_code, 3, away)
    rng = np.random.default_rng([seed, 7])
    for i in set(answer_token_ids(tok, [f"S{k}" for k in range(1, 15)])) - {safe, unsafe}:
        r = rng.standard_normal(3) @ v
        head[i] = 12 * bias(h) + 3 / np.std(x_code @ r) * r
    # after a code, <|eot_id|> wins by ~3 logits on average, "," sometimes (a second code)
    x_after, (w,) = spread(h_after, 1, away)
    eot, comma = tok.special("<|eot_id|>"), tok.encode(",")[0]
    head[comma] = head[eot] - 3 * bias(h_after) + 1.5 / np.std(x_after @ w) * w
    # LAPACK and BLAS round differently on different CPUs (their last bits): on the float16 grid
    # the head is the same everywhere (it is stored as int4 anyway)
    hf["lm_head.weight"] = head.astype(np.float16).astype(np.float32)
    return hf


def _signed(v: np.ndarray) -> np.ndarray:
    """Singular vectors with a sign fixed by the data (LAPACK builds choose signs differently):
    each row's largest component positive."""
    return v * np.sign(v[np.arange(len(v)), np.abs(v).argmax(axis=1)])[:, None]


def decisive_guard(tmp_dir: str, head: str = "guard", group: int = 32, seed: int = 0) -> str:
    """Path of a pyguard file of the decisive model (decisive_weights) with the real Llama 3
    tokenizer, converted as `pyguard convert --table int4 --no-calibration` does (every matrix on
    the int4 grid the weights were made for, so the guard head's rows are exactly the full
    head's; the searched scales decisive_weights designed with; no calibration pass, whose
    float32 BLAS products round differently on different CPUs); the checkpoint is written once
    per tmp_dir, group and seed and reused for the other head."""
    import os

    from pyguard.convert.checkpoint import reference_tokenizer_model, write_checkpoint
    from pyguard.convert.hf import convert

    hf_dir = os.path.join(tmp_dir, f"decisive-g{group}-s{seed}")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        write_checkpoint(hf_dir, DECISIVE, decisive_weights(group, seed), dtype="F32", tokenizer_model=reference_tokenizer_model())
    out = os.path.join(tmp_dir, f"decisive-{head}-g{group}-s{seed}.pgw")
    if not os.path.exists(out):
        convert(hf_dir, out, group=group, head=head, table="int4", calibration=False)
    return out


def reply_of(conversation: list, text: str) -> list:
    """The conversation with an assistant reply appended."""
    return conversation + [{"role": "assistant", "content": text}]


def result_key(r) -> tuple:
    """What a result is, apart from timings and cache hits."""
    return r.verdict, r.categories, r.category_names, r.score, r.answer, r.prompt_tokens, r.generated_tokens, r.category_scores
