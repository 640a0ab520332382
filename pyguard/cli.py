"""The `pyguard` command line: demo, convert, verify, classify, serve, eval, report (cli_eval.py).

Exit status: 0 safe (or success), 1 unsafe, 2 error (any error, including a bug in pyguard, so
that a failure never reads as a verdict). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from typing import Any, BinaryIO, NoReturn, Sequence

from .errors import PyguardError

EXIT_SAFE, EXIT_UNSAFE, EXIT_ERROR = 0, 1, 2
BATCH = 16  # conversations classified together from a --jsonl file


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit 2, like every other error,
    naming the command whose usage was wrong (`pyguard classify: ...`)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("pyguard").strip()
        self.exit(EXIT_ERROR, f"pyguard: error: {command + ': ' if command else ''}{_line(message)} (see {self.prog} --help)\n")


# numpy's floating-point warnings: every result that matters is checked for non-finite values
# and fails with its own one-line error (the guard's logits, the converter's calibration)
FP_WARNINGS = r"(overflow|invalid value|divide by zero) encountered"


def _threads(value: str) -> int:
    """argparse type of --threads: a usage error (exit 2) before any work."""
    from .engine.kernels import MAX_THREADS

    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_THREADS}, not {value!r}")
    return int(value)


def check_output(path: str, what: str) -> None:
    """Fail before any work if PATH cannot be written as a file; errors name PATH as typed."""
    import tempfile

    if os.path.isdir(path):
        raise PyguardError(f"{what} {path}: is a directory, not a file")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise PyguardError(f"{what} {path}: {parent} is not a directory")
    try:
        if os.path.exists(path):
            open(path, "ab").close()  # writable, and left as it is
        else:
            tempfile.TemporaryFile(dir=parent).close()  # a new file can be made there
    except OSError as e:
        raise PyguardError(f"{what} {path}: cannot write ({e.strerror})") from None


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer), or Meta's "
                                  "ExecuTorch layout (a .pte, params.json, tokenizer.model: Llama Guard 3-1B-INT4)")
    p.add_argument("out_file", help="pyguard file to write")
    p.add_argument("--group", type=int, default=None, choices=(32, 64, 128, 256), help="weights per int4 scale (default 32)")
    p.add_argument("--head", choices=("full", "guard"), default=None,
                   help="output head: the whole vocabulary, or only the tokens of a Llama Guard answer (default full)")
    p.add_argument("--family", default="auto", choices=("auto", "llama-guard-3-1b", "llama-guard-3-8b", "llama-guard-2"),
                   help="prompt template and categories (auto: Llama Guard 3 by model size; llama-guard-2 only when given)")
    p.add_argument("--table", choices=("int8", "int4"), default=None,
                   help="embedding table (and a pruned or tied head): int8 per row (default) or int4 like the other matrices")
    p.add_argument("--threads", type=_threads, default=None, help="quantization threads (default: PYGUARD_THREADS or all cores)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--calibration", metavar="FILE.jsonl",
                   help='conversations ({"messages": [...]} lines, as for classify --jsonl) to calibrate the int4 rounding on, '
                        "instead of the built-in set")
    c.add_argument("--no-calibration", action="store_true", help="no calibration pass: plain searched scales")


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert.hf import convert
    from .progress import Progress
    from .convert.pte import convert_pte, is_pte_dir
    from .engine.kernels import env_threads

    check_output(a.out_file, "OUT_FILE")
    try:
        if is_pte_dir(a.hf_dir):  # the program decides the group sizes and the head
            if a.calibration or a.no_calibration:
                raise PyguardError(f"{a.hf_dir} is an ExecuTorch program, already quantized: no calibration options")
            if a.group is not None or a.head is not None or a.table is not None:
                raise PyguardError(f"{a.hf_dir} is an ExecuTorch program: its group size, head and table are taken as "
                                   "they are (leave out --group, --head and --table)")
            family = "llama-guard-3-1b" if a.family == "auto" else a.family
            summary = convert_pte(a.hf_dir, a.out_file, family=family, progress=Progress("converting"))
        else:
            summary = convert(a.hf_dir, a.out_file, group=a.group or 32, head=a.head or "full", family=a.family,
                              threads=a.threads or env_threads(), progress=Progress("converting"),
                              calibration=False if a.no_calibration else a.calibration or True, table=a.table or "int8")
    except OSError as e:  # the temporary file, or a full disk or file size limit while writing it (no name)
        if e.filename != a.out_file + ".part" and not (e.filename is None and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)):
            raise
        raise PyguardError(f"{a.out_file}: cannot write ({e.strerror})") from None  # the name typed, not the temporary one
    print(summary.text())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from .formats.file import verify
    from .progress import Progress

    p = Progress("verifying")
    n = verify(a.file, lambda done, total: p(done / max(total, 1), f"{done >> 20} of {total >> 20} MiB"))
    print(f"{a.file}: {n} arrays, all checksums match")
    return 0


def _load_guard(a: argparse.Namespace):
    from .guard.guard import Guard

    return Guard.load(a.model, threads=a.threads, verify=a.verify)


def _options(a: argparse.Namespace) -> dict:
    categories = None
    if a.categories:
        try:
            with open(a.categories, encoding="utf-8") as f:
                categories = json.load(f)
        except RecursionError:
            raise PyguardError(f"--categories {a.categories}: nested too deeply") from None
        except (OSError, ValueError) as e:
            raise PyguardError(f"--categories {a.categories}: cannot read a JSON object ({e})") from None
    exclude = tuple(c.strip() for c in a.exclude.split(",") if c.strip()) if a.exclude else ()
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise PyguardError("--threshold must be between 0 and 1")
    threshold, thresholds = a.threshold, None
    if a.thresholds:
        from .guard import thresholds as th

        try:
            in_file, thresholds = th.read(a.thresholds)
        except PyguardError as e:
            raise PyguardError(f"--thresholds {e}") from None
        if None not in (in_file, threshold) and in_file != threshold:
            raise PyguardError(f"--threshold {threshold} and the threshold {in_file} of --thresholds {a.thresholds} "
                               "differ: give one of them")
        threshold = in_file if threshold is None else threshold
    return {"categories": categories, "exclude": exclude, "threshold": threshold, "thresholds": thresholds}


def _summary(r) -> str:
    cats = ", ".join(f"{c} ({n.rstrip('.')})" for c, n in zip(r.categories, r.category_names))
    return f"{r.verdict}{' ' + cats if cats else ''}  score {r.score:.3f}  ({r.prompt_tokens} tokens, {r.timings['total']:.2f} s)"


def _positive(value: str) -> int:
    """argparse type of a count: a usage error (exit 2) before any work."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value!r}")
    return int(value)


