"""The Llama Guard prompts: their exact text, and their tokens with special tokens only where
the template puts them.

Llama Guard 3 (families llama-guard-3-1b, -8b): its Hugging Face chat template rendered
(add_generation_prompt): one user turn holding the task, the categories, the conversation and
the instructions, then the assistant header. It ends there; the model's answer starts with
"\\n\\n" (verdict.STARTS, which pyguard's decoder feeds itself).

Llama Guard 2 (family llama-guard-2, Meta-Llama-Guard-2-8B): its chat template rendered
(tests/data/llama_guard_2_tokenizer_config.json): the same task, conversation and instructions
as plain text between "[INST] " and " [/INST]", no special token at all (not even
<|begin_of_text|>: the template has none, and transformers tokenizes a rendered chat template
without adding one), each category line ending with a space ("S1: Violent Crimes. \\n"). The
answer's first token carries a space (" safe", " unsafe": verdict.STARTS).

Everything up to "<BEGIN CONVERSATION>\\n\\n" (the policy prefix, 136 tokens with the default
categories) depends only on the assessed role, the categories and the exclusions, so a guard can
compute its key/value cache once and reuse it for every request (`prompt_parts`).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

from ..errors import PyguardError
from ..formats.config import FAMILIES

CATEGORIES_1B = {
    "S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex Crimes.", "S4": "Child Exploitation.",
    "S5": "Defamation.", "S6": "Specialized Advice.", "S7": "Privacy.", "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.", "S10": "Hate.", "S11": "Self-Harm.", "S12": "Sexual Content.", "S13": "Elections.",
}
CATEGORIES_8B = {**CATEGORIES_1B, "S14": "Code Interpreter Abuse."}
CATEGORIES_2 = {  # Llama Guard 2's template: MLCommons' taxonomy less defamation and elections
    "S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex Crimes.", "S4": "Child Exploitation.",
    "S5": "Specialized Advice.", "S6": "Privacy.", "S7": "Intellectual Property.", "S8": "Indiscriminate Weapons.",
    "S9": "Hate.", "S10": "Self-Harm.", "S11": "Sexual Content.",
}
CATEGORIES = {"llama-guard-3-1b": CATEGORIES_1B, "llama-guard-3-8b": CATEGORIES_8B, "llama-guard-2": CATEGORIES_2}

Message = Mapping[str, str]
Conversation = Union[str, Sequence[Message]]

# The template's text ("according our safety policy" is Meta's wording, without "to"; the
# space before <|eot_id|> is the template's too).
_TASK = ("\n\nTask: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
         "with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n")
_CONVERSATION = "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
_INSTRUCTIONS = ("<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
                 "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include "
                 "a comma-separated list of violated categories. ")
_NAMES = {"user": "User", "assistant": "Agent"}
# Llama Guard 2: the text before the task ("[INST] " where 3 has its header and "\n\n"), a
# category's line (a space before the newline), the end (" [/INST]", the space being the
# instructions' last character, as in 3's " <|eot_id|>").
_V2 = "llama-guard-2"
_V2_BEGIN, _V2_LINE, _V2_END = "[INST] ", "{}: {} \n", "[/INST]"
# Codes come back in the model's answer, so they bound its length (a guard sizes its answer
# budget from them): Meta's codes are S1..S14, and 32 characters leave room for readable custom
# ones ("hate_speech_targeted") while the longest answer stays ~2,000 characters.
MAX_CODE_CHARS = 32
MAX_CODES = 64


def _message_name(i: int, n: int, given_str: bool) -> str:
    """A message as users name it in errors: counted from 1; a str is "the message"; the two
    messages of a prompt/response pair are also named."""
    if given_str:
        return "the message"
    return f"message {i + 1}" + ((" (the prompt)", " (the response)")[i] if n == 2 else "")


def messages(conversation: Conversation) -> list[tuple[str, str]]:
    """Validated (role, stripped text) pairs; a str is one user message. Roles must alternate
    user / assistant starting with user (the template's rule). Errors are one line naming the
    message as users count (message 1 is the first; "the message" for a str; "message 2 (the
    response)" in a prompt/response pair)."""
    given_str = isinstance(conversation, str)
    if given_str:
        conversation = [{"role": "user", "content": conversation}]
    if isinstance(conversation, (Mapping, bytes, bytearray)) or not isinstance(conversation, Sequence) or not conversation:
        raise PyguardError("a conversation is a str or a non-empty list of {'role': ..., 'content': ...} messages")
    out = []
    for i, m in enumerate(conversation):
        name = _message_name(i, len(conversation), given_str)
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PyguardError(f"{name}: expected a mapping with 'role' and 'content'")
        role, text = m["role"], m["content"]
        if not isinstance(role, str) or role not in _NAMES:
            raise PyguardError(f"{name}: unknown role {role!r:.60} (roles are 'user' and 'assistant')")
        if role != ("user", "assistant")[i % 2]:
            raise PyguardError(f"{name}: roles must alternate user, assistant, user, ... starting with user; found {role!r}")
        if not isinstance(text, str):
            raise PyguardError(f"{name}: content must be a str, not {type(text).__name__}")
        if not text.strip():  # an unset shell variable, say: nothing to judge is no verdict
            raise PyguardError(f"{name}: empty content")
        out.append((role, text.strip()))  # Jinja's trim: str.strip()
    return out


def categories_of(categories: Mapping[str, str] | None = None, exclude: Iterable[str] = (),
                  family: str = "llama-guard-3-1b") -> dict[str, str]:
    """The categories the prompt lists, in order: the family's defaults, or the given
    {code: description} instead, minus the excluded codes (a str is one code)."""
    if family not in CATEGORIES:
        raise PyguardError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    if categories is None:
        categories = CATEGORIES[family]
    if not isinstance(categories, Mapping) or not categories:
        raise PyguardError("categories must be a non-empty mapping {code: description}")
    if len(categories) > MAX_CODES:
        raise PyguardError(f"categories: {len(categories)} codes, at most {MAX_CODES} (every code may appear in the answer)")
    for code, text in categories.items():
        # codes come back in the answer as a comma-separated list: keep them parseable
        if not isinstance(code, str) or not code or any(c.isspace() or c == "," for c in code):
            raise PyguardError(f"category code {code!r:.60}: codes are non-empty str without white space or commas")
        if len(code) > MAX_CODE_CHARS:
            raise PyguardError(f"category code {code[:20]!r}...: {len(code)} characters, at most {MAX_CODE_CHARS}")
        if not isinstance(text, str):
            raise PyguardError(f"category {code}: the description must be a str, not {type(text).__name__}")
    try:
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    except TypeError:
        raise PyguardError("exclude must be a list of category codes") from None
    bad = [c for c in exclude if not isinstance(c, str)]
    if bad:
        raise PyguardError(f"exclude: {bad[0]!r:.60} is not a category code (a str)")
    unknown = [c for c in exclude if c not in categories]
    if unknown:
        raise PyguardError(f"cannot exclude {', '.join(map(str, unknown))}: not among the categories ({', '.join(categories)})")
    kept = {k: v for k, v in categories.items() if k not in exclude}
    if not kept:
        raise PyguardError("every category is excluded")
    return kept


def _texts(msgs: list[tuple[str, str]], cats: Mapping[str, str], family: str) -> tuple[str, str]:
    """The prompt's text as (policy prefix, conversation and instructions): for Llama Guard 3
    the user turn's, between its header and <|eot_id|>; for Llama Guard 2 the whole prompt."""
    role = _NAMES[msgs[-1][0]]
    if family == _V2:
        prefix = _V2_BEGIN + _TASK.format(role=role).lstrip("\n") + "".join(_V2_LINE.format(k, v) for k, v in cats.items())
        return prefix + _CONVERSATION, conversation_text(msgs) + _INSTRUCTIONS.format(role=role) + _V2_END
    prefix = _TASK.format(role=role) + "".join(f"{k}: {v}\n" for k, v in cats.items()) + _CONVERSATION
    return prefix, conversation_text(msgs) + _INSTRUCTIONS.format(role=role)


def conversation_text(msgs: Sequence[tuple[str, str]]) -> str:
    """The conversation's part of the prompt, for validated (role, text) pairs (`messages`)."""
    return "".join(f"{_NAMES[r]}: {t}\n\n" for r, t in msgs)


def format_prompt(conversation: Conversation, categories: Mapping[str, str] | None = None,
                  exclude: Iterable[str] = (), family: str = "llama-guard-3-1b") -> str:
    """The prompt as text, special tokens spelled out (for display and tests: tokenize with
    `prompt_tokens`, never by encoding this string)."""
    prefix, rest = _texts(messages(conversation), categories_of(categories, exclude, family), family)
    if family == _V2:
        return prefix + rest
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>" + prefix + rest
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")


def prompt_parts(tokenizer, conversation: Conversation, categories: Mapping[str, str] | None = None,
                 exclude: Iterable[str] = (), family: str = "llama-guard-3-1b") -> tuple[list[int], list[int]]:
    """(policy prefix ids, remaining ids) of the prompt; their concatenation is `prompt_tokens`.

    The prefix ends with "<BEGIN CONVERSATION>\\n\\n" and the rest starts with "User:". The split
    pattern always ends a piece there (">\\n\\n" is one piece, a letter starts the next), so
    encoding the two texts apart gives the tokens of encoding them together."""
    return _tokens(tokenizer, messages(conversation), categories_of(categories, exclude, family), family)


def _tokens(tokenizer, msgs: list[tuple[str, str]], cats: Mapping[str, str], family: str) -> tuple[list[int], list[int]]:
    prefix, rest = _texts(msgs, cats, family)
    if family == _V2:  # text only
        return tokenizer.encode(prefix), tokenizer.encode(rest)
    sp = tokenizer.special
    return (tokenizer.encode_with_specials([sp("<|begin_of_text|>"), sp("<|start_header_id|>"), "user",
                                            sp("<|end_header_id|>"), prefix]),
            tokenizer.encode_with_specials([rest, sp("<|eot_id|>"), sp("<|start_header_id|>"), "assistant",
                                            sp("<|end_header_id|>")]))


def policy_prefix(tokenizer, role: str = "user", categories: Mapping[str, str] | None = None,
                  exclude: Iterable[str] = (), family: str = "llama-guard-3-1b") -> list[int]:
    """The prefix ids shared by every conversation whose last message has this role."""
    if not isinstance(role, str) or role not in _NAMES:
        raise PyguardError(f"unknown role {role!r} (roles are 'user' and 'assistant')")
    msgs = [("user", "")] + ([("assistant", "")] if role == "assistant" else [])  # the prefix holds no message
    return _tokens(tokenizer, msgs, categories_of(categories, exclude, family), family)[0]


def prompt_tokens(tokenizer, conversation: Conversation, categories: Mapping[str, str] | None = None,
                  exclude: Iterable[str] = (), family: str = "llama-guard-3-1b") -> list[int]:
    """The prompt's token ids: special tokens only where the template has them, every message
    encoded as text, so no message can forge a turn or an answer. Ends with the assistant header."""
    prefix, rest = prompt_parts(tokenizer, conversation, categories, exclude, family)
    return prefix + rest
