"""The language of Llama Guard answers, and greedy decoding constrained to it.

After the prompt the model writes "\\n\\n", then "safe", or "unsafe", a newline and a
comma-separated list of category codes ("S1,S10"), then <|eot_id|>. pyguard appends the
"\\n\\n" to the prompt itself (it is the only way an answer can start, and it saves a decode
step), so the grammar here covers what follows it. Decoding only ever picks tokens that keep
the text a prefix of a valid answer, so even a badly quantized model cannot produce an
unparsable verdict, and it stops as soon as the answer is decided: "safe" needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import PyguardError

SAFE, UNSAFE = "safe", "unsafe"
ANSWER_START = "\n\n"


class Grammar:
    """Valid answers: "safe", or "unsafe\\n" then distinct codes joined by ","."""

    def __init__(self, codes: Iterable[str]):
        self.codes = tuple(codes)

    def _categories(self, text: str) -> list[str] | None:
        """The code list of an "unsafe\\n..." text, None for any other text."""
        head = UNSAFE + "\n"
        return text[len(head):].split(",") if text.startswith(head) else None

    def viable(self, text: str) -> bool:
        """Is text a prefix of some valid answer?"""
        if SAFE.startswith(text) or (UNSAFE + "\n").startswith(text):
            return True
        parts = self._categories(text)
        if parts is None:
            return False
        *done, last = parts
        if len(set(done)) != len(done) or any(c not in self.codes for c in done):
            return False
        return any(c.startswith(last) and c not in done for c in self.codes)

    def complete(self, text: str) -> bool:
        """Is text a whole valid answer (so <|eot_id|> may follow)?"""
        if text == SAFE:
            return True
        parts = self._categories(text)
        return parts is not None and self.viable(text) and parts[-1] in self.codes and parts[-1] not in parts[:-1]

    def categories(self, text: str) -> list[str]:
        parts = self._categories(text)
        return [] if parts is None else parts

    def budget(self) -> int:
        """Positions the longest answer can take ("unsafe\\n" and every code, then <|eot_id|>):
        its characters plus one, as every token spells at least one character, whichever
        tokens greedy decoding picks."""
        return len(UNSAFE + "\n" + ",".join(self.codes)) + 1


@dataclass
class Decoded:
    text: str  # the answer after "\n\n", e.g. "unsafe\nS1,S10"
    tokens: list[int]  # vocabulary ids generated (not counting the appended "\n\n")


class AnswerDecoder:
    """Greedy decoding restricted to a grammar, over the rows of an output head.

    head_ids[i] is the vocabulary id of head row i and head_text[i] its text (None for special
    tokens). Only rows whose text is made of the grammar's characters can ever be chosen; they
    are found once here, so a full 128k-row head costs no more per step than a pruned one.
    """

    def __init__(self, grammar: Grammar, head_ids: np.ndarray, head_text: Sequence[str | None], eot_id: int):
        alphabet = set(SAFE + UNSAFE + "\n," + "".join(grammar.codes))
        self.grammar = grammar
        self.head_ids = np.asarray(head_ids)
        self.rows = [i for i, t in enumerate(head_text) if t and set(t) <= alphabet]
        self.text = {i: head_text[i] for i in self.rows}
        eot = np.flatnonzero(self.head_ids == eot_id)
        self.eot_row = int(eot[0]) if eot.size else None
        self._reach: dict[str, bool] = {}

    def _completable(self, text: str) -> bool:
        """Can the head's tokens still turn text into a whole answer? ("un" + "s" cannot, if no
        token spells "afe".) Depth-first with an explicit stack (answers can be long), stopping
        at the first completion found: every text on the path to it is completable (the next
        steps of decoding ask about them). A search that finds none has visited every text
        reachable from text, and none of them is completable either."""
        if text in self._reach:
            return self._reach[text]
        g, parent, stack = self.grammar, {text: None}, [text]
        while stack:
            t = stack.pop()
            if self._reach.get(t) or g.complete(t):
                while t is not None:
                    self._reach[t], t = True, parent[t]
                return True
            if t not in self._reach:
                for nxt in (t + s for s in self.text.values()):
                    if nxt not in parent and g.viable(nxt):
                        parent[nxt] = t
                        stack.append(nxt)
        self._reach.update(dict.fromkeys(parent, False))
        return False

    def _spells(self, text: str) -> bool:
        """Can the head's tokens spell exactly text? (Over the positions of text: reached[i]
        when text[:i] is a sequence of tokens.)"""
        reached = [True] + [False] * len(text)
        for i in range(len(text)):
            if reached[i]:
                for t in self.text.values():
                    if text.startswith(t, i):
                        reached[i + len(t)] = True
        return reached[-1]

    def unspellable(self) -> list[str]:
        """The grammar's codes no answer of this head can hold, and "safe" if it cannot say
        safe: a policy with such codes cannot be answered (they would always read as safe). A
        code counts as spelled first after "unsafe\\n", or after another code and "," (a
        token may join "," and the code's start)."""
        first = [c for c in self.grammar.codes if self._spells(UNSAFE + "\n" + c)]
        out = [] if self._spells(SAFE) else [SAFE]
        return out + [c for c in self.grammar.codes if c not in first
                      and not any(self._spells(f"{UNSAFE}\n{d},{c}") for d in first)]

    def finished(self, text: str) -> bool:
        """Is the answer decided (complete, and nothing but <|eot_id|> can follow)?"""
        g = self.grammar
        return text == SAFE or (g.complete(text) and not any(g.viable(text + t) for t in self.text.values()))

    def _allowed(self, text: str, force_first: str | None = None) -> list[int]:
        """Head rows that keep text + row a prefix of an answer the head can complete."""
        allowed = [i for i in self.rows if self.grammar.viable(text + self.text[i]) and self._completable(text + self.text[i])]
        if force_first and not text:
            allowed = [i for i in allowed if force_first.startswith(self.text[i])]
            if not allowed:  # a threshold decides the verdict, or there is none
                raise PyguardError(f"the model's output head cannot spell the answer {force_first!r}")
        if self.eot_row is not None and self.grammar.complete(text):
            allowed.append(self.eot_row)
        if not allowed:  # a head that cannot spell any answer at all
            raise PyguardError("the model's output head cannot spell a Llama Guard answer")
        return allowed

    def choose(self, text: str, logits: np.ndarray, force_first: str | None = None) -> int | None:
        """The head row to append to the answer so far, or None when the answer is finished.
        logits: over the head rows, after the prompt, "\n\n" and text. force_first
        ("safe"/"unsafe") imposes the first word, when a score threshold has decided it."""
        if self.finished(text):
            return None
        allowed = self._allowed(text, force_first)
        best = allowed[int(np.argmax(logits[allowed]))]
        return None if best == self.eot_row else best

    def advance(self, text: str, logits: np.ndarray, force_first: str | None = None) -> list[int]:
        """The rows to append next ([] when the answer is finished): the greedy choice, then
        every row the grammar forces after it ("\n" after "unsafe"): greedy would pick the only
        allowed row whatever the logits, so forced rows need no step of their own and are fed
        to the model together with the choice."""
        rows = []
        row = self.choose(text, logits, force_first)
        while row is not None:
            rows.append(row)
            text += self.text[row]
            if self.finished(text):
                break
            allowed = self._allowed(text)
            row = allowed[0] if len(allowed) == 1 and allowed[0] != self.eot_row else None
        return rows

    def decode(self, logits: np.ndarray, step: Callable[[list[int]], np.ndarray], force_first: str | None = None) -> Decoded:
        """Greedy answer from the logits after the prompt and "\n\n"; step(ids) feeds the
        vocabulary ids appended (a choice and the rows it forces) and returns the next logits."""
        text, tokens = "", []
        while rows := self.advance(text, logits, force_first):
            text += "".join(self.text[r] for r in rows)
            tokens += [int(self.head_ids[r]) for r in rows]
            if self.finished(text):
                break
            logits = step(tokens[-len(rows):])
        return Decoded(text, tokens)


def answer_strings(codes: Sequence[str]) -> list[str]:
    """Representative answers whose tokens a pruned output head must keep."""
    out = [ANSWER_START + SAFE, ANSWER_START + UNSAFE + "\n" + ",".join(codes)]
    out += [ANSWER_START + UNSAFE + "\n" + c for c in codes]
    out += [ANSWER_START + UNSAFE + "\n" + codes[0] + "," + c for c in codes]
    return out


def answer_token_ids(tokenizer, codes: Sequence[str]) -> list[int]:
    """Vocabulary ids of the tokens answers over these codes are made of, as the tokenizer
    spells them (the model was trained on these spellings), plus "," and <|eot_id|>."""
    ids = {tokenizer.special("<|eot_id|>")}
    for s in answer_strings(list(codes)) + [ANSWER_START, ","]:
        ids.update(tokenizer.encode(s))
    return sorted(ids)
