"""The pyguard file: everything needed at run time in one memory-mapped file (docs/FORMAT.md).

    0   8  magic b"PYGUARD\\0"
    8   4  format version (uint32 little-endian)
    12  4  metadata length L
    16  4  CRC-32 of the metadata
    20  4  zero
    24  8  data offset D (a multiple of 4096)
    32  L  metadata: UTF-8 JSON (config, quantization, tokenizer specials, head ids, family,
           and the directory of arrays with their offsets, sizes and CRC-32s)
    D   .. array data, each array 64-byte aligned

Loading checks the header, the metadata CRC and every directory entry (offsets inside the
file, aligned, not overlapping, sizes matching shapes), then maps the arrays without reading
them. `verify` reads everything and checks every array's CRC.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .config import ModelConfig, tensor_plan
from .errors import PyguardError
from .quant import QTensor, check_shape

MAGIC = b"PYGUARD\0"
VERSION = 1
HEADER = 32
ALIGN = 64
PAGE = 4096
DTYPES = {"u8": np.uint8, "f16": np.float16, "f32": np.float32, "u32": np.uint32}
CRC_WIDTH = 8  # hex digits: fixed so the metadata keeps its length when CRCs are filled in


@dataclass
class PgFile:
    """A loaded pyguard file: arrays are read-only views of the mapped file."""

    path: str
    config: ModelConfig
    tensors: dict[str, QTensor | np.ndarray]
    head_ids: list[int] | None  # vocabulary id of each row of a pruned output head
    family: str | None  # prompt family ("llama-guard-3-1b", "llama-guard-3-8b") or None
    meta: dict[str, Any]
    tokenizer_ranks: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)  # (bytes, offsets)

    def tokenizer(self):
        """The file's Tokenizer, or a PyguardError if the checkpoint's could not be represented."""
        from .tokenizer import Tokenizer

        if self.tokenizer_ranks is None:
            raise PyguardError(f"{self.path}: holds no tokenizer ({self.meta.get('tokenizer_note', 'none was converted')})")
        data, offsets = self.tokenizer_ranks
        blob = data.tobytes()
        ranks = {blob[offsets[i] : offsets[i + 1]]: i for i in range(len(offsets) - 1)}
        return Tokenizer(ranks, dict(self.meta["special_tokens"]), self.meta.get("tokenizer_pattern"))


def _arrays_of(name: str, t: QTensor | np.ndarray) -> list[tuple[str, np.ndarray]]:
    if isinstance(t, QTensor):
        return [(f"{name}.qs", t.qs), (f"{name}.scales", t.scales), (f"{name}.rowsum", t.rowsum)]
    return [(name, t)]


def _dtype_name(a: np.ndarray) -> str:
    for k, v in DTYPES.items():
        if a.dtype == v:
            return k
    raise PyguardError(f"cannot store arrays of dtype {a.dtype}")


class Writer:
    """Writes a pyguard file whose directory is known up front (shapes and dtypes), arrays
    then arriving in directory order, possibly in row chunks. Writes to `path + ".part"` and
    renames on `close`, so a failed conversion never leaves a half-written file behind."""

    def __init__(self, path: str, meta: dict[str, Any], layout: list[tuple[str, str, tuple[int, ...]]]):
        """layout: (array name, dtype name, shape) in the order the data will be written."""
        self.path, self.tmp = path, path + ".part"
        self.meta = dict(meta)
        directory, offset = [], 0
        for name, dtype, shape in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            directory.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes, "crc32": "0" * CRC_WIDTH})
            offset += -(-nbytes // ALIGN) * ALIGN
        self.meta["arrays"] = directory
        raw = self._meta_bytes()
        self.data_offset = -(-(HEADER + len(raw)) // PAGE) * PAGE
        self.total = self.data_offset + offset
        self.index, self.written, self.crc = 0, 0, 0
        self.f = open(self.tmp, "wb")
        self.f.truncate(self.total)
        self.f.seek(self.data_offset)

    def _meta_bytes(self) -> bytes:
        return json.dumps(self.meta, separators=(",", ":")).encode("utf-8")

    def append(self, a: np.ndarray) -> None:
        """The next rows of the current array (dtype must match the directory)."""
        e = self.meta["arrays"][self.index]
        b = np.ascontiguousarray(a, dtype=DTYPES[e["dtype"]]).tobytes()
        if self.written + len(b) > e["nbytes"]:
            raise PyguardError(f"internal error: too much data for array {e['name']}")
        self.f.write(b)
        self.crc = zlib.crc32(b, self.crc)
        self.written += len(b)
        if self.written == e["nbytes"]:
            e["crc32"] = f"{self.crc:0{CRC_WIDTH}x}"
            self.f.seek(self.data_offset + (self.meta["arrays"][self.index + 1]["offset"] if self.index + 1 < len(self.meta["arrays"]) else self.total - self.data_offset))
            self.index, self.written, self.crc = self.index + 1, 0, 0

    def close(self) -> None:
        """Write the header and metadata, then move the file into place."""
        if self.index != len(self.meta["arrays"]):
            raise PyguardError(f"internal error: array {self.meta['arrays'][self.index]['name']} not written")
        raw = self._meta_bytes()
        self.f.seek(0)
        self.f.write(MAGIC + VERSION.to_bytes(4, "little") + len(raw).to_bytes(4, "little"))
        self.f.write(zlib.crc32(raw).to_bytes(4, "little") + bytes(4) + self.data_offset.to_bytes(8, "little"))
        self.f.write(raw)
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def save(path: str, config: ModelConfig, tensors: dict[str, QTensor | np.ndarray], head_ids=None, family=None,
         tokenizer=None, extra: dict | None = None) -> None:
    """Write in-memory tensors (names of config.tensor_plan) as a pyguard file; tokenizer: a
    Tokenizer or None."""
    group = next(t.group for t in tensors.values() if isinstance(t, QTensor))
    meta, arrays = header_meta(config, group, head_ids, family, tokenizer, extra), []
    if tokenizer is not None:
        arrays += tokenizer_arrays(tokenizer)
    for name, t in tensors.items():
        arrays += _arrays_of(name, t)
    w = Writer(path, meta, [(n, _dtype_name(a), a.shape) for n, a in arrays])
    try:
        for _, a in arrays:
            w.append(a)
        w.close()
    except BaseException:
        w.abort()
        raise


def header_meta(config: ModelConfig, group: int, head_ids, family, tokenizer, extra=None) -> dict[str, Any]:
    meta = {"config": config.to_dict(), "quant": {"group": group}, "head_ids": None if head_ids is None else [int(i) for i in head_ids], "family": family}
    meta["special_tokens"] = None if tokenizer is None else dict(tokenizer.special_tokens)
    meta["tokenizer_pattern"] = None if tokenizer is None else tokenizer.pattern
    meta.update(extra or {})
    return meta


def tokenizer_arrays(tokenizer) -> list[tuple[str, np.ndarray]]:
    """The ranks as (concatenated token bytes, offsets): token of rank i is bytes[off[i]:off[i+1]]."""
    by_rank = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise PyguardError("tokenizer ranks are not contiguous from 0")
    offsets = np.cumsum([0] + [len(b) for b, _ in by_rank], dtype=np.int64).astype(np.uint32)
    return [("tokenizer.bytes", np.frombuffer(b"".join(b for b, _ in by_rank), np.uint8)), ("tokenizer.offsets", offsets)]


def _read_header(path: str) -> tuple[mmap.mmap, dict, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER)
            if len(head) < HEADER or head[:8] != MAGIC:
                raise PyguardError(f"{path}: not a pyguard file (bad magic)")
            version = int.from_bytes(head[8:12], "little")
            if version != VERSION:
                raise PyguardError(f"{path}: pyguard file format version {version}, this pyguard reads version {VERSION}")
            n, crc = int.from_bytes(head[12:16], "little"), int.from_bytes(head[16:20], "little")
            data_offset = int.from_bytes(head[24:32], "little")
            if HEADER + n > size or data_offset < HEADER + n or data_offset % PAGE or data_offset > size:
                raise PyguardError(f"{path}: truncated or corrupt pyguard file (header)")
            raw = f.read(n)
            if zlib.crc32(raw) != crc:
                raise PyguardError(f"{path}: corrupt pyguard file (metadata checksum mismatch)")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise PyguardError(f"{path}: corrupt pyguard file (metadata is not JSON)") from None
    return m, meta, data_offset


def _directory(path: str, meta: dict, data_offset: int, size: int) -> dict[str, tuple[dict, Callable[[], np.ndarray]]]:
    def bad(why: str) -> PyguardError:
        return PyguardError(f"{path}: corrupt pyguard file ({why})")

    arrays = meta.get("arrays")
    if not isinstance(arrays, list):
        raise bad("no array directory")
    out, end = {}, data_offset
    for e in arrays:
        try:
            name, dtype, shape, offset, nbytes = e["name"], DTYPES[e["dtype"]], e["shape"], e["offset"], e["nbytes"]
            crc = int(e["crc32"], 16)
            ok = isinstance(name, str) and all(type(d) is int and 0 <= d < 1 << 40 for d in shape) and type(offset) is int and type(nbytes) is int
        except (KeyError, TypeError, ValueError):
            raise bad("malformed directory entry") from None
        if not ok or nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise bad(f"directory entry {name!r} is inconsistent")
        start = data_offset + offset
        if offset % ALIGN or start < end or start + nbytes > size:
            raise bad(f"array {name!r} overlaps another or lies outside the file (truncated?)")
        end = start + nbytes
        out[name] = (dict(e, crc32=crc, start=start), dtype, tuple(shape))
    return out


def load(path: str) -> PgFile:
    """Map a pyguard file; checks header, metadata and directory, not the tensor data."""
    m, meta, data_offset = _read_header(path)
    directory = _directory(path, meta, data_offset, len(m))

    def array(name: str) -> np.ndarray:
        if name not in directory:
            raise PyguardError(f"{path}: array {name!r} is missing")
        e, dtype, shape = directory[name]
        return np.frombuffer(m, dtype, int(np.prod(shape, dtype=np.int64)), e["start"]).reshape(shape)

    try:
        config = ModelConfig.from_dict(meta["config"])
        config.validate()
        head_ids, family, quant = meta["head_ids"], meta["family"], meta["quant"]
        group = int(quant["group"])
    except (KeyError, TypeError, ValueError) as e:
        raise PyguardError(f"{path}: corrupt pyguard file (metadata field {e})") from None
    tensors: dict[str, QTensor | np.ndarray] = {}
    for name, _, quantized in tensor_plan(config):
        if name == "output" and config.tie_embeddings and f"output.qs" not in directory:
            continue
        if not quantized:
            tensors[name] = array(name)
            continue
        qs, scales, rowsum = array(f"{name}.qs"), array(f"{name}.scales"), array(f"{name}.rowsum")
        rows, k = qs.shape[0], qs.shape[1] * 2 if qs.ndim == 2 else 0
        if qs.ndim != 2 or k == 0 or scales.shape != (rows, k // group) or rowsum.shape != (rows,):
            raise PyguardError(f"{path}: corrupt pyguard file (tensor {name!r} has inconsistent parts)")
        check_shape(k, group)
        tensors[name] = QTensor(qs, scales, rowsum, group)
    ranks = None
    if "tokenizer.bytes" in directory:
        ranks = (array("tokenizer.bytes"), array("tokenizer.offsets").astype(np.int64))
        for n in ("tokenizer.bytes", "tokenizer.offsets"):
            _check_crc(path, m, n, directory[n][0])
        off = ranks[1]
        if len(off) < 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != len(ranks[0]):
            raise PyguardError(f"{path}: corrupt pyguard file (tokenizer offsets)")
    return PgFile(path, config, tensors, head_ids, family, meta, ranks)


def _check_crc(path: str, m: mmap.mmap, name: str, e: dict) -> None:
    crc = 0
    for i in range(e["start"], e["start"] + e["nbytes"], 64 << 20):
        crc = zlib.crc32(m[i : min(i + (64 << 20), e["start"] + e["nbytes"])], crc)
    if crc != e["crc32"]:
        raise PyguardError(f"{path}: array {name!r} is corrupt (checksum mismatch)")


def verify(path: str, progress: Callable[[int, int], None] | None = None) -> int:
    """Check every array's CRC-32; returns the number of arrays. progress(done, total) bytes."""
    m, meta, data_offset = _read_header(path)
    directory = _directory(path, meta, data_offset, len(m))
    total, done = sum(e["nbytes"] for e, _, _ in directory.values()), 0
    for name, (e, _, _) in directory.items():
        _check_crc(path, m, name, e)
        done += e["nbytes"]
        if progress:
            progress(done, total)
    return len(directory)
