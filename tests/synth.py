"""Random Llama checkpoints for tests and tools (numpy only): Hugging Face named float
weights (pyguard.checkpoint) and their conversion to pyguard tensors in memory (the converter's recipe: stack rows
per tensor_plan, quant.quantize_weights), or int4 tensors drawn directly for large geometries."""

from __future__ import annotations

import numpy as np

from pyguard import quant
from pyguard.checkpoint import GUARD_1B, random_weights  # noqa: F401 (re-exported for tests and tools)
from pyguard.config import ModelConfig, expected_shapes, tensor_plan

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