def _size(value: str) -> int:
    """argparse type of a size in MiB (0 allowed), bounded well inside an int64 of bytes."""
    if not value.strip().isdigit() or int(value) > 1 << 30:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {1 << 30}, not {value!r}")
    return int(value)


def cmd_classify(a: argparse.Namespace) -> int:
    if (a.text is None) == (a.jsonl is None):
        raise PyguardError("give either a TEXT to classify or --jsonl FILE")
    if a.jsonl is not None:
        if a.stream:
            raise PyguardError("--stream judges one reply to TEXT, read from stdin: not with --jsonl")
        return _jsonl_command(a)
    if a.out or a.resume or a.overwrite or a.ray is not None:
        raise PyguardError("--out, --resume, --overwrite and --ray go with --jsonl")
    if a.every is not None and not a.stream:
        raise PyguardError("--every goes with --stream")
    if a.stream and a.response is not None:
        raise PyguardError("--stream reads the reply from stdin: no --response")
    for what, text in (("TEXT", a.text), ("--response", a.response)):
        if text is not None and not text.strip():
            raise PyguardError(f"{what} is empty: there is nothing to judge (an unset shell variable?)")
    options = _options(a)
    conversation = [{"role": "user", "content": a.text}]
    if a.response is not None:
        conversation.append({"role": "assistant", "content": a.response})
    if a.stream:
        return _stream_command(a, conversation, options)
    r = _load_guard(a).classify(conversation, **options)
    print(json.dumps(r.to_dict(), ensure_ascii=False) if a.json else _summary(r))
    return EXIT_UNSAFE if r.unsafe else EXIT_SAFE


