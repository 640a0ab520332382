"""The Llama 3 tokenizer: byte-level BPE on tiktoken, built from ranks and special tokens.

Text given to `encode` is always ordinary text: a message holding "<|eot_id|>" is encoded as
the characters "<", "|", "eot", ... and never as the special token, so a message cannot forge
the end of a turn or the model's answer. Special tokens enter a sequence only by id, through
`special` / `encode_with_specials`, which the prompt builder uses.

`encode` gives the very ids of Meta's reference (`llama_models.llama3.tokenizer.Tokenizer`
with bos=False, eos=False), including its handling of very long inputs (cut every 400,000
characters, and inside runs of more than 25,000 white-space or non-white-space characters) and
of surrogates (tiktoken's: a high + low surrogate pair becomes the character it encodes, a
lone surrogate becomes U+FFFD).
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import re
from typing import Any, Iterable, Iterator, Mapping

import tiktoken

from ..errors import PyguardError

LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The split a Hugging Face ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Names of the 256 special tokens numbered after the ranks, as in Meta's reference tokenizer
# (llama-models 0.3.0). Only the first few are stable across releases; a checkpoint's own
# tokenizer.json names the others (see from_hf_tokenizer_json).
LLAMA3_SPECIAL_NAMES = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]

# Meta's reference encodes long inputs piece by piece (tiktoken used to panic on more than
# ~400k characters, and its regex is quadratic on long runs). The cuts change the tokens at
# the cut points, so they are reproduced exactly.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run (of white space or of anything else) longer than MAX_RUN_CHARS, matched whole from its
# first character. Python's \s is exactly str.isspace, which the reference tests.
# Text that every piece class of a split pattern meets (letters, digits, spaces, punctuation,
# newlines, other scripts, emoji, contractions), encoded once by every new Tokenizer.
_PROBE = "The quick brown fox jumps over the lazy dog. Hello, World! It's 2024; x=1.5e3 \t\r\n\n  ÿ Ünïcödé 日本語 🙂 'S 'll --> \u00a0 end\n"
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


class Tokenizer:
    """Byte-level BPE: `ranks` maps token bytes to id (lower id = merged first), `special_tokens`
    maps names such as "<|eot_id|>" to ids, `pattern` is the pre-tokenizer's split regex."""

    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], pattern: str = LLAMA3_PATTERN):
        try:  # ids may come as numpy integers (from a model file): keep plain ints
            self.ranks: dict[bytes, int] = {b: _index(i) for b, i in ranks.items()}
            self.special_tokens: dict[str, int] = {n: _index(i) for n, i in special_tokens.items()}
        except (AttributeError, TypeError):
            raise PyguardError("tokenizer: ranks and special tokens must be mappings to integer ids") from None
        self.pattern = pattern
        self._check()
        self._enc = _tiktoken("cannot build it", tiktoken.Encoding, "pyguard", pat_str=pattern,
                              mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        # tiktoken panics on a split pattern that matches an empty piece: find out now rather
        # than at the first message that shows it (encode catches the rest)
        self.encode(_PROBE)
        self._bytes = {i: b for b, i in self.ranks.items()}
        self._bytes.update((i, name.encode("utf-8")) for name, i in self.special_tokens.items())
        self._special_ids = frozenset(self.special_tokens.values())

    def _check(self) -> None:
        """Refuse what would make tiktoken panic later or decode wrongly."""
        if not isinstance(self.pattern, str) or not self.pattern:
            raise PyguardError("tokenizer: the split pattern must be a non-empty str")
        if not all(type(b) is bytes and b and i >= 0 for b, i in self.ranks.items()):
            raise PyguardError("tokenizer: ranks must map non-empty bytes to ids >= 0")
        if not all(isinstance(n, str) and n and i >= 0 for n, i in self.special_tokens.items()):
            raise PyguardError("tokenizer: special tokens must map non-empty names to ids >= 0")
        if len(set(self.ranks.values())) != len(self.ranks):
            raise PyguardError("tokenizer: two tokens share a rank")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise PyguardError("tokenizer: two special tokens share an id")
        if set(self.special_tokens.values()) & set(self.ranks.values()):
            raise PyguardError("tokenizer: a special token id is also an ordinary token's rank")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:  # BPE starts from single bytes: text holding such a byte could not be encoded
            raise PyguardError(f"tokenizer: {len(missing)} single bytes have no token (first: 0x{missing[0]:02x})")

    @classmethod
    def from_file(cls, path: str, special_tokens: Mapping[str, int] | None = None) -> "Tokenizer":
        """A tiktoken `tokenizer.model`: one "base64(token) rank" per line, ranks 0..n-1.
        special_tokens defaults to Llama 3's 256, numbered n, n+1, ... as in Meta's reference."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PyguardError(f"{path}: cannot read ({e.strerror or e})") from None
        ranks: dict[bytes, int] = {}
        seen: set[int] = set()
        for n, line in enumerate(data.split(b"\n"), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2 or not fields[1].isdigit():
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if not token:
                    raise ValueError
            except (ValueError, binascii.Error):
                raise PyguardError(f"{path}: line {n} is not 'base64-token rank' (is this a tiktoken tokenizer.model?)") from None
            if token in ranks or rank in seen:
                raise PyguardError(f"{path}: line {n} repeats a token or a rank")
            ranks[token] = rank
            seen.add(rank)
        if not ranks:
            raise PyguardError(f"{path}: no tokens (is this a tiktoken tokenizer.model?)")
        if max(seen) != len(ranks) - 1:  # ranks are unique, so this means 0..n-1
            raise PyguardError(f"{path}: ranks are not 0..{len(ranks) - 1}")
        if special_tokens is None:
            special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_NAMES)}
        try:
            return cls(ranks, special_tokens)
        except PyguardError as e:
            raise PyguardError(f"{path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, ordinary and special (ids are 0..vocab_size-1, some possibly unused)."""
        return max(self._bytes) + 1

    def special(self, name: str) -> int:
        """Id of a special token by name, e.g. special("<|eot_id|>") == 128009."""
        try:
            return self.special_tokens[name]
        except (KeyError, TypeError):
            raise PyguardError(f"the tokenizer has no special token {name!r}") from None

    def is_special(self, token_id: int) -> bool:
        """Is this id a special token's (rather than some bytes of text)?"""
        return token_id in self._special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of text, all of it ordinary text (special-token spellings included); no BOS."""
        if not isinstance(text, str):
            raise PyguardError(f"can only encode str, not {type(text).__name__}")
        out: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _cut_long_runs(text[i : i + MAX_ENCODE_CHARS]):
                # the reference's call: every special token disallowed as such, none refused
                out += _tiktoken("cannot encode this text", self._enc.encode, piece, allowed_special=set(), disallowed_special=())
        return out

    def encode_with_specials(self, parts: Iterable[str | int]) -> list[int]:
        """Ids of a sequence of parts: a str is encoded as text (each str on its own), an int
        must be a special token id (from `special`) and is kept as is."""
        out: list[int] = []
        for part in parts:
            if isinstance(part, str):
                out += self.encode(part)
            elif isinstance(part, int) and not isinstance(part, bool) and self.is_special(part):
                out.append(int(part))
            else:
                raise PyguardError(f"encode_with_specials: {part!r} is neither text nor a special token id")
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of token ids; a special token gives its name."""
        try:
            return b"".join(self._bytes[operator.index(i)] for i in ids)
        except KeyError as e:
            raise PyguardError(f"token id {e.args[0]} is not in the vocabulary") from None
        except TypeError:
            raise PyguardError("token ids must be integers") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 (such as part of a character, when
        ids stop in its middle) become U+FFFD, as in tiktoken's decode."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _index(i: Any) -> int:
    if isinstance(i, bool):  # operator.index(True) is 1: a JSON true is no id
        raise TypeError
    return operator.index(i)


def _tiktoken(what: str, fn, *args, **kw):
    """fn(*args, **kw), a tiktoken call: its errors become PyguardError. tiktoken raises
    ValueError, OverflowError, or pyo3's PanicException, which derives from BaseException."""
    try:
        return fn(*args, **kw)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise PyguardError(f"tokenizer: tiktoken {what} ({str(e)[:200]})") from None


def _cut_long_runs(s: str) -> Iterator[str]:
    """s cut so that no piece holds more than MAX_RUN_CHARS consecutive white-space or
    non-white-space characters: a run is cut every MAX_RUN_CHARS characters from its start,
    exactly where the reference's character-by-character loop cuts it."""
    start = 0
    for m in _LONG_RUN.finditer(s):
        for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
            yield s[start:cut]
            start = cut
    yield s[start:]


def _byte_of_char() -> dict[str, int]:
    """The character byte-level BPE files write for each byte (GPT-2's `bytes_to_unicode`):
    printable Latin-1 bytes stand for themselves, the others map to U+0100 onwards in order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(0x100 + extra)] = b
            extra += 1
    return out


def _split_pattern(pre: Any, refuse) -> str:
    """The split regex of a byte-level pre-tokenizer: Split(regex, isolated) + ByteLevel without
    regex (what converters of tiktoken files write), or ByteLevel with its built-in GPT-2 regex."""
    def byte_level(p: Any, use_regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
                and p.get("use_regex", True) == use_regex)

    if byte_level(pre, True):
        return GPT2_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers")
        if isinstance(steps, list) and len(steps) == 2 and byte_level(steps[1], False):
            split = steps[0]
            if (isinstance(split, dict) and split.get("type") == "Split" and split.get("behavior") == "Isolated"
                    and not split.get("invert") and isinstance(split.get("pattern"), dict)
                    and isinstance(split["pattern"].get("Regex"), str)):
                return split["pattern"]["Regex"]
    raise refuse("its pre-tokenizer is not a regex split followed by ByteLevel (without prefix space)")


def from_hf_tokenizer_json(path: str) -> Tokenizer:
    """The Tokenizer of a Hugging Face `tokenizer.json` holding a byte-level BPE.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank,
    and considers every pair whose concatenation is a token; a Hugging Face BPE merges only
    the pairs in its merge list, in list order. The two agree when (1) the merges, in list
    order, make tokens of non-decreasing rank and (2) every split of a token into two tokens
    is a merge. Both are checked, as are the other parts of the file that change tokens
    (normalizer, pre-tokenizer, added tokens): a file failing any check is refused with a
    PyguardError rather than tokenized differently. (Files converted from tiktoken, such as
    Llama 3's, pass: 280,147 merges, all the splits of its 128,000 tokens.)
    """
    def refuse(why: str) -> PyguardError:
        return PyguardError(f"{path}: tokenizer cannot be represented: {why}")

    try:
        with open(path, "rb") as f:
            tj = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise PyguardError(f"{path}: not a JSON file") from None
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise PyguardError(f"{path}: not a Hugging Face tokenizer.json (no model vocab and merges)")
    if model.get("type") != "BPE":
        raise refuse(f"model type {model.get('type')!r} is not BPE")
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise refuse("its BPE uses dropout, byte fallback or subword affixes")
    if tj.get("normalizer") is not None:
        raise refuse("it normalizes text before tokenizing")
    pattern = _split_pattern(tj.get("pre_tokenizer"), refuse)

    vocab: dict[str, int] = model["vocab"]
    if not all(isinstance(t, str) and type(i) is int for t, i in vocab.items()):
        raise PyguardError(f"{path}: malformed vocabulary (expected token: id)")
    added = tj.get("added_tokens", [])
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and type(a.get("id")) is int for a in added):
        raise PyguardError(f"{path}: malformed added_tokens")
    specials: dict[str, int] = {}
    for a in added:
        if vocab.get(a["content"]) == a["id"] and not a.get("special"):
            continue  # an ordinary token listed again
        if not a.get("special"):  # Hugging Face would match it inside text: not BPE, and not ours
            raise refuse(f"added token {a['content']!r} is not special")
        specials[a["content"]] = a["id"]
    bpe = {t: i for t, i in vocab.items() if t not in specials}

    byte_of = _byte_of_char()
    try:
        ranks = {bytes(byte_of[c] for c in t): i for t, i in bpe.items()}
    except KeyError:
        raise refuse("a vocabulary token is not written in byte-level characters") from None

    pairs: set[tuple[str, str]] = set()
    last = -1
    for n, m in enumerate(model["merges"]):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise PyguardError(f"{path}: merge {n} is malformed")
        a, b = parts
        rank = bpe.get(a + b)
        if a not in bpe or b not in bpe or rank is None:
            raise refuse(f"merge {n} ({a!r} + {b!r}) does not join two tokens into a token")
        if rank < last:  # merges making the same token share its rank
            raise refuse(f"merge {n} ({a!r} + {b!r}) is out of rank order: merge priority must follow token ranks")
        last = rank
        pairs.add((a, b))
    for t in bpe:
        for k in range(1, len(t)):
            if t[:k] in bpe and t[k:] in bpe and (t[:k], t[k:]) not in pairs:
                raise refuse(f"no merge of {t[:k]!r} + {t[k:]!r} into {t!r}, which tiktoken would make")
    try:
        return Tokenizer(ranks, specials, pattern)
    except PyguardError as e:
        raise PyguardError(f"{path}: {e}") from None
