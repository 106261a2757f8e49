"""Tokenizers: train, load and save them with Hugging Face ``tokenizers``.

Two kinds, both lossless on any UTF-8 text (``decode(encode(s)) == s``):

- ``bpe``: byte-level BPE (GPT-2 style): all 256 bytes are in the vocabulary, merges
  are learned up to ``tokenizer.vocab_size`` tokens, special tokens included;
- ``char``: one token per character seen in training, and the 256 byte tokens
  ``<0x00>`` .. ``<0xFF>`` for characters it never saw (a BPE model without merges,
  with byte fallback), like nanoGPT's shakespeare_char but never failing.

Special tokens have fixed ids 0..7 (:data:`SPECIAL_TOKENS`); ``<|endoftext|>`` marks
document boundaries, and it is also the begin token: every sequence the model scores
starts with it (:meth:`Tokenizer.with_bos`, the one rule that scoring, the server's echo +
logprobs, lm-eval and the HF / GGUF exports share). A tokenizer imported with a Hugging
Face model keeps that model's own end-of-text / begin / pad tokens (``specials``), saved beside ``tokenizer.json`` as
``special_tokens_map.json``; code asks for ``eot_id`` / ``pad_id``, never for fixed ids.
Generation stops at every id of ``end_ids`` (end of text, ``<|im_end|>``, and any further end
token the imported model declares). An imported tokenizer also keeps its model's own
begin-token rule (``add_bos``: Llama and Gemma add one, Qwen does not) and chat template
(``chat_template``, rendered by :mod:`lmforge.data.chat`); both are saved beside ``tokenizer.json``
and read back. Text that merely spells a special token (``"<|im_end|>"`` in a
document) is encoded as ordinary text, so data cannot inject control tokens; code
that needs a special token uses its id. The kind is not a separate field: it is
read back from the saved ``tokenizer.json`` (a BPE with byte fallback and no merges
is ``char``), so the file stays loadable by ``transformers``.

Usage::

    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=2048), texts)
    tok.save(Path("runs/demo/tokenizer"))
    tok = Tokenizer.load("runs/demo/tokenizer")
    ids = tok.encode("To be, or not to be")

The "tokenizer" stage is :func:`main` (``lmforge tokenize``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from lmforge import artifacts
from lmforge.config import ConfigError, RunConfig, TokenizerConfig
from lmforge.data.chat import is_chatml
from lmforge.data.readers.files import stage_texts
from lmforge.data.sources import DataError

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # 0: document boundary (EOT)
    "<|pad|>",  # 1: padding
    "<|im_start|>",  # 2: chat turn start
    "<|im_end|>",  # 3: chat turn end
    "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>",
]
EOT = SPECIAL_TOKENS[0]
PAD = SPECIAL_TOKENS[1]
END_OF_TURN = SPECIAL_TOKENS[3]  # ends a chat turn (the ChatML template of lmforge.data.chat)
BYTE_TOKENS: list[str] = [f"<0x{b:02X}>" for b in range(256)]
# Byte-level BPE cannot be smaller than its alphabet: every byte plus the special tokens.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
BPT_SAMPLE_BYTES = 1_000_000  # validation text measured for bytes_per_token


SPECIALS_FILE = "special_tokens_map.json"  # Hugging Face's name; written only for non-lmforge special tokens
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 keeps a tokenizer's chat template
DEFAULT_SPECIALS = {"eos_token": EOT, "bos_token": EOT, "pad_token": PAD}


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with lmforge's conventions.

    ``specials`` names the end-of-text (``eos_token``), begin (``bos_token``) and padding
    (``pad_token``) tokens; by default lmforge's own. ``eot_id``, ``bos_id`` and ``pad_id`` are
    their ids (a missing bos or pad falls back to the end-of-text token). ``end_tokens`` names
    further tokens that end a generation, besides ``eos_token`` and ``<|im_end|>`` (an imported
    model's ``generation_config.json`` may declare several); :attr:`end_ids` holds them all.
    ``chat_template`` is an imported model's own Jinja template (None: lmforge's ChatML), ``add_bos``
    its begin-token rule (None: lmforge's, a begin token first).
    """

    # The begin-of-sequence rule, declared here once: a scored or prompted sequence starts with
    # ``bos_id`` (lmforge's own tokenizers: ``<|endoftext|>``). Why: the pack stage writes every
    # document followed by the end-of-text id, so in training nearly every document starts right
    # after that token (all but the first of a shard), and the model learned "start of a document"
    # as "after <|endoftext|>". Text scored at position 0 with nothing before it looks to the model
    # like a window cut mid-document instead. The HF export (a tokenizer.json post-processor and
    # ``add_bos_token``), the GGUF metadata and the server's echo + logprobs follow this flag.
    add_bos: bool = True

    def __init__(self, inner: tokenizers.Tokenizer, origin: str = "tokenizer",
                 specials: dict[str, str | None] | None = None, end_tokens: Sequence[str] = (),
                 chat_template: str | None = None, add_bos: bool | None = None) -> None:
        self.inner, self.origin = inner, origin
        # Added (special) tokens are otherwise matched inside the input text; this makes text
        # that spells "<|endoftext|>" encode as the ordinary characters it is.
        self.inner.encode_special_tokens = True
        self.kind = _detect_kind(inner)
        self.specials: dict[str, str | None] = {**DEFAULT_SPECIALS, **(specials or {})}
        eos = self.specials["eos_token"]
        eot = None if eos is None else inner.token_to_id(eos)
        if eot is None:
            raise DataError(f"{origin}: the tokenizer has no {eos} token (lmforge needs it to mark document ends)")
        self.eot_id: int = eot
        bos, pad = (self.specials[k] for k in ("bos_token", "pad_token"))
        bos_id, pad_id = (None if t is None else inner.token_to_id(t) for t in (bos, pad))
        self.bos_id: int = eot if bos_id is None else bos_id
        self.pad_id: int = eot if pad_id is None else pad_id
        missing = [t for t in end_tokens if inner.token_to_id(t) is None]
        if missing:
            raise DataError(f"{origin}: end token {missing[0]!r} is not in the tokenizer")
        self.end_tokens: list[str] = sorted(set(end_tokens))
        # lmforge's own template (what its exports write) is rendered by lmforge's ChatML code, as before export.
        self.chat_template: str | None = None if chat_template is None or is_chatml(chat_template) else chat_template
        if add_bos is not None:
            self.add_bos = add_bos
        self._chat_inner: tokenizers.Tokenizer | None = None

    @property
    def folder(self) -> str:
        """Where the tokenizer came from, for messages: its folder when it was read from a file."""
        return self.origin.removesuffix("/tokenizer.json")

    @property
    def end_ids(self) -> list[int]:
        """Every token id that ends a generation: end of text, end of turn (``<|im_end|>``) and the declared ones.

        The engine stops at any of them by default, for every endpoint and verb, so a chat model's
        end of turn is never printed as text.
        """
        names = [self.specials["eos_token"], END_OF_TURN, *self.end_tokens]
        ids = {self.eot_id, *(self.inner.token_to_id(t) for t in names if t is not None)}
        return sorted(i for i in ids if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added or recognised."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_rendered_chat(self, text: str) -> list[int]:
        """Token ids of a chat template's rendering: the special tokens it spells are recognised, as in
        transformers' ``apply_chat_template`` (:mod:`lmforge.data.chat` first checks that no message content
        spells one, so only the template's own markup becomes control tokens); nothing is added."""
        if self._chat_inner is None:
            self._chat_inner = tokenizers.Tokenizer.from_str(self.inner.to_str())
            self._chat_inner.encode_special_tokens = False
        return self._chat_inner.encode(text, add_special_tokens=False).ids

    def special_tokens(self) -> dict[int, str]:
        """The added tokens marked special (control tokens: begin, end, turn markers), by id."""
        return {i: t.content for i, t in self.inner.get_added_tokens_decoder().items() if t.special}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(list(texts), add_special_tokens=False)]

    def with_bos(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as the start of a sequence the model sees: ``bos_id`` first, unless it already is.

        A prompt of token ids that already starts with the begin token (lm-eval with
        ``add_bos_token=True``) is left as it is, so the token is never doubled.
        """
        ids = [int(i) for i in ids]
        if not self.add_bos or ids[:1] == [self.bos_id]:
            return ids
        return [self.bos_id, *ids]

    def with_bos_post_processor(self) -> tokenizers.Tokenizer:
        """A copy of the inner tokenizer whose post-processor applies :meth:`with_bos`, so Hugging Face's
        tokenizer (``add_special_tokens=True``, its default) and lm-eval give the ids lmforge scores."""
        inner = tokenizers.Tokenizer.from_str(self.inner.to_str())
        if not self.add_bos or inner.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]:
            return inner  # no rule to add, or the tokenizer's own post-processor already adds it
        bos = self.id_to_token(self.bos_id)
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, self.bos_id)])
        # Keep an existing post-processor (GPT-2's ByteLevel one trims offsets) and add ours after it.
        existing = inner.post_processor
        inner.post_processor = template if existing is None else processors.Sequence([existing, template])
        return inner

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; the exact inverse of :meth:`encode`; special ids give their text unless skipped."""
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def save(self, directory: Path | str, bos_post_processor: bool = False) -> Path:
        """Write ``directory/tokenizer.json`` (atomically) and return its path.

        An imported tokenizer's own special tokens (and begin-token rule) go beside it in
        ``special_tokens_map.json``, its chat template in ``chat_template.jinja``.
        ``bos_post_processor`` writes :meth:`with_bos_post_processor` (for exports to other tools).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.specials != DEFAULT_SPECIALS or self.end_tokens or not self.add_bos:
            # "end_tokens" and "add_bos_token" are lmforge's keys here; HF exports rewrite this file.
            extra = {"end_tokens": self.end_tokens} if self.end_tokens else {}
            extra |= {} if self.add_bos else {"add_bos_token": False}
            artifacts.write_text(directory / SPECIALS_FILE, json.dumps({**self.specials, **extra}, indent=2) + "\n")
        if self.chat_template is not None:
            artifacts.write_text(directory / TEMPLATE_FILE, self.chat_template)
        path = directory / "tokenizer.json"
        inner = self.with_bos_post_processor() if bos_post_processor else self.inner
        artifacts.write_text(path, inner.to_str(pretty=True))
        return path

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or a folder that holds one."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer not found: {p}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise DataError(f"{p} is not a valid tokenizer.json ({e})") from None
        return cls(inner, origin=str(p), specials=read_specials(p.parent), end_tokens=read_end_tokens(p.parent),
                   chat_template=read_chat_template(p.parent), add_bos=read_add_bos(p.parent))


def tokenizer_digest(path: Path) -> str:
    """sha256 of a ``tokenizer.json``: checkpoints record it, so a model is never paired with another tokenizer."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_specials(folder: Path) -> dict[str, str | None]:
    """``eos_token`` / ``bos_token`` / ``pad_token`` named in ``folder``'s ``special_tokens_map.json`` or
    ``tokenizer_config.json`` (Hugging Face's files; the first that names a token wins; empty if none).

    Hugging Face writes each either as the token's text or as ``{"content": text, ...}``.
    """
    out: dict[str, str | None] = {}
    for path in (folder / SPECIALS_FILE, folder / "tokenizer_config.json"):
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not readable JSON ({e})") from None
        for key in DEFAULT_SPECIALS:
            if not isinstance(raw, dict) or key not in raw:
                continue
            value = raw[key].get("content") if isinstance(raw[key], dict) else raw[key]
            if value is None or isinstance(value, str):  # null = the model has no such token
                out.setdefault(key, value)
    return out


def read_end_tokens(folder: Path) -> list[str]:
    """The further end tokens lmforge saved in ``folder``'s ``special_tokens_map.json`` (``end_tokens``)."""
    path = folder / SPECIALS_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from None
    tokens = raw.get("end_tokens", []) if isinstance(raw, dict) else []
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataError(f"{path}: end_tokens must be a list of token strings (got {tokens!r})")
    return tokens


def _read_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from None
    return raw if isinstance(raw, dict) else {}


def read_add_bos(folder: Path) -> bool | None:
    """The begin-token rule written in ``folder``: ``add_bos_token`` of ``special_tokens_map.json`` (lmforge's
    key) or of ``tokenizer_config.json`` (Hugging Face's); None when neither says."""
    for path in (folder / SPECIALS_FILE, folder / "tokenizer_config.json"):
        value = _read_object(path).get("add_bos_token") if path.is_file() else None
        if isinstance(value, bool):
            return value
    return None


def read_chat_template(folder: Path) -> str | None:
    """The chat template of ``folder``: ``chat_template.jinja`` (transformers 5) or ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates whose ``default`` one is taken)."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    found = _read_object(config).get("chat_template") if config.is_file() else None
    if isinstance(found, list):
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    return found if isinstance(found, str) and found.strip() else None


def _detect_kind(inner: tokenizers.Tokenizer) -> str:
    """'char' for a BPE with byte fallback and no merges (what we build), else 'bpe'."""
    model = json.loads(inner.to_str()).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback") and not model.get("merges"):
        return "char"
    return "bpe"


def _special_added_tokens() -> list[AddedToken]:
    return [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]


def _train_bpe(cfg: TokenizerConfig, texts: Iterable[str]) -> tokenizers.Tokenizer:
    if cfg.vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"tokenizer.vocab_size ({cfg.vocab_size}) is smaller than the {MIN_BPE_VOCAB} tokens "
                          f"a byte-level BPE needs (256 bytes + {len(SPECIAL_TOKENS)} special); "
                          "raise it or use tokenizer.kind=char")
    inner = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would break decode(encode(s)) == s.
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=_special_added_tokens(),  # listed first, so they get ids 0..7
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer)
    return inner


def _train_char(texts: Iterable[str]) -> tokenizers.Tokenizer:
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for token in sorted(seen) + BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    # No merges: each character is its own token; unknown characters become their UTF-8 bytes.
    # No normalizer and no pre-tokenizer, so the text reaches the model unchanged.
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    inner.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    inner.add_special_tokens(_special_added_tokens())
    return inner


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """Train a tokenizer of ``cfg.kind`` on ``texts`` (any iterable; streamed). Deterministic."""
    inner = _train_bpe(cfg, texts) if cfg.kind == "bpe" else _train_char(texts)
    tok = Tokenizer(inner, origin=f"trained {cfg.kind} tokenizer")
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # guards the contract other stages rely on
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    return tok


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], limit: int = BPT_SAMPLE_BYTES) -> float | None:
    """UTF-8 bytes per token over the first ``limit`` bytes of ``texts`` (None if there is no text)."""
    n_bytes = n_tokens = 0
    for text in texts:
        data = text.encode("utf-8")
        if n_bytes + len(data) > limit:
            # Cut at the byte budget; 'ignore' drops a character split in half at the cut.
            data = data[: limit - n_bytes].decode("utf-8", errors="ignore").encode("utf-8")
        n_bytes += len(data)
        n_tokens += len(tok.encode(data.decode("utf-8")))
        if n_bytes >= limit:
            break
    return n_bytes / n_tokens if n_tokens else None


def corpus_size(docs_dir: Path) -> tuple[int, int]:
    """Documents and UTF-8 bytes of ``docs_dir/train.jsonl``: from the docs stage's manifest, else counted."""
    outputs = (artifacts.read_manifest(docs_dir) or {}).get("outputs") or {}
    if isinstance(outputs.get("train_docs"), int) and isinstance(outputs.get("train_bytes"), int):
        return outputs["train_docs"], outputs["train_bytes"]
    docs = size = 0
    for text in stage_texts(docs_dir / "train.jsonl"):
        docs, size = docs + 1, size + len(text.encode("utf-8"))
    return docs, size


def sample_texts(texts: Iterable[str], docs: int, size: int, budget: int, seed: int,
                 taken: dict[str, int] | None = None) -> Iterator[str]:
    """A seeded sample of ``texts`` (``docs`` documents, ``size`` bytes) of at most ``budget`` bytes.

    Every document is drawn with probability ``budget / size`` (one seeded draw per document, so the
    sample is spread over the whole corpus, never its first part) and kept, in corpus order, if it fits
    in what is left of the budget; one that does not is skipped (a later, shorter one may fit), unless
    the sample is still empty: then its start, cut at a character boundary, fills the budget. All
    documents, unchanged, when the corpus fits. ``taken`` receives the sample's ``docs`` and ``bytes``.
    """
    taken = taken if taken is not None else {}
    taken.update(docs=0, bytes=0)
    drawn = np.random.default_rng(seed).random(docs) < budget / size if size > budget else np.ones(docs, bool)
    for i, text in enumerate(texts):
        if i < docs and not drawn[i]:
            continue
        data = text.encode("utf-8")
        if len(data) > budget - taken["bytes"]:
            if taken["docs"]:
                continue
            text = data[:budget].decode("utf-8", errors="ignore")  # a first document larger than the budget
            data = text.encode("utf-8")
        taken["docs"] += 1
        taken["bytes"] += len(data)
        yield text


def main(cfg: RunConfig, docs_dir: Path, out_dir: Path) -> dict:
    """The tokenizer stage: train on a sample of ``docs_dir/train.jsonl`` (``tokenizer.sample_bytes``; all of it
    when smaller) or load ``tokenizer.path``, and save to ``out_dir``."""
    docs_dir, out_dir = Path(docs_dir), Path(out_dir)
    t0 = time.perf_counter()
    sample: dict[str, int] = {}
    if cfg.tokenizer.path:
        tok = Tokenizer.load(cfg.tokenizer.path)
        source = str(cfg.tokenizer.path)
    else:
        docs, size = corpus_size(docs_dir)
        texts = sample_texts(stage_texts(docs_dir / "train.jsonl"), docs, size, cfg.tokenizer.sample_bytes,
                             cfg.seed, sample)
        tok = train_tokenizer(cfg.tokenizer, texts)
        sample.update(corpus_docs=docs, corpus_bytes=size)
        source = "trained"
    train_seconds = time.perf_counter() - t0
    tok.save(out_dir)
    val_path = docs_dir / "val.jsonl"
    bpt = bytes_per_token(tok, stage_texts(val_path)) if val_path.is_file() else None
    return {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_seconds, 3) if source == "trained" else 0.0,
        "bytes_per_token": bpt,
        "source": source,
        **({"sample": sample} if sample else {}),
    }
