"""Tests for lmforge.data.encode (tiktoken's ids equal tokenizers'), the pack stage's batch writer and the
tokenizer stage's training sample."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from lmforge.config import RunConfig, TokenizerConfig
from lmforge.data.encode import PROBE, batch_encoder, flatten
from lmforge.data.pack import ShardWriter, list_shards, read_index, read_shard, write_shards
from lmforge.data.readers.files import docs_texts
from lmforge.data.sources import DataError, Document, embedded_corpus
from lmforge.data.tokenizer import Tokenizer, main, sample_texts, train_tokenizer

pytest.importorskip("tiktoken")

ADVERSARIAL = [
    PROBE,
    "",
    " ",
    "\n" * 50 + " " * 37 + "\t" * 9 + "x",
    "1234567890" * 30 + " 3.14159e-10 -42 0xDEADBEEF ٣٤٥ ๑๒๓ Ⅻ",
    "<|endoftext|><|endoftext|>text<|im_start|><|pad|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 20,
    "the the the thethethe ththth eeee  the\u00a0the\u2003the",
    "\x00\x01\x02\x1b[31mred\x1b[0m\x7f\ufffd\ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🏳️‍🌈 👨🏿‍🚀 Z̴̡̛a̸l̷g̶o̵ ‍",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [d.text for d in embedded_corpus()]


@pytest.fixture(scope="module")
def demo_bpe(corpus: list[str]) -> Tokenizer:
    """The demo's tokenizer: BPE 2048 trained on the embedded corpus."""
    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=2048), corpus)


def _reference(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def test_tiktoken_ids_equal_tokenizers_on_the_corpus_and_awkward_text(demo_bpe: Tokenizer, corpus) -> None:
    encode, name = batch_encoder(demo_bpe)
    assert name == "tiktoken"
    assert encode(corpus) == _reference(demo_bpe, corpus)
    assert encode(ADVERSARIAL) == _reference(demo_bpe, ADVERSARIAL)
    # Words glued from random vocabulary entries: where rank order and merge order could part ways.
    rng = random.Random(0)
    pieces = [demo_bpe.decode([i]) for i in range(8, demo_bpe.vocab_size)]
    glued = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 16))) for _ in range(3000)]
    assert encode(glued) == _reference(demo_bpe, glued)
    # Every character of the Basic Multilingual Plane's first 12,288 code points, between letters and spaces.
    chars = [f"a{chr(c)}b {chr(c)}{chr(c)} 1{chr(c)}\n" for c in range(0x3000) if not 0xD800 <= c < 0xE000]
    assert encode(chars) == _reference(demo_bpe, chars)


def test_fallback_to_tokenizers_when_the_conversion_is_not_exact(demo_bpe: Tokenizer, monkeypatch) -> None:
    char = train_tokenizer(TokenizerConfig(kind="char"), ["plain text"])
    assert batch_encoder(char)[1] == "tokenizers"
    assert batch_encoder(char)[0](["plain text é"]) == [char.encode("plain text é")]

    # The same BPE with another pre-tokenizer (a space added in front): tiktoken's pattern would not match it.
    inner = tokenizers.Tokenizer.from_str(demo_bpe.inner.to_str())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other = Tokenizer(inner)
    encode, name = batch_encoder(other)
    assert name == "tokenizers" and encode(ADVERSARIAL) == _reference(other, ADVERSARIAL)

    # An added token that is not special is found inside the text by tokenizers, never by tiktoken.
    inner = tokenizers.Tokenizer.from_str(demo_bpe.inner.to_str())
    inner.add_tokens(["forsooth"])
    added = Tokenizer(inner)
    encode, name = batch_encoder(added)
    assert name == "tokenizers" and encode(["forsooth, my lord"]) == [added.encode("forsooth, my lord")]

    assert batch_encoder(demo_bpe, fast=False)[1] == "tokenizers"
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if it were not installed
    assert batch_encoder(demo_bpe)[1] == "tokenizers"


def test_fallback_when_the_ids_disagree(demo_bpe: Tokenizer, monkeypatch) -> None:
    """The probe compares the two encoders, so a conversion that is not exact is never used."""
    import tiktoken

    real = tiktoken.Encoding.encode_ordinary
    monkeypatch.setattr(tiktoken.Encoding, "encode_ordinary", lambda self, text: real(self, text)[::-1])
    assert batch_encoder(demo_bpe)[1] == "tokenizers"


def test_demo_shards_are_the_tokens_of_each_document_then_eot(demo_bpe: Tokenizer, corpus, tmp_path: Path) -> None:
    """The shards the pack stage writes are the old per-document ones: encode(doc) + EOT, in order."""
    stats = write_shards(corpus, demo_bpe, tmp_path / "fast", "train", shard_tokens=400_000)
    slow = write_shards(corpus, demo_bpe, tmp_path / "slow", "train", shard_tokens=400_000, fast=False)
    assert (stats["encoder"], slow["encoder"]) == ("tiktoken", "tokenizers")
    expected = np.concatenate(
        [np.array([*ids, demo_bpe.eot_id], dtype=np.uint16) for ids in _reference(demo_bpe, corpus)]
    )
    shards = list_shards(tmp_path / "fast", "train")
    assert len(shards) == stats["shards"] > 1
    assert np.array_equal(np.concatenate([read_shard(p) for p in shards]), expected)
    for fast, slow_path in zip(shards, list_shards(tmp_path / "slow", "train"), strict=True):
        assert fast.read_bytes() == slow_path.read_bytes()
        assert read_index(fast).tolist() == read_index(slow_path).tolist()
    assert stats["tokens"] == len(expected) and stats["docs"] == len(corpus)


