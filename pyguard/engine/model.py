"""The Llama decoder: int4 weights, int8 dynamic activations, everything else float32 (attention,
rotary embeddings, SwiGLU and RMSNorm fused with the quantization of the products' inputs in C
kernels whose numpy references are here, the rest in numpy).

One forward pass (`Model._forward`) serves prefill (a chunk of tokens through the int8 x int4
GEMM) and decode (one token through the GEMV): per layer RMSNorm, the stacked q/k/v product,
rotary embeddings (Hugging Face "rotate half" layout, optional Llama 3 frequency scaling),
grouped-query attention over the state's key/value cache, the output product, RMSNorm, the
stacked gate/up product, SwiGLU and the down product; then the final norm and the head.
Activations are quantized per token at the input of every linear layer (the INT4 recipe).
The embedding table and a pruned or tied head may be int8 (quant.Q8Tensor): looked up in
numpy, and the head's product summed exactly (`linear8`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from . import detmath, kernels
from ..formats.config import ModelConfig
from ..errors import PyguardError
from ..formats import quant
from ..formats.quant import Q8Tensor, QTensor

# Tokens per pass: bounds the prefill buffers (~24 MB for the 1B geometry); each pass streams every
# weight matrix, and 128 tokens run 16% faster per token than 64 (1B, AVX2, 2 threads)
PREFILL_CHUNK = 128
SPREAD_MIN = 1 << 22  # float operations below which numpy work stays on one thread (decode)
HEAD_ROWS = 256  # rows of an int8 head converted to float64 at once: 4 MB at dim 2048, cache-sized


@dataclass
class Layer:
    attention_norm: np.ndarray  # float32 [dim]
    wqkv: QTensor  # [(n_heads + 2 n_kv_heads) head_dim, dim]: q, k, v rows
    wo: QTensor  # [dim, n_heads head_dim]
    ffn_norm: np.ndarray  # float32 [dim]
    w13: QTensor  # [2 hidden_dim, dim]: gate rows, then up rows
    w2: QTensor  # [dim, hidden_dim]


@dataclass(frozen=True)
class Snapshot:
    """The cache of a state's first `pos` positions (see State.snapshot)."""

    pos: int
    kv: np.ndarray  # [n_layers, 2, n_kv_heads, pos, head_dim]


