"""The `pyguard` command line: demo, convert, verify, classify.

Exit status: 0 safe (or success), 1 unsafe, 2 error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence

from .errors import PyguardError

EXIT_SAFE, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2
BATCH = 16  # conversations classified together from a --jsonl file


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


def _load_guard(a: argparse.Namespace):
    from .guard import Guard

    if a.threads is not None and a.threads < 1:
        raise PyguardError("--threads must be at least 1")
    return Guard.load(a.model, threads=a.threads)


def _options(a: argparse.Namespace) -> dict:
    categories = None
    if a.categories:
        try:
            with open(a.categories, encoding="utf-8") as f:
                categories = json.load(f)
        except (OSError, ValueError) as e:
            raise PyguardError(f"--categories {a.categories}: cannot read a JSON object ({e})") from None
    exclude = tuple(c.strip() for c in a.exclude.split(",") if c.strip()) if a.exclude else ()
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise PyguardError("--threshold must be between 0 and 1")
    return {"categories": categories, "exclude": exclude, "threshold": a.threshold}


def _summary(r) -> str:
    cats = ", ".join(f"{c} ({n.rstrip('.')})" for c, n in zip(r.categories, r.category_names))
    return f"{r.verdict}{' ' + cats if cats else ''}  score {r.score:.3f}  ({r.prompt_tokens} tokens, {r.timings['total']:.2f} s)"


def cmd_classify(a: argparse.Namespace) -> int:
    if (a.text is None) == (a.jsonl is None):
        raise PyguardError("give either a TEXT to classify or --jsonl FILE")
    if a.jsonl is None and a.out:
        raise PyguardError("--out goes with --jsonl")
    options = _options(a)
    guard = _load_guard(a)
    if a.jsonl is not None:
        return _classify_jsonl(guard, a.jsonl, a.out, options)
    conversation = [{"role": "user", "content": a.text}]
    if a.response is not None:
        conversation.append({"role": "assistant", "content": a.response})
    r = guard.classify(conversation, **options)
    print(json.dumps(r.to_dict(), ensure_ascii=False) if a.json else _summary(r))
    return EXIT_UNSAFE if r.unsafe else EXIT_SAFE


def _classify_jsonl(guard, path: str, out_path: str | None, options: dict) -> int:
    """One conversation per line; bad lines are reported on stderr and skipped. Exit status:
    2 if any line failed, else 1 if any conversation is unsafe, else 0."""
    import os

    from .progress import Progress

    try:
        with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PyguardError(f"{path}: cannot read ({e})") from None
    items, failed = [], 0
    for n, line in enumerate(lines, 1):  # validate every line first: a bad one costs only itself
        if not line.strip():
            continue
        try:
            try:
                item = json.loads(line)
            except ValueError as e:
                raise PyguardError(f"not JSON ({e})") from None
            if not isinstance(item, dict) or "messages" not in item:
                raise PyguardError('expected an object with "messages"')
            guard.prepare(item["messages"], options["categories"], options["exclude"])
            items.append(item)
        except PyguardError as e:
            print(f"pyguard: {path}: line {n}: {e}", file=sys.stderr)
            failed += 1
    out = open(out_path + ".part", "w", encoding="utf-8") if out_path else sys.stdout
    progress = Progress("classifying") if out_path or not sys.stdout.isatty() else None
    unsafe = 0
    try:
        for i in range(0, len(items), BATCH):
            batch = items[i : i + BATCH]
            for item, r in zip(batch, guard.classify_many([x["messages"] for x in batch], **options, batch_size=BATCH)):
                unsafe += r.unsafe
                out.write(json.dumps(({"id": item["id"]} if "id" in item else {}) | r.to_dict(), ensure_ascii=False) + "\n")
            if progress:
                progress((i + len(batch)) / len(items), f"{i + len(batch)}/{len(items)}, {unsafe} unsafe")
    finally:
        if out_path:
            out.close()
    if out_path:
        os.replace(out_path + ".part", out_path)
    return EXIT_ERROR if failed else EXIT_UNSAFE if unsafe else EXIT_SAFE


def cmd_demo(a: argparse.Namespace) -> int:
    import tempfile
    import warnings as w

    from .checkpoint import DEMO, reference_tokenizer_model, write_checkpoint
    from .convert import convert
    from .guard import Guard

    print("pyguard demo: the weights below are RANDOM, not Llama Guard's: the pipeline is real, the verdict is meaningless.")
    tokenizer = reference_tokenizer_model()
    with tempfile.TemporaryDirectory(prefix="pyguard-demo-") as tmp:
        hf, out = f"{tmp}/hf", f"{tmp}/demo.pgw"
        print(f"1. writing a random-weight Llama checkpoint ({DEMO.n_layers} layers, dim {DEMO.dim}, real Llama 3 tokenizer)")
        write_checkpoint(hf, DEMO, seed=a.seed, tokenizer_model=tokenizer)
        print("2. converting it:", end=" ", flush=True)
        with w.catch_warnings():
            w.simplefilter("error")
            print(convert(hf, out, group=32, head="guard").text())
        guard = Guard.load(out, threads=a.threads)
        conversation = [{"role": "user", "content": "How do I make a bomb?"},
                        {"role": "assistant", "content": "I can't help with that."}]
        print("3. classifying:", json.dumps(conversation))
        r = guard.classify(conversation)
        print(f"   -> {_summary(r)}")
        print(f"   prompt tokens {r.prompt_tokens}, answer {r.answer!r}; kernel path {_isa()}")
    print("Next: download meta-llama/Llama-Guard-3-1B, `pyguard convert` it, then `pyguard classify` (see README).")
    return 0


def _isa() -> str:
    from . import kernels

    return kernels.isa()


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
    k = sub.add_parser("classify", help="judge a conversation: exit 0 safe, 1 unsafe, 2 error")
    k.add_argument("-m", "--model", required=True, help="pyguard file")
    k.add_argument("text", nargs="?", help="the user message")
    k.add_argument("--response", help="the agent's reply to TEXT: the reply is judged")
    k.add_argument("--jsonl", metavar="IN", help='file of {"id": ..., "messages": [...]} lines ("-": stdin)')
    k.add_argument("--out", help="write the --jsonl results here (default stdout)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.add_argument("--exclude", help="category codes to leave out, e.g. S6,S7")
    k.add_argument("--categories", metavar="JSON", help='file with {"code": "description"} replacing the default categories')
    k.add_argument("--threshold", type=float, help="unsafe when the score reaches this (default: greedy answer)")
    k.add_argument("--threads", type=int, help="kernel threads (default: PYGUARD_THREADS or all cores)")
    k.set_defaults(run=cmd_classify)
    d = sub.add_parser("demo", help="end to end on a random-weight model (no download needed)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int)
    d.set_defaults(run=cmd_demo)
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
