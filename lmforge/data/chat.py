"""The chat format: ChatML for lmforge's own models, the model's own template for imported ones.

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

A tokenizer imported with a Hugging Face model carries that model's own template
(``Tokenizer.chat_template``: Llama 3's headers and ``<|eot_id|>``, Gemma's ``<start_of_turn>``, ...).
It is rendered as it is, by transformers' Jinja renderer (imported only then), and the text is tokenized
as ``apply_chat_template`` does: the special tokens the template writes become their ids, nothing is
added, and the tokenizer's own begin-token rule (``Tokenizer.with_bos``, never doubled) applies. A
message whose content spells a special token is refused, so only the template makes control tokens.

Which tokens are the assistant's (:func:`chat_spans`) is read from the template without markers: the
tokens between the rendering of the conversation before an assistant message with the generation
prompt (``render(messages[:i], add_generation_prompt=True)``, exactly what the server prompts with)
and the template's end of that turn, the first special token after it (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ``</s>``), included so the model learns to stop. For a template that keeps earlier
turns as they were this is the token difference ``render(messages[:i+1]) - render(messages[:i], gen)``
cut after the end of turn; a template that re-renders past turns (Qwen3 drops their empty think block)
is read in the whole conversation, as the model sees it at serving time. A template whose generation
prompt is not a token prefix of the conversation, or that ends an assistant turn with no special token
(no roles), cannot mark the assistant's tokens and is refused with the model's folder named.

Example::

    ids = render_chat(tokenizer, [{"role": "user", "content": "Hi!"}])
    stops = tokenizer.end_ids                   # <|im_end|> and <|endoftext|>, among others
    ids, spans = chat_spans(tokenizer, messages) # spans: (start, end) of each assistant message's tokens
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


class ChatTemplateError(ValueError):
    """The model's chat template cannot mark the assistant's tokens (a property of the template)."""


class TemplateRefused(ValueError):
    """The template (or its tokenizer) refuses this conversation; ``reason`` is short, for counting."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_chatml(template: str) -> bool:
    """True for lmforge's own template, as its exports write it (with or without the begin token)."""
    return template.strip() in (CHAT_TEMPLATE, "{{- bos_token }}" + CHAT_TEMPLATE)


def _special(tokenizer: ChatTokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token} token, so it cannot hold a chat; train it with lmforge "
                         f"(its special tokens include {IM_START} and {IM_END})")
    return found


def render_chat(tokenizer: ChatTokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` (dicts with ``role`` in :data:`ROLES` and string ``content``).

    With ``add_generation_prompt`` the ids end with the opening of an assistant turn,
    so the model's continuation is the reply. A tokenizer with its own template renders through it
    (begin token included by its rule); lmforge's ChatML ids carry none (the engine adds it).
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return _render_template(tokenizer, messages, add_generation_prompt)
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


# ------------------------------------------------------------------ a model's own template
def _render_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    """Ids of ``messages`` through the tokenizer's Jinja template (see the module docstring)."""
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    controls = tokenizer.special_tokens().values()
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            raise TemplateRefused(f"messages[{i}].content must be a string (got {type(content).__name__})",
                                  "content not a string")
        spelled = next((t for t in controls if t in content), None)
        if spelled is not None:
            raise TemplateRefused(f"messages[{i}].content spells the special token {spelled!r}, which only the "
                                  f"chat template may write", "content spells a special token")
    names = {k: v for k, v in tokenizer.specials.items() if v is not None}
    try:
        [text], _ = render_jinja_template([list(messages)], chat_template=tokenizer.chat_template,
                                          add_generation_prompt=add_generation_prompt, **names)
    except TemplateError as e:
        raise TemplateRefused(f"the chat template of {tokenizer.folder} refuses this conversation: {e}",
                              f"refused by the chat template ({e})") from None
    return tokenizer.with_bos(tokenizer.encode_rendered_chat(text))


def chat_spans(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of the whole conversation and, for each assistant message, the ``(start, end)`` of its tokens
    (end of turn included) in them, read from the template as the module docstring says.

    Raises :class:`ChatTemplateError` (naming the model's folder) when the template cannot mark them and
    :class:`TemplateRefused` when it refuses the conversation. lmforge's ChatML is marked by
    :mod:`lmforge.finetune.chat` turn by turn.
    """
    ids = render_chat(tokenizer, messages, add_generation_prompt=False)
    controls = tokenizer.special_tokens()
    where = f"the chat template of {tokenizer.folder} cannot mark the assistant's tokens"
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        if ids[: len(prompt)] != prompt:
            raise ChatTemplateError(f"{where}: the prompt it renders for messages[{i}] (with the generation "
                                    f"prompt) is not a token prefix of the conversation")
        start = len(prompt)
        end = next((j + 1 for j in range(start, len(ids)) if ids[j] in controls), None)
        if end is None:
            raise ChatTemplateError(f"{where}: no special token ends the turn of messages[{i}] (a template "
                                    f"without roles and turn markers), so a model would not learn to stop")
        if end - start < 2 or (spans and start < spans[-1][1]):
            raise ChatTemplateError(f"{where}: its generation prompt does not open the turn of messages[{i}] "
                                    f"(the turn's first special token comes before its content)")
        spans.append((start, end))
    return ids, spans


PROBE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]


def template_end_token(tokenizer) -> str:
    """The token the template ends an assistant turn with (``<|eot_id|>``, ``<end_of_turn>``, ...); a
    generation stops there. Raises :class:`ChatTemplateError` for a template that cannot mark turns."""
    try:
        ids, [(_, end)] = chat_spans(tokenizer, PROBE)
    except TemplateRefused as e:
        raise ChatTemplateError(f"the chat template of {tokenizer.folder} refuses a one-exchange conversation "
                                f"({e.reason})") from None
    return tokenizer.id_to_token(ids[end - 1])
