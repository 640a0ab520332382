"""Hugging Face transformers as the oracle of the engine (test and tools only; needs torch).

Random Llama checkpoints in Hugging Face naming, their conversion to pyguard tensors in
memory (the converter's recipe: stack rows per tensor_plan, quant.quantize_weights), and the
oracle model holding the *dequantized* int4 weights, so that only the engine's arithmetic
differs from it. `quantized_activations` makes the oracle round the input of every linear
layer exactly as the kernels do, which isolates the engine's own float rounding.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyguard import model as pgmodel
from pyguard import quant
from pyguard.config import ModelConfig, expected_shapes, tensor_plan
from pyguard.model import Model

GUARD_1B = ModelConfig(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, vocab_size=128256,
    rope_theta=500000.0, max_seq_len=131072,
    rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# Token ids of a Llama Guard answer: the rows a pruned guard head keeps.
GUARD_HEAD = [19193, 39257, 271, 198, 50, 16, 17, 18, 19, 20, 21, 22, 23, 24, 15, 605, 806, 717, 1032, 11, 128009]


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(rope_type="llama3", **cfg.rope_scaling)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
    )


def random_weights(cfg: ModelConfig, seed: int = 0, qk_gain: float = 1.5, logit_std: float = 6.0) -> dict[str, np.ndarray]:
    """Hugging Face named float32 weights, far from a flat random model: every matrix keeps
    activations at unit scale (std 1/sqrt(fan in)), q and k are larger so attention is
    peaked, norms vary around 1, and the head rows resemble the embedding rows (as in trained
    models; tied embeddings are the extreme case), so most positions have a decisive top
    token (top-1 margin ~1 logit std) that int8 rounding noise must not flip."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            continue
        std = 1.0 if name == "model.embed_tokens.weight" else 1 / np.sqrt(shape[1])
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            std *= qk_gain
        out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    if not cfg.tie_embeddings:
        noise = out["lm_head.weight"] * np.sqrt(cfg.dim)
        out["lm_head.weight"] = ((out["model.embed_tokens.weight"] + noise) * (logit_std / np.sqrt(2 * cfg.dim))).astype(np.float32)
    return out


def quantize_checkpoint(cfg: ModelConfig, hf: dict[str, np.ndarray], group: int, head_ids=None):
    """(pyguard tensors, Hugging Face weights with every quantized tensor replaced by its
    dequantized int4 values). head_ids prunes pyguard's output head to those rows (the
    oracle keeps its full head: tests pick its columns)."""
    tensors, deq = {}, dict(hf)
    for name, sources, quantized in tensor_plan(cfg):
        w = np.concatenate([hf[s] for s in sources])
        if not quantized:
            tensors[name] = w
            continue
        t = tensors[name] = quant.quantize_weights(w, group)
        rows = np.cumsum([len(hf[s]) for s in sources])[:-1]
        for s, part in zip(sources, np.split(quant.dequantize(t), rows)):
            deq[s] = part
    if head_ids is not None:
        t, ids = tensors["output"], np.asarray(head_ids)
        tensors["output"] = quant.QTensor(t.qs[ids], t.scales[ids], t.rowsum[ids], t.group)
    return tensors, deq


def hf_model(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> LlamaForCausalLM:
    """A float32 LlamaForCausalLM holding exactly these weights (shared with the numpy arrays)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(cfg))
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    # buffers (rotary inv_freq) were created on the meta device: build them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model.float().eval()


def oracle_logits(model: LlamaForCausalLM, ids, columns=None) -> np.ndarray:
    """float32 logits [len(ids), vocab or len(columns)] of one sequence."""
    with torch.inference_mode():
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long)[None], use_cache=False).logits[0]
    out = out.numpy()
    return out if columns is None else out[:, np.asarray(columns)]


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x rounded to uint8 per row as quant.quantize_acts does, then mapped back to float."""
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0)
    s = (hi - lo) / 255
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.clamp(torch.round(-lo / s), 0, 255)
    q = torch.clamp(torch.round(x * (1 / s)) + zp, 0, 255)
    return s * (q - zp)


def _agree(x: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    err = np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= rtol, f"{what}: input differs from the reference run by {err:.2e} of its range"


def engine_weight(engine: Model, hf_name: str) -> quant.QTensor:
    """The engine matrix that holds a Hugging Face linear layer's rows."""
    if hf_name == "lm_head":
        return engine.output
    layer = engine.layers[int(hf_name.split(".")[2])]
    kind = hf_name.rsplit(".", 1)[1]
    return {"q_proj": layer.wqkv, "k_proj": layer.wqkv, "v_proj": layer.wqkv, "o_proj": layer.wo,
            "gate_proj": layer.w13, "up_proj": layer.w13, "down_proj": layer.w2}[kind]


@contextlib.contextmanager
def quantized_activations(model: torch.nn.Module, engine: Model | None = None, inputs: dict | None = None, rtol: float = 1e-3):
    """Within the block every linear layer of the oracle rounds its input to int8 per token.

    With `inputs` (recorded by `linear_inputs` while `engine` ran the same tokens), each layer
    first checks that its input equals the engine's to rtol of its range, then rounds the
    engine's input instead of its own: both take the same rounding decisions, so that a float
    difference of one ulp cannot flip an int8 code and make the two runs drift apart.
    """
    def hook(name):
        ref = None if inputs is None else np.concatenate(inputs[id(engine_weight(engine, name))])

        def round_input(_, args):
            x = args[0]
            if ref is not None:
                _agree(x[0].numpy(), ref, rtol, name)
                x = torch.from_numpy(ref)[None]
            return (_fake_quant(x),)

        return round_input

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def linear_inputs(replay: dict | None = None, rtol: float = 1e-3):
    """Record the inputs of the engine's linear layers: yields {id(QTensor): [input rows, ...]}
    in call order. With `replay` (a record of an earlier run over the same tokens), each call
    checks its input against the recorded rows (consumed in order per matrix) and then uses
    those rows, so that the run takes the recorded run's int8 rounding decisions."""
    original = pgmodel.linear
    record: dict[int, list[np.ndarray]] = {}
    ref = {k: np.concatenate(v) for k, v in (replay or {}).items()}
    used: dict[int, int] = {}

    def linear(w, x):
        if replay is not None:
            start = used.get(id(w), 0)
            rows = ref[id(w)][start : start + len(x)]
            used[id(w)] = start + len(x)
            _agree(x, rows, rtol, f"matrix {w.shape}")
            x = rows
        record.setdefault(id(w), []).append(x.copy())
        return original(w, x)

    pgmodel.linear = linear
    try:
        yield record
    finally:
        pgmodel.linear = original