def test_flatten() -> None:
    tokens, lengths = flatten([[5, 6], [], [7]], 0, np.dtype(np.uint16))
    assert tokens.tolist() == [5, 6, 0, 0, 7, 0] and lengths.tolist() == [3, 1, 2]
    assert tokens.dtype == np.uint16


def test_add_many_closes_shards_where_add_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 40, size=300)
    tokens = rng.integers(0, 1000, size=int(lengths.sum())).astype(np.uint16)
    one = ShardWriter(tmp_path / "one", "train", 1000, shard_tokens=97)
    (tmp_path / "one").mkdir()
    start = 0
    for n in lengths:
        one.add(tokens[start : start + n].tolist())
        start += n
    one.close()
    many = ShardWriter(tmp_path / "many", "train", 1000, shard_tokens=97)
    (tmp_path / "many").mkdir()
    cuts = [0, 1, 2, 50, 51, 170, 300]  # batches of 1, 1, 48, 1, 119 and 130 documents
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for a, b in zip(cuts, cuts[1:], strict=False):
        many.add_many(tokens[ends[a] : ends[b]], lengths[a:b])
    many.close()
    names = [p.name for p in list_shards(tmp_path / "one", "train")]
    assert len(names) > 10 and names == [p.name for p in list_shards(tmp_path / "many", "train")]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
        index = name.removesuffix(".bin") + ".idx.npy"
        assert (tmp_path / "one" / index).read_bytes() == (tmp_path / "many" / index).read_bytes()


# ----------------------------------------------------------------------- training sample
def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i} " + "word " * rng.randint(10, 300) + "é" * rng.randint(0, 5) for i in range(n)]


def test_sample_is_bounded_seeded_and_spread(monkeypatch) -> None:
    texts = _docs(2000)
    size = sum(len(t.encode()) for t in texts)
    budget = size // 10
    taken: dict[str, int] = {}
    sample = list(sample_texts(texts, len(texts), size, budget, seed=7, taken=taken))
    assert taken["bytes"] == sum(len(t.encode()) for t in sample) <= budget
    assert taken["docs"] == len(sample) and taken["bytes"] > budget * 0.8
    assert sample == list(sample_texts(texts, len(texts), size, budget, seed=7))
    assert sample != list(sample_texts(texts, len(texts), size, budget, seed=8))
    firsts = [int(t.split()[1]) for t in sample]
    assert firsts == sorted(firsts) and firsts[0] < 200 and firsts[-1] > 1600  # from the whole corpus, in order
    # A corpus within the budget is taken whole and unchanged.
    assert list(sample_texts(texts, len(texts), size, size, seed=7)) == texts
    # A budget inside one document cuts it at a character boundary.
    # A first document larger than the budget is cut to it at a character boundary; later ones still fit
    # (docs=0: a corpus of unknown size, every document drawn).
    assert list(sample_texts(["ééé", "x", "yy"], 0, 9, 3, seed=0)) == ["é", "x"]


def _write_docs(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    lines = [Document(id=f"d{i}", text=t, source="t", meta={}).to_json() for i, t in enumerate(texts)]
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def test_stage_records_the_sample(tmp_path: Path) -> None:
    texts = _docs(400)
    docs = _write_docs(tmp_path / "docs", texts)
    size = sum(len(t.encode()) for t in texts)
    whole = main(RunConfig.model_validate({"tokenizer": {"vocab_size": 300}}), docs, tmp_path / "all")
    assert whole["sample"] == {"docs": 400, "bytes": size, "corpus_docs": 400, "corpus_bytes": size}
    cfg = RunConfig.model_validate({"tokenizer": {"vocab_size": 300, "sample_bytes": size // 4}})
    part = main(cfg, docs, tmp_path / "part")
    assert part["sample"]["corpus_bytes"] == size and part["sample"]["bytes"] <= size // 4
    assert 50 < part["sample"]["docs"] < 150
    again = main(cfg, docs, tmp_path / "again")
    assert (tmp_path / "part" / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "part" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert again["sample"] == part["sample"]


def test_docs_texts_reads_the_docs_stage_and_names_a_bad_line(tmp_path: Path) -> None:
    texts = ["first", "é🎉 second\nline", ""]
    folder = _write_docs(tmp_path / "docs", texts)
    assert list(docs_texts(folder / "train.jsonl")) == texts
    with open(folder / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "x", "text": 5}\n')
    with pytest.raises(DataError, match=r"train.jsonl:4: field 'text' is int, not a string"):
        list(docs_texts(folder / "train.jsonl"))
    (folder / "train.jsonl").write_text('{"id": "a", "text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.jsonl:2: not a document of the docs stage"):
        list(docs_texts(folder / "train.jsonl"))
    with pytest.raises(DataError, match="nowhere.jsonl not found; run the docs stage first"):
        list(docs_texts(tmp_path / "nowhere.jsonl"))
