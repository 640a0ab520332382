"""Hugging Face transformers as the oracle of the engine (tests and tools only; needs torch).

The oracle is a float32 LlamaForCausalLM holding the *dequantized* int4 weights (see
synth.py), so that only the engine's arithmetic differs from it. `quantized_activations`
makes it round the input of every linear layer to int8 exactly as the kernels do, and can
make it take the engine's very rounding decisions (`linear_inputs` records them).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyguard.engine import model as pgmodel
from pyguard.formats import quant
from pyguard.formats.config import ModelConfig
from pyguard.engine.model import Model


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

    def linear(w, x, pool=None):
        if replay is not None:
            start = used.get(id(w), 0)
            rows = ref[id(w)][start : start + len(x)]
            used[id(w)] = start + len(x)
            _agree(x, rows, rtol, f"matrix {w.shape}")
            x = rows
        record.setdefault(id(w), []).append(x.copy())
        return original(w, x, pool)

    pgmodel.linear = linear
    # the fused norm + quantization equals linear(rms_norm(x)) bit for bit: record its rows here
    original_norm = pgmodel.norm_linear
    pgmodel.norm_linear = lambda w, x, norm, eps, pool=None: linear(w, pgmodel.rms_norm(x, norm, eps), pool)
    try:
        yield record
    finally:
        pgmodel.linear = original
        pgmodel.norm_linear = original_norm
