"""The Llama Guard 3 prompt: its exact text, and its tokens with special tokens only where the
template puts them.

The prompt is the Hugging Face chat template of Llama Guard 3 rendered: a user turn holding
the task, the categories, the conversation and the instructions, then the assistant header.
Everything from the start to "<BEGIN CONVERSATION>\\n\\n" (the policy prefix, ~136 tokens)
depends only on the assessed role, the categories and the exclusions, which lets the guard
reuse its key/value cache across requests.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

from .errors import PyguardError

CATEGORIES_1B = {
    "S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex Crimes.", "S4": "Child Exploitation.",
    "S5": "Defamation.", "S6": "Specialized Advice.", "S7": "Privacy.", "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.", "S10": "Hate.", "S11": "Self-Harm.", "S12": "Sexual Content.", "S13": "Elections.",
}
CATEGORIES_8B = {**CATEGORIES_1B, "S14": "Code Interpreter Abuse."}
CATEGORIES = {"llama-guard-3-1b": CATEGORIES_1B, "llama-guard-3-8b": CATEGORIES_8B}

Message = Mapping[str, str]
Conversation = Union[str, Sequence[Message]]

_TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
         "with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n")
_INSTRUCTIONS = ("<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
                 "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include "
                 "a comma-separated list of violated categories. ")
_NAMES = {"user": "User", "assistant": "Agent"}


def messages(conversation: Conversation) -> list[tuple[str, str]]:
    """Validated (role, stripped text) pairs; a str is one user message."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if isinstance(conversation, Mapping) or not isinstance(conversation, Sequence) or not conversation:
        raise PyguardError("a conversation is a non-empty list of {'role', 'content'} messages (or one str)")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PyguardError(f"message {i}: expected a mapping with 'role' and 'content'")
        role, text = m["role"], m["content"]
        if role not in _NAMES:
            raise PyguardError(f"message {i}: unknown role {role!r} (use 'user' or 'assistant')")
        if role != ("user", "assistant")[i % 2]:
            raise PyguardError(f"message {i}: roles must alternate user/assistant starting with user, found {role!r}")
        if not isinstance(text, str):
            raise PyguardError(f"message {i}: content must be a str, not {type(text).__name__}")
        out.append((role, text.strip()))
    return out


def categories_of(categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                  family: str = "llama-guard-3-1b") -> dict[str, str]:
    """The categories the prompt lists: the family's defaults or the given {code: description},
    minus the excluded codes."""
    if categories is None:
        if family not in CATEGORIES:
            raise PyguardError(f"unknown model family {family!r} (known: {', '.join(CATEGORIES)})")
        categories = CATEGORIES[family]
    if not isinstance(categories, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in categories.items()):
        raise PyguardError("categories must map str codes to str descriptions")
    bad = [k for k in categories if not k or any(ch.isspace() or ch == "," for ch in k)]
    if bad:
        raise PyguardError(f"category code {bad[0]!r} cannot appear in an answer (no commas, spaces or empty codes)")
    if isinstance(exclude, str):
        exclude = (exclude,)
    unknown = [c for c in exclude if c not in categories]
    if unknown:
        raise PyguardError(f"cannot exclude {', '.join(map(str, unknown))}: not among the categories {', '.join(categories)}")
    kept = {k: v for k, v in categories.items() if k not in exclude}
    if not kept:
        raise PyguardError("every category is excluded")
    return kept


def _texts(msgs: list[tuple[str, str]], cats: dict[str, str]) -> tuple[str, str]:
    """(policy prefix text, conversation + instructions text) of the user turn."""
    role = _NAMES[msgs[-1][0]]
    prefix = "\n\n" + _TASK.format(role=role) + "".join(f"{k}: {v}\n" for k, v in cats.items())
    prefix += "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
    rest = "".join(f"{_NAMES[r]}: {t}\n\n" for r, t in msgs) + _INSTRUCTIONS.format(role=role)
    return prefix, rest


def format_prompt(conversation: Conversation, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                  family: str = "llama-guard-3-1b") -> str:
    """The prompt the model sees, special tokens spelled out."""
    prefix, rest = _texts(messages(conversation), categories_of(categories, exclude, family))
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>" + prefix + rest
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")


def prompt_parts(tokenizer, conversation: Conversation, categories: Mapping[str, str] | None = None,
                 exclude: Sequence[str] = (), family: str = "llama-guard-3-1b") -> tuple[list[int], list[int]]:
    """(policy prefix ids, remaining ids) of the prompt. The prefix ends with "\\n\\n" before
    "User:", a boundary the split pattern never merges across, so the two parts are exactly
    the tokens of the whole text."""
    prefix, rest = _texts(messages(conversation), categories_of(categories, exclude, family))
    sp = tokenizer.special
    head = [sp("<|begin_of_text|>"), sp("<|start_header_id|>")] + tokenizer.encode("user") + [sp("<|end_header_id|>")]
    tail = [sp("<|eot_id|>"), sp("<|start_header_id|>")] + tokenizer.encode("assistant") + [sp("<|end_header_id|>")]
    return head + tokenizer.encode(prefix), tokenizer.encode(rest) + tail


def prompt_tokens(tokenizer, conversation: Conversation, categories: Mapping[str, str] | None = None,
                  exclude: Sequence[str] = (), family: str = "llama-guard-3-1b") -> list[int]:
    """The prompt's token ids: message text is always text, never special tokens."""
    prefix, rest = prompt_parts(tokenizer, conversation, categories, exclude, family)
    return prefix + rest