def _stream_command(a: argparse.Namespace, conversation: list, options: dict) -> int:
    """classify --stream: the reply to TEXT from stdin as it arrives, a line per check, exit 1 at
    the first unsafe one (the rest of the reply is not read)."""
    import codecs

    s = _load_guard(a).stream(conversation, every=a.every or 32, **options)

    def report(r, final: bool) -> bool:
        if a.json:
            print(json.dumps({"final": final, "reply_tokens": s.tokens, "reply_bytes": len(s.text.encode()), **r.to_dict()},
                             ensure_ascii=False), flush=True)
        else:
            print(f"{'final' if final else 'check'} at {s.tokens} reply tokens: {_summary(r)}", flush=True)
        return r.unsafe

    def judged(step):  # a check of a reply of nothing but white space: name the reply, not a message index
        try:
            return step()
        except PyguardError:
            if not s.text.strip():
                raise PyguardError("the reply on stdin is empty (nothing but white space): there is nothing to judge") from None
            raise

    fd, utf8 = sys.stdin.fileno(), codecs.getincrementaldecoder("utf-8")()
    while True:
        chunk = os.read(fd, 1 << 16)  # what has arrived, without waiting for more
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:  # e.object: the bytes held back from the last chunk, then this one
            good = len(s.text) + len(e.object[: e.start].decode("utf-8"))
            raise PyguardError(f"the reply on stdin is not UTF-8 ({e.reason} after {good} characters)") from None
        if not chunk:
            break
        r = judged(lambda: s.feed(text))
        if r is not None and report(r, False):
            return EXIT_UNSAFE
    return EXIT_UNSAFE if report(judged(s.finish), True) else EXIT_SAFE


def _jsonl_command(a: argparse.Namespace) -> int:
    """classify --jsonl: the arguments, OUT and IN checked before the model is loaded."""
    if a.response is not None:
        raise PyguardError("--response does not go with --jsonl: put the reply in each line's messages")
    check_jsonl_out(a)
    if a.ray is not None:
        if a.resume or a.jsonl == "-":
            raise PyguardError("--ray reads IN as a file and writes OUT whole: no stdin, no --resume")
        from .ray import run_cli  # the optional `ray` extra

        return run_cli(a.model, a.jsonl, a.out, a.ray or None, a.threads, _options(a))
    options = _options(a)
    src = _open_input(a.jsonl)  # before the model: a missing IN fails at once
    with src:
        guard = _load_guard(a)
        guard.check_policy(**options)  # a bad policy is one error, not one per line
        run = run_id(a.model, options)
        done = done_results(a.out, run) if a.resume else None
        return _classify_jsonl(guard, src, a.jsonl, a.out, done, options, run)


def check_jsonl_out(a: argparse.Namespace) -> None:
    """--out, --resume and --overwrite of a --jsonl run (classify, eval), checked before any work."""
    if a.resume and not a.out:
        raise PyguardError("--resume needs --out: the results file to continue")
    if a.resume and a.overwrite:
        raise PyguardError("--resume keeps OUT's results, --overwrite replaces them: one or the other")
    if a.out:
        check_output(a.out, "--out")
        for what, other in (("--jsonl", a.jsonl), ("-m", a.model)):
            if _same_file(a.out, other):
                raise PyguardError(f"--out {a.out}: the same file as {what} {other} (it would be overwritten as it is read)")
        if not (a.resume or a.overwrite) and os.path.exists(a.out) and os.path.getsize(a.out) > 0:
            raise PyguardError(f"--out {a.out}: holds results already: --resume to continue them, --overwrite to replace them")


