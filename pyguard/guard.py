"""Llama Guard classification: conversation in, verdict out.

Per request: build the prompt's tokens, start from the cached key/value state of its policy
prefix (computed once per role, categories and exclusions), prefill the conversation and the
instructions plus the "\\n\\n" every answer starts with, then decode greedily within the
answer grammar until the answer is decided.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import PyguardError
from .model import Model, Snapshot
from .prompt import Conversation, categories_of, messages, prompt_parts
from .tokenizer import Tokenizer
from .verdict import ANSWER_START, SAFE, UNSAFE, AnswerDecoder, Grammar, answer_token_ids

MAX_ANSWER_TOKENS = 48  # "unsafe\n" and every code of a 14-category policy fit well within this


@dataclass
class Result:
    verdict: str  # "safe" or "unsafe"
    categories: list[str]  # violated codes, e.g. ["S1", "S10"]
    category_names: list[str]  # their descriptions, e.g. ["Violent Crimes.", "Hate."]
    score: float  # probability of "unsafe" as the first answer token
    answer: str  # the model's answer text after "\n\n"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the policy-prefix cache
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill, decode, total

    @property
    def unsafe(self) -> bool:
        return self.verdict == UNSAFE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Guard:
    """A Llama Guard model ready to classify. Not reentrant: one call at a time."""

    def __init__(self, model: Model, tokenizer: Tokenizer, family: str = "llama-guard-3-1b", max_tokens: int = 8192,
                 prefix_cache: int = 8):
        """max_tokens: the longest prompt accepted (longer conversations raise PyguardError);
        prefix_cache: how many policy prefixes (role x categories x exclusions) to keep."""
        self.model, self.tokenizer, self.family = model, tokenizer, family
        self.max_tokens = min(max_tokens, model.config.max_seq_len) - MAX_ANSWER_TOKENS
        self.eot_id = tokenizer.special("<|eot_id|>")
        self.start_ids = tokenizer.encode(ANSWER_START)
        head_text = [self._text(int(i)) for i in model.head_ids]
        self._unsafe_rows = np.flatnonzero(model.head_ids == tokenizer.encode(UNSAFE)[0])
        self._head_text = head_text
        self._decoders: dict[tuple[str, ...], AnswerDecoder] = {}
        self._prefixes: OrderedDict[tuple, Snapshot] = OrderedDict()
        self.prefix_cache = prefix_cache

    @classmethod
    def load(cls, path: str, threads: int | None = None, **kw) -> "Guard":
        """Open a pyguard file; threads: kernel worker threads (None: PYGUARD_THREADS or all cores)."""
        from . import kernels
        from .file import load

        kernels.set_threads(threads)
        f = load(path)
        if f.family is None:
            raise PyguardError(f"{path}: not converted as a Llama Guard model (no prompt family recorded)")
        model = Model(f.config, f.tensors, f.head_ids)
        return cls(model, f.tokenizer(), f.family, **kw)

    def _text(self, token_id: int) -> str | None:
        if token_id in self.tokenizer.special_tokens.values():
            return None
        try:
            return self.tokenizer.decode_bytes([token_id]).decode("utf-8")
        except (UnicodeDecodeError, PyguardError):
            return None

    def _decoder(self, codes: tuple[str, ...]) -> AnswerDecoder:
        if codes not in self._decoders:
            # only the tokens answers are spelled with: a full head then decodes like a guard head
            spelled = set(answer_token_ids(self.tokenizer, codes))
            text = [t if int(i) in spelled else None for i, t in zip(self.model.head_ids, self._head_text)]
            self._decoders[codes] = AnswerDecoder(Grammar(codes), self.model.head_ids, text, self.eot_id)
        return self._decoders[codes]

    def _prefix(self, key: tuple, ids: list[int]) -> Snapshot:
        """The cached state after the policy prefix (least recently used ones are dropped)."""
        snap = self._prefixes.get(key)
        if snap is None:
            state = self.model.new_state(len(ids))
            self.model.prefill(state, ids)
            snap = state.snapshot()
            if self.prefix_cache > 0:
                self._prefixes[key] = snap
                while len(self._prefixes) > self.prefix_cache:
                    self._prefixes.popitem(last=False)
        else:
            self._prefixes.move_to_end(key)
        return snap

    def prepare(self, conversation: Conversation, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = ()):
        """(prefix key, prefix ids, remaining ids incl. the answer start, kept categories) of a
        request, validated; a prompt over the token limit raises PyguardError."""
        msgs = messages(conversation)
        cats = categories_of(categories, exclude, self.family)
        prefix, rest = prompt_parts(self.tokenizer, conversation, cats)
        rest = rest + self.start_ids
        n = len(prefix) + len(rest)
        if n > self.max_tokens:
            raise PyguardError(f"the prompt is {n} tokens, over the limit of {self.max_tokens} "
                               f"(max_tokens minus {MAX_ANSWER_TOKENS} for the answer): shorten the conversation")
        key = (msgs[-1][0], tuple(cats.items()))
        return key, prefix, rest, cats

    def classify(self, conversation: Conversation, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                 threshold: float | None = None) -> Result:
        """Judge the last message of a conversation (a str is one user message).

        categories: {code: description} replacing the defaults; exclude: codes left out;
        threshold: if given, the verdict is unsafe exactly when score >= threshold (the
        categories are then still decoded greedily) instead of the greedy first token."""
        return self.classify_many([conversation], categories, exclude, threshold)[0]

    def classify_many(self, conversations: Sequence[Conversation], categories: Mapping[str, str] | None = None,
                      exclude: Sequence[str] = (), threshold: float | None = None, batch_size: int = 16) -> list[Result]:
        """classify() of every conversation, batch_size at a time: a batch is prefilled and
        decoded together (each weight matrix streamed once per pass for all), and every result
        is the one classify() gives alone. All conversations are validated before any work;
        timings are those of the batch a result was computed in."""
        if batch_size < 1:
            raise PyguardError("batch_size must be at least 1")
        requests = [self.prepare(c, categories, exclude) for c in conversations]
        out: list[Result] = []
        for i in range(0, len(requests), batch_size):
            out += self._batch(requests[i : i + batch_size], threshold)
        return out

    def _batch(self, requests: list, threshold: float | None) -> list[Result]:
        t0 = time.perf_counter()
        states, rests, cached = [], [], []
        for key, prefix, rest, _ in requests:
            cached.append(len(prefix) if key in self._prefixes else 0)
            state = self.model.new_state(len(prefix) + len(rest) + MAX_ANSWER_TOKENS)
            state.restore(self._prefix(key, prefix))
            states.append(state)
            rests.append(rest)
        logits = list(self.model.prefill_many(states, rests))
        t1 = time.perf_counter()
        scores = [self.score(x) for x in logits]
        force = [None if threshold is None else UNSAFE if s >= threshold else SAFE for s in scores]
        decoders = [self._decoder(tuple(cats)) for *_, cats in requests]
        texts, tokens = [""] * len(requests), [[] for _ in requests]
        active = list(range(len(requests)))
        while active:  # every unfinished answer advances by a choice (and what it forces) per pass
            fed, new = [], []
            for k in active:
                rows = decoders[k].advance(texts[k], logits[k], force[k])
                texts[k] += "".join(decoders[k].text[r] for r in rows)
                tokens[k] += [int(self.model.head_ids[r]) for r in rows]
                if rows and not decoders[k].finished(texts[k]):
                    fed.append(k)
                    new.append(tokens[k][-len(rows):])
            if fed:
                for k, x in zip(fed, self.model.prefill_many([states[k] for k in fed], new)):
                    logits[k] = x
            active = fed
        t2 = time.perf_counter()
        results = []
        for k, (_, prefix, rest, cats) in enumerate(requests):
            verdict = UNSAFE if texts[k].startswith(UNSAFE) else SAFE
            codes = decoders[k].grammar.categories(texts[k])
            results.append(Result(verdict, codes, [cats[c] for c in codes], scores[k], texts[k], len(prefix) + len(rest),
                                  cached[k], len(tokens[k]), {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}))
        return results

    def score(self, logits: np.ndarray) -> float:
        """Probability of the "unsafe" token among the head's rows (the whole vocabulary with a
        full head, the kept answer tokens with a guard head)."""
        if self._unsafe_rows.size == 0:
            raise PyguardError("the model's output head has no 'unsafe' token")
        z = logits.astype(np.float64)
        z -= z.max()
        p = np.exp(z)
        return float(p[self._unsafe_rows[0]] / p.sum())