class State:
    """One sequence: its key/value cache and the number of positions filled.

    The cache is one array [n_layers, 2 (k, v), n_kv_heads, max_len, head_dim]. It comes from
    np.zeros, whose large allocations are fresh pages mapped on first write: a state costs
    memory only for the positions actually filled, whatever max_len it was given.
    """

    def __init__(self, config: ModelConfig, max_len: int, dtype: np.dtype = np.float32):
        if max_len < 1:
            raise PyguardError(f"state length must be positive, not {max_len}")
        c = config
        self.kv = np.zeros((c.n_layers, 2, c.n_kv_heads, max_len, c.head_dim), dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.kv.shape[3]

    def snapshot(self) -> Snapshot:
        """A copy of the filled positions only (a policy prefix of 136 tokens is 9 MB for 1B)."""
        return Snapshot(self.pos, self.kv[:, :, :, : self.pos].copy())

    def restore(self, snap: Snapshot) -> None:
        """Return to the snapshot's positions; this state may be longer than the snapshot's."""
        if snap.kv.shape[:3] + snap.kv.shape[4:] != self.kv.shape[:3] + self.kv.shape[4:]:
            raise PyguardError("snapshot taken from a model of another geometry")
        if snap.pos > self.max_len:
            raise PyguardError(f"snapshot of {snap.pos} positions does not fit a state of {self.max_len}")
        self.kv[:, :, :, : snap.pos] = snap.kv
        self.pos = snap.pos


class Model:
    """A Llama decoder on int4 weights.

    Thread-safe: the weights are read-only and every call works on the states it is given, so
    one model may serve several threads (their kernels take turns on the model's thread pool;
    models with their own pools run in parallel). A state must not be used by two calls at once.
    """

    def __init__(self, config: ModelConfig, tensors: Mapping[str, QTensor | Q8Tensor | np.ndarray],
                 head_ids: Sequence[int] | None = None, threads: int | None = None):
        """config: the geometry; tensors: the names of config.tensor_plan, matrices as QTensor
        (`tok_embeddings` and `output` may be Q8Tensor), norm weights as float arrays (`output`
        may be left out when embeddings are tied);
        head_ids: vocabulary id of each row of a pruned `output` (None: the full vocabulary);
        threads: this model's kernel threads (None: PYGUARD_THREADS or all cores)."""
        config.validate()
        self.pool = kernels.Pool(threads)
        c = self.config = config
        q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

        def matrix(name: str, shape: tuple[int, int] | None) -> QTensor:
            t = tensors.get(name)
            if not isinstance(t, QTensor):
                raise PyguardError(f"tensor {name!r} is {'missing' if t is None else 'not an int4 QTensor'}")
            if shape and t.shape != shape:
                raise PyguardError(f"tensor {name!r} has shape {t.shape}, expected {shape}")
            return t

        def table(name: str, shape: tuple[int, int] | None) -> QTensor | Q8Tensor:
            """An int4 matrix or an int8 one (the embedding table, the head)."""
            t = tensors.get(name)
            if not isinstance(t, Q8Tensor):
                return matrix(name, shape)
            q, d = t.q, t.scales
            if not (isinstance(q, np.ndarray) and isinstance(d, np.ndarray) and q.dtype == np.int8 and q.ndim == 2
                    and d.dtype == np.float32 and d.shape == q.shape[:1]):
                raise PyguardError(f"tensor {name!r}: malformed int8 tensor (dtype or shape)")
            if shape and t.shape != shape:
                raise PyguardError(f"tensor {name!r} has shape {t.shape}, expected {shape}")
            return t

        def norm(name: str) -> np.ndarray:
            if name not in tensors:
                raise PyguardError(f"tensor {name!r} is missing")
            w = np.ascontiguousarray(tensors[name], dtype=np.float32)
            if w.shape != (c.dim,):
                raise PyguardError(f"tensor {name!r} has shape {w.shape}, expected {(c.dim,)}")
            return w

        self.tok_embeddings = table("tok_embeddings", (c.vocab_size, c.dim))
        self.layers = [
            Layer(
                norm(f"layers.{i}.attention_norm"),
                matrix(f"layers.{i}.wqkv", (q_rows + 2 * kv_rows, c.dim)),
                matrix(f"layers.{i}.wo", (c.dim, q_rows)),
                norm(f"layers.{i}.ffn_norm"),
                matrix(f"layers.{i}.w13", (2 * c.hidden_dim, c.dim)),
                matrix(f"layers.{i}.w2", (c.dim, c.hidden_dim)),
            )
            for i in range(c.n_layers)
        ]
        self.norm = norm("norm")
        tied = c.tie_embeddings and "output" not in tensors
        self.output = self.tok_embeddings if tied else table("output", None)
        for t in [self.tok_embeddings, self.output] + [w for l in self.layers for w in (l.wqkv, l.wo, l.w13, l.w2)]:
            if isinstance(t, QTensor):
                kernels._qtensor(t)  # validates layout and dtypes before any kernel sees them
        rows, k = self.output.shape
        if k != c.dim:
            raise PyguardError(f"tensor 'output' has {k} columns, expected {c.dim}")
        if head_ids is None:
            if rows != c.vocab_size:
                raise PyguardError(f"the output head has {rows} rows, not {c.vocab_size}: its vocabulary ids are needed")
            head_ids = range(rows)
        self.head_ids = np.array(head_ids, dtype=np.int64)
        if self.head_ids.shape != (rows,) or self.head_ids.min() < 0 or self.head_ids.max() >= c.vocab_size:
            raise PyguardError(f"head ids must be {rows} vocabulary ids in 0..{c.vocab_size - 1}")
        self.inv_freq = rope_frequencies(c)

    @classmethod
    def load(cls, path: str, threads: int | None = None) -> "Model":
        """Open a pyguard file; threads: kernel worker threads (None: PYGUARD_THREADS or all cores)."""
        from ..formats.file import load as load_file

        f = load_file(path)
        return cls(f.config, f.tensors, f.head_ids, threads)

    @property
    def head_size(self) -> int:
        """Number of logits per position (rows of the output head)."""
        return len(self.head_ids)

    def new_state(self, max_len: int, kv_dtype: np.dtype = np.float32) -> State:
        """An empty sequence of up to max_len positions. kv_dtype float16 halves the cache
        (134 MB instead of 268 MB for 4096 positions of the 1B model) at some decode speed."""
        return State(self.config, max_len, kv_dtype)

    def prefill(self, state: State, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the sequence; float32 logits of the last position [head_size], or of
        every new position [len(token_ids), head_size] if all_logits."""
        ids = self._check(state, token_ids)
        out = []
        for i in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[i : i + PREFILL_CHUNK]
            last = i + PREFILL_CHUNK >= len(ids)
            x = self._forward([(state, chunk)], None if all_logits else [len(chunk) - 1] if last else [])
            if all_logits:
                out.append(self._head(x))
        return np.concatenate(out) if all_logits else self._head(x)[0]

    def decode(self, state: State, token_id: int) -> np.ndarray:
        """Append one token; float32 logits of the next one [head_size]."""
        return self._head(self._forward([(state, self._check(state, [token_id]))]))[0]

    def prefill_many(self, states: Sequence[State], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Append tokens to several sequences at once; float32 logits after each one's last
        token [len(states), head_size]. Passes of up to PREFILL_CHUNK tokens gather pieces of
        several sequences, so each weight matrix is streamed once per pass for all of them;
        each sequence's logits are those it gets alone. One token per state is a batched decode."""
        if len({id(s) for s in states}) != len(states) or len(states) != len(token_lists):
            raise PyguardError("prefill_many needs distinct states, one token list each")
        pending = [(k, self._check(s, t)) for k, (s, t) in enumerate(zip(states, token_lists))]
        last = np.empty((len(states), self.config.dim), np.float32)
        while pending:
            budget, segs, later = PREFILL_CHUNK, [], []
            for k, ids in pending:
                take = ids[: max(budget, 0)]
                if len(take):
                    segs.append((k, take))
                    budget -= len(take)
                if len(take) < len(ids):
                    later.append((k, ids[len(take) :]))
            ends = np.cumsum([len(ids) for _, ids in segs]) - 1
            unfinished = {k for k, _ in later}
            finished = [(k, e) for (k, _), e in zip(segs, ends) if k not in unfinished]
            x = self._forward([(states[k], ids) for k, ids in segs], [e for _, e in finished])
            for j, (k, _) in enumerate(finished):
                last[k] = x[j]
            pending = later
        return self._head(last)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), head_size]: the logits after every position of a fresh sequence."""
        return self.prefill(self.new_state(max(len(token_ids), 1)), token_ids, all_logits=True)

    def _check(self, state: State, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise PyguardError("no tokens given")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise PyguardError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if state.pos + ids.size > state.max_len:
            raise PyguardError(f"{state.pos} + {ids.size} positions exceed the state's {state.max_len}")
        return ids.astype(np.int32)

    def _forward(self, segments: list[tuple[State, np.ndarray]], keep: Sequence[int] | None = None) -> np.ndarray:
        """Run tokens through every layer, each segment's at its state's next positions,
        filling the caches; returns the hidden states before the final norm of the token rows
        `keep` (None: all) [len(keep), dim]. The products see all segments' tokens at once (one
        weight stream for the batch); attention is per segment, over its own cache. A state
        appears at most once. Every layer must fill the cache for every token, but the last
        one's output product and MLP (~5% of the work) run only for the kept rows."""
        c = self.config
        ids = np.concatenate([seg for _, seg in segments])
        n = len(ids)
        bounds = np.cumsum([0] + [len(seg) for _, seg in segments])
        q_end = c.n_heads * c.head_dim
        cos, sin = rope_tables(self.inv_freq, np.concatenate([np.arange(st.pos, st.pos + len(seg)) for st, seg in segments]))
        pool, scale = self.pool, np.float32(1 / math.sqrt(c.head_dim))  # correctly rounded: the same everywhere
        x = lookup(self.tok_embeddings, ids, pool)
        for i, layer in enumerate(self.layers):
            qkv = norm_linear(layer.wqkv, x, layer.attention_norm, c.norm_eps, pool)
            kernels.rope(qkv, c.n_heads + c.n_kv_heads, cos, sin, pool)
            att = np.empty((n, q_end), np.float32)
            for (state, _), a, b in zip(segments, bounds[:-1], bounds[1:]):
                kv, start = state.kv[i], state.pos
                kv[:, :, start : start + b - a] = qkv[a:b, q_end:].reshape(b - a, 2, c.n_kv_heads, c.head_dim).transpose(1, 2, 0, 3)
                if kv.dtype != np.float32:  # a float16 cache: the kernel reads float32
                    kv = kv[:, :, : start + b - a].astype(np.float32)
                att[a:b] = kernels.attention(qkv[a:b, :q_end], kv[0], kv[1], start, scale, pool)
            if keep is not None and i == c.n_layers - 1:
                x, att = x[keep], att[keep]
                if not len(x):
                    break
            x += linear(layer.wo, att, pool)
            gate_up = norm_linear(layer.w13, x, layer.ffn_norm, c.norm_eps, pool)
            x += linear(layer.w2, kernels.swiglu(gate_up, pool), pool)
        for state, seg in segments:
            state.pos += len(seg)
        return x

    def _head(self, x: np.ndarray) -> np.ndarray:
        return linear(self.output, rms_norm(x, self.norm, self.config.norm_eps), self.pool)


