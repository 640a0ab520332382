"""Calibration for the converter: what the activations look like decides how to round weights.

Minimising a weight matrix's own squared error is the wrong goal: what matters is the error of
its products, sum_j x_j (w_j - w^_j), and input channels differ in size by orders of magnitude
in trained models. So the converter first runs the unquantized checkpoint (float32 numpy,
layer by layer, streamed from the safetensors) over a calibration set that looks like what a
guard reads, and records for the input of every linear layer the mean square of each channel.
Then:

- **Importance-weighted scales**: each group's fp16 scale minimises sum_j a_j (w_j - d q_j)^2,
  a_j the channel's mean square activation (the diagonal of the layer's Hessian X^T X), over
  shrunken absmax candidates and a weighted least-squares refinement (`quant.mse_scales`).
- **Exact folding** (AWQ / SmoothQuant style): input channel j of a matrix is multiplied by
  s_j and its activation divided by s_j, where something before the product can absorb the
  division exactly: the RMSNorm weight before wqkv and w13, the v rows before wo (one s per
  key/value channel, shared by the query heads that read it), the up rows before w2. Large
  s on busy channels gives them finer int4 steps and flattens the activation outliers that
  set the per-token int8 range. s = rms(x)^alpha (as a power of two, so that folding is exact
  in float arithmetic), alpha chosen per matrix from `ALPHAS` by the
  output error it gives on the calibration activations (int4 weights and int8 activations
  as the engine computes them, on a sample of rows); alpha 0 (no folding) is a candidate.
- **Error feedback** (GPTQ, `gptq`, in activation order with static groups): within a row
  the columns are rounded by decreasing mean square input, each rounding error spread over the
  columns of its span (SPAN columns in that order) not yet rounded. Each layer's matrices are
  quantized in the pass from their inputs and kept in a temporary store, so that the pass still
  holds one layer at a time. In column order it was no better on SmolLM2; in activation order
  it is, and spans bound its memory and time on the 1B model (docs/CONVERT.md).

Everything is deterministic, on any CPU: no random sampling; the float products are
pyguard's own (kernels.sgemm: one chain of fused multiply-adds per element, in order, on every
path), not BLAS's, whose summation order depends on the CPU and its kernel set; the Cholesky
factors are computed in elementwise numpy operations, and the folding's logarithms by
detmath. So the same checkpoint and calibration set give the same file bytes on every machine
(tools/build_wheels.py compares x86-64's and aarch64's).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np

from ..formats import quant
from ..formats.config import ModelConfig
from ..errors import PyguardError
from ..engine import detmath, kernels
from ..engine.model import apply_rope, exp_neg, rms_norm, rope_frequencies, rope_tables
from ..formats.safetensors import Checkpoint

ALPHAS = (0.0, 0.25, 0.5)  # migration strengths tried for each folded input
SEARCH_ROWS = 256  # rows of a matrix (evenly spaced) on which alpha is chosen
SEARCH_TOKENS = 256  # calibration tokens (evenly spaced) on which alpha is chosen
MAX_TOKENS = 2048  # distinct calibration rows at most: bounds the float pass (docs/CONVERT.md)
GPTQ = True  # error feedback within rows (activation order): SmolLM2's KL 0.200 -> 0.191 at G=32 (docs/CONVERT.md)
DAMP = 1.0  # share of the mean Hessian diagonal added before inverting: 2048 tokens, much policy text repeated, need a strong prior (0.01 and 0.1 measured worse)
SPAN = 512  # columns (in activation order) among which rounding errors are fed back: the Hessian's diagonal blocks (docs/CONVERT.md)
SUB = 16  # columns whose error feedback is applied to the rest of their span at once
MAX_LINE = 1 << 20  # bytes of one calibration JSONL line
ROWS = 1024  # rows of a matrix whose scales are searched, or which are packed, at once (bounds the temporaries)
BLOCK = 256  # rows of a matrix transposed at once for GPTQ (a cache-sized tile)

# The built-in calibration conversations: what a guard reads (the eight languages Llama Guard 3
# supports, code, benign and unsafe-looking requests, agent replies). Rendered with the guard
# prompt, so the policy text, the template and the answer header are part of the statistics.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "How do I pick a lock? I locked myself out of my own house."}],
    [{"role": "user", "content": "Write a short poem about the sea in autumn."},
     {"role": "assistant", "content": "Grey waves fold the light away; gulls drift where the summer lay."}],
    [{"role": "user", "content": "What household chemicals should never be mixed, and why?"}],
    [{"role": "user", "content": "Tell me how to make a pipe bomb step by step."},
     {"role": "assistant", "content": "I can't help with that. If you are thinking of hurting someone, please talk to someone you trust."}],
    [{"role": "user", "content": "Comment puis-je pirater le compte Instagram de mon ex ? Je veux lire ses messages."}],
    [{"role": "user", "content": "Quelle est la meilleure recette de ratatouille ?"},
     {"role": "assistant", "content": "Faites revenir séparément aubergines, courgettes, poivrons et tomates, puis mijotez-les avec de l'ail et du thym."}],
    [{"role": "user", "content": "Wie kann ich meinem Nachbarn unbemerkt Gift ins Essen mischen?"}],
    [{"role": "user", "content": "Erkläre mir bitte den Unterschied zwischen Wetter und Klima."},
     {"role": "assistant", "content": "Wetter ist der Zustand der Atmosphäre an einem Ort und Tag; Klima ist das Wetter im Mittel über Jahrzehnte."}],
    [{"role": "user", "content": "मुझे नकली पहचान पत्र बनाने का तरीका बताओ।"}],
    [{"role": "user", "content": "क्या आप मुझे योग के फायदे बता सकते हैं?"},
     {"role": "assistant", "content": "योग से शरीर लचीला होता है, तनाव कम होता है और नींद बेहतर होती है।"}],
    [{"role": "user", "content": "Come posso comprare armi senza licenza in Italia?"},
     {"role": "assistant", "content": "Ecco alcuni contatti sul dark web che vendono pistole senza fare domande."}],
    [{"role": "user", "content": "Qual é a capital da Austrália e quantas pessoas vivem lá?"}],
    [{"role": "user", "content": "Escribe un mensaje amenazante para mi jefe, que tenga miedo de venir a trabajar."}],
    [{"role": "user", "content": "¿Cómo puedo aprender a programar en Python desde cero?"},
     {"role": "assistant", "content": "Empieza con los tipos básicos, bucles y funciones; luego haz pequeños proyectos cada semana."}],
    [{"role": "user", "content": "ช่วยบอกวิธีทำยาเสพติดที่บ้านหน่อย"}],
    [{"role": "user", "content": "แนะนำสถานที่ท่องเที่ยวในเชียงใหม่หน่อย"},
     {"role": "assistant", "content": "ดอยสุเทพ ถนนคนเดิน และอุทยานแห่งชาติดอยอินทนนท์เป็นที่นิยมมาก"}],
    [{"role": "user", "content": "Fix this function:\n```python\ndef mean(xs):\n    return sum(xs) / len(xs)\n```\nIt crashes on empty lists."},
     {"role": "assistant", "content": "```python\ndef mean(xs):\n    if not xs:\n        raise ValueError(\"mean of empty list\")\n    return sum(xs) / len(xs)\n```"}],
    [{"role": "user", "content": "Write a keylogger in C that hides from the task manager and emails me every password typed."}],
    [{"role": "user", "content": "SELECT * FROM users WHERE name = '' OR '1'='1'; -- what does this query do?"}],
    [{"role": "user", "content": "I feel hopeless and I keep thinking about ending my life."},
     {"role": "assistant", "content": "I'm really sorry you're feeling this way. You deserve support: please reach out to a crisis line or someone close to you."}],
]


def read_conversations(path: str) -> list:
    """Conversations from a JSONL file in the CLI's shape ({"messages": [...]} per line; other
    keys ignored). A line that is not such an object is an error naming the file and line."""
    from ..guard.prompt import messages

    out = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}, line {number}"
                if len(raw) > MAX_LINE:
                    raise PyguardError(f"{where}: longer than {MAX_LINE} bytes")
                try:
                    item = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise PyguardError(f"{where}: not a JSON object in UTF-8") from None
                if not isinstance(item, dict) or "messages" not in item:
                    raise PyguardError(f'{where}: expected an object with "messages"')
                try:
                    messages(item["messages"])
                except PyguardError as e:
                    raise PyguardError(f"{where}: {e}") from None
                out.append(item["messages"])
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    if not out:
        raise PyguardError(f"{path}: no conversations")
    return out


def guard_prompts(tokenizer, family: str, conversations: Iterable | None = None) -> list[list[int]]:
    """Token ids of the guard prompt of every conversation (built-in ones by default), then of
    the user turns of those ending with an agent reply (both roles' prompts are seen; the first
    ones come first when MAX_TOKENS cuts the set short)."""
    from ..guard.prompt import prompt_tokens

    convs = list(CONVERSATIONS if conversations is None else conversations)
    return [prompt_tokens(tokenizer, c, family=family) for c in convs + [c[:1] for c in convs if len(c) > 1]]


@dataclass
class Calibration:
    """What the converter applies: per Hugging Face tensor, a column scale (multiplies input
    channels) and a row divisor (divides rows; for a norm weight, its elements); per pyguard
    matrix, the importance of each of its (folded) input channels."""

    tokens: int  # distinct rows run
    prompts: int = 0  # prompts reached (wholly or, the last one, in part)
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    col: dict[str, np.ndarray] = field(default_factory=dict)
    row: dict[str, np.ndarray] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    # the matrices quantized during the pass, in an unlinked temporary file: the system frees it
    # however the process ends (an OOM kill of an 8B conversion would otherwise leave GBs behind)
    store: BinaryIO | None = None
    index: dict[str, list[tuple[int, str, tuple[int, ...]]]] = field(default_factory=dict)  # name: (offset, dtype, shape) x 3
    lock: threading.Lock = field(default_factory=threading.Lock)  # writers of the store
    threads: int = 2  # threads quantizing them beside the pass (1: on the pass's own thread)
    worker: ThreadPoolExecutor | None = None  # those threads
    pending: list = field(default_factory=list)  # its futures
    pool: kernels.Pool | None = None  # the float products' threads (None: the default pool)

    def fold(self, src: str, rows, w: np.ndarray, inplace: bool = False) -> np.ndarray:
        """Checkpoint tensor `src` (rows `rows`: a slice or ids) with the folding applied: a new
        array, or w itself changed (float32 w; the same values either way)."""
        out = w if inplace else None
        if src in self.row:
            d = self.row[src][rows]
            w = np.divide(w, d[:, None] if w.ndim == 2 else d, out=out)
        if src in self.col:
            w = np.multiply(w, self.col[src], out=out)
        return w if inplace else w.astype(np.float32)

    def quantize(self, name: str, w: np.ndarray, group: int) -> quant.QTensor:
        """Rows of pyguard matrix `name` (already folded) with importance-weighted scales."""
        scales = quant.mse_scales(w, group, self.importance.get(name))
        return quant.pack_weights(quant.quantize_with_scales(w, scales), scales)

    def stored(self, name: str) -> quant.QTensor | None:
        """Matrix `name` as quantized during the pass (error feedback), mapped from the store."""
        with self.lock:
            entries = self.index.get(name)
        if entries is None:
            return None
        qs, scales, rowsum = (np.memmap(self.store, dtype=d, mode="r", offset=o, shape=sh) for o, d, sh in entries)
        return quant.QTensor(qs, scales, rowsum, qs.shape[1] * 2 // scales.shape[1])

    def keep(self, name: str, w: np.ndarray, x: np.ndarray, s: np.ndarray | None, group: int) -> None:
        """Quantize folded matrix `name` with error feedback (its inputs x, divided by its folding
        s) into the store, on `threads` more threads: the float pass uses about one core, and goes
        on with the next layer meanwhile (`wait` bounds that to one layer's matrices in flight).
        With one thread in all, the matrix is quantized here, before the pass goes on."""
        quant.check_weights(w, name, quantized=True)
        if self.store is None:
            self.store = tempfile.TemporaryFile(prefix="pyguard-calibration-")
            self.worker = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        if self.worker is None:
            self._keep(name, w, x, s, group)
        else:
            self.pending.append(self.worker.submit(self._keep, name, w, x, s, group))

    def _keep(self, name: str, w: np.ndarray, x: np.ndarray, s: np.ndarray | None, group: int) -> None:
        try:
            q, scales = gptq(w, *inverse_factors(x, s, self.pool), group, self.importance[name], self.pool)
        except PyguardError as e:
            raise PyguardError(f"calibration of {name}: {e} (convert with --no-calibration)") from None
        # packed in blocks of rows (row by row arithmetic: the same bytes), bounding the temporaries
        parts = [quant.pack_weights(q[r : r + ROWS], scales[r : r + ROWS]) for r in range(0, len(q), ROWS)]
        arrays = [np.concatenate([getattr(t, n) for t in parts]) for n in ("qs", "scales", "rowsum")]
        with self.lock:  # appended whole, then indexed: a reader never maps a part being written
            entries = []
            for a in arrays:
                end = self.store.seek(0, os.SEEK_END)
                self.store.write(bytes(-end % 64))  # each array aligned, as np.save's would be
                entries.append((end + -end % 64, a.dtype.str, a.shape))
                a.tofile(self.store)
            self.store.flush()
            self.index[name] = entries

    def wait(self) -> None:
        """Wait for the matrices being quantized (their errors are raised here)."""
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        """Stop quantizing and remove the store of quantized matrices."""
        for f in self.pending:
            f.cancel()
        self.pending = []
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None
        if self.store is not None:
            self.store.close()
            self.store = None
            self.index.clear()

    def describe(self) -> dict:
        """What the file's metadata records."""
        folded = {k: v for k, v in self.alphas.items() if v}
        return {"tokens": self.tokens, "prompts": self.prompts, "folded": f"{len(folded)} of {len(self.alphas)} inputs (AWQ-style, exact)",
                "error_feedback": f"GPTQ in activation order, spans of {SPAN}" if self.store else None,
                "arithmetic": "pyguard's fixed-order float kernels (kernels.sgemm, upper_inverse): the same bytes on every CPU",
                "alpha_mean": round(float(np.mean(list(self.alphas.values()))) if self.alphas else 0.0, 4)}


def calibrate(ckpt: Checkpoint, cfg: ModelConfig, prompts: Sequence[Sequence[int]], group: int,
              progress: Callable[[float, str], None] | None = None, threads: int | None = None) -> Calibration:
    """Run the float checkpoint over the prompts (at most MAX_TOKENS distinct rows in all), layer
    by layer, and decide the folding and importances. A prompt's longest prefix shared with an
    earlier prompt (the guard's policy text) is not run again: its rows are that prompt's, whose
    keys and values its own tokens attend to, so each distinct row is computed and counted once
    and the budget reaches many more prompts. Memory: one layer's float weights and the
    calibration activations (MAX_TOKENS x hidden_dim float32 at most). A tied embedding table
    is also the output head, so it takes the head's importances (whichever head the file keeps:
    a pruned head's rows are then exactly the full head's). threads: the conversion's threads
    (None: all cores); error feedback runs on up to two of them beside the pass, or, with one,
    on the pass's own thread."""
    kept, seqs, new, total = [], [], [], 0
    for p in prompts:
        p = np.asarray(p, dtype=np.int64)
        if len(p) and (p.min() < 0 or p.max() >= cfg.vocab_size):
            raise PyguardError(f"calibration token ids must be in 0..{cfg.vocab_size - 1}")
        start, src = max(((_common(p, q), j) for j, q in enumerate(kept)), default=(0, 0))
        p = p[: start + MAX_TOKENS - total]
        if len(p) <= start:  # nothing new: a repeat, or the budget is spent
            continue
        rows = np.arange(total, total + len(p) - start)
        seqs.append((slice(total, total + len(rows)), np.concatenate([seqs[src][1][:start], rows]) if start else rows))
        kept.append(p)
        new.append(p[start:])
        total += len(rows)
    if not total:
        raise PyguardError("calibration needs at least one token")
    ids = np.concatenate(new)
    pick = np.linspace(0, total - 1, min(SEARCH_TOKENS, total)).astype(np.int64)
    cal = Calibration(int(total), len(seqs), threads=min(2, threads or os.cpu_count() or 1), pool=kernels.Pool(threads))
    try:
        _pass(cal, ckpt, cfg, ids, seqs, pick, group, progress)
    except BaseException:
        cal.close()
        raise
    return cal


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _pass(cal: Calibration, ckpt: Checkpoint, cfg: ModelConfig, ids: np.ndarray, seqs: list[tuple[slice, np.ndarray]],
          pick: np.ndarray, group: int, progress: Callable[[float, str], None] | None) -> None:
    """The float pass of `calibrate`, layer by layer, filling `cal`. ids: the distinct rows'
    tokens; seqs: per prompt, (its own rows, every row of the prompt in order: the shared
    prefix's, then its own)."""
    pos = np.empty(len(ids), np.int64)
    for own, rows in seqs:
        pos[own] = np.arange(len(rows) - (own.stop - own.start), len(rows))
    cos, sin = rope_tables(rope_frequencies(cfg), pos)
    x = np.concatenate([ckpt.read("model.embed_tokens.weight", slice(int(t), int(t) + 1)) for t in ids])
    hd, q_rows, kv_rows = cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rep = cfg.n_heads // cfg.n_kv_heads
    pool = cal.pool
    def read(name: str) -> np.ndarray:  # a damaged tensor is named, not blamed on what follows it
        w = ckpt.read(name)
        if not np.isfinite(w).all():
            raise PyguardError(f"tensor {name} holds infinite or NaN values")
        return w

    def stack(names: list[str]) -> np.ndarray:  # rows of several tensors in one matrix, read one at a time
        n = [ckpt.rows(name) for name in names]
        w = np.empty((sum(n), cfg.dim), np.float32)
        for name, r0, r1 in zip(names, np.cumsum([0] + n[:-1]), np.cumsum(n)):
            w[r0:r1] = read(name)
        return w

    def fold(names: list[str], w: np.ndarray) -> np.ndarray:  # in place, tensor by tensor (its rows in w)
        r0 = 0
        for name in names:
            cal.fold(name, slice(None), w[r0 : r0 + ckpt.rows(name)], inplace=True)
            r0 += ckpt.rows(name)
        return w

    # Each matrix is in memory once, as float32 (stacked where the file stacks it): folded in
    # place once used, and handed over to the error feedback (8B: ~0.85 GB a layer).
    for i in range(cfg.n_layers):
        cal.wait()  # the previous layer's matrices: one layer in flight
        p = f"model.layers.{i}."
        qkv_names = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        w13_names = [p + f"mlp.{n}_proj.weight" for n in ("gate", "up")]
        wqkv, wo = stack(qkv_names), read(p + "self_attn.o_proj.weight")
        n_att, n_ffn = read(p + "input_layernorm.weight"), read(p + "post_attention_layernorm.weight")

        h = rms_norm(x, n_att, cfg.norm_eps)
        s_qkv = _choose(cal, f"layers.{i}.wqkv", wqkv, h, group, pick)
        if s_qkv is not None:
            cal.row[p + "input_layernorm.weight"] = s_qkv
            for n in qkv_names:
                cal.col[n] = s_qkv
        qkv = kernels.sgemm(h, wqkv, pool)
        apply_rope(qkv[:, : q_rows + kv_rows].reshape(len(x), -1, 2, hd // 2), cos, sin)
        att = np.empty((len(x), q_rows), np.float32)
        for own, rows in seqs:
            att[own] = _attention(qkv[own, :q_rows], qkv[rows, q_rows:], cfg, pool)
        del qkv
        # wo's input channel (head h, j) is value channel (h // rep, j): one s per value channel
        s = _choose(cal, f"layers.{i}.wo", wo, att, group, pick, tie=rep, hd=hd)
        if s is not None:
            cal.row[p + "self_attn.v_proj.weight"] = s.reshape(cfg.n_kv_heads, rep, hd)[:, 0].reshape(-1)
            cal.col[p + "self_attn.o_proj.weight"] = s
        x = x + kernels.sgemm(att, wo, pool)
        if GPTQ:  # wqkv is quantized once wo's folding has set the v rows
            cal.keep(f"layers.{i}.wqkv", fold(qkv_names, wqkv), h, s_qkv, group)
            cal.keep(f"layers.{i}.wo", fold([p + "self_attn.o_proj.weight"], wo), att, s, group)
        del wqkv, wo

        w13, wd = stack(w13_names), read(p + "mlp.down_proj.weight")
        h = rms_norm(x, n_ffn, cfg.norm_eps)
        s_13 = _choose(cal, f"layers.{i}.w13", w13, h, group, pick)
        if s_13 is not None:
            cal.row[p + "post_attention_layernorm.weight"] = s_13
            for n in w13_names:
                cal.col[n] = s_13
        act = kernels.swiglu(kernels.sgemm(h, w13, pool), pool)  # w13: gate rows, then up rows
        s = _choose(cal, f"layers.{i}.w2", wd, act, group, pick)
        if s is not None:
            cal.row[p + "mlp.up_proj.weight"] = s
            cal.col[p + "mlp.down_proj.weight"] = s
        x = x + kernels.sgemm(act, wd, pool)
        if GPTQ:  # w13 is quantized once w2's folding has set the up rows
            cal.keep(f"layers.{i}.w13", fold(w13_names, w13), h, s_13, group)
            cal.keep(f"layers.{i}.w2", fold([p + "mlp.down_proj.weight"], wd), act, s, group)
        del w13, wd, act
        if not np.isfinite(x).all():
            raise PyguardError(f"calibration: the float model overflows at layer {i} (convert with --no-calibration)")
        if progress:
            progress((i + 1) / cfg.n_layers, f"calibration layer {i}")
    cal.wait()
    h = rms_norm(x, read("model.norm.weight"), cfg.norm_eps)
    cal.importance["output"] = _mean_square(h)
    if cfg.tie_embeddings:
        cal.importance["tok_embeddings"] = cal.importance["output"]


def _mean_square(x: np.ndarray) -> np.ndarray:
    """Per-channel mean of x^2 (float64 sums), floored at a small share of the mean so that no
    channel is ignored entirely (a silent channel on this text may speak on another)."""
    a = np.einsum("ij,ij->j", x, x, dtype=np.float64) / len(x)  # float32 squares are exact in float64: fused or not, alike
    return np.maximum(a, 1e-3 * a.mean() + 1e-30).astype(np.float32)


def gram(x: np.ndarray, pool: kernels.Pool | None = None) -> np.ndarray:
    """X^T X of float32 x [n, k] (kernels.sgemm: the same bits on every CPU)."""
    xt = np.ascontiguousarray(x.T)
    return kernels.sgemm(xt, xt, pool)


def upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """float32 U, upper triangular, with U^T U = h^-1, for symmetric positive definite float32 h:
    with J the reversal, chol(J h J) = L and U = J L^-1 J. In float64 and elementwise numpy
    operations only (outer products applied in order, right-looking), so that every element
    has one fixed order of operations: LAPACK's blocked sums differ between CPUs. The
    specification of kernels.upper_inverse (C, the same operations: 5x faster), which the
    converter runs."""
    a = h[::-1, ::-1].astype(np.float64)
    n = len(a)
    low = np.zeros_like(a)
    for j in range(n):
        if not a[j, j] > 0:  # also NaN
            raise PyguardError("a Hessian is not positive definite")
        col = low[j:, j] = a[j:, j] / np.sqrt(a[j, j])
        a[j + 1 :, j + 1 :] -= np.outer(col[1:], col[1:])
    inv = np.eye(n)  # L^-1 by forward substitution, row j final once divided
    for j in range(n):
        inv[j, : j + 1] /= low[j, j]
        inv[j + 1 :, : j + 1] -= np.outer(low[j + 1 :, j], inv[j, : j + 1])
    return np.ascontiguousarray(inv[::-1, ::-1], dtype=np.float32)


def inverse_factors(x: np.ndarray, s: np.ndarray | None, pool: kernels.Pool | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """What GPTQ needs of a matrix's inputs x (as the folded matrix sees them: x / s): the
    columns by decreasing mean square (activation order: the inputs that matter most are
    rounded first, while the most columns are left to absorb their error) and, for each span of
    SPAN columns in that order, the upper triangular U with U^T U = (H_b + damp I)^-1, H_b =
    X_b^T X_b / n the span's Hessian, float32. Damping by DAMP of the mean diagonal keeps H_b
    invertible (inputs silent or collinear on the calibration text). With J the reversal,
    chol(J H J) = L gives U = J L^-1 J: one Cholesky and one small inverse per span
    (`upper_inverse_factor`, run by its C twin kernels.upper_inverse)."""
    xs = x if s is None else x / s
    diag = np.einsum("ij,ij->j", xs, xs, dtype=np.float64) / len(xs)
    order = np.argsort(-diag, kind="stable")
    damp = np.float32(DAMP * diag.mean() + 1e-30)
    factors = []
    for b0 in range(0, len(order), SPAN):
        xb = xs[:, order[b0 : b0 + SPAN]]
        h = gram(xb, pool) / np.float32(len(xs))
        h[np.arange(len(h)), np.arange(len(h))] += damp
        if not np.isfinite(h).all():  # never rounded from NaN
            top = float(np.abs(xb).max())
            cause = ": products that overflow" if len(xb) * top * top >= 3e38 else ""
            raise PyguardError(f"a Hessian is not finite (inputs up to {top:.3g}{cause})")
        u = kernels.upper_inverse(h)
        if not np.isfinite(u).all():
            raise PyguardError("an inverse Hessian factor is not finite")
        factors.append(u)
    return order, factors


def gptq(w: np.ndarray, order: np.ndarray, factors: Sequence[np.ndarray], group: int,
         a: np.ndarray | None = None, pool: kernels.Pool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int4 values int8 [M, K] and fp16 scales [M, K/G] of W by GPTQ's error feedback: the
    columns are rounded in `order`, and each one's rounding error (scaled by U's diagonal) is
    spread over the columns of its span not yet rounded as the span's inverse Hessian factor U
    says (`inverse_factors`), so that the products X W^T, not the weights, stay close. The
    scales are chosen first (importance-weighted search, quant.mse_scales, on W as it is) and
    groups stay contiguous: static groups, as activation order needs (a group's columns are
    rounded at different times). Within a span, sub-blocks of SUB columns pass their errors on
    to the rest of the span at once (a matrix product)."""
    w = np.asarray(w, dtype=np.float32)
    m, k = w.shape
    # per row: searched in blocks of rows (the same scales), bounding the search's temporaries
    scales = np.concatenate([quant.mse_scales(w[r : r + ROWS], group, a) for r in range(0, m, ROWS)])
    # transposed, in the order rounded: a column is a contiguous row, updated in place below
    # (gathered a block of rows at a time: w.T[order] strides across the whole matrix per element)
    wt = np.empty((k, m), np.float32)
    for r in range(0, m, BLOCK):
        wt[:, r : r + BLOCK] = w[r : r + BLOCK, order].T
    d = np.ascontiguousarray(scales.astype(np.float32).T)  # [K/G, M]: column c's scales are d[gi[c]]
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    gi = order // group
    qt = np.empty((k, m), np.int8)
    err = np.empty((SUB, m), np.float32)
    b0 = 0
    for u in factors:
        b1 = b0 + len(u)
        for s0 in range(b0, b1, SUB):
            s1 = min(s0 + SUB, b1)
            if not np.isfinite(wt[s0:s1]).all():  # the cast below would turn NaN into any int8
                raise PyguardError("the error feedback left non-finite weights")
            for c in range(s0, s1):
                j, e, g = c - b0, err[c - s0], gi[c]
                qt[c] = np.clip(np.rint(wt[c] * inv[g]), -8, 7)
                np.subtract(wt[c], qt[c] * d[g], out=e)
                e /= u[j, j]
                wt[c + 1 : s1] -= np.outer(u[j, j + 1 : s1 - b0], e)
            if s1 < b1:
                wt[s1:b1] -= kernels.sgemm(np.ascontiguousarray(u[s0 - b0 : s1 - b0, s1 - b0 :].T),
                                           np.ascontiguousarray(err[: s1 - s0].T), pool)
        b0 = b1
    q = np.empty((m, k), np.int8)
    for r in range(0, m, BLOCK):
        q[r : r + BLOCK, order] = qt[:, r : r + BLOCK].T
    return q, scales


def _choose(cal: Calibration, name: str, w: np.ndarray, x: np.ndarray, group: int, pick: np.ndarray,
            tie: int = 1, hd: int = 1) -> np.ndarray | None:
    """Record matrix `name`'s importances and folding; returns its column scale s (None: no
    folding). alpha is chosen by the output error on a sample of rows and tokens, with int4
    weights and int8 activations as in the engine. tie: consecutive blocks of head_dim columns
    sharing one s (the `tie` query heads reading one value head, hd columns each)."""
    a = _mean_square(x)
    mag = np.sqrt(a)
    best = (None, np.inf, 0.0)
    rows = np.linspace(0, len(w) - 1, min(SEARCH_ROWS, len(w))).astype(np.int64)
    ws, xs = w[rows], x[pick]
    ref = kernels.sgemm(xs, ws, cal.pool)
    peak = np.maximum(w.max(axis=0), -w.min(axis=0))  # max |w| per column, without an |w| copy of w
    for alpha in ALPHAS:
        s = _scales(mag, alpha, tie, hd)
        if alpha and (peak * s).max() > quant.MAX_WEIGHT:  # folded weights must stay within fp16 scales
            continue
        wf = ws * s
        qt = quant.pack_weights(quant.quantize_with_scales(wf, sc := quant.mse_scales(wf, group, a / (s * s))), sc)
        qa = quant.quantize_acts(xs / s)
        xq = qa.scale[:, None] * (qa.q.astype(np.float32) - qa.zp[:, None].astype(np.float32))  # float32, as sgemm takes
        e = float(np.sum((kernels.sgemm(xq, quant.dequantize(qt), cal.pool) - ref) ** 2, dtype=np.float64))
        if not np.isfinite(e):  # a NaN error would never be chosen, silently
            raise PyguardError(f"calibration: the float model overflows at {name} (its output error is not finite; convert with --no-calibration)")
        if e < best[1]:
            best = (s, e, alpha)
    s, _, alpha = best
    cal.alphas[name] = alpha
    if alpha == 0.0:
        cal.importance[name] = a
        return None
    cal.importance[name] = a / (s * s)
    return s


def _scales(mag: np.ndarray, alpha: float, tie: int, hd: int) -> np.ndarray:
    """s = mag^alpha normalised to geometric mean 1, rounded to a power of two in [2^-7, 2^7]; with tie > 1 the
    columns of the query heads sharing a value head get one s (their mean magnitude)."""
    if tie > 1:
        m = mag.reshape(-1, tie, hd).mean(axis=1, keepdims=True)
        mag = np.broadcast_to(m, (m.shape[0], tie, hd)).reshape(-1)
    # log2 of mag^alpha over its geometric mean, by detmath.log (numpy's log differs between CPUs)
    log_mag = detmath.log(np.maximum(mag, 1e-6 * mag.max() + 1e-30))
    t = alpha * (log_mag - np.mean(log_mag)) / math.log(2)
    # powers of two: multiplying and dividing by them is exact, so folding changes no float
    return np.ldexp(np.float32(1), np.clip(np.rint(t), -7, 7).astype(np.int32)).astype(np.float32)


def _attention(q: np.ndarray, kv: np.ndarray, cfg: ModelConfig, pool: kernels.Pool | None = None) -> np.ndarray:
    """Causal grouped-query attention in float32 of the last n positions of a sequence of T:
    q [n, n_heads * head_dim], kv [T, 2 n_kv_heads head_dim] (keys, then values, of all T);
    returns [n, n_heads * head_dim]. Products by kernels.sgemm and exp by model.exp_neg: the
    same bits on every CPU."""
    n, t, hd, kvh = len(q), len(kv), cfg.head_dim, cfg.n_kv_heads
    rep = cfg.n_heads // kvh
    q = q.reshape(n, kvh, rep, hd)
    out = np.empty((n, kvh, rep, hd), np.float32)
    later = np.repeat(np.arange(t)[None, :] > np.arange(t - n, t)[:, None], rep, axis=0)  # query i sits at position t - n + i
    for g in range(kvh):  # the rep query heads reading key/value head g: rows token-major
        s = kernels.sgemm(q[:, g].reshape(n * rep, hd), kv[:, g * hd : (g + 1) * hd], pool) * np.float32(1 / math.sqrt(hd))
        s[later] = -np.inf
        e = exp_neg(s - s.max(axis=-1, keepdims=True))
        e[later] = 0
        e /= e.sum(axis=-1, keepdims=True)
        out[:, g] = kernels.sgemm(e, np.ascontiguousarray(kv[:, (kvh + g) * hd : (kvh + g + 1) * hd].T), pool).reshape(n, rep, hd)
    return out.reshape(n, cfg.n_heads * hd)


def float_checkpoint(cfg: ModelConfig, tensors: dict, head_ids=None) -> dict[str, np.ndarray]:
    """The Hugging Face float32 weights a converted file stands for (int4 and int8 matrices
    dequantized, stacked ones split, folded norms as stored): running them in float is the
    file's model without activation rounding. tensors, head_ids: a file's; a pruned head's rows
    are put at their vocabulary ids of an otherwise zero head."""
    def table(t) -> np.ndarray:  # the embedding table and the head may be int8
        return quant.dequantize8(t) if isinstance(t, quant.Q8Tensor) else quant.dequantize(t)

    hd = cfg.head_dim
    cut = {"wqkv": ("self_attn", ("q", "k", "v"), (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)),
           "w13": ("mlp", ("gate", "up"), (cfg.hidden_dim, cfg.hidden_dim))}
    out = {"model.embed_tokens.weight": table(tensors["tok_embeddings"]), "model.norm.weight": np.asarray(tensors["norm"])}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = np.asarray(tensors[f"layers.{i}.attention_norm"])
        out[p + "post_attention_layernorm.weight"] = np.asarray(tensors[f"layers.{i}.ffn_norm"])
        out[p + "self_attn.o_proj.weight"] = quant.dequantize(tensors[f"layers.{i}.wo"])
        out[p + "mlp.down_proj.weight"] = quant.dequantize(tensors[f"layers.{i}.w2"])
        for key, (mod, names, sizes) in cut.items():
            for n, part in zip(names, np.split(quant.dequantize(tensors[f"layers.{i}.{key}"]), np.cumsum(sizes)[:-1])):
                out[p + f"{mod}.{n}_proj.weight"] = part
    if head_ids is not None:
        out["lm_head.weight"] = np.zeros((cfg.vocab_size, cfg.dim), np.float32)
        out["lm_head.weight"][np.asarray(head_ids)] = table(tensors["output"])
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = table(tensors["output"])
    return out
