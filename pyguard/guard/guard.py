"""Llama Guard classification: conversation in, verdict out.

Per request: build the prompt's tokens, restore the key/value state of their longest prefix held
in the guard's token-prefix cache (the policy prefix at least, once computed; the whole earlier
conversation when it was checked before, as turns are added or a reply streams), prefill the rest
and the "\\n\\n" every answer starts with, then decode greedily within the answer grammar until
the answer is decided. The state at the end of the conversation goes into the cache for the next
request. Restoring is exact (a position's state depends only on the tokens up to it), so a result
does not depend on what the cache held.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .. import checks
from ..engine import detmath
from ..engine.cache import PrefixCache
from ..errors import PyguardError
from ..engine.model import Model
from .prompt import CATEGORIES, Conversation, categories_of, conversation_text, messages, prompt_parts
from . import thresholds as th
from .stream import Stream
from ..formats.tokenizer import Tokenizer
from .verdict import ENDS, STARTS, UNSAFE, AnswerDecoder, Grammar, answer_token_ids

# Guards alive in this process: after os.fork() the child gets fresh locks (one held by a
# parent thread at the fork would never be released in the child, where that thread is gone).
_LIVE: "weakref.WeakSet[Guard]" = weakref.WeakSet()
# The token-prefix cache's default budget, in positions: 256 MiB for the 1B model (64 KiB a
# position), 1 GiB for 8B; a streamed reply of a few thousand tokens stays in it.
CACHE_POSITIONS = 4096
# Policies (tuples of category codes) whose answer decoder and category-score step a guard
# keeps, least recently used dropped first: a service taking per-request categories would
# otherwise keep one of each forever. A decoder is a few KB (the head rows answers can be spelled
# with), and rebuilding a dropped one gives the same answers, only costing a pass over the head.
POLICIES = 256


def _after_fork_in_child() -> None:
    for g in list(_LIVE):
        g._lock = threading.Lock()
        g._policy_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True, eq=False)
class Request:
    """A validated request (Guard.prepare): its prompt's tokens, then the answer start."""

    ids: np.ndarray  # int64 [n]
    policy: int  # tokens of the policy prefix (role, categories, exclusions)
    conversation: int  # tokens up to the end of the conversation: what the next turn shares
    categories: dict[str, str]
    budget: int  # positions of the longest answer the policy allows


