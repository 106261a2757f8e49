"""Response bodies in OpenAI's format: choices, stream chunks, usage and log-probabilities.

The completions API reports log-probabilities in the legacy layout that
lm-evaluation-harness reads (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``; with ``echo`` the prompt tokens come first; the first of them has
``None`` unless the server put the begin token before it, as it does to score a prompt), the chat API in the newer one (``content: [{token, logprob, bytes,
top_logprobs}]``). A token that is only part of a UTF-8 character is shown as
``bytes:\\xNN`` as OpenAI does, since its text alone is not a character.

Example::

    texts = TokenTexts(tokenizer)
    body = completion_logprobs(texts, ids, logprobs, tops, start_offset=0)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from functools import lru_cache

from lmforge.serve.batch import Completion, TopLogprobs


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table (printable stand-ins for the 256 byte values)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """Text and raw bytes of single tokens, cached (the tokenizer is lmforge's or any with these methods)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _raw(self, token_id: int, text: str) -> bytes:
        piece = self.tokenizer.id_to_token(token_id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte-fallback token
            return bytes([int(piece[3:5], 16)])
        table = _byte_level_decoder()
        if getattr(self.tokenizer, "kind", "bpe") == "bpe" and piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return text.encode("utf-8")

    def get(self, token_id: int) -> tuple[str, bytes]:
        """``(display text, UTF-8 bytes)`` of one token."""
        if token_id not in self._cache:
            text = self.tokenizer.decode([token_id])
            raw = self._raw(token_id, text)
            if "\ufffd" in text and raw != text.encode("utf-8"):
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._cache[token_id] = (text, raw)
        return self._cache[token_id]

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[TopLogprobs | None] | None, start_offset: int = 0) -> dict:
    """The legacy ``logprobs`` object for ``ids`` (``tops`` None = no alternatives asked)."""
    tokens = [texts.text(t) for t in ids]
    offsets, pos = [], start_offset
    for t in ids:
        offsets.append(pos)
        pos += len(texts.tokenizer.decode([t]))
    top_dicts: list[dict[str, float] | None] | None = None
    if tops is not None:
        top_dicts = [None if top is None else {texts.text(t): lp for t, lp in top} for top in tops]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def merge_logprobs(first: dict | None, second: dict) -> dict:
    """Concatenate two legacy ``logprobs`` objects (the echoed prompt's and the completion's)."""
    if first is None:
        return second
    tops = None
    if first["top_logprobs"] is not None or second["top_logprobs"] is not None:
        tops = (first["top_logprobs"] or [None] * len(first["tokens"])) + \
               (second["top_logprobs"] or [None] * len(second["tokens"]))
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "text_offset")} | \
        {"top_logprobs": tops}


def chat_logprobs(texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[TopLogprobs] | None) -> dict:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True)):
        text, raw = texts.get(t)
        alternatives = []
        for alt, alt_lp in (tops[i] if tops is not None else []):
            alt_text, alt_raw = texts.get(alt)
            alternatives.append({"token": alt_text, "logprob": alt_lp, "bytes": list(alt_raw)})
        content.append({"token": text, "logprob": lp, "bytes": list(raw), "top_logprobs": alternatives})
    return {"content": content}


def prompt_part(texts: TokenTexts, c: Completion, top: bool, lead: int = 0) -> tuple[str, dict]:
    """The echoed prompt's text and legacy logprobs (the first token the model saw has None), without
    the ``lead`` tokens the server put in front of the prompt it was sent (the begin token)."""
    ids = c.prompt_ids[lead:]
    text = texts.tokenizer.decode(ids)
    lps = c.prompt_logprobs[lead:] if c.prompt_logprobs is not None else [None] * len(ids)
    tops = c.prompt_top_logprobs[lead:] if top and c.prompt_top_logprobs is not None else None
    return text, completion_logprobs(texts, ids, lps, tops)