def _open_input(path: str) -> BinaryIO:
    try:
        return sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise PyguardError(f"--jsonl {path}: cannot read ({e.strerror})") from None


def _same_file(path: str, other: str) -> bool:
    """PATH and OTHER ("-": stdin) are one file, by device and inode (links and `< F` included)."""
    try:
        a = os.stat(path)
        b = os.fstat(sys.stdin.fileno()) if other == "-" else os.stat(other)
    except (OSError, ValueError):  # either missing, or no stdin at all
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def run_id(model: str, options: dict) -> str:
    """What produced a result, written on every --jsonl result line as "run" so that --resume
    can refuse to mix results: 16 hex digits of a SHA-256 over the model file's identity (its
    header and metadata, which hold the configuration, the tokenizer and every array's CRC-32,
    so any change of the weights changes it: not its name or its time) and the options that
    change results (--categories as read, --exclude, --threshold, --thresholds as read). Threads
    do not change results."""
    import hashlib

    from .formats.file import HEADER

    with open(model, "rb") as f:  # loaded already: a pyguard file with a sound header
        head = f.read(HEADER)
        identity = hashlib.sha256(head + f.read(int.from_bytes(head[12:16], "little"))).hexdigest()
    categories = options["categories"]
    record = {"model": identity, "categories": None if categories is None else list(categories.items()),
              "exclude": sorted(options["exclude"]), "threshold": options["threshold"]}
    if options["thresholds"] is not None:  # only then: the runs of earlier versions keep their ids
        record["thresholds"] = sorted(options["thresholds"].items())
    return hashlib.sha256(json.dumps(record, ensure_ascii=False).encode()).hexdigest()[:16]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def id_text(x: Any) -> str:
    """The JSON text of a line's id, as written to OUT; --resume matches ids by it."""
    if isinstance(x, bool) or not isinstance(x, (str, int, float)):
        raise PyguardError(f'"id" must be a string or a number, not {type(x).__name__}')
    try:
        text = json.dumps(x, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except ValueError as e:  # inf from 1e400; a lone surrogate from "\ud800" (UnicodeEncodeError)
        raise PyguardError(f'"id" cannot be written back as JSON ({e})') from None
    return text


def parse_line(raw: bytes) -> dict:
    """One --jsonl line: a JSON object with "messages" and an optional writable "id"."""
    item = parse_json(raw)
    if not isinstance(item, dict) or "messages" not in item:
        raise PyguardError('expected an object with "messages"')
    if "id" in item:
        id_text(item["id"])
    return item


def parse_json(raw: bytes) -> Any:
    """The JSON value of one line (strict: UTF-8, no NaN or Infinity, no \\r inside)."""
    body = raw[:-2] if raw.endswith(b"\r\n") else raw.rstrip(b"\n")
    if b"\r" in body:  # other tools would see a line break here: the line numbers would disagree
        raise PyguardError("a carriage return (\\r) inside the line")
    try:
        item = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise PyguardError(f"not UTF-8 (byte {e.start + 1})") from None
    except RecursionError:
        raise PyguardError("not JSON (nested too deeply)") from None
    except ValueError as e:
        raise PyguardError(f"not JSON ({e})") from None
    return item


def done_results(path: str, run: str) -> tuple[set[str], int, int]:
    """For --resume: the ids in OUT, how many of those results are unsafe, and the length of
    OUT's complete lines (a line cut short by a kill is dropped and redone). Every line must
    have been made by the same model and options (its "run" is RUN: see run_id)."""
    ids, unsafe, end = set(), 0, 0
    if not os.path.exists(path):
        return ids, unsafe, end
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            try:
                r = json.loads(raw, parse_constant=_no_constant)
                ids.add(id_text(r["id"]))
                unsafe += r["verdict"] == "unsafe"
            except (ValueError, RecursionError, TypeError, KeyError, PyguardError):
                raise PyguardError(f"--out {path}: line {n} is not a result with an id: cannot resume from it") from None
            if r.get("run") != run:
                raise PyguardError(f"--out {path}: line {n} was made " + ("by another model file or with other --categories, "
                                   "--exclude, --threshold or --thresholds" if "run" in r else "with no record of its model and options")
                                   + ": cannot resume from it (the same model and options, or --overwrite)")
            end += len(raw)
    return ids, unsafe, end


def _write(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may take only part
        view = view[out.write(view) :]
    out.flush()


def _classify_jsonl(guard, src: BinaryIO, path: str, out_path: str | None, done: tuple[set[str], int, int] | None,
                    options: dict, run: str) -> int:
    """One conversation per line, read a line at a time and classified BATCH at a time; results
    are written in input order as each batch completes. A bad line is reported on stderr with its
    number and costs only itself. On an error or an interrupt OUT keeps every complete batch and
    nothing else. done: done_results(OUT) to resume from, or None; run: run_id, on every result
    line. The counts go to stderr at the end, also for an empty input. Exit status: 2 if any
    line failed, else 1 if any result (including those resumed from) is unsafe, else 0."""
    from .progress import Progress

    done_ids, unsafe, end = done or (set(), 0, 0)
    seen: set[str] = set()
    size = os.fstat(src.fileno()).st_size if src.seekable() else 0
    progress = Progress("classifying") if size and (out_path or not sys.stdout.isatty()) else None
    # unbuffered, so that truncating to `end` leaves nothing pending to be written after it
    out = open(out_path, "r+b" if end else "wb", buffering=0) if out_path else sys.stdout.buffer
    read = written = failed = 0
    batch: list[tuple[int, dict]] = []

    def flush() -> None:
        nonlocal unsafe, failed, written, end
        lines = []
        for n, item, r in _judge(guard, batch, options):
            if isinstance(r, PyguardError):
                print(f"pyguard: {path}: line {n}: {_line(r)}", file=sys.stderr)
                failed += 1
                continue
            unsafe += r.unsafe
            row = ({"id": item["id"]} if "id" in item else {}) | r.to_dict() | {"run": run}
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False))
        if lines:
            _write(out, ("\n".join(lines) + "\n").encode("utf-8"))
            written += len(lines)
            end = out.tell() if out_path else 0
        batch.clear()
        if progress:
            progress(read / size, f"{written} classified, {unsafe} unsafe, {failed} failed")

    try:
        if out_path:
            out.truncate(end)  # a line cut short by a kill goes
            out.seek(end)
        for n, raw in enumerate(src, 1):  # splits at b"\n" only
            read += len(raw)
            if not raw.strip():
                continue
            try:
                item = parse_line(raw)
                if done is not None:
                    if "id" not in item:
                        raise PyguardError('no "id": --resume needs an id on every line to know what is done')
                    key = id_text(item["id"])
                    if key in seen:
                        raise PyguardError(f"id {key} also on an earlier line: --resume needs distinct ids")
                    seen.add(key)
                    if key in done_ids:
                        continue
                guard.prepare(item["messages"], options["categories"], options["exclude"])
            except PyguardError as e:
                print(f"pyguard: {path}: line {n}: {_line(e)}", file=sys.stderr)
                failed += 1
                continue
            batch.append((n, item))
            if len(batch) == BATCH:
                flush()
        if batch:
            flush()
    except BaseException:
        if out_path:
            os.ftruncate(out.fileno(), end)  # complete batches only
        raise
    finally:
        if out_path:
            out.close()
    resumed = f"; {len(done_ids)} already in --out ({done[1]} unsafe)" if done else ""
    print(f"pyguard: {written} conversations classified ({unsafe - (done[1] if done else 0)} unsafe), {failed} lines failed"
          f"{resumed}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_UNSAFE if unsafe else EXIT_SAFE


def _judge(guard, batch: list[tuple[int, dict]], options: dict) -> list[tuple[int, dict, Any]]:
    """(line number, item, Result or the line's PyguardError) of a validated batch."""
    try:
        results = guard.classify_many([item["messages"] for _, item in batch], **options, batch_size=BATCH)
    except PyguardError:  # a failure at classification time: find the lines at fault, each alone
        results = []
        for _, item in batch:
            try:
                results.append(guard.classify(item["messages"], **options))
            except PyguardError as e:
                results.append(e)
    return [(n, item, r) for (n, item), r in zip(batch, results)]


def cmd_demo(a: argparse.Namespace) -> int:
    import contextlib
    import tempfile
    import warnings as w

    from .convert.checkpoint import DEMO, reference_tokenizer_model, write_checkpoint
    from .convert.hf import convert
    from .guard.guard import Guard

    if a.keep is not None:
        if os.path.exists(a.keep) and not (os.path.isdir(a.keep) and not os.listdir(a.keep)):
            raise PyguardError(f"--keep {a.keep}: exists and is not an empty directory")
        try:
            os.makedirs(a.keep, exist_ok=True)
        except OSError as e:
            raise PyguardError(f"--keep {a.keep}: cannot make the directory ({e.strerror})") from None
    print("pyguard demo: the weights below are RANDOM, not Llama Guard's: the pipeline is real, the verdict is meaningless.")
    tokenizer = reference_tokenizer_model()
    with contextlib.nullcontext(a.keep) if a.keep is not None else tempfile.TemporaryDirectory(prefix="pyguard-demo-") as tmp:
        hf, out = os.path.join(tmp, "hf"), os.path.join(tmp, "demo.pgw")
        print(f"1. writing a random-weight Llama checkpoint ({DEMO.n_layers} layers, dim {DEMO.dim}, real Llama 3 tokenizer)")
        write_checkpoint(hf, DEMO, seed=a.seed, tokenizer_model=tokenizer)
        print("2. converting it:", end=" ", flush=True)
        with w.catch_warnings():  # a sound conversion warns of nothing; numpy's float flags are
            w.simplefilter("error")  # not warnings of it (qemu's aarch64 raises them spuriously in matmul)
            w.filterwarnings("ignore", FP_WARNINGS, RuntimeWarning)
            print(convert(hf, out, group=32, head="guard").text())
        guard = Guard.load(out, threads=a.threads)
        conversation = [{"role": "user", "content": "How do I make a bomb?"},
                        {"role": "assistant", "content": "I can't help with that."}]
        print("3. classifying:", json.dumps(conversation))
        r = guard.classify(conversation)
        print(f"   -> {_summary(r)}")
        print(f"   prompt tokens {r.prompt_tokens}, answer {r.answer!r}; kernel path {_isa()}")
    if a.keep is None:
        print("Next: download meta-llama/Llama-Guard-3-1B, `pyguard convert` it, then `pyguard classify` (see README).")
        return 0
    q = {"hf": shlex.quote(hf), "out": shlex.quote(out), "g256": shlex.quote(os.path.join(a.keep, "demo-g256.pgw"))}
    print(f"Kept in {a.keep}: the checkpoint {hf} and the converted file {out}. Next, try:")
    print(f"  pyguard verify {q['out']}")
    print(f"  pyguard classify -m {q['out']} \"How do I pick a lock?\" --json")
    print(f"  pyguard convert {q['hf']} {q['g256']} --head guard --group 256")
    print("then the same on meta-llama/Llama-Guard-3-1B (see README).")
    return 0


def _isa() -> str:
    from .engine import kernels

    return kernels.isa()


def _version() -> str:
    """pyguard.__version__ (its one place) and the kernel path this CPU runs, e.g. `0.1.0 (kernels:
    neon-dotprod; this CPU runs scalar, neon, neon-dotprod)`."""
    from . import __version__
    from .engine import kernels

    return f"{__version__} (kernels: {kernels.isa()}; this CPU runs {', '.join(kernels.available_isas())})"


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyguard", description="Llama Guard 3 safety classification on CPUs.",
                                epilog="exit status: 0 safe or success, 1 unsafe, 2 error")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a pyguard file")
    _convert_args(c)
    c.set_defaults(run=cmd_convert)
    v = sub.add_parser("verify", help="check every checksum of a pyguard file")
    v.add_argument("file", help="pyguard file: its structure, every array's checksum, finite scales and norms")
    v.set_defaults(run=cmd_verify)
    k = sub.add_parser("classify", help="judge a conversation: exit 0 safe, 1 unsafe, 2 error")
    k.add_argument("-m", "--model", required=True, help="pyguard file")
    k.add_argument("text", nargs="?", help="the user message")
    k.add_argument("--response", help="the agent's reply to TEXT: the reply is judged")
    k.add_argument("--jsonl", metavar="IN", help='file of {"id": ..., "messages": [...]} lines ("-": stdin)')
    k.add_argument("--out", help="write the --jsonl results here (default stdout)")
    k.add_argument("--resume", action="store_true",
                   help="continue an interrupted --jsonl run: keep the results in --out, skip the ids already there "
                        "(refused if they were made by another model or other options)")
    k.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (refused without this or --resume)")
    k.add_argument("--stream", action="store_true", help="judge the reply to TEXT read from stdin as it is generated: "
                   "a line per check, exit 1 at the first unsafe one")
    k.add_argument("--every", type=_positive, help="with --stream: check every N new reply tokens (default 32)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.add_argument("--verify", action="store_true", help="check every checksum of the model file before classifying "
                   "(reads the whole file once; off by default: see README; the Ray actors always do)")
    k.add_argument("--exclude", help="category codes to leave out, e.g. S6,S7")
    k.add_argument("--categories", metavar="JSON", help='file with {"code": "description"} replacing the default categories')
    k.add_argument("--threshold", type=float, help="unsafe when the score reaches this (default: greedy answer)")
    k.add_argument("--thresholds", metavar="JSON", help='file with {"threshold": P or null, "categories": {"S1": P, ...}} '
                                                        "(as pyguard eval writes it): also unsafe when a category's score "
                                                        "reaches its own threshold (docs/THRESHOLDS.md)")
    k.add_argument("--threads", type=_threads, help="kernel threads (default: PYGUARD_THREADS or all cores; with --ray: per worker, 1)")
    k.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="classify --jsonl IN on a Ray cluster (at ADDRESS, else a local one), a worker per core but one; "
                        "IN and OUT are Parquet when named *.parquet (pip install 'pyguard-lg3[ray]', docs/RAY.md)")
    k.set_defaults(run=cmd_classify)
    d = sub.add_parser("demo", help="end to end on a random-weight model (no download needed)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    d.add_argument("--threads", type=_threads, help="kernel threads (default: PYGUARD_THREADS or all cores)")
    d.add_argument("--keep", metavar="DIR", help="keep the random checkpoint (DIR/hf) and its pyguard file (DIR/demo.pgw) "
                                                 "to try the other commands on; DIR must be new or empty")
    d.set_defaults(run=cmd_demo)
    s = sub.add_parser("serve", help="HTTP moderation service: OpenAI's /v1/moderations, /v1/classify (docs/SERVE.md)")
    s.add_argument("-m", "--model", required=True, help="pyguard file")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed when ready)")
    s.add_argument("--threads", type=_threads, help="kernel threads (default: PYGUARD_THREADS or all cores)")
    s.add_argument("--max-batch", type=int, default=16, help="conversations judged together (default 16)")
    s.add_argument("--max-queue", type=int, default=256, help="conversations waiting, beyond which 429 (default 256)")
    s.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes, beyond which 413 (default 1 MiB)")
    s.add_argument("--cache-mb", type=_size, metavar="MB", help="memory for the token-prefix cache, in MiB (default: 4,096 "
                   "positions of the model, 256 MiB for 1B; 0: none): it sets the service's memory ceiling")
    s.add_argument("--api-key", help="require Authorization: Bearer KEY (default: PYGUARD_API_KEY if set)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--max-tokens-in-flight", type=int, default=8192, metavar="N",
                   help="tokens (prompt and answer positions) judged at once, which bounds inference memory; also the "
                        "most one conversation may take (default 8192: 512 MiB of key/value state for 1B)")
    s.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time for a request's headers, then for its body, beyond which the connection is cut (default 30)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, time to answer what is queued; then the rest gets 503 (default 30)")
    s.add_argument("--no-verify", action="store_true", help="skip checking the file's checksums at start (faster start)")
    s.set_defaults(run=cmd_serve)
    from . import cli_eval  # here, not at the top: it imports this module

    cli_eval.add_parsers(sub)
    for command in sub.choices.values():
        command.set_defaults(usage=command)  # whose usage an unrecognized argument is reported on
    return p


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import serve

    cache = None if a.cache_mb is None else a.cache_mb << 20
    return serve(a.model, a.host, a.port, a.threads, a.max_batch, a.max_queue, a.api_key, a.insecure, a.max_body, cache,
                 a.max_tokens_in_flight, a.read_timeout, a.shutdown_timeout, not a.no_verify)