def lookup(t: QTensor | Q8Tensor, ids: np.ndarray, pool: kernels.Pool | None = None) -> np.ndarray:
    """float32 [len(ids), K]: embedding rows dequantized (quant.dequantize8 or the C kernel)."""
    if isinstance(t, Q8Tensor):
        return quant.dequantize8(t, ids)
    return kernels.dequant_rows(t, ids, pool)


def linear(w: QTensor | Q8Tensor, x: np.ndarray, pool: kernels.Pool | None = None) -> np.ndarray:
    """x [n, K] . W^T with x quantized per row; one row goes through the GEMV (same arithmetic)."""
    if isinstance(w, Q8Tensor):
        return linear8(w, x, pool)
    if len(x) == 1:
        return kernels.gemv(w, x[0], pool=pool)[None]
    return kernels.gemm(w, kernels.quantize_acts(x, pool), pool=pool)


def norm_linear(w: QTensor, x: np.ndarray, norm: np.ndarray, eps: float, pool: kernels.Pool | None = None) -> np.ndarray:
    """linear(w, rms_norm(x, norm, eps)) with the norm fused into the rows' quantization
    (kernels.norm_quantize, the same bits): the normalized rows are never written out. One row
    goes through the GEMV inside kernels.gemm, as in linear."""
    return kernels.gemm(w, kernels.norm_quantize(x, norm, eps, pool), pool=pool)