@dataclass
class Result:
    verdict: str  # "safe" or "unsafe"
    categories: list[str]  # violated codes, e.g. ["S1", "S10"]
    category_names: list[str]  # their descriptions, e.g. ["Violent Crimes.", "Hate."]
    score: float  # probability of "unsafe" as the first answer token
    answer: str  # the model's answer text after "\n\n" (Llama Guard 2: after "[/INST]", from its space)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from the token-prefix cache
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill, decode, total
    # {code: P(unsafe) x P(code is the first category named)}, when asked for or unsafe (Guard._code_step)
    category_scores: dict[str, float] = field(default_factory=dict)

    @property
    def unsafe(self) -> bool:
        return self.verdict == UNSAFE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Guard:
    """A Llama Guard model ready to classify.

    Thread-safe: a guard's calls take turns (a lock held for the whole of a classify_many
    guards its prefix and decoder caches), separate guards run in parallel. Fork-safe."""

    def __init__(self, model: Model, tokenizer: Tokenizer, family: str = "llama-guard-3-1b", max_tokens: int = 8192,
                 cache_bytes: int | None = None):
        """max_tokens: the most positions a request may take, prompt and answer budget
        (longer conversations raise PyguardError); cache_bytes: memory for the key/value states
        of recent prompts' prefixes (None: CACHE_POSITIONS positions' worth; 0: none kept),
        least recently used dropped first."""
        checks.integer(max_tokens, "max_tokens", 1)
        self.model, self.tokenizer, self.family = model, tokenizer, family
        if cache_bytes is None:
            cache_bytes = CACHE_POSITIONS * model.new_state(1).kv.nbytes
        self.cache = PrefixCache(checks.integer(cache_bytes, "cache_bytes", 0))
        self.max_tokens = min(max_tokens, model.config.max_seq_len)
        cats = categories_of(None, (), family)  # an unknown family fails here; the shortest request, below
        fed, self.lead = STARTS[family]
        self.end_ids = [tokenizer.special(e) for e in ENDS[family]]
        self.start_ids = tokenizer.encode(fed)
        head_text = [self._text(int(i)) for i in model.head_ids]
        self._unsafe_rows = np.flatnonzero(model.head_ids == tokenizer.encode(self.lead + UNSAFE)[0])
        self._head_text = head_text
        # per policy, at most POLICIES each; their own lock: prepare() runs outside _lock
        self._decoders: OrderedDict[tuple[str, ...], AnswerDecoder] = OrderedDict()
        self._code_steps: OrderedDict[tuple[str, ...], tuple[list[int], list[int | None]]] = OrderedDict()
        self._policy_lock = threading.Lock()
        self._lock = threading.Lock()
        _LIVE.add(self)
        prefix, rest = prompt_parts(tokenizer, "x", cats, family=family)
        least = len(prefix) + len(rest) + len(self.start_ids) + Grammar(cats, self.lead).budget()
        if least > self.max_tokens:
            raise PyguardError(f"max_tokens {max_tokens} is too small for any prompt: the shortest request with the "
                               f"default policy takes {least} tokens (prompt and answer)")

    @classmethod
    def load(cls, path: str, threads: int | None = None, verify: bool = False, **kw) -> "Guard":
        """Open a pyguard file; threads: kernel worker threads (None: PYGUARD_THREADS or all cores);
        other keywords go to Guard().

        verify: read the whole file once and check every array's CRC-32 (what `pyguard verify`
        does) before the model is built; a mismatch raises PyguardError naming the damaged
        array (e.g. "array 'layers.3.wqkv.qs' is corrupt (checksum mismatch)"). Without it only
        the header, metadata, tokenizer and small arrays are checked and the weights are mapped
        unread, so a flipped weight byte would change scores without a word. Off by default
        because it reads the whole file (docs/FORMAT.md gives the cost); a process that serves
        for long should turn it on."""
        from ..formats.file import load

        f = load(path, verify=checks.flag(verify, "verify"))
        if f.family is None:
            raise PyguardError(f"{path}: not converted as a Llama Guard model (no prompt family recorded)")
        model = Model(f.config, f.tensors, f.head_ids, threads=threads)
        return cls(model, f.tokenizer(), f.family, **kw)

    def _text(self, token_id: int) -> str | None:
        if token_id in self.tokenizer.special_tokens.values():
            return None
        try:
            return self.tokenizer.decode_bytes([token_id]).decode("utf-8")
        except (UnicodeDecodeError, PyguardError):
            return None

    def _decoder(self, codes: tuple[str, ...]) -> AnswerDecoder:
        """The decoder of a policy's answers; a policy this head cannot answer raises PyguardError."""
        dec = self._recall(self._decoders, codes)
        if dec is None:
            # only the tokens answers are spelled with: a full head then decodes like a guard head
            spelled = set(answer_token_ids(self.tokenizer, codes, self.family))
            text = [t if int(i) in spelled else None for i, t in zip(self.model.head_ids, self._head_text)]
            dec = AnswerDecoder(Grammar(codes, self.lead), self.model.head_ids, text, self.end_ids)
            bad = dec.unspellable()
            if bad:
                head = f"guard head of {self.model.head_size} tokens" if self.model.head_size < self.model.config.vocab_size \
                    else "vocabulary"
                raise PyguardError(f"this model cannot answer {', '.join(bad)}: its output head ({head}) cannot spell "
                                   f"it, so that verdict could never be given (defaults: {', '.join(CATEGORIES[self.family])})")
            self._keep(self._decoders, codes, dec)
        return dec

    def _recall(self, cache: OrderedDict, codes: tuple[str, ...]) -> Any:
        """A policy's entry of cache (now the most recently used), or None."""
        with self._policy_lock:
            v = cache.get(codes)
            if v is not None:
                cache.move_to_end(codes)
            return v

    def _keep(self, cache: OrderedDict, codes: tuple[str, ...], value: Any) -> None:
        """Store a policy's entry, dropping the least recently used beyond POLICIES."""
        with self._policy_lock:
            cache[codes] = value
            cache.move_to_end(codes)
            while len(cache) > POLICIES:
                cache.popitem(last=False)

    def _code_step(self, codes: tuple[str, ...]) -> tuple[list[int], list[int | None]]:
        """(tokens, rows) of the per-category scores: the tokens fed after the prompt, "unsafe\\n"
        (after the family's lead) and the tokens every code's spelling starts with (for S1..S14:
        "unsafe\\nS"), and per code
        the head row of its next token (None when the head lacks it: probability 0). Codes whose
        spellings share that token (one code a prefix of another) share its probability."""
        step = self._recall(self._code_steps, codes)
        if step is None:
            spelled = [self.tokenizer.encode(f"{self.lead}{UNSAFE}\n{c}") for c in codes]
            n = 0  # the common prefix, leaving every code a token of its own
            while all(len(s) > n + 1 and s[n] == spelled[0][n] for s in spelled):
                n += 1
            row = {int(t): r for r, t in enumerate(self.model.head_ids)}
            step = spelled[0][:n], [row.get(s[n]) for s in spelled]
            self._keep(self._code_steps, codes, step)
        return step

    def _code_scores(self, score: float, logits: np.ndarray, cats: Mapping[str, str]) -> dict[str, float]:
        """score x the softmax, over the codes' next-token rows, of the logits after _code_step's tokens."""
        _, rows = self._code_step(tuple(cats))
        kept = sorted({r for r in rows if r is not None})
        e = detmath.exp(logits[kept].astype(np.float64) - logits[kept].max())
        p = dict(zip(kept, e / e.sum()))
        return {c: score * float(p[r]) if r is not None else 0.0 for c, r in zip(cats, rows)}

    def check_policy(self, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                     threshold: float | None = None, thresholds: Mapping[str, float] | None = None) -> None:
        """Raise PyguardError now for options no request could be judged with: bad categories or
        exclusions, codes this model cannot answer, a bad threshold, or per-category thresholds
        that are malformed or name codes outside the policy. (For jobs that judge many
        conversations: one error before any work rather than one per conversation.)"""
        cats = categories_of(categories, exclude, self.family)
        self._decoder(tuple(cats))
        checks.threshold(threshold)
        th.check(thresholds, cats)

    def prepare(self, conversation: Conversation, categories: Mapping[str, str] | None = None,
                exclude: Sequence[str] = ()) -> Request:
        """A request, validated: a prompt that with the policy's answer budget exceeds
        max_tokens, or a policy whose codes the model cannot spell, raises PyguardError."""
        msgs = messages(conversation)
        cats = categories_of(categories, exclude, self.family)
        self._decoder(tuple(cats))
        prefix, rest = prompt_parts(self.tokenizer, conversation, cats, family=self.family)
        ids = np.array(prefix + rest + self.start_ids, np.int64)
        n, budget = len(ids), Grammar(cats, self.lead).budget()
        if n + budget > self.max_tokens:
            raise PyguardError(f"the prompt is {n} tokens, over the limit of {self.max_tokens - budget} "
                               f"(max_tokens {self.max_tokens} minus {budget} for this policy's longest answer): "
                               "shorten the conversation")
        # where the conversation's tokens end: those it shares with the prompt (the last piece of
        # text may merge with the instructions after it)
        conv = self.tokenizer.encode(conversation_text(msgs))[: len(rest)]
        shared = next((i for i, (a, b) in enumerate(zip(conv, rest)) if a != b), len(conv))
        return Request(ids, len(prefix), len(prefix) + shared, cats, budget)

    def classify(self, conversation: Conversation, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                 threshold: float | None = None, category_scores: bool = False,
                 thresholds: Mapping[str, float] | None = None) -> Result:
        """Judge the last message of a conversation (a str is one user message).

        categories: {code: description} replacing the defaults; exclude: codes left out;
        threshold: if given (0 to 1), the verdict is unsafe exactly when score >= threshold
        (the categories are then still decoded greedily) instead of the greedy first token;
        thresholds: {code: 0 to 1}, the verdict is also unsafe when a category's score reaches
        its threshold, and that category is listed (guard/thresholds.py has the rule);
        category_scores: fill Result.category_scores even when the verdict is safe (one more
        step of a few tokens; an unsafe verdict, or thresholds, always have them)."""
        threshold = checks.threshold(threshold)
        checks.flag(category_scores, "category_scores")
        with self._lock:
            request = self.prepare(conversation, categories, exclude)
            return self._classify([request], threshold, self._thresholds(thresholds, request), 1, False, category_scores)[0]

    def stream(self, conversation: Conversation, every: int = 32, categories: Mapping[str, str] | None = None,
               exclude: Sequence[str] = (), threshold: float | None = None,
               thresholds: Mapping[str, float] | None = None) -> Stream:
        """Moderate the assistant's reply to a conversation (ending with a user message) while it
        is generated: `feed(text)` checks once `every` new reply tokens arrived, `check()` now,
        `finish()` at the end. Each check's Result is `classify(conversation + [{"role":
        "assistant", "content": reply so far}], categories, exclude, threshold, thresholds=thresholds)`,
        bit for bit; the token-prefix cache makes it cost the new tokens, not the whole reply."""
        return Stream(self, conversation, checks.integer(every, "every", 1), categories, exclude, checks.threshold(threshold),
                      th.check(thresholds, categories_of(categories, exclude, self.family)))

    def classify_many(self, conversations: Sequence[Conversation], categories: Mapping[str, str] | None = None,
                      exclude: Sequence[str] = (), threshold: float | None = None, batch_size: int = 16,
                      category_scores: bool = False, thresholds: Mapping[str, float] | None = None) -> list[Result]:
        """classify() of every conversation, batch_size at a time: a batch is prefilled and
        decoded together (each weight matrix streamed once per pass for all), and every result
        is the one classify() gives alone. All conversations are validated before any work
        (errors name the conversation's index); timings are those of the batch a result was
        computed in."""
        if isinstance(conversations, (str, bytes, bytearray, Mapping)) or not isinstance(conversations, Sequence):
            raise PyguardError(f"conversations must be a list of conversations, not {type(conversations).__name__}")
        threshold = checks.threshold(threshold)
        checks.integer(batch_size, "batch_size", 1)
        checks.flag(category_scores, "category_scores")
        with self._lock:
            requests = []
            for i, c in enumerate(conversations):
                try:
                    requests.append(self.prepare(c, categories, exclude))
                except PyguardError as e:
                    raise PyguardError(f"conversation {i + 1}: {e}") from None  # counted as users count
            limits = self._thresholds(thresholds, requests[0]) if requests else th.check(thresholds)
            return self._classify(requests, threshold, limits, batch_size, True, category_scores)

    @staticmethod
    def _thresholds(thresholds: Any, request: Request) -> dict[str, float] | None:
        """Per-category thresholds, checked against the request's policy (every request of a
        call has the same one)."""
        return th.check(thresholds, request.categories)

    def _classify(self, requests: list, threshold: float | None, thresholds: dict[str, float] | None, batch_size: int,
                  named: bool, category_scores: bool) -> list[Result]:
        """Results of prepared requests; named: errors name the request's index."""
        out: list[Result] = []
        for i in range(0, len(requests), batch_size):
            out += self._batch(requests[i : i + batch_size], threshold, thresholds, i if named else None, category_scores)
        return out

    def _batch(self, requests: list[Request], threshold: float | None, thresholds: dict[str, float] | None,
               first: int | None, category_scores: bool) -> list[Result]:
        """Results of requests first, first + 1, ... (None: not named in errors)."""
        t0 = time.perf_counter()
        states, cached = [], []
        for r in requests:
            state = self.model.new_state(len(r.ids) + r.budget)
            if self.cache.restore(state, r.ids, len(r.ids) - 1) < r.policy and self.cache.budget:
                # a policy prefix not held yet: completed alone, so that the batch shares it
                self.model.prefill(state, r.ids[state.pos : r.policy])
                self.cache.insert(r.ids[: r.policy], state)
                self.cache.restore(state, r.ids, len(r.ids) - 1)
            cached.append(state.pos)
            states.append(state)
        logits = list(self.model.prefill_many(states, [r.ids[state.pos :] for r, state in zip(requests, states)]))
        for r, state in zip(requests, states):
            self.cache.insert(r.ids[: r.conversation], state)
        t1 = time.perf_counter()
        for k, x in enumerate(logits):
            self._check_finite(x, first, k)
        scores = [self.score(x) for x in logits]
        code_scores: list[dict[str, float]] = [{} for _ in requests]
        if thresholds:  # they decide the verdict with the score: needed before the answer
            self._category_scores(requests, states, scores, code_scores, range(len(requests)), first)
        force = [th.impose(s, c, threshold, thresholds) for s, c in zip(scores, code_scores)]
        decoders = [self._decoder(tuple(r.categories)) for r in requests]
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
                    logits[k] = self._check_finite(x, first, k)
            active = fed
        verdicts = [d.grammar.verdict(t) for d, t in zip(decoders, texts)]
        scored = [k for k in range(len(requests)) if not code_scores[k] and (category_scores or verdicts[k] == UNSAFE)]
        self._category_scores(requests, states, scores, code_scores, scored, first)
        t2 = time.perf_counter()
        results = []
        for k, r in enumerate(requests):
            cats = r.categories
            verdict = verdicts[k]
            if force[k] not in (None, verdict):  # the decoder imposes it: never a silent disagreement
                raise PyguardError(f"the answer {texts[k]!r} contradicts the threshold's verdict {force[k]!r}")
            codes = th.listed(decoders[k].grammar.categories(texts[k]), code_scores[k], thresholds, cats)
            results.append(Result(verdict, codes, [cats[c] for c in codes], scores[k], texts[k], len(r.ids),
                                  cached[k], len(tokens[k]), {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0},
                                  code_scores[k]))
        return results

    def _category_scores(self, requests: list[Request], states: list, scores: list[float], out: list[dict[str, float]],
                         ks: Sequence[int], first: int | None) -> None:
        """out[k] = the category scores of requests ks: one batched step of _code_step's tokens
        after each prompt, whose state is then back at the prompt's end (the positions after it
        are overwritten by whatever is fed next)."""
        if not ks:
            return
        fed_ids = [self._code_step(tuple(requests[k].categories))[0] for k in ks]
        for k in ks:
            states[k].pos = len(requests[k].ids)
        for k, x in zip(ks, self.model.prefill_many([states[k] for k in ks], fed_ids)):
            out[k] = self._code_scores(scores[k], self._check_finite(x, first, k), requests[k].categories)
        for k in ks:
            states[k].pos = len(requests[k].ids)

    @staticmethod
    def _check_finite(logits: np.ndarray, first: int | None, k: int) -> np.ndarray:
        """Logits a decision may be made on: NaN or inf (a damaged model) is an error, never a verdict."""
        if not np.isfinite(logits).all():
            where = "" if first is None else f"conversation {first + k + 1}: "
            raise PyguardError(f"{where}the model computed non-finite logits (NaN or inf): no verdict (is the file damaged?)")
        return logits

    def score(self, logits: np.ndarray) -> float:
        """Probability of the "unsafe" token (Llama Guard 2: " unsafe", with its space) among the
        head's rows (the whole vocabulary with a full head, the kept answer tokens with a guard head)."""
        if self._unsafe_rows.size == 0:
            raise PyguardError("the model's output head has no 'unsafe' token")
        z = logits.astype(np.float64)
        z -= z.max()
        p = detmath.exp(z)  # numpy's exp differs in the last bits between CPUs
        score = float(p[self._unsafe_rows[0]] / p.sum())
        if not math.isfinite(score):
            raise PyguardError("the model computed non-finite logits (NaN or inf): no verdict (is the file damaged?)")
        return score
