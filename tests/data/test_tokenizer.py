"""Tests for lmforge.data.tokenizer: round trips, special tokens, save/load, determinism, the stage."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from lmforge.config import ConfigError, RunConfig, TokenizerConfig
from lmforge.data.sources import DataError, Document, embedded_corpus
from lmforge.data.tokenizer import (
    BYTE_TOKENS,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_per_token,
    main,
    train_tokenizer,
)

SAMPLES = [
    "To be, or not to be, that is the question.",
    "Café naïve façade Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 🎉👩‍👩‍👧 and 🇫🇷",
    "control \x00\x01\x07\x1b[0m\x7f chars",
    "tabs\tand\r\nnewlines\n\n  spaces   ",
    " leading space",
    "",
]


def _sample_texts() -> list[str]:
    # Two short plays' first 40 kB each: enough merges for vocab 300, fast to train.
    return [d.text[:40_000] for d in islice(embedded_corpus(), 2)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=2), _sample_texts())


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_tokenizer(TokenizerConfig(kind="char"), ["hello world, plain ASCII only."])


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(kind: str, text: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_token_ids(bpe: Tokenizer, char: Tokenizer) -> None:
    for tok in (bpe, char):
        assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(8))
        assert (tok.eot_id, tok.pad_id) == (0, 1)
        assert tok.decode([0, 3]) == "<|endoftext|><|im_end|>"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_token_text_is_ordinary_text(kind: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    text = "a<|endoftext|>b<|im_start|>user\n<|im_end|><|pad|>"
    ids = tok.encode(text)
    assert min(ids) >= len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text
    assert all(min(row) >= len(SPECIAL_TOKENS) for row in tok.encode_batch([text, "<|reserved_2|>"]))


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]


def test_bpe_vocab_and_merges(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 300
    # Learned merges make common English shorter than its bytes.
    text = "the king and the queen"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))


def test_char_vocab_and_byte_fallback(char: Tokenizer) -> None:
    assert char.kind == "char"
    seen = sorted(set("hello world, plain ASCII only."))
    assert char.vocab_size == len(SPECIAL_TOKENS) + len(seen) + 256
    assert [char.id_to_token(i) for i in range(8, 8 + len(seen))] == seen
    assert char.encode("hello") == [char.token_to_id(c) for c in "hello"]
    ids = char.encode("é")  # unseen: its two UTF-8 bytes
    assert [char.id_to_token(i) for i in ids] == ["<0xC3>", "<0xA9>"]
    assert char.decode(char.encode("héllo 🎉\n\t  x")) == "héllo 🎉\n\t  x"
    assert all(char.token_to_id(b) is not None for b in BYTE_TOKENS)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_identical(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for loaded in (Tokenizer.load(tmp_path / "tok"), Tokenizer.load(path)):
        assert loaded.kind == kind
        assert loaded.vocab_size == tok.vocab_size
        assert [loaded.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
        assert min(loaded.encode("<|endoftext|>")) >= len(SPECIAL_TOKENS)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_begin_token_rule_and_its_post_processor(kind: str, request: pytest.FixtureRequest) -> None:
    """One rule for the begin token: with_bos puts it first once; the exported post-processor does the same."""
    import tokenizers
    from tokenizers import processors

    tok: Tokenizer = request.getfixturevalue(kind)
    ids = tok.encode("To be, or not to be")
    assert tok.with_bos(ids) == [tok.bos_id, *ids] and tok.with_bos([]) == [tok.bos_id]
    assert tok.with_bos([tok.bos_id, *ids]) == [tok.bos_id, *ids]  # never doubled
    assert tok.bos_id == tok.token_to_id("<|endoftext|>")  # what pack.py puts before every document but a shard's first
    exported = tok.with_bos_post_processor()
    assert exported.encode("To be, or not to be").ids == tok.with_bos(ids)
    assert tok.inner.encode("To be, or not to be").ids == ids  # the run's own tokenizer is unchanged
    # An existing post-processor is kept (GPT-2's ByteLevel one); one that already adds the token is not doubled.
    inner = tokenizers.Tokenizer.from_str(tok.inner.to_str())
    inner.post_processor = processors.ByteLevel(trim_offsets=True)
    again = Tokenizer(inner).with_bos_post_processor()
    assert again.encode("To be, or not to be").ids == tok.with_bos(ids)
    assert Tokenizer(again).with_bos_post_processor().encode("To be, or not to be").ids == tok.with_bos(ids)


def test_training_is_deterministic() -> None:
    cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    a = train_tokenizer(cfg, _sample_texts())
    b = train_tokenizer(cfg, iter(_sample_texts()))  # an iterator trains the same as a list
    assert a.inner.to_str() == b.inner.to_str()
    c1 = train_tokenizer(TokenizerConfig(kind="char"), ["zyx", "abc"])
    c2 = train_tokenizer(TokenizerConfig(kind="char"), ["abc", "zyx"])
    assert c1.inner.to_str() == c2.inner.to_str()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer not found: .*tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json is not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_bpe_vocab_below_alphabet_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size \(100\)"):
        train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=100), ["text"])


def test_bytes_per_token(char: Tokenizer) -> None:
    assert bytes_per_token(char, ["hello", "world"]) == 1.0
    assert bytes_per_token(char, ["é"]) == 1.0  # two bytes, two byte tokens
    assert bytes_per_token(char, ["hello world"], limit=5) == 1.0
    assert bytes_per_token(char, []) is None


def _write_docs(folder: Path, train: list[str], val: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", train), ("val", val)):
        lines = [Document(id=f"{name}{i}", text=t, source="test", meta={}).to_json() for i, t in enumerate(texts)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_stage_trains_and_reloads(tmp_path: Path, bpe: Tokenizer) -> None:
    docs = _write_docs(tmp_path / "docs", ["abc abc", "cab"], ["abcd"])
    cfg = RunConfig.model_validate({"tokenizer": {"kind": "char"}})
    stats = main(cfg, docs, tmp_path / "tok")
    assert stats["kind"] == "char"
    assert stats["vocab_size"] == 8 + 4 + 256  # ' ', a, b, c
    assert stats["bytes_per_token"] == 1.0
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"

    bpe.save(tmp_path / "given")
    cfg = RunConfig.model_validate({"tokenizer": {"path": str(tmp_path / "given")}})
    stats = main(cfg, docs, tmp_path / "copied")
    assert (stats["kind"], stats["vocab_size"], stats["train_seconds"]) == ("bpe", 300, 0.0)
    assert Tokenizer.load(tmp_path / "copied").encode("abcd") == bpe.encode("abcd")


def test_stage_without_docs_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train.jsonl not found; run the docs stage first"):
        main(RunConfig(), tmp_path / "nodocs", tmp_path / "tok")
