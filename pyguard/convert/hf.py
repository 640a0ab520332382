"""Hugging Face Llama checkpoint (safetensors) -> one pyguard file, streamed tensor by tensor.

By default the unquantized checkpoint is first run over a calibration set (pyguard/convert/calibrate.py,
docs/CONVERT.md): its activations decide the folding of input scales and the importance of each
input channel. Then each tensor is read in row chunks (float32), folded, quantized with searched
group scales (quant.mse_scales, importance-weighted with calibration) on a few threads, and
appended to the output file (or copied from calibration's store when error feedback quantized
it during the pass); memory stays bounded by a layer whatever the model size. The embedding
table is int8 per row (quant.quantize8) by default, and so is the head when it is pruned or is
the table: a lookup and a 21-row product cost nothing more, and int8 is close to float there.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import calibrate
from ..formats import quant
from ..formats.config import ModelConfig, expected_shapes, tensor_plan
from ..errors import PyguardError
from ..formats.file import Writer, header_meta, tensor_layout, tokenizer_arrays
from ..guard.prompt import CATEGORIES, FAMILIES
from ..guard.verdict import answer_token_ids
from ..formats.safetensors import Checkpoint

CHUNK_ROWS = 1024  # rows read at once; quantized in sub-chunks of SUB_ROWS on the threads
SUB_ROWS = 64


@dataclass
class Summary:
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    head: str
    head_rows: int
    group: int
    tokenizer: str
    int8: str  # what is int8, in words ("" if nothing)

    def text(self) -> str:
        return (f"{wrote(self.tensors, self.parameters, self.bytes)}, group size {self.group}{self.int8}, {self.head} head of "
                f"{self.head_rows} rows, tokenizer: {self.tokenizer}; {self.seconds:.1f} s")


def wrote(tensors: int, parameters: int, nbytes: int) -> str:
    """The start of a conversion's summary line: what the file holds."""
    bits = 8 * nbytes / max(parameters, 1)
    return (f"wrote {tensors} tensors, {parameters / 1e6:.1f} M parameters, {nbytes / 1e6:.1f} MB "
            f"({bits:.2f} bits per parameter)")


def read_config(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise PyguardError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)") from None
    except (OSError, ValueError) as e:
        raise PyguardError(f"{path}: cannot parse ({e})") from None
    except RecursionError:
        raise PyguardError(f"{path}: cannot parse (nested too deeply)") from None
    if not isinstance(hf, dict):
        raise PyguardError(f"{path}: not a JSON object")
    return ModelConfig.from_hf(hf)


def read_tokenizer(hf_dir: str):
    """The checkpoint's tokenizer as a pyguard Tokenizer, or (None, reason) if it cannot be
    represented; special token names come from tokenizer.json / tokenizer_config.json."""
    model = os.path.join(hf_dir, "original", "tokenizer.model")
    tok_json = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(model) and not os.path.exists(tok_json):
        return None, "no original/tokenizer.model or tokenizer.json"
    from ..formats.tokenizer import Tokenizer, from_hf_tokenizer_json

    try:
        if os.path.exists(model):
            tok = Tokenizer.from_file(model)
            names = _special_names(hf_dir)
            if names:
                tok = Tokenizer(tok.ranks, names)
            return tok, "original/tokenizer.model"
        return from_hf_tokenizer_json(tok_json), "tokenizer.json"
    except PyguardError as e:
        return None, str(e)


def _special_names(hf_dir: str) -> dict[str, int]:
    """{name: id} of the added (special) tokens a Hugging Face checkpoint declares."""
    def added(name: str, key: str, pairs) -> dict[str, int]:
        """{content: id} of (id, token) pairs; ids as JSON integers or their decimal strings."""
        path = os.path.join(hf_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f).get(key) or {}
            out = {t["content"]: int(i) if isinstance(i, str) and i.isdecimal() else i for i, t in pairs(data)}
            if all(isinstance(c, str) and type(i) is int for c, i in out.items()):
                return out
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            pass
        raise PyguardError(f"{path}: malformed {key}")

    return (added("tokenizer.json", "added_tokens", lambda ts: ((t["id"], t) for t in ts))
            or added("tokenizer_config.json", "added_tokens_decoder", lambda d: d.items()))


