"""The Llama 3 tokenizer: byte-level BPE on tiktoken, built from ranks and special tokens.

Text passed to `encode` is always ordinary text: a message containing "<|eot_id|>" is encoded
as the characters "<", "|", "eot", ... and never as the special token, so no one can forge the
end of a conversation or the model's answer. Special tokens enter only through `special`,
which the prompt builder uses.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Iterator, Sequence

import tiktoken

from .errors import PyguardError

PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Meta's reference encodes long inputs in pieces; the same pieces give the same tokens.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Names of the 256 special tokens after the ranks, as in Meta's reference tokenizer
# (a checkpoint's tokenizer.json may rename the reserved ones; see Tokenizer.from_file).
SPECIAL_NAMES = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int]):
        """ranks: token bytes -> id (the BPE merge priority); special_tokens: name -> id."""
        self.ranks, self.special_tokens = ranks, dict(special_tokens)
        if set(special_tokens.values()) & set(ranks.values()):
            raise PyguardError("tokenizer: special token ids collide with ordinary token ids")
        try:
            self._enc = tiktoken.Encoding("pyguard", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        except Exception as e:  # tiktoken's own errors (ValueError, pyo3 panics) carry no common type
            raise PyguardError(f"tokenizer: cannot build the BPE ({e})") from None
        self._bytes = {i: b for b, i in ranks.items()}
        self._bytes.update((i, n.encode()) for n, i in self.special_tokens.items())

    @classmethod
    def from_file(cls, path: str, special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """A tiktoken `tokenizer.model` (lines of base64 token and rank); special tokens
        default to Llama 3's 256, numbered after the ranks."""
        ranks = {}
        try:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except OSError as e:
            raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, binascii.Error):
            raise PyguardError(f"{path}: line {n} is not 'base64-token rank'") from None
        if special_tokens is None:
            special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)}
        return cls(ranks, special_tokens)

    @property
    def vocab_size(self) -> int:
        return max(self._bytes) + 1

    def special(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>"."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise PyguardError(f"the tokenizer has no special token {name}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of text, every character as text (special-token spellings included)."""
        if not isinstance(text, str):
            raise PyguardError(f"can only encode str, not {type(text).__name__}")
        out: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                out += self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return b"".join(self._bytes[int(i)] for i in ids)
        except KeyError as e:
            raise PyguardError(f"token id {e.args[0]} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; bytes that are not valid UTF-8 (a partial character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _runs(s: str, limit: int) -> Iterator[str]:
    """Cut s so that no piece holds more than `limit` consecutive white-space or non-white-space
    characters (Meta's reference does this to bound the regex's work)."""
    start, run, space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            space, run = not space, 1
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def _gpt2_byte_map() -> dict[str, int]:
    """The printable characters byte-level BPE files use for each byte (GPT-2's scheme)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _regexes(node) -> list[str]:
    """Every split regex in a tokenizer.json pre-tokenizer tree."""
    if isinstance(node, dict):
        return [node["Regex"]] if isinstance(node.get("Regex"), str) else [r for v in node.values() for r in _regexes(v)]
    return [r for v in node for r in _regexes(v)] if isinstance(node, list) else []


def from_hf_tokenizer_json(path: str) -> Tokenizer:
    """A Hugging Face `tokenizer.json` byte-level BPE with Llama 3's split pattern, as ranks.

    tiktoken merges the pair whose result has the lowest rank; a Hugging Face BPE merges by
    the order of its merge list. The two agree only if merge results are ranked in merge
    order, which is checked: other vocabularies are refused rather than tokenized differently.
    """
    def refuse(why: str) -> PyguardError:
        return PyguardError(f"{path}: tokenizer cannot be represented: {why}")

    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        vocab, merges = model["vocab"], model["merges"]
        added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens", [])}
    except OSError as e:
        raise PyguardError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise PyguardError(f"{path}: not a Hugging Face tokenizer.json") from None
    if model.get("type") != "BPE":
        raise refuse(f"model type {model.get('type')!r} is not BPE")
    if PATTERN not in _regexes(tj.get("pre_tokenizer")):
        raise refuse("its pre-tokenizer is not Llama 3's split pattern")
    byte_of = _gpt2_byte_map()
    try:
        ranks = {bytes(byte_of[c] for c in tok): int(i) for tok, i in vocab.items() if tok not in added}
    except KeyError:
        raise refuse("a vocabulary entry is not byte-level") from None
    if not all(bytes([b]) in ranks for b in range(256)):
        raise refuse("not every byte has a token")
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        r = vocab.get(a + b)
        if r is None or r < last:  # pairs making the same token share its rank
            raise refuse(f"merge {a!r} + {b!r} is out of rank order")
        last = r
    return Tokenizer(ranks, added)