def linear8(w: Q8Tensor, x: np.ndarray, pool: kernels.Pool | None = None) -> np.ndarray:
    """x [n, K] . W^T for an int8 head, bit for bit quant.gemm8: x quantized per row as for
    every linear, then the integer products summed in float64, where every partial sum is an
    integer below 255 * 127 * K < 2^53 and so exact in any order: BLAS's speed, and the same
    bits alone or in a batch. The rows are converted HEAD_ROWS at a time, parts of them on
    the pool's threads."""
    a = kernels.quantize_acts(x, pool)
    xi = a.q.astype(np.float64) - a.zp[:, None]
    (n, k), m = xi.shape, w.shape[0]
    y = np.empty((n, m), np.float32)

    def rows(lo: int, hi: int) -> None:
        for r in range(lo, hi, HEAD_ROWS):
            e = min(r + HEAD_ROWS, hi)
            dot = (xi @ w.q[r:e].astype(np.float64).T).astype(np.float32)
            dot *= w.scales[r:e]
            dot *= a.scale[:, None]
            y[:, r:e] = dot

    spread(rows, m, 2 * n * m * k, pool)
    return y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w over the last axis of float32 x [n, K], K % 8 == 0, in a
    fixed order, the specification of the fused norm + quantization kernel (kernels.norm_quantize
    computes quant.quantize_acts of this): lane l sums the squares of columns 8i + l in order of
    i, then tree8; r = 1 / sqrt(sum / K + eps); y = (x r) w."""
    n, k = x.shape
    if k % 8:
        raise PyguardError(f"rms_norm needs a multiple of 8 columns, not {k}")
    r = tree8(np.cumsum((x * x).reshape(n, k // 8, 8), axis=1, dtype=np.float32)[:, -1])
    r /= k
    r += eps
    np.sqrt(r, out=r)
    np.reciprocal(r, out=r)
    y = x * r[:, None]
    y *= w
    return y


def swiglu_reference(gate_up: np.ndarray) -> np.ndarray:
    """The specification of the SwiGLU kernel (kernels.swiglu): silu(gate) * up for gate_up
    [n, 2 hidden] float32, gate columns first, in these float32 operations and this order:
    e = exp_neg(-|g|) (attention's exp: no overflow, no libm); silu = g / (1 + e) for g >= 0,
    (g e) / (1 + e) for g < 0 (a NaN g takes the second: NaN); out = silu * up."""
    hidden = gate_up.shape[1] // 2
    g, up = gate_up[:, :hidden], gate_up[:, hidden:]
    e = exp_neg(-np.abs(g))
    return np.where(g >= 0, g, g * e) / (np.float32(1) + e) * up


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """Rotation frequencies [head_dim / 2], float32 as in Hugging Face and Meta's code, with
    Llama 3 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    inv_freq = np.float32(1) / detmath.pow32(c.rope_theta, np.arange(0, c.head_dim, 2, dtype=np.float32) / np.float32(c.head_dim))
    s = c.rope_scaling
    if s:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > old_len / low, inv_freq / factor, np.where(wavelen < old_len / high, inv_freq, ramp))
    return inv_freq.astype(np.float32)


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, head_dim/2] float32 of each position's angles, float32 products
    position * frequency, as the models were trained with (detmath: the same bits on every CPU)."""
    angles = positions.astype(np.float32)[:, None] * inv_freq
    return detmath.sincos32(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """The specification of the rotary kernel (kernels.rope): rotate heads x [n, heads, 2,
    head_dim/2] in place by cos, sin [n, head_dim/2], "rotate half" layout: with a, b the two
    halves of a head, (a, b) -> (a cos - b sin, b cos + a sin)."""
    c, s = cos[:, None], sin[:, None]
    a, b = x[:, :, 0].copy(), x[:, :, 1]
    x[:, :, 0] = a * c - b * s
    x[:, :, 1] = b * c + a * s


def tree8(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis of 8 lanes: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1."""
    b = a[..., :4] + a[..., 4:]
    return (b[..., 0] + b[..., 2]) + (b[..., 1] + b[..., 3])


