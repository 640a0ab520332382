"""Moderating a reply while it is generated (Guard.stream).

Every check is `guard.classify(conversation + [the reply so far])`, tokenized whole, so a chunk
may end anywhere (inside a word, an emoji, a UTF-8 sequence) and a result is exactly the one a
one-off classification gives. Checks are cheap because the guard's token-prefix cache holds the
state after the conversation and the reply up to the previous check: only the reply's new
tokens (and those whose tokenization changed at its end) and the closing instructions are
computed again.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import PyguardError
from .prompt import Conversation, messages

if TYPE_CHECKING:
    from .guard import Guard, Result


class Stream:
    """A reply under moderation; made by Guard.stream. Not for several threads at once."""

    def __init__(self, guard: "Guard", conversation: Conversation, every: int, categories: Mapping[str, str] | None,
                 exclude: Sequence[str], threshold: float | None, thresholds: Mapping[str, float] | None):
        msgs = messages(conversation)
        if msgs[-1][0] != "user":
            raise PyguardError("a streamed reply answers the conversation's last message, which must be the user's")
        self._conversation = [{"role": role, "content": text} for role, text in msgs]  # a copy the caller cannot change
        guard.prepare(self._conversation + [{"role": "assistant", "content": "x"}], categories, exclude)  # the policy
        self._options = {"categories": None if categories is None else dict(categories),
                         "exclude": [exclude] if isinstance(exclude, str) else list(exclude or ()), "threshold": threshold,
                         "thresholds": thresholds}
        self._guard, self.every = guard, every
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._checked = 0  # reply tokens at the last check
        self._finished = False
        self.text = ""  # the reply so far (bytes of an unfinished character are held back)
        self.unsafe = False  # True once any check said unsafe
        self.last: "Result | None" = None  # the latest check's result

    def feed(self, chunk: str | bytes) -> "Result | None":
        """Append generated text (str, or UTF-8 bytes cut anywhere); the check's Result when
        `every` reply tokens arrived since the last check, else None."""
        if self._finished:
            raise PyguardError("the stream is finished: no more text after finish()")
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            try:
                chunk = self._utf8.decode(bytes(chunk))
            except UnicodeDecodeError as e:  # e.object: the bytes held back from the last chunk, then this one
                before = len(self.text) + len(e.object[: e.start].decode("utf-8", "replace"))  # every character fed
                raise PyguardError(f"the reply is not UTF-8 ({e.reason} after {before} characters)") from None
        elif not isinstance(chunk, str):
            raise PyguardError(f"feed() takes str or bytes, not {type(chunk).__name__}")
        elif self._utf8.getstate()[0]:
            raise PyguardError("a str chunk after bytes that end inside a UTF-8 sequence")
        self.text += chunk
        if self.tokens - self._checked >= self.every:
            return self.check()
        return None

    def check(self) -> "Result":
        """Check the reply so far now: `guard.classify(conversation + [reply])`. A reply with
        nothing but white space yet cannot be judged (PyguardError naming the reply)."""
        if not self.text.strip():  # named here: classify would count it as a message of the conversation
            raise PyguardError("the reply is empty (nothing but white space so far): there is nothing to judge")
        r = self._guard.classify(self._conversation + [{"role": "assistant", "content": self.text}], **self._options)
        self._checked = self.tokens
        self.unsafe |= r.unsafe
        self.last = r
        return r

    def finish(self) -> "Result":
        """The final check of the whole reply (always runs); the stream takes no more text."""
        if self._finished:
            raise PyguardError("the stream is finished already")
        self._finished = True
        try:
            self.text += self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise PyguardError("the reply ends inside a UTF-8 sequence") from None
        return self.check()

    @property
    def tokens(self) -> int:
        """Tokens of the reply so far, as the prompt holds it (stripped)."""
        return len(self._guard.tokenizer.encode(self.text.strip()))
