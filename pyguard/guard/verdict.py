"""The language of Llama Guard answers, and greedy decoding constrained to it.

After the prompt Llama Guard 3 writes "\\n\\n", then "safe", or "unsafe", a newline and a
comma-separated list of category codes ("S1,S10"), then <|eot_id|>. pyguard appends the
"\\n\\n" to the prompt itself (it is the only way an answer can start, and it saves a decode
step), so the grammar here covers what follows it. Llama Guard 2 answers right after "[/INST]"
with a space that belongs to the first word's token (" safe", " unsafe"): that space is the
grammar's lead (STARTS). Decoding only ever picks tokens that keep
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
# Per prompt family: (text pyguard feeds after the prompt, text the answer's first token spells
# before the word). Llama Guard 2 was trained on "[/INST] unsafe\nS1": Meta's fine-tuning
# formatter (llama-recipes) joins prompt and answer with a space, and " safe" and " unsafe" are
# single tokens of the Llama 3 vocabulary, so the space cannot be fed apart from the word.
STARTS = {"llama-guard-3-1b": (ANSWER_START, ""), "llama-guard-3-8b": (ANSWER_START, ""), "llama-guard-2": ("", " ")}
# Per prompt family, the tokens that may end an answer. Llama Guard 2's checkpoint names
# <|end_of_text|> as its end (config.json eos_token_id 128001, the tokenizer's eos_token): both
# ends are offered, so whichever the model learnt can stop the code list.
ENDS = {"llama-guard-3-1b": ("<|eot_id|>",), "llama-guard-3-8b": ("<|eot_id|>",),
        "llama-guard-2": ("<|eot_id|>", "<|end_of_text|>")}


class Grammar:
    """Valid answers: the lead, then "safe", or "unsafe\\n" and distinct codes joined by ","."""

    def __init__(self, codes: Iterable[str], lead: str = ""):
        self.codes = tuple(codes)
        self.lead = lead

    def body(self, text: str) -> str | None:
        """text after the lead ("" while the lead is not complete), None if it is not there."""
        if self.lead.startswith(text):
            return ""
        return text[len(self.lead):] if text.startswith(self.lead) else None

    def verdict(self, text: str) -> str:
        return UNSAFE if (self.body(text) or "").startswith(UNSAFE) else SAFE

    def _categories(self, text: str) -> list[str] | None:
        """The code list of an "unsafe\\n..." text, None for any other text."""
        head, text = UNSAFE + "\n", self.body(text) or ""
        return text[len(head):].split(",") if text.startswith(head) else None

    def viable(self, text: str) -> bool:
        """Is text a prefix of some valid answer?"""
        body = self.body(text)
        if body is None:
            return False
        if SAFE.startswith(body) or (UNSAFE + "\n").startswith(body):
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
        if self.body(text) == SAFE:
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
        return len(self.lead + UNSAFE + "\n" + ",".join(self.codes)) + 1


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

    def __init__(self, grammar: Grammar, head_ids: np.ndarray, head_text: Sequence[str | None], end_ids: Iterable[int]):
        alphabet = set(grammar.lead + SAFE + UNSAFE + "\n," + "".join(grammar.codes))
        self.grammar = grammar
        self.head_ids = np.asarray(head_ids)
        self.rows = [i for i, t in enumerate(head_text) if t and set(t) <= alphabet]
        self.text = {i: head_text[i] for i in self.rows}
        self.end_rows = [int(r) for r in np.flatnonzero(np.isin(self.head_ids, list(end_ids)))]
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
        lead = self.grammar.lead
        first = [c for c in self.grammar.codes if self._spells(lead + UNSAFE + "\n" + c)]
        out = [] if self._spells(lead + SAFE) else [SAFE]
        return out + [c for c in self.grammar.codes if c not in first
                      and not any(self._spells(f"{lead}{UNSAFE}\n{d},{c}") for d in first)]

    def finished(self, text: str) -> bool:
        """Is the answer decided (complete, and nothing but <|eot_id|> can follow)?"""
        g = self.grammar
        return g.body(text) == SAFE or (g.complete(text) and not any(g.viable(text + t) for t in self.text.values()))

    def _allowed(self, text: str, force_first: str | None = None) -> list[int]:
        """Head rows that keep text + row a prefix of an answer the head can complete."""
        g = self.grammar
        allowed = [i for i in self.rows if g.viable(text + self.text[i]) and self._completable(text + self.text[i])]
        if force_first and not g.body(text):  # until the first word has begun
            allowed = [i for i in allowed if force_first.startswith(g.body(text + self.text[i]))]
            if not allowed:  # a threshold decides the verdict, or there is none
                raise PyguardError(f"the model's output head cannot spell the answer {force_first!r}")
        if self.grammar.complete(text):
            allowed += self.end_rows
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
        return None if best in self.end_rows else best

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
            row = allowed[0] if len(allowed) == 1 and allowed[0] not in self.end_rows else None
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


def answer_strings(codes: Sequence[str], family: str = "llama-guard-3-1b") -> list[str]:
    """Representative answers whose tokens a pruned output head must keep."""
    start = "".join(STARTS[family])
    out = [start + SAFE, start + UNSAFE + "\n" + ",".join(codes)]
    out += [start + UNSAFE + "\n" + c for c in codes]
    out += [start + UNSAFE + "\n" + codes[0] + "," + c for c in codes]
    return out


def answer_token_ids(tokenizer, codes: Sequence[str], family: str = "llama-guard-3-1b") -> list[int]:
    """Vocabulary ids of the tokens answers over these codes are made of, as the tokenizer
    spells them (the model was trained on these spellings), plus "," and the ends (ENDS)."""
    ids = {tokenizer.special(e) for e in ENDS[family]}
    for s in answer_strings(list(codes), family) + [STARTS[family][0], ","]:
        ids.update(tokenizer.encode(s))
    return sorted(ids)