def convert(hf_dir: str, out_path: str, group: int = 32, head: str = "full", family: str = "auto",
            threads: int | None = None, progress: Callable[[float, str], None] | None = None,
            calibration: bool | str | list = True, table: str = "int8") -> Summary:
    """Convert a checkpoint directory to a pyguard file (written to a temporary name, then renamed).

    calibration: True (the built-in conversations), a JSONL file of conversations, token id
    lists (for a checkpoint whose tokenizer pyguard cannot read), or False (plain searched scales).
    table: "int8" (the embedding table, and a pruned head or the table as head, int8 per row)
    or "int4" (every matrix int4, as files of format version 1; a full tied head decodes faster)."""
    t0 = time.time()
    if group not in quant.GROUP_SIZES:
        raise PyguardError(f"group size {group} not supported (use one of {quant.GROUP_SIZES})")
    if head not in ("full", "guard"):
        raise PyguardError(f"head must be 'full' or 'guard', not {head!r}")
    if table not in ("int8", "int4"):
        raise PyguardError(f"table must be 'int8' or 'int4', not {table!r}")
    if not os.path.isdir(hf_dir):
        raise PyguardError(f"{hf_dir}: not a directory")
    cfg = read_config(hf_dir)
    quant.check_shape(cfg.dim, group)
    quant.check_shape(cfg.n_heads * cfg.head_dim, group)
    quant.check_shape(cfg.hidden_dim, group)
    ckpt = Checkpoint(hf_dir)
    ckpt.require(expected_shapes(cfg))
    if family == "auto":
        family = "llama-guard-3-8b" if cfg.dim == 4096 else "llama-guard-3-1b"
    if family not in FAMILIES:
        raise PyguardError(f"family must be auto or one of {', '.join(FAMILIES)}, not {family!r}")
    tok, tok_note = read_tokenizer(hf_dir)
    if tok is None:
        warnings.warn(f"tokenizer not converted ({tok_note}): the file serves token ids only, not the guard API", stacklevel=2)
    elif tok.vocab_size > cfg.vocab_size:
        raise PyguardError(f"the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    head_ids = None
    if head == "guard":
        if tok is None:
            raise PyguardError(f"--head guard needs the tokenizer, which could not be read: {tok_note}")
        head_ids = answer_token_ids(tok, list(CATEGORIES[family]), family)

    cal, pool = None, None
    try:  # the calibration's store goes whatever stops the conversion, from its first matrix on
        if calibration is not False:
            if isinstance(calibration, list):
                prompts = calibration
            elif tok is None:  # no guard prompts to run: the file serves token ids only anyway
                if calibration is not True:
                    raise PyguardError(f"calibration needs the tokenizer, which could not be read ({tok_note})")
                warnings.warn("no calibration without a tokenizer: plain searched scales", stacklevel=2)
                prompts = None
            else:
                prompts = calibrate.guard_prompts(tok, family, None if calibration is True else calibrate.read_conversations(calibration))
            if prompts is not None:
                cal = calibrate.calibrate(ckpt, cfg, prompts, group, progress=progress, threads=threads)
        plan = tensor_plan(cfg)
        if cfg.tie_embeddings and head_ids is None:
            plan = [p for p in plan if p[0] != "output"]  # the embedding table serves as the head
        # int8 where it costs nothing at run time: a lookup of n rows, a pruned head's 21 rows (a
        # full untied head stays int4: its product is the kernels'); a tied full head is the table
        int8 = [] if table == "int4" else ["tok_embeddings"] + (["output"] if head_ids is not None else [])
        tok_arrays = tokenizer_arrays(tok) if tok is not None else []
        stored = tensor_layout(cfg, group, None if head_ids is None else len(head_ids), None, int8)
        layout = [(n, "u8" if a.dtype == np.uint8 else "u32", a.shape) for n, a in tok_arrays] + stored
        params = sum(math.prod(s) * (2 if n.endswith(".qs") else 1) for n, _, s in stored if not n.endswith((".scales", ".rowsum")))
        scales = "f16, searched (min activation-weighted squared error)" if cal else "f16, searched (min squared error)"
        extra = {"quant": {"group": group, "scales": scales, "activations": "uint8 asymmetric per token",
                           "calibration": cal.describe() if cal else None},
                 "head": head, "source": os.path.basename(os.path.abspath(hf_dir)), "tokenizer_note": tok_note}
        writer = Writer(out_path, header_meta(cfg, group, head_ids, family, tok, extra, None, int8), layout)
        done = 0
        pool = ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1))
        try:
            for _, a in tok_arrays:
                writer.append(a)
            for name, sources, quantized in plan:
                if not quantized:
                    w = ckpt.read(sources[0])
                    w = cal.fold(sources[0], slice(None), w) if cal else w
                    quant.check_weights(w, sources[0], quantized=False)
                    writer.append(w)
                    done += w.size
                    if progress:
                        progress(done / params, name)
                    continue
                kept = cal.stored(name) if cal else None
                if kept is not None:  # quantized during the calibration pass (error feedback)
                    for part in (kept.qs, kept.scales, kept.rowsum):
                        for r in range(0, len(part), CHUNK_ROWS):
                            writer.append(np.array(part[r : r + CHUNK_ROWS]))
                    done += kept.shape[0] * kept.shape[1]
                    if progress:
                        progress(done / params, name)
                    continue
                scales, rowsums, q8 = [], [], name in int8
                for src, rows in _row_chunks(ckpt, sources, head_ids if name == "output" else None):
                    w = ckpt.read(src, rows) if isinstance(rows, slice) else np.concatenate([ckpt.read(src, slice(r, r + 1)) for r in rows])
                    w = cal.fold(src, rows, w) if cal else w
                    quant.check_weights(w, src, quantized=not q8)  # int8's float32 scales take any finite row
                    if q8:  # plain per-row absmax: no search to spread over threads
                        parts = [quant.quantize8(w)]
                    else:
                        rows_of = (lambda i: cal.quantize(name, w[i : i + SUB_ROWS], group)) if cal else (
                            lambda i: quant.quantize_weights(w[i : i + SUB_ROWS], group, search=True))
                        parts = list(pool.map(rows_of, range(0, len(w), SUB_ROWS)))
                    for p in parts:
                        writer.append(p.q if q8 else p.qs)
                    scales += [p.scales for p in parts]
                    rowsums += [] if q8 else [p.rowsum for p in parts]
                    done += w.size
                    if progress:
                        progress(done / params, name)
                writer.append(np.concatenate(scales))
                if not q8:
                    writer.append(np.concatenate(rowsums))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        if pool:
            pool.shutdown()
        if cal:
            cal.close()
    words = {"tok_embeddings": "embedding table" + (" (also the head)" if cfg.tie_embeddings and head_ids is None else ""),
             "output": "head"}
    return Summary(len(plan), params, os.path.getsize(out_path), time.time() - t0, head,
                   len(head_ids) if head_ids is not None else cfg.vocab_size, group, tok_note if tok else "none",
                   f", int8 {' and '.join(words[n] for n in int8)}" if int8 else "")


def _row_chunks(ckpt: Checkpoint, sources: list[str], head_ids):
    """(source tensor, rows) pieces in output row order: slices of CHUNK_ROWS, or id lists."""
    if head_ids is not None:
        for i in range(0, len(head_ids), CHUNK_ROWS):
            yield sources[0], head_ids[i : i + CHUNK_ROWS]
        return
    for src in sources:
        n = ckpt.rows(src)
        for r in range(0, n, CHUNK_ROWS):
            yield src, slice(r, min(r + CHUNK_ROWS, n))