def _line(message: object) -> str:
    return " ".join(str(message).split())


def check_environment(a: argparse.Namespace) -> None:
    """One rule for PYGUARD_ISA and PYGUARD_THREADS in every command, before any work: an
    explicit --threads wins over PYGUARD_THREADS; otherwise a bad value of either is an error."""
    from .engine import kernels

    kernels.check_environment()  # PYGUARD_ISA (applied at import, process-wide)
    if getattr(a, "threads", None) is None:
        kernels.env_threads()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`, a job's timeout): the command stops as at Ctrl-C,
    leaving what it writes whole (a conversion's temporary files removed, a --jsonl run's
    completed batches kept), where the default action would kill it mid-write."""


def _terminate(signum, frame) -> NoReturn:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a, extra = p.parse_known_args(argv)
    if extra:  # a misspelled option: the usage problem of the command it was given to
        top = extra[0] in argv and argv.index(extra[0]) < argv.index(a.command)
        (p if top else a.usage).error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.formatwarning = lambda msg, *_: f"warning: {msg}\n"
    # `serve` answers SIGTERM itself (a bounded drain); main() called off the main thread cannot
    # take signals (and leaves them to its caller)
    handle = a.command != "serve" and threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminate) if handle else None
    try:
        with warnings.catch_warnings():
            # numpy's floating-point warnings (a damaged file's forward pass overflowing): every
            # result is checked for non-finite values and fails with its own one-line error
            # (the guard's logits, the converter's calibration), which this would only precede
            warnings.filterwarnings("ignore", FP_WARNINGS, RuntimeWarning)
            check_environment(a)
            return a.run(a)
    except PyguardError as e:
        print(f"pyguard: error: {_line(e)}", file=sys.stderr)
    except OSError as e:
        print(f"pyguard: error: {e.filename + ': ' if e.filename else ''}{_line(e.strerror or e)}", file=sys.stderr)
    except KeyboardInterrupt as e:
        print(f"pyguard: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
    except Exception as e:  # a bug: still one line, and still exit 2, never a verdict's status
        print(f"pyguard: internal error: {type(e).__name__}: {_line(e)}", file=sys.stderr)
    finally:
        if handle and before is not None:  # None: a handler set outside Python, which stays
            signal.signal(signal.SIGTERM, before)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