EXP_MIN, LOG2E, LN2_HI, LN2_LO = np.float32(-87), np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_POLY = [np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)]


def exp_neg(x: np.ndarray) -> np.ndarray:
    """exp(x) for float32 x <= 0 in plain float32 multiplies and adds (Cephes' expf), the
    operations of the C kernels' pg_exp_neg; x is clamped to >= -87 (NaN counts as -87)."""
    x = np.where(x > EXP_MIN, x, EXP_MIN).astype(np.float32)
    n = np.rint(x * LOG2E)
    r = x - n * LN2_HI
    r = r - n * LN2_LO
    p = np.full_like(x, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + c
    y = p * (r * r) + r + np.float32(1)
    return y * ((n.astype(np.int32) + 127) << 23).view(np.float32)


def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: np.float32) -> np.ndarray:
    """The specification of the attention kernel (kernels.attention), in its exact order of
    operations: every sum has a fixed order, so a query's result depends on nothing but its own
    inputs (not on how many queries share the call, nor on the cache beyond its position).

    q [n, n_heads * hd] at positions start..start + n - 1, scaled by `scale`; keys, values
    [n_kv, >= start + n, hd]; query head h reads cache head h // (n_heads / n_kv) (Hugging Face's
    repeat_kv). Dot products: lane l sums columns 8i + l in order of i, then tree8. Softmax:
    exp_neg(s - max); the sum's lane l takes positions 8i + l in order, then tree8; a non-finite
    score makes the head's output NaN. Output: weights times values summed in order of
    position, divided by the sum."""
    n, hd = len(q), keys.shape[2]
    heads = q.shape[1] // hd
    group = heads // keys.shape[0]
    out = np.empty((n, heads, hd), np.float32)
    for i in range(n):
        length = start + i + 1
        for h in range(heads):
            k, v = keys[h // group, :length], values[h // group, :length]
            qh = q[i, h * hd : (h + 1) * hd] * scale
            s = tree8(np.cumsum((qh * k).reshape(length, hd // 8, 8), axis=1, dtype=np.float32)[:, -1])
            e = exp_neg(s - s.max())
            lanes = np.zeros(-(-length // 8) * 8, np.float32)
            lanes[:length] = e
            total = tree8(np.cumsum(lanes.reshape(-1, 8), axis=0, dtype=np.float32)[-1])
            if not np.isfinite(s).all():
                total = np.float32(np.nan)
            out[i, h] = np.cumsum(e[:, None] * v, axis=0, dtype=np.float32)[-1] / total
    return out.reshape(n, heads * hd)


def spread(fn: Callable[[int, int], None], n: int, work: int, pool: kernels.Pool | None = None) -> None:
    """Run fn(a, b) over contiguous parts of range(n), one per thread of the pool (the caller
    takes the first). numpy releases the GIL in ufuncs, so the parts run in parallel; each item
    is computed alike whatever the split, so results do not depend on the thread count. Below
    SPREAD_MIN operations the hand-off would cost more than it saves."""
    pool = pool or kernels.default_pool()
    parts = min(pool.threads, n) if work >= SPREAD_MIN else 1
    if parts <= 1:
        fn(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [pool.executor.submit(fn, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()
