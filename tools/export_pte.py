"""Export a random-weight Llama checkpoint with ExecuTorch's Llama Guard 3-1B-INT4 recipe (tests, benchmarks).

    python tools/export_pte.py OUT_DIR [--geometry tiny|guard-1b-int4] [--embedding-group 32|256]
        [--dtype fp32|bf16] [--seed S] [--full-logits]

Writes OUT_DIR laid out like Meta's `meta-llama/Llama-Guard-3-1B-INT4` repository: `model.pte`,
`params.json` (Meta's layout) and `tokenizer.model` (the real Llama 3 tokenizer, from the
llama-models wheel). The checkpoint (`consolidated.00.pth`, Meta's interleaved q/k rows) and
the prune map are made in OUT_DIR/src, then ExecuTorch (test-only: `pip install
executorch==1.5.1`) runs `export_llama -kv --use_sdpa_with_kv_cache -X -qmode 8da4w
--group_size 256 --embedding-quantize 4,G --output_prune_map MAP` on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyguard.convert.checkpoint import random_tensor, reference_tokenizer_model  # noqa: E402
from pyguard.formats.config import ModelConfig  # noqa: E402

# The 20 verdict tokens of Meta's prune map, in its row order.
PRUNE_IDS = [271, 19193, 39257, 198, 50, 11, 16, 17, 18, 19, 20, 21, 22, 23, 24, 605, 806, 717, 1032, 128009]
SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
GEOMETRIES = {
    # params.json gives hidden_dim through ffn_dim_multiplier / multiple_of: int(2 * 4 * 256 / 3) = 682 -> 768
    "tiny": (ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=SCALING),
             {"ffn_dim_multiplier": 1.0, "multiple_of": 256}),
    "guard-1b-int4": (ModelConfig(dim=2048, n_layers=12, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=6400,
                                  vocab_size=128256, rope_theta=500000.0, rope_scaling=SCALING),
                      {"hidden_dim": 6400}),
}


def meta_params(cfg: ModelConfig, ffn: dict) -> dict:
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "use_scaled_rope": cfg.rope_scaling is not None, "rope_scale_factor": 32, **ffn}


def meta_checkpoint(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The random Hugging Face checkpoint of pyguard.convert.checkpoint, in Meta's names and q/k layout."""

    def interleave(w: np.ndarray, heads: int) -> np.ndarray:
        # HF "rotate half" rows (j, i) -> Meta's interleaved pairs (i, j) within each head
        return w.reshape(heads, 2, cfg.head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)

    def hf(name: str) -> np.ndarray:
        return random_tensor(cfg, name, seed)

    out = {"tok_embeddings.weight": hf("model.embed_tokens.weight"), "norm.weight": hf("model.norm.weight"),
           "output.weight": hf("lm_head.weight")}
    for i in range(cfg.n_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        out.update({
            m + "attention_norm.weight": hf(p + "input_layernorm.weight"),
            m + "ffn_norm.weight": hf(p + "post_attention_layernorm.weight"),
            m + "attention.wq.weight": interleave(hf(p + "self_attn.q_proj.weight"), cfg.n_heads),
            m + "attention.wk.weight": interleave(hf(p + "self_attn.k_proj.weight"), cfg.n_kv_heads),
            m + "attention.wv.weight": hf(p + "self_attn.v_proj.weight"),
            m + "attention.wo.weight": hf(p + "self_attn.o_proj.weight"),
            m + "feed_forward.w1.weight": hf(p + "mlp.gate_proj.weight"),
            m + "feed_forward.w3.weight": hf(p + "mlp.up_proj.weight"),
            m + "feed_forward.w2.weight": hf(p + "mlp.down_proj.weight"),
        })
    return out


def export(out_dir: str, geometry: str = "tiny", embedding_group: int = 32, dtype: str = "fp32", seed: int = 0,
           full_logits: bool = False, max_seq_length: int = 128) -> str:
    """Write OUT_DIR (model.pte, params.json, tokenizer.model); returns the .pte path."""
    import torch

    cfg, ffn = GEOMETRIES[geometry]
    src = os.path.join(out_dir, "src")
    os.makedirs(src, exist_ok=True)
    params = meta_params(cfg, ffn)
    for d in (src, out_dir):
        with open(os.path.join(d, "params.json"), "w") as f:
            json.dump(params, f, indent=2)
    ckpt = os.path.join(src, "consolidated.00.pth")
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in meta_checkpoint(cfg, seed).items()}, ckpt)
    prune = os.path.join(src, "prune_map.json")
    with open(prune, "w") as f:
        json.dump({str(r): i for r, i in enumerate(PRUNE_IDS)}, f)
    shutil.copyfile(reference_tokenizer_model(), os.path.join(out_dir, "tokenizer.model"))
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama", "--model", "llama3_2",
           "--checkpoint", ckpt, "--params", os.path.join(src, "params.json"), "-kv", "--use_sdpa_with_kv_cache", "-X",
           "-qmode", "8da4w", "--group_size", "256", "--embedding-quantize", f"4,{embedding_group}",
           "--output_prune_map", prune, "-d", dtype, "--max_seq_length", str(max_seq_length),
           "--max_context_length", str(max_seq_length), "--output-dir", src, "--output_name", "model.pte"]
    if full_logits:
        cmd.append("--generate_full_logits")
    subprocess.run(cmd, check=True, cwd=src, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.replace(os.path.join(src, "model.pte"), os.path.join(out_dir, "model.pte"))
    return os.path.join(out_dir, "model.pte")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--geometry", choices=GEOMETRIES, default="tiny")
    p.add_argument("--embedding-group", type=int, choices=(32, 256), default=32)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-logits", action="store_true", help="logits at every position (export_llama --generate_full_logits)")
    p.add_argument("--max-seq-length", type=int, default=128)
    a = p.parse_args()
    try:
        path = export(a.out_dir, a.geometry, a.embedding_group, a.dtype, a.seed, a.full_logits, a.max_seq_length)
    except subprocess.CalledProcessError as e:
        print(f"error: export_llama failed:\n{e.stderr.decode(errors='replace')[-4000:]}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({a.geometry}, random weights, embedding group {a.embedding_group}, {a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
