"""A small safetensors reader and writer in numpy (no torch).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping tensor
names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the
header), then the data. The reader checks the header before trusting it and maps the data, so
a tensor costs memory only when it is read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from ..errors import PyguardError

MAX_HEADER = 100 << 20  # a 100 MB header would be ~1M tensors: anything larger is corrupt
DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """Validated directory of one safetensors file; `read` returns float32 rows."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise PyguardError(f"{path}: not a safetensors file (only {size} bytes)")
                n = int.from_bytes(f.read(8), "little")
                if n > min(MAX_HEADER, size - 8):
                    raise PyguardError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
                raw = f.read(n)
        except OSError as e:
            raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
        self.tensors = _parse_header(path, raw, 8 + n, size)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of a tensor (all by default) as a new float32 array."""
        t = self.tensors[name]
        if t.dtype not in DTYPES:
            raise PyguardError(f"{self.path}: tensor {name} has dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        dtype, item = DTYPES[t.dtype]
        row_bytes = item * math.prod(t.shape[1:])
        n_rows = t.shape[0] if t.shape else 1
        r0, r1, _ = rows.indices(n_rows)
        a = np.empty((max(r1 - r0, 0),) + t.shape[1:] if t.shape else (), dtype)
        # read, not mmap: mapped pages would count in the converter's resident memory
        with open(self.path, "rb") as f:
            f.seek(t.begin + r0 * row_bytes)
            if f.readinto(memoryview(a).cast("B")) != a.nbytes:
                raise PyguardError(f"{self.path}: truncated while reading {name}")
        if t.dtype == "BF16":  # bf16 is the top half of a float32 (shifted in place: one float32 copy, not two)
            u = a.astype(np.uint32)
            u <<= 16
            return u.view(np.float32)
        return a.astype(np.float32)


def _parse_header(path: str, raw: bytes, data_start: int, size: int) -> dict[str, TensorInfo]:
    def bad(why: str) -> PyguardError:
        return PyguardError(f"{path}: corrupt safetensors header: {why}")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or not isinstance(e.get("shape"), list) \
                or not isinstance(e.get("data_offsets"), list):
            raise bad(f"entry {name!r:.80} lacks dtype, shape or data_offsets")
        shape, offs, dtype = e["shape"], e["data_offsets"], e.get("dtype")
        if not all(type(d) is int and 0 <= d < 1 << 40 for d in shape) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise bad(f"entry {name!r:.80} has an invalid shape or offsets")
        begin, end = data_start + offs[0], data_start + offs[1]
        if not data_start <= begin <= end <= size:
            raise bad(f"tensor {name!r} lies outside the file (truncated?)")
        if dtype in DTYPES and end - begin != DTYPES[dtype][1] * math.prod(shape):  # Python ints: no overflow
            raise bad(f"tensor {name!r}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
        out[name] = TensorInfo(dtype, tuple(shape), begin, end)
    spans = sorted((t.begin, t.end, n) for n, t in out.items() if t.end > t.begin)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"tensors {n0!r} and {n1!r} overlap")
    return out


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory (one file or shards with an index)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise PyguardError(f"{index}: not a valid safetensors index") from None
            shards = {}
            for name in files:
                if not isinstance(name, str) or os.path.basename(name) != name:
                    raise PyguardError(f"{index}: invalid shard name {name!r}")
                if not os.path.exists(os.path.join(directory, name)):
                    raise PyguardError(f"{index}: shard {name} is missing")
                shards[name] = SafetensorsFile(os.path.join(directory, name))
        elif os.path.exists(single):
            shards = {"model.safetensors": SafetensorsFile(single)}
        else:
            raise PyguardError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.directory = directory
        self.where: dict[str, SafetensorsFile] = {}
        for s in shards.values():
            for t in s.tensors:
                if t in self.where:  # which one would be meant?
                    raise PyguardError(f"{s.path}: tensor {t} is also in {self.where[t].path}")
                self.where[t] = s

    def require(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check that every tensor the architecture needs is present, float, with its shape."""
        for name, shape in shapes.items():
            s = self.where.get(name)
            if s is None:
                raise PyguardError(f"{self.directory}: checkpoint lacks tensor {name}")
            t = s.tensors[name]
            if t.dtype not in DTYPES:
                raise PyguardError(f"{s.path}: tensor {name} has dtype {t.dtype}; supported: {', '.join(DTYPES)}")
            if t.shape != tuple(shape):
                raise PyguardError(f"{s.path}: tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        return self.where[name].read(name, rows)

    def rows(self, name: str) -> int:
        return self.where[name].tensors[name].shape[0]


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even as torch does (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write(path: str, specs: list[tuple[str, tuple[int, ...]]], make: Callable[[str], np.ndarray | Iterable[np.ndarray]],
          dtype: str = "F32") -> None:
    """Write float tensors as one safetensors file of dtype BF16, F16 or F32; specs gives
    (name, shape) in file order and make(name) each tensor, called one at a time: an array, or
    an iterator of its row blocks in order (a tensor larger than memory)."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = DTYPES[dtype][1] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in specs:
            a = make(name)
            if isinstance(a, np.ndarray):
                if a.shape != tuple(shape):
                    raise PyguardError(f"tensor {name}: shape {a.shape}, declared {tuple(shape)}")
                a = [a]
            rows = 0
            for b in a:
                if b.shape[1:] != tuple(shape[1:]):
                    raise PyguardError(f"tensor {name}: a block of shape {b.shape}, declared {tuple(shape)}")
                rows += b.shape[0] if b.ndim else 1
                f.write((to_bf16(b) if dtype == "BF16" else np.ascontiguousarray(b, dtype=DTYPES[dtype][0])).tobytes())
            if rows != (shape[0] if shape else 1):
                raise PyguardError(f"tensor {name}: {rows} rows made, declared {tuple(shape)}")
