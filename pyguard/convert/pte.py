"""Meta's Llama Guard 3-1B-INT4 as published: an ExecuTorch program (`.pte`) -> a pyguard file.

`meta-llama/Llama-Guard-3-1B-INT4` ships `*.pte` (an ExecuTorch program whose linear layers are
delegated to XNNPACK), `params.json` and `tokenizer.model`. This module reads the program with
pyguard's own bounds-checked flatbuffer reader (`flatbuffer.py`; schemas: ExecuTorch
`schema/program.fbs` and XNNPACK's `backends/xnnpack/serialization/schema.fbs`; no ExecuTorch
or torch needed) and writes the weights as they are:

- linear layers: XNNPACK `qbint4` (int4 + 8, two per byte, even column in the low nibble, one
  bf16 scale per group) -> pyguard's 64-column nibble blocks, values untouched; bf16 scales
  -> fp16 (exact for every scale in [2^-17, 65504], which trained int4 scales are; any that is
  not is counted and reported);
- the embedding: `quantized_decomposed::embedding_4bit` (int4 + 8, even column in the high
  nibble, fp32/bf16/fp16 scales per group) -> the same layout, fp32 scales rounded to fp16
  (the loss, at most 2^-11 relative per scale, is reported);
- q and k rows from Meta's interleaved rotary layout to Hugging Face's "rotate half" (a row
  permutation, with their scales);
- the pruned head and its vocabulary ids (the `index_put` that scatters its 20 logits).

The program's structure is checked against `params.json`: one `forward`, only the operators
of the Llama export, four delegates per layer plus the head, every weight of the expected
shape, norm epsilons and rotary tables matching the geometry. Anything else is one
PyguardError naming what was found.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..formats import quant
from ..formats.config import ModelConfig, tensor_plan
from ..errors import PyguardError
from ..formats.file import Writer, header_meta, tokenizer_arrays
from .flatbuffer import Buf, Table
from .hf import wrote

# ---------------------------------------------------------------------------------------------
# The ExecuTorch program (schema/program.fbs).

# KernelTypes union members
_NULL, _INT, _BOOL, _DOUBLE, _TENSOR, _STRING, _INT_LIST, _DOUBLE_LIST, _BOOL_LIST, _TENSOR_LIST, _OPT_TENSOR_LIST = range(1, 12)
_KERNEL_CALL, _DELEGATE_CALL = 1, 2  # InstructionArguments members
_SCALAR_TYPES = {0: np.uint8, 1: np.int8, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32, 15: "bf16"}
# Every operator a Llama export with the 1B-INT4 recipe uses: anything else is another model.
OPERATORS = {
    "aten::full", "aten::sym_size", "quantized_decomposed::embedding_4bit", "aten::select_copy", "aten::mul",
    "aten::_local_scalar_dense", "executorch_prim::add", "executorch_prim::sub", "aten::mean", "aten::slice_copy",
    "aten::add", "aten::sub", "executorch_prim::et_view", "aten::view_copy", "aten::rsqrt", "llama::update_cache",
    "aten::squeeze_copy", "aten::unsqueeze_copy", "aten::cat", "llama::custom_sdpa", "aten::sigmoid",
    "aten::index_put", "aten::_to_copy", "dim_order_ops::_to_dim_order_copy", "aten::clone",
}
UINT64_MAX = (1 << 64) - 1
# Kernel arguments pyguard reads by position: an instruction of one of these operators needs at
# least this many (the last reads plus the output after them); every kernel needs its output
# (the last argument, followed by _reaches). Fewer is not a Llama export.
MIN_ARGS = {"quantized_decomposed::embedding_4bit": 6, "aten::mul": 3, "aten::add": 3, "llama::custom_sdpa": 4,
            "aten::index_put": 3, "aten::slice_copy": 2, "llama::update_cache": 3}


@dataclass
class _Call:
    op: str  # operator name, or "delegate"
    args: list[int]
    delegate: int = -1


@dataclass
class Program:
    """The parts of a .pte pyguard needs: the values, the instruction list, the data."""

    path: str
    values: list  # ("tensor", dtype, sizes, data_buffer_idx, external) | ("int", v) | ("double", v) | ("ints", v) | ("list", value ids) | ("other", type)
    calls: list[_Call]
    delegates: list[tuple[str, memoryview]]  # (backend id, payload)
    data: memoryview = field(repr=False)
    constant: Callable[[int], memoryview] = field(repr=False)  # data of constant buffer i
    named: dict[str, memoryview] = field(repr=False)
    methods: dict[str, int] = field(default_factory=dict)  # constant methods: get_n_layers, get_vocab_size, ...

    def tensor(self, v: int, dtype: list, sizes: list[int] | None = None, what: str = "tensor") -> np.ndarray:
        """The data of constant tensor value v, of one of the dtypes listed (numpy types or
        "bf16"; a program's scalar type pyguard does not know is never one), as a numpy array
        (bf16 widened to float32)."""
        t = self.value(v)
        if t[0] != "tensor" or t[3] <= 0:
            raise PyguardError(f"{self.path}: {what} (value {v}) is not a constant tensor")
        _, dt, shape, idx, external = t
        if external:
            raise PyguardError(f"{self.path}: {what} is stored outside the .pte (external data is not supported)")
        if dt not in dtype:
            raise PyguardError(f"{self.path}: {what} has dtype {dt}, expected {' or '.join(map(str, dtype))}")
        if sizes is not None and list(shape) != list(sizes):
            raise PyguardError(f"{self.path}: {what} has shape {list(shape)}, expected {list(sizes)}")
        n = math.prod(shape)
        raw = self.constant(idx)
        width = 2 if dt == "bf16" else np.dtype(dt).itemsize
        if len(raw) < n * width:
            raise PyguardError(f"{self.path}: {what} holds {len(raw)} bytes, its shape needs {n * width} (truncated?)")
        if dt == "bf16":
            return _bf16(np.frombuffer(raw, np.uint16, n)).reshape(shape)
        return np.frombuffer(raw, dt, n).reshape(shape)

    def value(self, v: int):
        if not 0 <= v < len(self.values):
            raise PyguardError(f"{self.path}: value index {v} out of range")
        return self.values[v]


def _bf16(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def read_program(path: str) -> Program:
    """Parse and check a .pte file's framing, its one `forward` plan and its data references."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 64:
                raise PyguardError(f"{path}: not an ExecuTorch program ({size} bytes)")
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    if bytes(data[4:8]) != b"ET12":
        raise PyguardError(f"{path}: not an ExecuTorch program (file identifier {bytes(data[4:8])!r}, expected b'ET12')")
    program_size, base = len(data), 0
    if bytes(data[8:12]) == b"eh00":  # extended header: program size, then where the segments start
        hlen, program_size, base = struct.unpack_from("<IQQ", data, 12)
        if hlen < 24 or program_size > size or base > size or (base and base < program_size):
            raise PyguardError(f"{path}: corrupt ExecuTorch header (program {program_size}, segments at {base}, file {size} bytes)")
    buf = Buf(data[:program_size], path)
    prog = buf.root()
    segments = [(s.scalar(0, "Q"), s.scalar(1, "Q")) for s in prog.tables(4)]
    for off, n in segments:
        if base + off + n > size:
            raise PyguardError(f"{path}: truncated (a data segment ends at {base + off + n}, the file at {size})")

    def segment(i: int) -> memoryview:
        if not 0 <= i < len(segments):
            raise PyguardError(f"{path}: data segment {i} does not exist ({len(segments)} segments)")
        off, n = segments[i]
        return data[base + off : base + off + n]

    inline = prog.tables(2)  # constant_buffer (older programs)
    const_seg = prog.table(5)
    offsets = const_seg.scalars(1, "Q") if const_seg else []

    def constant(i: int) -> memoryview:
        if inline:
            if not 0 < i < len(inline):
                raise PyguardError(f"{path}: constant buffer {i} does not exist")
            return inline[i].blob(0)
        if not 0 < i < len(offsets):
            raise PyguardError(f"{path}: constant {i} does not exist ({len(offsets)} constants)")
        seg = segment(const_seg.scalar(0, "I"))
        if offsets[i] > len(seg):
            raise PyguardError(f"{path}: constant {i} lies outside its segment")
        return seg[offsets[i] :]

    named = {}
    for nd in prog.tables(7):
        named[nd.string(0)] = segment(nd.scalar(1, "I"))

    plans = {p.string(0): p for p in prog.tables(1)}
    if "forward" not in plans:
        raise PyguardError(f"{path}: no method 'forward' (found {sorted(plans)})")
    # export_llama adds constant methods (get_n_layers, get_vocab_size, ...): kept to cross-check params.json
    constants = {}
    for name, p in plans.items():
        vals, outs = p.tables(2), p.scalars(4, "i")
        if name != "forward" and len(outs) == 1 and 0 <= outs[0] < len(vals) and _value(vals[outs[0]])[0] == "int":
            constants[name] = _value(vals[outs[0]])[1]
    plan = plans["forward"]
    values = [_value(e) for e in plan.tables(2)]
    operators = [o.string(0) or "" for o in plan.tables(6)]  # "": a nameless operator, unknown below
    unknown = sorted(set(operators) - OPERATORS)
    if unknown:
        raise PyguardError(f"{path}: unsupported operator {', '.join(map(str, unknown))} (not a Llama Guard 3-1B-INT4 export)")
    inline_delegates = prog.tables(3)
    delegates = []
    for d in plan.tables(7):
        ref = d.table(1)
        if ref is None:
            raise PyguardError(f"{path}: delegate without data")
        loc, idx = ref.scalar(0, "B"), ref.scalar(1, "I")
        if loc == 0:
            if idx >= len(inline_delegates):
                raise PyguardError(f"{path}: delegate data {idx} does not exist")
            payload = inline_delegates[idx].blob(0)
        else:
            payload = segment(idx)
        delegates.append((d.string(0), payload))
    chains = plan.tables(5)
    if len(chains) != 1:
        raise PyguardError(f"{path}: expected one chain of instructions, found {len(chains)}")
    calls = []
    for ins in chains[0].tables(2):
        kind, a = ins.union(0)
        if kind == _KERNEL_CALL and a is not None:
            k = a.scalar(0, "i")
            if not 0 <= k < len(operators):
                raise PyguardError(f"{path}: instruction calls operator {k}, which does not exist")
            args = a.scalars(1, "i")
            if len(args) < MIN_ARGS.get(operators[k], 1):
                raise PyguardError(f"{path}: a call of {operators[k]} with {len(args)} arguments, fewer than a Llama export's")
            calls.append(_Call(operators[k], args))
        elif kind == _DELEGATE_CALL and a is not None:
            k = a.scalar(0, "i")
            if not 0 <= k < len(delegates):
                raise PyguardError(f"{path}: instruction calls delegate {k}, which does not exist")
            calls.append(_Call("delegate", a.scalars(1, "i"), k))
        else:
            raise PyguardError(f"{path}: unsupported instruction kind {kind} (control flow or moves are not a Llama export)")
    for c in calls:
        for v in c.args:
            if not -1 <= v < len(values):
                raise PyguardError(f"{path}: an instruction refers to value {v}, which does not exist")
    return Program(path, values, calls, delegates, data, constant, named, constants)


def _value(e: Table):
    kind, t = e.union(0)
    if t is None:
        return ("other", kind)
    if kind == _TENSOR:
        st = t.scalar(0, "b")
        extra = t.table(9)
        external = extra is not None and extra.scalar(2, "b") == 1
        sizes = t.scalars(2, "i")
        if min(sizes, default=0) < 0:  # signed in the schema: a negative count would read the rest of the data
            raise e.buf.bad(f"a tensor of sizes {sizes}")
        return ("tensor", _SCALAR_TYPES.get(st, f"scalar type {st}"), sizes, t.scalar(5, "I"), external)
    if kind == _INT:
        return ("int", t.scalar(0, "q"))
    if kind == _DOUBLE:
        return ("double", t.scalar(0, "d"))
    if kind == _INT_LIST:
        return ("ints", t.scalars(0, "q"))
    if kind in (_TENSOR_LIST, _OPT_TENSOR_LIST):
        return ("list", t.scalars(0, "i"))
    return ("other", kind)


# ---------------------------------------------------------------------------------------------
# XNNPACK delegates (backends/xnnpack/serialization/schema.fbs): fully connected layers only.

_XNN_FC, _XNN_CONVERT = 2, 18  # XNodeUnion members pyguard accepts
_XNN_TENSOR, _XNN_QTENSOR = 1, 2  # XValueUnion
_XNN_QBINT4, _XNN_FP32 = 10, 1  # XNNDatatype
_PER_CHANNEL_GROUP = 4  # XNNQuantParams member
_EXTERNAL_OUTPUT = 2  # XNNTensorValue flag


@dataclass
class Linear:
    """One XNNPACK fully connected layer: int8 values [M, K] in -8..7 and float32 scales [M, K/G]."""

    q: np.ndarray
    scales: np.ndarray
    group: int
    out_value: int  # the program value its output is written to


def delegate_linears(prog: Program, call: _Call) -> list[Linear]:
    """The fully connected layers of one XNNPACK delegate call, in graph order."""
    backend, payload = prog.delegates[call.delegate]
    what = f"{prog.path}: delegate {call.delegate}"
    if backend != "XnnpackBackend":
        raise PyguardError(f"{what}: backend {backend!r} is not supported (only XnnpackBackend)")
    if len(payload) < 30 or bytes(payload[4:8]) != b"XH00":
        raise PyguardError(f"{what}: not an XNNPACK payload (no XH00 header)")
    fb_off, fb_size, c_off, c_size = struct.unpack_from("<IIIQ", payload, 10)
    if fb_off + fb_size > len(payload) or c_off + c_size > len(payload):
        raise PyguardError(f"{what}: truncated XNNPACK payload")
    graph = Buf(payload[fb_off : fb_off + fb_size], what).root()
    consts = graph.tables(8)

    def constant(i: int, n: int, name: str) -> memoryview:
        if not 0 < i < len(consts):
            raise PyguardError(f"{what}: {name} refers to constant {i}, which does not exist")
        off, size, key = consts[i].scalar(0, "Q"), consts[i].scalar(1, "Q"), consts[i].string(2)
        if off == UINT64_MAX:
            if key not in prog.named:
                raise PyguardError(f"{what}: {name} refers to named data {key!r}, which the program does not hold")
            raw = prog.named[key]
        else:
            raw = payload[c_off + off : c_off + off + size] if off + size <= c_size else memoryview(b"")
        if len(raw) < n or size < n:
            raise PyguardError(f"{what}: {name} holds {min(len(raw), size)} bytes, needs {n} (truncated?)")
        return raw[:n]

    xvalues = graph.tables(2)

    def xvalue(i: int) -> tuple[int, Table | None, Table]:
        if not 0 <= i < len(xvalues):
            raise PyguardError(f"{what}: value {i} does not exist")
        kind, v = xvalues[i].union(0)
        if v is None or kind not in (_XNN_TENSOR, _XNN_QTENSOR):
            raise PyguardError(f"{what}: value {i} is not a tensor")
        if kind == _XNN_TENSOR:
            return kind, None, v
        t = v.table(0)  # a quantized tensor's tensor part
        if t is None:
            raise PyguardError(f"{what}: value {i} is a quantized tensor without its tensor")
        return kind, v, t

    out = []
    for node in graph.tables(1):
        kind, n = node.union(0)
        if kind == _XNN_CONVERT:  # the dynamic int8 quantization of the input
            continue
        if kind != _XNN_FC or n is None:
            raise PyguardError(f"{what}: unsupported XNNPACK operation (node type {kind}; only fully connected layers are)")
        if n.scalar(2, "I", 0) != 0xFFFFFFFF:  # XNNPACK's invalid id: no bias
            raise PyguardError(f"{what}: a linear layer with a bias is not a Llama layer")
        _, qv, tv = xvalue(n.scalar(1, "I"))
        dtype, dims = tv.scalar(0, "h"), tv.scalars(2, "I")
        ptype, p = (qv.union(1) if qv is not None else (0, None))
        if dtype != _XNN_QBINT4 or ptype != _PER_CHANNEL_GROUP or p is None or len(dims) != 2:
            raise PyguardError(f"{what}: linear weights of XNNPACK type {dtype} with {len(dims)} dims; only int4 in groups (qbint4, 8da4w) is supported")
        m, k = dims
        group = p.scalar(2, "i")
        if group <= 0 or k % group or k % 2:
            raise PyguardError(f"{what}: group size {group} does not divide the {k} inputs")
        packed = np.frombuffer(constant(tv.scalar(3, "I"), m * k // 2, "weights"), np.uint8).reshape(m, k // 2)
        # qbint4: value + 8, column 2j in the low nibble of byte j, 2j + 1 in the high nibble
        q = np.empty((m, k), np.int8)
        q[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
        q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
        ns = m * (k // group)
        if p.scalar(5, "I") != ns:
            raise PyguardError(f"{what}: {p.scalar(5, 'I')} scales for a {m}x{k} matrix in groups of {group}")
        raw = constant(p.scalar(4, "I"), 2 * ns, "scales")  # bf16, as XNNPACK's qb4w takes them
        scales = _bf16(np.frombuffer(raw, np.uint16, ns)).reshape(m, k // group)
        _, _, ov = xvalue(n.scalar(3, "I"))
        ext = ov.scalar(4, "I")
        if not ov.scalar(5, "I") & _EXTERNAL_OUTPUT or ext >= len(call.args):
            raise PyguardError(f"{what}: a linear layer's output does not leave the delegate")
        out.append(Linear(q, scales, group, call.args[ext]))
    return out


# ---------------------------------------------------------------------------------------------
# The Llama graph: which weight is which.


def read_params(src_dir: str) -> dict:
    path = os.path.join(src_dir, "params.json")
    try:
        with open(path, encoding="utf-8") as f:
            p = json.load(f)
    except FileNotFoundError:
        raise PyguardError(f"{src_dir}: no params.json (Meta's layout: a .pte, params.json and tokenizer.model)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise PyguardError(f"{path}: cannot parse ({e})") from None
    if not isinstance(p, dict):
        raise PyguardError(f"{path}: not a JSON object")
    return p


def config_from_params(p: dict, rope_factor: float | None) -> ModelConfig:
    """Meta's params.json -> ModelConfig; hidden_dim given, or from ffn_dim_multiplier / multiple_of
    as Meta's code computes it. rope_factor: the Llama 3 scaling factor (None: no scaling)."""

    def num(key: str, kind=int, default=None):
        v = p.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PyguardError(f"params.json: {key} must be a number, not {v!r}")
        if not (math.isfinite(v) and 0 < v < 1 << 31) or (kind is int and v != int(v)):
            raise PyguardError(f"params.json: {key} = {v} is out of range or not an integer")
        return kind(v)

    dim, heads = num("dim"), num("n_heads")
    if "hidden_dim" in p and p["hidden_dim"] is not None:
        hidden = num("hidden_dim")
    else:
        hidden = int(2 * (4 * dim) / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(num("ffn_dim_multiplier", float) * hidden)
        m = num("multiple_of", int, 256)
        hidden = -(-hidden // m) * m
    scaling = None
    if rope_factor is not None:
        scaling = {"factor": float(rope_factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ModelConfig(
        dim=dim, n_layers=num("n_layers"), n_heads=heads, n_kv_heads=num("n_kv_heads", int, heads),
        head_dim=num("head_dim", int, dim // heads), hidden_dim=hidden, vocab_size=num("vocab_size"),
        norm_eps=num("norm_eps", float, 1e-5), rope_theta=num("rope_theta", float, p.get("rope_freq_base", 10000.0)),
        rope_scaling=scaling, max_seq_len=131072 if scaling else 8192,
    )
    cfg.validate()
    return cfg


def _consumers(prog: Program) -> dict[int, list[tuple[int, int]]]:
    """value -> (call, argument position) of every call reading it, through tensor lists."""
    out: dict[int, list[tuple[int, int]]] = {}
    for i, c in enumerate(prog.calls):
        for pos, v in enumerate(c.args[:-1] if c.op != "delegate" else c.args):
            val = prog.value(v)
            for u in [v] + (val[1] if val[0] == "list" else []):
                out.setdefault(u, []).append((i, pos))
    return out


def _reaches(calls: list[_Call], consumers: dict, start: int, stops: set[str]) -> list[tuple[_Call, int]]:
    """(call, argument position) of every `stops` operator the value `start` flows into, through
    any other kernels (an out-variant kernel writes its last argument); delegates end a path."""
    seen, todo, hits = {start}, [start], []
    while todo:
        v = todo.pop()
        for i, pos in consumers.get(v, []):
            c = calls[i]
            if c.op in stops:
                hits.append((c, pos))
            elif c.op != "delegate" and c.args[-1] not in seen:
                seen.add(c.args[-1])
                todo.append(c.args[-1])
    return hits


def _role(calls, consumers, lin: Linear, sdpa_caches: tuple[set, set]) -> str:
    """'q', 'k', 'v' (by where the output meets attention), 'gate' (through a sigmoid) or '?'."""
    roles = set()
    for c, pos in _reaches(calls, consumers, lin.out_value, {"llama::custom_sdpa", "llama::update_cache", "aten::sigmoid"}):
        if c.op == "llama::custom_sdpa" and pos == 0:
            roles.add("q")
        elif c.op == "llama::update_cache" and pos == 0:
            roles.add("k" if c.args[1] in sdpa_caches[0] else "v" if c.args[1] in sdpa_caches[1] else "?")
        elif c.op == "aten::sigmoid":
            roles.add("gate")
        else:
            roles.add("?")
    return roles.pop() if len(roles) == 1 else "?"


def _to_hf_rows(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Meta's interleaved rotary rows (pair i, member j) -> Hugging Face's (member j, pair i), per head."""
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Extracted:
    config: ModelConfig
    tensors: dict  # pyguard name -> (int8 values, float32 scales) or float32 norm weight
    head_ids: list[int] | None
    linear_group: int
    embedding_group: int
    rope_note: str


def extract(prog: Program, params: dict) -> Extracted:
    """Map the program's weights onto pyguard's tensors, checking the structure on the way."""
    path, calls = prog.path, prog.calls
    base = config_from_params(params, None)
    c = base
    for method, want in (("get_n_layers", c.n_layers), ("get_vocab_size", c.vocab_size)):
        if method in prog.methods and prog.methods[method] != want:
            raise PyguardError(f"{path}: the program's {method} is {prog.methods[method]}, params.json says {want}")
    consumers = _consumers(prog)
    emb = [x for x in calls if x.op == "quantized_decomposed::embedding_4bit"]
    if len(emb) != 1:
        raise PyguardError(f"{path}: expected one 4-bit embedding, found {len(emb)}")
    e = emb[0].args
    if prog.value(e[2])[0] != "other" or prog.value(e[3]) != ("int", -8) or prog.value(e[4]) != ("int", 7):
        raise PyguardError(f"{path}: embedding quantization is not symmetric int4 (-8..7, no zero points)")
    eq = prog.tensor(e[0], [np.uint8], [c.vocab_size, c.dim // 2], "embedding weights")
    sv = prog.value(e[1])
    shape = sv[2] + [1] if sv[0] == "tensor" and len(sv[2]) == 1 else sv[2] if sv[0] == "tensor" else []  # [V]: one group per row
    if len(shape) != 2 or shape[0] != c.vocab_size or shape[1] < 1 or c.dim % shape[1]:
        raise PyguardError(f"{path}: embedding scales of shape {sv[2] if sv[0] == 'tensor' else sv[0]} do not fit {c.vocab_size}x{c.dim}")
    escales = prog.tensor(e[1], [np.float32, np.float16, "bf16"], None, "embedding scales").astype(np.float32).reshape(shape)
    emb_group = c.dim // escales.shape[1]
    q = np.empty((c.vocab_size, c.dim), np.int8)  # embedding_4bit: column 2j in the high nibble
    q[:, 0::2] = (eq >> 4).astype(np.int8) - 8
    q[:, 1::2] = (eq & 0x0F).astype(np.int8) - 8
    tensors: dict = {"tok_embeddings": (q, escales)}

    # RMSNorm weights: the constant [dim] operand of the multiplications, in program order
    norms = [prog.tensor(x.args[1], [np.float32, np.float16, "bf16"], None, "norm weight").astype(np.float32)
             for x in calls if x.op == "aten::mul" and prog.value(x.args[1])[0] == "tensor" and prog.value(x.args[1])[3] > 0]
    if len(norms) != 2 * c.n_layers + 1 or any(n.shape != (c.dim,) for n in norms):
        raise PyguardError(f"{path}: found {len(norms)} norm weights, a {c.n_layers}-layer model of dim {c.dim} has {2 * c.n_layers + 1}")
    eps = {float(prog.tensor(x.args[1], [np.float32, np.float16, "bf16"], [], "norm epsilon")) for x in calls if x.op == "aten::add" and prog.value(x.args[1])[0] == "tensor"
           and prog.value(x.args[1])[3] > 0 and prog.value(x.args[1])[2] == []}
    if eps != {float(np.float32(c.norm_eps))}:
        raise PyguardError(f"{path}: norm epsilon {sorted(eps)} does not match params.json's {c.norm_eps}")

    sdpa = [x for x in calls if x.op == "llama::custom_sdpa"]
    if len(sdpa) != c.n_layers:
        raise PyguardError(f"{path}: {len(sdpa)} attention calls for {c.n_layers} layers")
    for x in sdpa:
        scale = prog.value(x.args[7]) if len(x.args) > 7 else ("other", 0)
        if scale[0] == "double" and not math.isclose(scale[1], c.head_dim ** -0.5, rel_tol=1e-6):
            raise PyguardError(f"{path}: attention scale {scale[1]} is not 1/sqrt(head_dim)")
    caches = ({x.args[1] for x in sdpa}, {x.args[2] for x in sdpa})
    delegate_calls = [x for x in calls if x.op == "delegate"]
    if len(delegate_calls) != 4 * c.n_layers + 1:
        raise PyguardError(f"{path}: {len(delegate_calls)} XNNPACK delegates, a {c.n_layers}-layer model has {4 * c.n_layers + 1}")
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    groups = set()

    def take(call: _Call, want: list[tuple[str, int, int]], layer: str) -> list[Linear]:
        lins = delegate_linears(prog, call)
        by_role = {}
        for lin in lins:
            role = _role(calls, consumers, lin, caches) if len(want) > 1 else want[0][0]
            by_role.setdefault(role, []).append(lin)
        if len(lins) == 2 and "gate" in by_role and len(by_role["gate"]) == 1:  # gate and up: the other is up
            by_role["up"] = [x for x in lins if x is not by_role["gate"][0]]
        out = []
        for role, m, k in want:
            found = by_role.get(role, [])
            if len(found) != 1 or found[0].q.shape != (m, k):
                shapes = [lin.q.shape for lin in lins]
                raise PyguardError(f"{path}: {layer}: expected {', '.join(f'{r} {m}x{k}' for r, m, k in want)}, found linear layers {shapes}")
            groups.add(found[0].group)
            out.append(found[0])
        return out

    for i in range(c.n_layers):
        d = delegate_calls[4 * i : 4 * i + 4]
        lq, lk, lv = take(d[0], [("q", q_rows, c.dim), ("k", kv_rows, c.dim), ("v", kv_rows, c.dim)], f"layer {i} attention")
        (lo,) = take(d[1], [("o", c.dim, q_rows)], f"layer {i} output projection")
        lg, lu = take(d[2], [("gate", c.hidden_dim, c.dim), ("up", c.hidden_dim, c.dim)], f"layer {i} MLP")
        (ld,) = take(d[3], [("down", c.dim, c.hidden_dim)], f"layer {i} MLP down projection")
        qk = [(_to_hf_rows(x.q, h, c.head_dim), _to_hf_rows(x.scales, h, c.head_dim)) for x, h in ((lq, c.n_heads), (lk, c.n_kv_heads))]
        tensors[f"layers.{i}.attention_norm"] = norms[2 * i]
        tensors[f"layers.{i}.wqkv"] = (np.concatenate([qk[0][0], qk[1][0], lv.q]), np.concatenate([qk[0][1], qk[1][1], lv.scales]))
        tensors[f"layers.{i}.wo"] = (lo.q, lo.scales)
        tensors[f"layers.{i}.ffn_norm"] = norms[2 * i + 1]
        tensors[f"layers.{i}.w13"] = (np.concatenate([lg.q, lu.q]), np.concatenate([lg.scales, lu.scales]))
        tensors[f"layers.{i}.w2"] = (ld.q, ld.scales)
    tensors["norm"] = norms[-1]
    head = delegate_linears(prog, delegate_calls[-1])
    if len(head) != 1 or head[0].q.shape[1] != c.dim:
        raise PyguardError(f"{path}: the output head is {[h.q.shape for h in head]}, expected one linear layer of {c.dim} inputs")
    groups.add(head[0].group)
    tensors["output"] = (head[0].q, head[0].scales)
    head_ids = _head_ids(prog, head[0], c)
    if len(groups) != 1:
        raise PyguardError(f"{path}: linear layers use several group sizes {sorted(groups)}")
    cfg, rope_note = _rope_config(prog, params, base)
    return Extracted(cfg, tensors, head_ids, groups.pop(), emb_group, rope_note)


def _head_ids(prog: Program, head: Linear, c: ModelConfig) -> list[int] | None:
    """Vocabulary id of each head row: the indices the pruned logits are scattered to."""
    rows = head.q.shape[0]
    puts = [x for x in prog.calls if x.op == "aten::index_put"]
    if not puts:
        if rows != c.vocab_size:
            raise PyguardError(f"{prog.path}: a head of {rows} rows without a prune map (vocabulary {c.vocab_size})")
        return None
    if len(puts) != 1 or prog.value(puts[0].args[1])[0] != "list":
        raise PyguardError(f"{prog.path}: expected one scatter of the pruned head's logits, found {len(puts)}")
    idx = [v for v in prog.value(puts[0].args[1])[1] if v >= 0]
    if len(idx) != 1:
        raise PyguardError(f"{prog.path}: the pruned head's scatter has {len(idx)} index tensors, expected 1")
    ids = prog.tensor(idx[0], [np.int64, np.int32], [rows], "pruned head ids").astype(np.int64)
    if ids.min() < 0 or ids.max() >= c.vocab_size or len(set(ids.tolist())) != rows:
        raise PyguardError(f"{prog.path}: pruned head ids are not {rows} distinct vocabulary ids below {c.vocab_size}")
    return ids.tolist()


def _rope_config(prog: Program, params: dict, base: ModelConfig) -> tuple[ModelConfig, str]:
    """The config whose rotary frequencies the program's cos/sin tables hold: params.json's
    scaling (rope_scale_factor, default 32 as in Llama 3.2) if it matches, else the other Llama 3
    factor (ExecuTorch's `--model llama3` default is 8), else an error."""
    import dataclasses

    from ..engine.model import rope_frequencies

    tables = []
    for x in prog.calls:
        if x.op == "aten::slice_copy":
            v = prog.value(x.args[0])
            if v[0] == "tensor" and v[3] > 0 and len(v[2]) == 2 and v[2][1] == base.head_dim // 2 and x.args[0] not in [t[0] for t in tables]:
                tables.append((x.args[0], prog.tensor(x.args[0], [np.float32, np.float16, "bf16"], None, "rotary table").astype(np.float64)))
    if len(tables) != 2 or min(len(a) for _, a in tables) < 2:  # one row (position 0) matches any rotary setting
        raise PyguardError(f"{prog.path}: expected rotary cos and sin tables of {base.head_dim // 2} columns and at least 2 "
                           f"rows, found {[a.shape for _, a in tables]}")
    (_, a), (_, b) = tables
    cos, sin = (a, b) if np.all(a[0] == 1) else (b, a)
    n = len(cos)
    angle = np.arctan2(sin[n - 1], cos[n - 1])
    scaled = bool(params.get("use_scaled_rope", False))
    candidates = [float(params.get("rope_scale_factor", 32)), 32.0, 8.0] if scaled else [None]
    for factor in dict.fromkeys(candidates):
        cfg = dataclasses.replace(base, rope_scaling=config_from_params(params, factor).rope_scaling)
        want = np.float64(n - 1) * rope_frequencies(cfg).astype(np.float64)
        diff = np.abs((angle - want + np.pi) % (2 * np.pi) - np.pi)
        if np.all(diff <= 1e-5 + 4e-7 * want):
            note = "no scaling" if factor is None else f"Llama 3 scaling factor {factor:g}"
            return cfg, f"theta {cfg.rope_theta:g}, {note} (checked against the program's {n}-position tables)"
    raise PyguardError(f"{prog.path}: the program's rotary tables match no Llama 3 rotary setting of params.json (theta {base.rope_theta:g})")


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclass
class PteSummary:
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    head_rows: int
    embedding_group: int
    linear_group: int
    scales_note: str
    rope_note: str

    def text(self) -> str:
        return (f"{wrote(self.tensors, self.parameters, self.bytes)} from an ExecuTorch program: int4 values as stored, group sizes "
                f"{self.linear_group} (layers and head), {self.embedding_group} (embedding), head of {self.head_rows} rows; "
                f"scales: {self.scales_note}; rope: {self.rope_note}; {self.seconds:.1f} s")


def find_pte(src_dir: str) -> str:
    ptes = sorted(f for f in os.listdir(src_dir) if f.endswith(".pte")) if os.path.isdir(src_dir) else []
    if len(ptes) != 1:
        raise PyguardError(f"{src_dir}: expected one .pte file, found {len(ptes)}")
    return os.path.join(src_dir, ptes[0])


def is_pte_dir(path: str) -> bool:
    """True for a directory laid out like Meta's Llama Guard 3-1B-INT4 repository (a .pte and params.json)."""
    try:
        return os.path.isfile(os.path.join(path, "params.json")) and any(f.endswith(".pte") for f in os.listdir(path))
    except OSError:
        return False


def _stored_group(g: int) -> int:
    """The group a tensor of group g is stored with: g, or the largest pyguard group dividing it."""
    fits = [s for s in quant.GROUP_SIZES if g % s == 0]
    if not fits:
        raise PyguardError(f"group size {g} is not a multiple of any pyguard group size {quant.GROUP_SIZES}")
    return max(fits)


def _fp16_scales(s: np.ndarray) -> tuple[np.ndarray, int, float]:
    """fp16 scales, how many were not exact, and the largest relative change."""
    if not np.isfinite(s).all() or np.abs(s).max(initial=0) > 65504:
        raise PyguardError("scales beyond fp16's range (65504) or not finite")
    h = s.astype(np.float16)
    back = h.astype(np.float32)
    inexact = back != s
    rel = np.abs(back - s)[inexact] / np.abs(s[inexact])
    return h, int(inexact.sum()), float(rel.max(initial=0))


def convert_pte(src_dir: str, out_path: str, family: str = "llama-guard-3-1b",
                progress: Callable[[float, str], None] | None = None) -> PteSummary:
    """Convert Meta's layout (a .pte, params.json, tokenizer.model) to a pyguard file, written to
    a temporary name and renamed when complete."""
    from ..formats.tokenizer import Tokenizer

    t0 = time.time()
    prog = read_program(find_pte(src_dir))
    params = read_params(src_dir)
    x = extract(prog, params)
    cfg = x.config
    tok_path = os.path.join(src_dir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise PyguardError(f"{src_dir}: no tokenizer.model")
    tok = Tokenizer.from_file(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise PyguardError(f"the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    # each tensor keeps its group (a group-32 embedding beside group-256 layers, as Meta exports
    # it); a group pyguard has no kernel for is stored as the largest one dividing it, its scales
    # repeated (lossless)
    group, emb_group = _stored_group(x.linear_group), _stored_group(x.embedding_group)
    groups = {"tok_embeddings": emb_group} if emb_group != group else {}
    plan = [p[0] for p in tensor_plan(cfg)]
    layout = []
    for name in plan:
        t = x.tensors[name]
        if isinstance(t, tuple):
            m, k = t[0].shape
            g = groups.get(name, group)
            quant.check_shape(k, g)
            layout += [(f"{name}.qs", "u8", (m, k // 2)), (f"{name}.scales", "f16", (m, k // g)), (f"{name}.rowsum", "f32", (m,))]
        else:
            layout.append((name, "f32", t.shape))
    tok_arrays = tokenizer_arrays(tok)
    layout = [(n, "u8" if a.dtype == np.uint8 else "u32", a.shape) for n, a in tok_arrays] + layout
    inexact, worst, n_scales = {"linear": 0, "embedding": 0}, {"linear": 0.0, "embedding": 0.0}, 0
    packed = {}
    for name in plan:
        t = x.tensors[name]
        if not isinstance(t, tuple):
            continue
        q, s = t
        kind = "embedding" if name == "tok_embeddings" else "linear"
        h, bad, rel = _fp16_scales(s)
        inexact[kind] += bad
        worst[kind] = max(worst[kind], rel)
        n_scales += h.size
        packed[name] = np.repeat(h, (q.shape[1] // h.shape[1]) // groups.get(name, group), axis=1)
    notes = []
    for kind, src in (("linear", "bf16"), ("embedding", str(x.tensors["tok_embeddings"][1].dtype))):
        notes.append(f"{kind} -> fp16 " + ("exact" if not inexact[kind] else f"{inexact[kind]} rounded (max relative change {worst[kind]:.2g})"))
    scales_note = ", ".join(notes)
    extra = {"quant": {"group": group, **({"groups": groups} if groups else {}), "scales": f"f16 from the ExecuTorch program ({scales_note})", "activations": "uint8 asymmetric per token"},
             "head": "guard" if x.head_ids is not None else "full", "source": os.path.basename(os.path.abspath(src_dir)),
             "tokenizer_note": "tokenizer.model", "pte": {"linear_group": x.linear_group, "embedding_group": x.embedding_group, "rope": x.rope_note}}
    writer = Writer(out_path, header_meta(cfg, group, x.head_ids, family, tok, extra), layout)
    params_total = sum((t[0].size if isinstance(t, tuple) else t.size) for t in x.tensors.values())
    done = 0
    try:
        for _, a in tok_arrays:
            writer.append(a)
        for name in plan:
            t = x.tensors[name]
            if isinstance(t, tuple):
                qt = quant.pack_weights(t[0], packed.pop(name))
                writer.append(qt.qs)
                writer.append(qt.scales)
                writer.append(qt.rowsum)
                done += t[0].size
            else:
                writer.append(t)
                done += t.size
            if progress:
                progress(done / params_total, name)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return PteSummary(len(plan), params_total, os.path.getsize(out_path), time.time() - t0,
                      len(x.head_ids) if x.head_ids is not None else cfg.vocab_size, x.embedding_group,
                      x.linear_group, scales_note, x.rope_note)
