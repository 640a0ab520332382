"""Random-weight Hugging Face Llama checkpoints: the demo's model and the tests' and
benchmarks' inputs (real Llama Guard weights cannot be downloaded everywhere).

Weights are drawn tensor by tensor from a seed (each tensor from its own stream, so any
tensor can be made alone and a 1B checkpoint never needs its 6 GB of float32 at once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Iterator

import numpy as np

from ..formats import safetensors
from ..formats.config import ModelConfig, expected_shapes
from ..errors import PyguardError

GUARD_1B = ModelConfig(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, vocab_size=128256,
    rope_theta=500000.0, max_seq_len=131072,
    rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# Llama Guard 3 8B (Llama 3.1 8B): wider heads (128), 4:1 grouped queries, no rope scaling
GUARD_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=128256,
                       rope_theta=500000.0, max_seq_len=8192)
# A small model with the real vocabulary: the demo's, converts and runs in seconds.
DEMO = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=128256,
                   rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True, rope_scaling=GUARD_1B.rope_scaling)


def random_tensor(cfg: ModelConfig, name: str, seed: int = 0, qk_gain: float = 1.5, logit_std: float = 6.0) -> np.ndarray:
    """One Hugging Face named float32 weight, far from a flat random model: matrices keep
    activations at unit scale (std 1/sqrt(fan in)), q and k are larger so attention is
    peaked, norms vary around 1, and untied head rows resemble the embedding rows (as in
    trained models; tied embeddings are the extreme case), so most positions have a decisive
    top token (top-1 margin ~1 logit std) that int8 rounding noise must not flip."""
    parts = list(random_rows(cfg, name, seed, qk_gain=qk_gain, logit_std=logit_std))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def random_rows(cfg: ModelConfig, name: str, seed: int = 0, rows: int = 1024, qk_gain: float = 1.5,
                logit_std: float = 6.0) -> Iterator[np.ndarray]:
    """random_tensor's weight in blocks of `rows` rows, the same values (each tensor's stream is
    drawn in order, and the rest is elementwise), so that an 8B checkpoint's 2 GB head and table
    are never whole in memory."""
    shapes = expected_shapes(cfg)
    names = list(shapes)
    rng = np.random.default_rng([seed, names.index(name)])
    shape = shapes[name]
    if len(shape) == 1:
        yield (1 + 0.2 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        return
    if name == "lm_head.weight":
        emb = random_rows(cfg, "model.embed_tokens.weight", seed, rows)
        for r in range(0, shape[0], rows):
            noise = rng.standard_normal((min(rows, shape[0] - r),) + shape[1:], np.float32)
            yield ((next(emb) + noise) * np.float32(logit_std / np.sqrt(2 * cfg.dim))).astype(np.float32)
        return
    std = 1.0 if name == "model.embed_tokens.weight" else 1 / np.sqrt(shape[1])
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        std *= qk_gain
    for r in range(0, shape[0], rows):
        w = rng.standard_normal((min(rows, shape[0] - r),) + shape[1:], np.float32)
        w *= np.float32(std)
        yield w


def random_weights(cfg: ModelConfig, seed: int = 0, **kw) -> dict[str, np.ndarray]:
    """Every weight of a random checkpoint in memory (small geometries)."""
    return {name: random_tensor(cfg, name, seed, **kw) for name in expected_shapes(cfg)}


def hf_config(cfg: ModelConfig, rope_format: str = "rope_scaling") -> dict:
    """config.json of a LlamaForCausalLM; rope_format 'rope_scaling' (older transformers keys)
    or 'rope_parameters' (newer)."""
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128009,
    }
    scaling = dict(cfg.rope_scaling or {})
    if rope_format == "rope_parameters":
        d["rope_parameters"] = {"rope_type": "llama3" if scaling else "default", "rope_theta": cfg.rope_theta, **scaling}
    else:
        d["rope_theta"] = cfg.rope_theta
        d["rope_scaling"] = {"rope_type": "llama3", **scaling} if scaling else None
    return d


def write_checkpoint(out_dir: str, cfg: ModelConfig, weights: dict[str, np.ndarray] | None = None, seed: int = 0,
                     dtype: str = "BF16", shards: int = 1, tokenizer_model: str | None = None,
                     rope_format: str = "rope_scaling", max_shard_bytes: int | None = None) -> None:
    """Write a Hugging Face checkpoint directory: config.json, generation_config.json,
    model.safetensors (or shards and an index), and original/tokenizer.model if given.
    weights None: random ones made a block of rows at a time. Shards: `shards` files of about
    as many tensors each, or with max_shard_bytes as transformers' save_pretrained cuts them
    (its module order, a new file before the tensor that would pass the limit)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, rope_format), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": 128009}, f, indent=2)
    shapes = expected_shapes(cfg)
    make = (lambda n: weights[n]) if weights is not None else (lambda n: random_rows(cfg, n, seed))
    if max_shard_bytes is not None:
        parts: list[list[str]] = [[]]
        size = 0
        item = safetensors.DTYPES[dtype][1]
        for n in _module_order(cfg):
            nbytes = item * math.prod(shapes[n])
            if parts[-1] and size + nbytes > max_shard_bytes:
                parts.append([])
                size = 0
            parts[-1].append(n)
            size += nbytes
    else:
        parts = [list(p) for p in np.array_split(np.array(list(shapes)), shards)]
    if len(parts) == 1:
        safetensors.write(os.path.join(out_dir, "model.safetensors"), [(n, shapes[n]) for n in parts[0]], make, dtype)
    else:
        weight_map = {}
        for i, part in enumerate(parts):
            file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            safetensors.write(os.path.join(out_dir, file), [(n, shapes[n]) for n in part], make, dtype)
            weight_map.update({n: file for n in part})
        total = sum(safetensors.DTYPES[dtype][1] * math.prod(s) for s in shapes.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    if tokenizer_model:
        os.makedirs(os.path.join(out_dir, "original"), exist_ok=True)
        shutil.copyfile(tokenizer_model, os.path.join(out_dir, "original", "tokenizer.model"))


def _module_order(cfg: ModelConfig) -> list[str]:
    """Tensor names in a LlamaForCausalLM's state_dict order (what save_pretrained writes)."""
    layer = [f"self_attn.{x}_proj.weight" for x in "qkvo"] + [f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")] \
        + ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}" for i in range(cfg.n_layers) for n in layer] + ["model.norm.weight"]
    return names + ([] if cfg.tie_embeddings else ["lm_head.weight"])


def reference_tokenizer_model() -> str:
    """Path of the Llama 3 tokenizer.model shipped in the `llama-models` wheel (pip install
    llama-models): the one public place it can be installed from without a Hugging Face login."""
    from importlib.util import find_spec

    spec = find_spec("llama_models")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, "llama3", "tokenizer.model")
        if os.path.exists(path):
            return path
    raise PyguardError("the Llama 3 tokenizer.model was not found: install it with `pip install llama-models`")

