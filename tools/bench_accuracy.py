"""How far the quantized engine's logits are from the unquantized bf16 checkpoint, on random
weights (not a test; needs torch and transformers).

    python tools/bench_accuracy.py [--geometry small|1b] [--tokens 256] [--groups 32 64 128 256]

The reference is the checkpoint run in float32 by transformers (bf16 weights, exact
arithmetic otherwise). For each int4 group size: the oracle with the dequantized int4
weights and float activations (what weight rounding alone costs), and pyguard (int4 weights
and int8 activations), each with plain absmax scales and with the converter's searched scales
(the gain is absmax's error over the searched one's). Per position: KL(reference || model) of the softmax over the full
vocabulary, and whether the top token is the same. Random weights as in the tests, except
the head: independent Gaussian rows giving logits of std --logit-std, a flat output where any
change of the hidden state reorders the top tokens (--decisive keeps the tests' head, built
from the embedding, whose top token wins by a wide margin). Random Gaussian weights are a
harsh case for int4: trained checkpoints quantize far better (Meta's 1B-INT4 loses no F1).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import oracle  # noqa: E402
import synth  # noqa: E402
import torch  # noqa: E402
from pyguard.config import ModelConfig  # noqa: E402
from pyguard.model import Model  # noqa: E402

SMALL = ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=4096, vocab_size=8192,
                    rope_theta=500000.0, rope_scaling=synth.GUARD_1B.rope_scaling, max_seq_len=131072)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(got)) in nats, and top-1 agreement."""
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, float(np.mean(ref.argmax(1) == got.argmax(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=("small", "1b"), default="small")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--logit-std", type=float, default=3.0)
    ap.add_argument("--decisive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = SMALL if args.geometry == "small" else synth.GUARD_1B  # 1b: ~20 GB of float weights
    torch.set_num_threads(2)

    weights = synth.random_weights(cfg, args.seed)
    if not args.decisive:
        rng = np.random.default_rng([args.seed, 1])  # not random_weights' stream (its embedding)
        head = rng.standard_normal((cfg.vocab_size, cfg.dim)) * (args.logit_std / np.sqrt(cfg.dim))
        weights["lm_head.weight"] = head.astype(np.float32)
    for k, v in weights.items():  # the checkpoint is bf16
        weights[k] = torch.from_numpy(v).bfloat16().float().numpy()
    ids = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, args.tokens)
    ref = oracle.oracle_logits(oracle.hf_model(cfg, weights), ids)
    s = np.sort(ref, 1)
    print(f"{args.geometry} geometry ({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}), {args.tokens} tokens;"
          f" reference top-1 probability {np.mean(torch.softmax(torch.from_numpy(ref), -1).max(-1).values.numpy()):.2f},"
          f" top-1 margin {np.mean(s[:, -1] - s[:, -2]):.2f} logits")
    print(f"{'group':>5} {'scales':>7} {'weight rel. RMSE':>16}  {'int4 weights: KL':>16} {'top-1':>6}   "
          f"{'pyguard (+int8 acts): KL':>24} {'top-1':>6}")
    matrices = [k for k, v in weights.items() if v.ndim == 2]
    for g in args.groups:
        row = {}
        for search in (False, True):
            tensors, deq = synth.quantize_checkpoint(cfg, weights, g, search=search)
            err = np.sqrt(sum(np.sum((deq[k] - weights[k]) ** 2, dtype=np.float64) for k in matrices)
                          / sum(np.sum(weights[k] ** 2, dtype=np.float64) for k in matrices))
            w_only = oracle.oracle_logits(oracle.hf_model(cfg, deq), ids)
            engine = Model(cfg, tensors).logits(ids)
            row[search] = (err, *kl_top1(ref, w_only), *kl_top1(ref, engine))
            e, kw, tw, ke, te = row[search]
            print(f"{g:5} {'search' if search else 'absmax':>7} {e:16.4f}  {kw:16.4f} {tw:6.3f}   {ke:24.4f} {te:6.3f}")
        print(f"{'':5} {'gain':>7} {row[False][0] / row[True][0]:15.3f}x  {row[False][1] / row[True][1]:15.3f}x "
              f"{'':6}   {row[False][3] / row[True][3]:23.3f}x")


if __name__ == "__main__":
    main()
