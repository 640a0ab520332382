"""A small bounds-checked flatbuffer reader (no schema compiler, no flatbuffers package).

A table is a signed offset to its vtable, whose entries locate fields by index. Every read is
checked against the buffer first: anything outside it is one PyguardError naming the buffer.
"""

from __future__ import annotations

import struct

from ..errors import PyguardError


class Buf:
    """Bounds-checked little-endian reads of one flatbuffer; `what` names it in errors."""

    def __init__(self, data, what: str):
        self.data, self.what = data, what

    def bad(self, why: str) -> PyguardError:
        return PyguardError(f"{self.what}: corrupt or truncated ({why})")

    def unpack(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise self.bad(f"read of {size} bytes at {pos} outside {len(self.data)}")
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def root(self) -> "Table":
        return Table(self, self.unpack("I", 0))


class Table:
    def __init__(self, buf: Buf, pos: int):
        self.buf, self.pos = buf, pos
        self.vt = pos - buf.unpack("i", pos)
        self.vt_size = buf.unpack("H", self.vt)
        if self.vt_size < 4 or self.vt_size % 2:
            raise buf.bad(f"vtable at {self.vt}")

    def _field(self, i: int) -> int:
        """Absolute position of field i, or 0 when absent."""
        if 4 + 2 * i + 2 > self.vt_size:
            return 0
        off = self.buf.unpack("H", self.vt + 4 + 2 * i)
        return self.pos + off if off else 0

    def scalar(self, i: int, fmt: str, default=0):
        p = self._field(i)
        return self.buf.unpack(fmt, p) if p else default

    def _ref(self, i: int) -> int:
        p = self._field(i)
        return p + self.buf.unpack("I", p) if p else 0

    def table(self, i: int) -> "Table | None":
        p = self._ref(i)
        return Table(self.buf, p) if p else None

    def _vector(self, i: int, elem: int) -> tuple[int, int]:
        p = self._ref(i)
        if not p:
            return 0, 0
        n = self.buf.unpack("I", p)
        if p + 4 + n * elem > len(self.buf.data):
            raise self.buf.bad(f"vector of {n} at {p} runs past the end")
        return p + 4, n

    def string(self, i: int) -> str | None:
        p, n = self._vector(i, 1)
        if not p:
            return None
        try:
            return bytes(self.buf.data[p : p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.buf.bad(f"string at {p} is not UTF-8") from None

    def blob(self, i: int) -> memoryview:
        p, n = self._vector(i, 1)
        return memoryview(self.buf.data)[p : p + n]

    def scalars(self, i: int, fmt: str) -> list:
        size = struct.calcsize(fmt)
        p, n = self._vector(i, size)
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf.data, p)) if n else []

    def tables(self, i: int) -> list["Table"]:
        p, n = self._vector(i, 4)
        return [Table(self.buf, p + 4 * k + self.buf.unpack("I", p + 4 * k)) for k in range(n)]

    def union(self, i: int) -> tuple[int, "Table | None"]:
        """(type, value) of a union declared as field i (its type is field i, its value i + 1)."""
        return self.scalar(i, "B"), self.table(i + 1)
