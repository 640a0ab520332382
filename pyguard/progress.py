"""Progress on stderr for long work: a rewritten line on a terminal, a line per 10% otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0, self.last = time.time(), -1.0

    def __call__(self, fraction: float, detail: str = "") -> None:
        line = f"{self.label} {fraction * 100:5.1f}%  {time.time() - self.t0:6.1f} s  {detail}"
        if self.tty:
            self.stream.write(f"\r{line:<79.79}" + ("\n" if fraction >= 1 else ""))
        elif int(fraction * 10) > int(self.last * 10):
            self.stream.write(line.rstrip() + "\n")
        self.last = fraction
        self.stream.flush()
