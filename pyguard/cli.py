"""The `pyguard` command line: demo, convert, verify, classify.

Exit status: 0 safe (or success), 1 unsafe, 2 error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from .errors import PyguardError

EXIT_SAFE, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("out_file", help="pyguard file to write")
    p.add_argument("--group", type=int, default=32, choices=(32, 64, 128, 256), help="weights per int4 scale (default 32)")
    p.add_argument("--head", choices=("full", "guard"), default="full",
                   help="output head: the whole vocabulary, or only the tokens of a Llama Guard answer (default full)")
    p.add_argument("--family", default="auto", choices=("auto", "llama-guard-3-1b", "llama-guard-3-8b"),
                   help="prompt template and categories (auto: by model size)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: all cores)")


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert
    from .progress import Progress

    if a.threads is not None and a.threads < 1:
        raise PyguardError("--threads must be at least 1")
    summary = convert(a.hf_dir, a.out_file, group=a.group, head=a.head, family=a.family, threads=a.threads,
                      progress=Progress("converting"))
    print(summary.text())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from .file import verify
    from .progress import Progress

    n = verify(a.file, Progress("verifying"))
    print(f"{a.file}: {n} arrays, all checksums match")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyguard", description="Llama Guard 3 safety classification on CPUs.",
                                epilog="exit status: 0 safe or success, 1 unsafe, 2 error")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a pyguard file")
    _convert_args(c)
    c.set_defaults(run=cmd_convert)
    v = sub.add_parser("verify", help="check every checksum of a pyguard file")
    v.add_argument("file")
    v.set_defaults(run=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    warnings.formatwarning = lambda msg, *_: f"warning: {msg}\n"
    try:
        return a.run(a)
    except PyguardError as e:
        print(f"pyguard: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"pyguard: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pyguard: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
