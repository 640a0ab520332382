"""The pyguard file: everything needed at run time in one memory-mapped file (docs/FORMAT.md).

    0   8  magic b"PYGUARD\\0"
    8   4  format version (uint32 little-endian): 2 (1, without int8 tensors, is still read)
    12  4  metadata length L
    16  4  CRC-32 of the metadata
    20  4  zero
    24  8  data offset D (a multiple of 4096)
    32  L  metadata: UTF-8 JSON (config, quantization, tokenizer specials, head ids, family,
           and the directory of arrays with their offsets, sizes and CRC-32s)
    D   .. array data, each array 64-byte aligned

Loading checks the header, the metadata CRC, the metadata's fields and every directory entry
against the layout the config implies (names, order, dtypes, shapes, sizes, alignment, extent
inside the file), then maps the big arrays without reading them. `verify` runs the same checks,
then reads everything: every array's CRC, and finite scales, row sums and norms.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .config import FAMILIES, ModelConfig, expected_shapes, tensor_plan
from ..errors import PyguardError
from .quant import GROUP_SIZES, Q8Tensor, QTensor, check_shape

MAGIC = b"PYGUARD\0"
VERSION = 2  # 2 added int8 tensors (quant.int8); version 1 files are read as before
READS = (1, 2)
INT8 = ("tok_embeddings", "output")  # the tensors that may be int8: only looked up, or a pruned or tied head
HEADER = 32
ALIGN = 64
PAGE = 4096
DTYPES = {"u8": np.uint8, "i8": np.int8, "f16": np.float16, "f32": np.float32, "u32": np.uint32}
CRC_WIDTH = 8  # hex digits: fixed so the metadata keeps its length when CRCs are filled in
MAX_META = 64 << 20  # metadata bytes; a real model's take ~100 KB


@dataclass
class PgFile:
    """A loaded pyguard file: arrays are read-only views of the mapped file."""

    path: str
    config: ModelConfig
    tensors: dict[str, QTensor | Q8Tensor | np.ndarray]
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


def _arrays_of(name: str, t: QTensor | Q8Tensor | np.ndarray) -> list[tuple[str, np.ndarray]]:
    if isinstance(t, QTensor):
        return [(f"{name}.qs", t.qs), (f"{name}.scales", t.scales), (f"{name}.rowsum", t.rowsum)]
    if isinstance(t, Q8Tensor):
        return [(f"{name}.q8", t.q), (f"{name}.scales", t.scales)]
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
            nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            directory.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes, "crc32": "0" * CRC_WIDTH})
            offset += -(-nbytes // ALIGN) * ALIGN
        self.meta["arrays"] = directory
        raw = self._meta_bytes()
        self.data_offset = -(-(HEADER + len(raw)) // PAGE) * PAGE
        self.total = self.data_offset + offset
        self.index, self.written, self.crc = 0, 0, 0
        self.f = open(self.tmp, "wb")
        try:  # a file size limit or quota can refuse the size: then no empty .part is left
            self.f.truncate(self.total)
            self.f.seek(self.data_offset)
        except BaseException:
            self.abort()
            raise

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


def save(path: str, config: ModelConfig, tensors: dict[str, QTensor | Q8Tensor | np.ndarray], head_ids=None, family=None,
         tokenizer=None, extra: dict | None = None) -> None:
    """Write in-memory tensors (names of config.tensor_plan; `output` is not stored when the
    embeddings are tied and the head is full) as a pyguard file; tokenizer: a Tokenizer or None."""
    qtensors = {name: t for name, t in tensors.items() if isinstance(t, QTensor)}
    group = max(sorted({t.group for t in qtensors.values()}), key=[t.group for t in qtensors.values()].count)  # the most common
    groups = {name: t.group for name, t in qtensors.items() if t.group != group}
    int8 = [name for name in INT8 if isinstance(tensors.get(name), Q8Tensor)]
    layout = tensor_layout(config, group, None if head_ids is None else len(head_ids), groups, int8)
    parts = {n: a for name, t in tensors.items() for n, a in _arrays_of(name, t)}
    arrays = tokenizer_arrays(tokenizer) if tokenizer is not None else []
    arrays += [(name, parts[name]) for name, _, _ in layout]
    meta = header_meta(config, group, head_ids, family, tokenizer, extra, groups, int8)
    w = Writer(path, meta, [(n, _dtype_name(a), a.shape) for n, a in arrays])
    try:
        for _, a in arrays:
            w.append(a)
        w.close()
    except BaseException:
        w.abort()
        raise


def header_meta(config: ModelConfig, group: int, head_ids, family, tokenizer, extra=None, groups=None, int8=()) -> dict[str, Any]:
    """groups: {tensor name: group size} of the tensors whose group is not `group`; int8: the
    tensors stored as int8 (of INT8). `extra` may add to `quant`, not replace its layout fields."""
    layout = {"group": group, **({"groups": dict(groups)} if groups else {}), **({"int8": list(int8)} if int8 else {})}
    meta = {"config": config.to_dict(), "head_ids": None if head_ids is None else [int(i) for i in head_ids], "family": family}
    meta["special_tokens"] = None if tokenizer is None else dict(tokenizer.special_tokens)
    meta["tokenizer_pattern"] = None if tokenizer is None else tokenizer.pattern
    meta.update(extra or {})
    meta["quant"] = {**meta.get("quant", {}), **layout}
    return meta


def tokenizer_arrays(tokenizer) -> list[tuple[str, np.ndarray]]:
    """The ranks as (concatenated token bytes, offsets): token of rank i is bytes[off[i]:off[i+1]]."""
    by_rank = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise PyguardError("tokenizer ranks are not contiguous from 0")
    offsets = np.cumsum([0] + [len(b) for b, _ in by_rank], dtype=np.int64).astype(np.uint32)
    return [("tokenizer.bytes", np.frombuffer(b"".join(b for b, _ in by_rank), np.uint8)), ("tokenizer.offsets", offsets)]


def tensor_layout(config: ModelConfig, group: int, head_rows: int | None,
                  groups: dict[str, int] | None = None, int8: Sequence[str] = ()) -> list[tuple[str, str, tuple[int, ...]]]:
    """(array name, dtype name, shape) of every tensor's arrays, in file order. head_rows: rows
    of a pruned output head; None for a full head, which is left out when the embeddings are
    tied (the embedding table serves as the head). groups: tensors whose group size is not
    `group` (e.g. Meta's INT4 program: a group-32 embedding beside group-256 layers). int8:
    the tensors stored as int8 (`NAME.q8` i8 [M, K], `NAME.scales` f32 [M]) instead of int4."""
    groups = groups or {}
    shapes, out = expected_shapes(config), []
    for name, sources, quantized in tensor_plan(config):
        k = shapes[sources[0]][-1]
        if not quantized:
            out.append((name, "f32", (k,)))
            continue
        rows, g = sum(shapes[s][0] for s in sources), groups.get(name, group)
        check_shape(k, g)
        if name == "output":
            if head_rows is None and config.tie_embeddings:
                continue
            rows = config.vocab_size if head_rows is None else head_rows
        if name in int8:
            out += [(f"{name}.q8", "i8", (rows, k)), (f"{name}.scales", "f32", (rows,))]
        else:
            out += [(f"{name}.qs", "u8", (rows, k // 2)), (f"{name}.scales", "f16", (rows, k // g)), (f"{name}.rowsum", "f32", (rows,))]
    return out


def _read_header(path: str) -> tuple[mmap.mmap, dict, int, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER)
            if len(head) < HEADER or head[:8] != MAGIC:
                raise PyguardError(f"{path}: not a pyguard file (bad magic)")
            version = int.from_bytes(head[8:12], "little")
            if version not in READS:
                raise PyguardError(f"{path}: pyguard file format version {version}, this pyguard reads versions "
                                   f"{', '.join(map(str, READS))}")
            n, crc = int.from_bytes(head[12:16], "little"), int.from_bytes(head[16:20], "little")
            data_offset = int.from_bytes(head[24:32], "little")
            if n > MAX_META:  # checked before anything is read
                raise PyguardError(f"{path}: corrupt pyguard file (metadata of {n} bytes, more than {MAX_META})")
            if head[20:24] != bytes(4) or HEADER + n > size or data_offset < HEADER + n or data_offset % PAGE or data_offset > size:
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
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the parser
        raise PyguardError(f"{path}: corrupt pyguard file (metadata is not a JSON object)") from None
    return m, meta, data_offset, version


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int
    crc32: int


@dataclass
class _Checked:
    """What `_check` has validated: the metadata's meaning and the array directory."""

    config: ModelConfig
    group: int
    groups: dict[str, int]  # tensors whose group is not `group`
    int8: list[str]  # tensors stored as int8
    head_ids: list[int] | None
    family: str | None
    entries: list[_Entry]


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi  # type(): not a bool, not a float


def _check(path: str, meta: dict, data_offset: int, size: int, version: int) -> _Checked:
    """Every structural check of load and verify: the metadata fields, and the directory
    against the layout the config implies (names, order, dtypes, shapes, sizes, alignment,
    extent). Nothing is read from the arrays."""
    def bad(why: str) -> PyguardError:
        return PyguardError(f"{path}: corrupt pyguard file ({why})")

    try:
        config = ModelConfig.from_dict(meta.get("config"))
    except PyguardError as e:
        raise bad(str(e)) from None
    quant = meta.get("quant")
    group = quant.get("group") if isinstance(quant, dict) else None
    if type(group) is not int or group not in GROUP_SIZES:
        raise bad(f"quant.group {group!r:.40} is not one of {GROUP_SIZES}")
    groups = quant.get("groups", {})
    quantized = {name for name, _, q in tensor_plan(config) if q}
    if not isinstance(groups, dict) or not all(k in quantized and type(g) is int and g in GROUP_SIZES for k, g in groups.items()):
        raise bad(f"quant.groups must map quantized tensor names to one of {GROUP_SIZES}")
    int8 = quant.get("int8", [])
    if version < 2 and "int8" in quant:
        raise bad(f"quant.int8 in a version {version} file")
    if not isinstance(int8, list) or not all(n in INT8 and n not in groups for n in int8) or len(set(int8)) != len(int8):
        raise bad(f"quant.int8 must list distinct tensors of {', '.join(INT8)} (without a group)")
    head_ids, family = meta.get("head_ids"), meta.get("family")
    if head_ids is not None:
        if not isinstance(head_ids, list) or not 1 <= len(head_ids) <= config.vocab_size \
                or not all(_is_int(i, 0, config.vocab_size - 1) for i in head_ids) or len(set(head_ids)) != len(head_ids):
            raise bad(f"head_ids must be null or distinct vocabulary ids in 0..{config.vocab_size - 1}")
    if meta.get("head", "full" if head_ids is None else "guard") != ("full" if head_ids is None else "guard"):
        raise bad("head does not match head_ids")
    if family is not None and family not in FAMILIES:
        raise bad(f"family {family!r:.40} is not one of {', '.join(FAMILIES)}")

    arrays = meta.get("arrays")
    if not isinstance(arrays, list):
        raise bad("no array directory")
    entries, end = [], data_offset
    for e in arrays:
        if not isinstance(e, dict) or sorted(e) != ["crc32", "dtype", "name", "nbytes", "offset", "shape"]:
            raise bad("malformed directory entry")
        name, dtype, shape, offset, nbytes, crc = (e[k] for k in ("name", "dtype", "shape", "offset", "nbytes", "crc32"))
        if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in DTYPES or not isinstance(shape, list) \
                or not all(_is_int(d, 0, 1 << 40) for d in shape) or not _is_int(offset, 0, size) or type(nbytes) is not int \
                or not isinstance(crc, str) or len(crc) != CRC_WIDTH or not all(c in "0123456789abcdef" for c in crc):
            raise bad(f"malformed directory entry {name!r:.80}")
        if nbytes != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:  # Python ints: no overflow
            raise bad(f"array {name!r}: {nbytes} bytes do not hold {dtype} {shape}")
        start = data_offset + offset
        if offset % ALIGN or start < end or start + nbytes > size:
            raise bad(f"array {name!r} overlaps another or lies outside the file (truncated?)")
        end = start + nbytes
        entries.append(_Entry(name, dtype, tuple(shape), start, nbytes, int(crc, 16)))

    # The directory must be exactly the layout the metadata implies.
    specials = meta.get("special_tokens")
    layout = []
    if specials is not None or meta.get("tokenizer_pattern") is not None:
        n = entries[1].shape[0] - 1 if len(entries) > 1 and entries[1].shape else 0
        layout = [("tokenizer.bytes", "u8", (entries[0].nbytes if entries else 0,)), ("tokenizer.offsets", "u32", (n + 1,))]
        if not 256 <= n <= config.vocab_size:
            raise bad(f"tokenizer of {n} tokens (needs the 256 single bytes, at most the vocabulary of {config.vocab_size})")
        _check_specials(specials, meta.get("tokenizer_pattern"), n, config.vocab_size, bad)
    try:
        layout += tensor_layout(config, group, None if head_ids is None else len(head_ids), groups, int8)
    except PyguardError as e:
        raise bad(str(e)) from None
    if "output" in int8 and "output.q8" not in {name for name, _, _ in layout}:
        raise bad("quant.int8 names output, which the file does not store (the embedding table is the head)")
    if len(entries) != len(layout):
        raise bad(f"{len(entries)} arrays, the metadata implies {len(layout)}")
    for e, (name, dtype, shape) in zip(entries, layout):
        if (e.name, e.dtype, e.shape) != (name, dtype, tuple(shape)):
            raise bad(f"array {e.name!r:.80} is {e.dtype} {list(e.shape)}, expected {name!r} {dtype} {list(shape)}")
    return _Checked(config, group, groups, int8, head_ids, family, entries)


def _check_specials(specials: Any, pattern: Any, n_ranks: int, vocab: int, bad: Callable[[str], PyguardError]) -> None:
    """Special tokens {name: id}: distinct ids after the ranks and inside the vocabulary."""
    if not isinstance(specials, dict) or not specials:
        raise bad("a tokenizer without special_tokens")
    if not all(isinstance(k, str) and k and _is_int(i, n_ranks, vocab - 1) for k, i in specials.items()):
        raise bad(f"special_tokens must map names to ids in {n_ranks}..{vocab - 1}")
    if len(set(specials.values())) != len(specials):
        raise bad("two special tokens share an id")
    if not isinstance(pattern, str) or not pattern:
        raise bad("a tokenizer without its split pattern")


def _view(m: mmap.mmap, e: _Entry) -> np.ndarray:
    return np.frombuffer(m, DTYPES[e.dtype], math.prod(e.shape), e.start).reshape(e.shape)


def _tensors(m: mmap.mmap, checked: _Checked) -> dict[str, QTensor | Q8Tensor | np.ndarray]:
    """Views of the mapped arrays, validated by _check (QTensor and Q8Tensor parts together)."""
    arrays = {e.name: _view(m, e) for e in checked.entries}
    out: dict[str, QTensor | Q8Tensor | np.ndarray] = {}
    for name, a in arrays.items():
        if name.endswith(".qs"):
            base = name[:-3]
            out[base] = QTensor(a, arrays[base + ".scales"], arrays[base + ".rowsum"], checked.groups.get(base, checked.group))
        elif name.endswith(".q8"):
            out[name[:-3]] = Q8Tensor(a, arrays[name[:-3] + ".scales"])
        elif not name.startswith("tokenizer.") and not name.endswith((".scales", ".rowsum")):
            out[name] = a
    return out


def _check_finite(path: str, name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise PyguardError(f"{path}: array {name!r} holds infinite or NaN values")


def load(path: str, verify: bool = False) -> PgFile:
    """Map a pyguard file. Checks the header, the metadata and every array's dtype, shape,
    alignment and extent against the config, the tokenizer arrays' checksums, that norms and
    row sums are finite and that int8 scales are finite and >= 0; the big arrays (int4 and
    int8 values, int4 scales) are mapped, not read.

    verify: also run `verify`'s checks on the mapping returned (every array's CRC-32, finite
    scales): reads the whole file once (its cost: docs/FORMAT.md); a mismatch
    raises PyguardError naming the damaged array. Off by default: a one-off command pays it
    on every start, a long-lived service once."""
    from ..checks import flag

    flag(verify, "verify")  # before any work: a truthy string must not pass for True
    f, m, checked = _load(path)
    if verify:
        _verify_arrays(path, m, checked)
    return f


def _load(path: str) -> tuple[PgFile, mmap.mmap, _Checked]:
    m, meta, data_offset, version = _read_header(path)
    checked = _check(path, meta, data_offset, len(m), version)
    tensors = _tensors(m, checked)
    for name, t in tensors.items():
        if isinstance(t, QTensor):
            _check_finite(path, name + ".rowsum", t.rowsum)
        elif isinstance(t, Q8Tensor):
            _check_finite(path, name + ".scales", t.scales)
            if (t.scales < 0).any():
                raise PyguardError(f"{path}: array {name + '.scales'!r} holds negative scales")
        else:
            _check_finite(path, name, t)
    ranks = None
    if meta.get("special_tokens") is not None:
        data_e, off_e = checked.entries[:2]
        for e in (data_e, off_e):
            _check_crc(path, m, e)
        ranks = (_view(m, data_e), _view(m, off_e).astype(np.int64))
        off = ranks[1]
        if off[0] != 0 or np.any(np.diff(off) <= 0) or off[-1] != len(ranks[0]):
            raise PyguardError(f"{path}: corrupt pyguard file (tokenizer offsets)")
    return PgFile(path, checked.config, tensors, checked.head_ids, checked.family, meta, ranks), m, checked


def _check_crc(path: str, m: mmap.mmap, e: _Entry) -> None:
    crc = 0
    for i in range(e.start, e.start + e.nbytes, 64 << 20):
        crc = zlib.crc32(m[i : min(i + (64 << 20), e.start + e.nbytes)], crc)
    if crc != e.crc32:
        raise PyguardError(f"{path}: array {e.name!r} is corrupt (checksum mismatch)")


def verify(path: str, progress: Callable[[int, int], None] | None = None) -> int:
    """The checks of load, then every array's CRC-32, and that scales, row sums and norms are
    finite; returns the number of arrays. progress(done, total) bytes."""
    _, m, checked = _load(path)
    _verify_arrays(path, m, checked, progress)
    return len(checked.entries)


def _verify_arrays(path: str, m: mmap.mmap, checked: _Checked, progress: Callable[[int, int], None] | None = None) -> None:
    """Every array's CRC-32 and that f16/f32 arrays are finite; PyguardError names the first bad one."""
    total, done = sum(e.nbytes for e in checked.entries), 0
    for e in checked.entries:
        _check_crc(path, m, e)
        if e.dtype in ("f16", "f32"):
            _check_finite(path, e.name, _view(m, e))
        done += e.nbytes
        if progress:
            progress(done, total)
