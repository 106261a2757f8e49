"""Bulk encoding for the pack stage: the same ids as :meth:`Tokenizer.encode`, several times faster.

A byte-level BPE trained by ``tokenizers`` (GPT-2's scheme) can be run by ``tiktoken``: its
ranks are the vocabulary's byte strings (the GPT-2 byte-to-unicode table read backwards) with
rank = token id, and its split pattern is the ``ByteLevel`` pre-tokenizer's regex. On 2 shared
cores that encodes about 4x faster than ``tokenizers`` (docs/benchmarks.md, "Tokenize and pack").

:func:`batch_encoder` builds it only when the conversion is exact: a ``BPE`` model with no
normalizer, dropout, prefixes or byte fallback, the plain ``ByteLevel`` pre-tokenizer, merges in
id order (tiktoken merges by rank, ``tokenizers`` by merge order: the same when they agree),
every byte in the vocabulary, and identical ids on every vocabulary entry and on a probe of
awkward text (unicode, whitespace runs, digits, text spelling special tokens). Anything else
(``char`` tokenizers, imported ones with other pre-tokenizers or with added tokens that are not
special, tiktoken not installed) encodes with ``tokenizers``' ``encode_batch_fast`` (no offsets),
which gives the ids of ``encode``.

Usage::

    encode, name = batch_encoder(Tokenizer.load("runs/demo/tokenizer"))   # name: "tiktoken" or "tokenizers"
    ids = encode(["To be, or not to be", "that is the question"])          # list of id lists, no EOT
    tokens, lengths = flatten(ids, eot_id=0, dtype=np.dtype(np.uint16))      # one array, EOT after each
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence

import numpy as np

from lmforge.data.tokenizer import Tokenizer

BatchEncoder = Callable[[Sequence[str]], list[list[int]]]

# The split regex of tokenizers' ByteLevel pre-tokenizer (use_regex=True), which is GPT-2's.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text where a regex engine or a merge order could disagree: every kind of space, digits, marks,
# scripts, emoji, control characters, contractions, and the spelling of special tokens.
PROBE = (
    "Hello, world! It's 2026 -- the year's 1st test: 3.14159, 1,000,000 and 0x1F600.\n\n\n"
    "  leading spaces\t\ttabs\r\nwindows\u00a0nbsp\u2009thin\u3000ideographic\u2028line\u2029para\x0bvt\x0cff"
    "\x1c\x1d\x1e\x1f\x85 next-line \u180e mongolian \u200b zero-width \ufeff bom\n"
    "Ünïcödé naïve café résumé Straße ΑΒΓ αβγ Привет мир 漢字かなカナ 한국어 عربى עברית हिन्दी ไทย\n"
    "emoji 🙂👍🏽👨‍👩‍👧 flags 🇩🇪 combining e\u0301 a\u0308 Roman Ⅻ ½ ² ٣ ७ superscripts¹²³\n"
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE DON'T we'll they've I'm o'clock ''quoted'' '''\n"
    "<|endoftext|> <|pad|><|im_start|>user\nhi<|im_end|> <|reserved_0|>\n"
    "    def f(x):\n        return x  # code\n\n\n\n   \n \t \n  trailing   "
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: the character a byte-level BPE writes -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _convertible(tok: Tokenizer) -> dict | None:
    """The tokenizer.json's model when it is a plain byte-level BPE that tiktoken runs the same way."""
    spec = json.loads(tok.inner.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain_model = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    )
    plain_pre = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    return model if plain_model and plain_pre and spec.get("normalizer") is None else None


def _tiktoken(tok: Tokenizer) -> BatchEncoder | None:
    """A tiktoken encoder with ``tok``'s ids, or None when it cannot be exact (see the module docstring)."""
    model = _convertible(tok)
    if model is None:
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    to_byte = _byte_decoder()
    added_tokens = tok.inner.get_added_tokens_decoder()
    if not all(t.special for t in added_tokens.values()):
        return None  # tokenizers finds ordinary added tokens inside the text; tiktoken would not
    added = set(added_tokens)
    vocab: dict[str, int] = model["vocab"]
    if any(ch not in to_byte for s, i in vocab.items() if i not in added for ch in s):
        return None
    ranks = {bytes(to_byte[ch] for ch in s): i for s, i in vocab.items() if i not in added}
    merged = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in model["merges"]]
    in_order = None not in merged and all(a < b for a, b in zip(merged, merged[1:], strict=False))
    if (
        not in_order
        or len(ranks) != len(vocab) - len(added & set(vocab.values()))
        or any(bytes([b]) not in ranks for b in range(256))
    ):
        return None
    enc = tiktoken.Encoding(
        f"lmforge:{tok.origin}", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    checks = [PROBE, *(bytes(to_byte[ch] for ch in s).decode("utf-8", "replace") for s in vocab)]
    if [enc.encode_ordinary(text) for text in checks] != _tokenizers(tok)(checks):
        return None

    def encode(texts: Sequence[str]) -> list[list[int]]:
        # One text at a time in this thread (encode_ordinary_batch hands each to a thread pool): the pack
        # stage's tasks are the parallelism, so each encoder keeps to its core.
        return [enc.encode_ordinary(text) for text in texts]

    return encode


def _tokenizers(tok: Tokenizer) -> BatchEncoder:
    def encode(texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips the offsets that encode_batch computes; the ids are the same.
        return [e.ids for e in tok.inner.encode_batch_fast(list(texts), add_special_tokens=False)]

    return encode


def batch_encoder(tok: Tokenizer, fast: bool = True) -> tuple[BatchEncoder, str]:
    """The fastest exact batch encoder for ``tok`` and its name (``fast=False``: always ``tokenizers``)."""
    encode = _tiktoken(tok) if fast else None
    return (encode, "tiktoken") if encode is not None else (_tokenizers(tok), "tokenizers")


def flatten(encoded: list[list[int]], eot_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A batch's id lists as one flat array, each document followed by ``eot_id``, and their lengths."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eot_id
    body = np.ones(len(flat), dtype=bool)
    body[ends - 1] = False
    flat[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=len(flat) - len(encoded))
    return flat, lengths
