"""The chat format: ChatML turns built from the tokenizer's special tokens.

Its one home, read by fine-tuning (:mod:`lmforge.finetune.chat`, which adds loss masks), serving
(the API and ``lmforge chat``) and export (the template written into Hugging Face and GGUF files):
rendering a conversation to token ids is tokenization, so it lives with the tokenizer.

A conversation is rendered as::

    <|im_start|>system\\nYou answer briefly.<|im_end|>\\n<|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n

and the model's reply ends with ``<|im_end|>``, one of the tokenizer's ``end_ids`` that every
generation stops at. Token ids are built by joining the
special tokens' ids with the encoded text between them, because lmforge's
tokenizer never turns text that spells a special token into its id (so a user
cannot inject a turn boundary). :data:`CHAT_TEMPLATE` is the same format as a
Jinja template, written into exported models (Hugging Face, GGUF) so that other
runtimes render conversations exactly as lmforge does.

Example::

    ids = render_chat(tokenizer, [{"role": "user", "content": "Hi!"}])
    stops = tokenizer.end_ids                   # <|im_end|> and <|endoftext|>, among others
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

# The same rendering in Jinja (transformers' apply_chat_template, llama.cpp's tokenizer.chat_template).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatTokenizer(Protocol):
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def token_to_id(self, token: str) -> int | None: ...


def _special(tokenizer: ChatTokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token} token, so it cannot hold a chat; train it with lmforge "
                         f"(its special tokens include {IM_START} and {IM_END})")
    return found


def render_chat(tokenizer: ChatTokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` (dicts with ``role`` in :data:`ROLES` and string ``content``).

    With ``add_generation_prompt`` the ids end with the opening of an assistant turn,
    so the model's continuation is the reply.
    """
    start, end = _special(tokenizer, IM_START), _special(tokenizer, IM_END)
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string (got {type(content).__name__})")
        # The text between two special tokens is encoded as one piece, as a tokenizer applying the
        # Jinja template would see it.
        ids += [start, *tokenizer.encode(f"{role}\n{content}"), end, *newline]
    if add_generation_prompt:
        ids += [start, *tokenizer.encode("assistant\n")]
    return ids
