"""Tests for lmforge.data.pack (the token shard format) and lmforge.data.loader (batches, resume)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import RunConfig, TokenizerConfig
from lmforge.data import pack
from lmforge.data.loader import TokenLoader
from lmforge.data.pack import ShardWriter, index_path, list_shards, read_index, read_shard, shard_info, write_shards
from lmforge.data.sources import DataError, Document
from lmforge.data.tokenizer import Tokenizer, train_tokenizer

DOCS = ["first document here", "second one", "a third, longer document with more characters in it", "é🎉"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TokenizerConfig(kind="char"), DOCS)


def test_header_and_index(tok: Tokenizer, tmp_path: Path) -> None:
    stats = write_shards(DOCS, tok, tmp_path, "train")
    lengths = [len(tok.encode(d)) + 1 for d in DOCS]  # + EOT
    assert stats == {"tokens": sum(lengths), "docs": 4, "shards": 1, "bytes": sum(len(d.encode()) for d in DOCS),
                     "encoder": "tokenizers"}  # a char tokenizer: tiktoken cannot run it
    (path,) = list_shards(tmp_path, "train")
    assert path.name == "train_000.bin"
    raw = path.read_bytes()
    magic, version, code, count, docs, vocab = struct.unpack("<8sIIQQI", raw[:36])
    assert (magic, version, code, count, docs, vocab) == (b"LMFTOKS\x00", 1, 1, sum(lengths), 4, tok.vocab_size)
    assert raw[36:64] == bytes(28)
    assert len(raw) == 64 + 2 * sum(lengths)
    assert shard_info(path)["dtype"] == "uint16"

    idx = np.load(index_path(path))
    assert idx.dtype == np.int64
    assert np.diff(idx).tolist() == lengths
    assert idx[0] == 0 and idx[-1] == sum(lengths)
    tokens = read_shard(path)
    assert tokens[idx[1:] - 1].tolist() == [tok.eot_id] * 4  # EOT closes every document
    assert tokens.tolist() == sum((tok.encode(d) + [tok.eot_id] for d in DOCS), [])
    assert read_index(path).tolist() == idx.tolist()


def test_multiple_shards_close_at_document_boundaries(tok: Tokenizer, tmp_path: Path) -> None:
    docs = DOCS * 5
    stats = write_shards(docs, tok, tmp_path, "train", shard_tokens=40)
    paths = list_shards(tmp_path, "train")
    assert stats["shards"] == len(paths) > 1
    infos = [shard_info(p) for p in paths]
    assert all(i["tokens"] >= 40 for i in infos[:-1])
    assert sum(i["tokens"] for i in infos) == stats["tokens"]
    assert sum(i["docs"] for i in infos) == len(docs)
    joined = np.concatenate([read_shard(p) for p in paths]).tolist()
    assert joined == sum((tok.encode(d) + [tok.eot_id] for d in docs), [])
    # Rewriting with one shard removes the stale ones.
    write_shards(docs, tok, tmp_path, "train")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000.bin"]


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", vocab_size=70_000, shard_tokens=1000)
    writer.add([69_999, 5, 0])
    (path,) = writer.close()
    assert shard_info(path)["dtype"] == "uint32"
    assert read_shard(path).tolist() == [69_999, 5, 0]


def test_bad_files_are_rejected(tok: Tokenizer, tmp_path: Path) -> None:
    write_shards(DOCS, tok, tmp_path, "train")
    (path,) = list_shards(tmp_path, "train")
    good = path.read_bytes()

    bad = tmp_path / "notes.bin"
    bad.write_bytes(b"hello world" * 10)
    with pytest.raises(DataError, match=r"notes.bin is not an lmforge token shard \(bad magic\); are you passing"):
        read_shard(bad)

    cut = tmp_path / "cut.bin"
    cut.write_bytes(good[:-6])
    with pytest.raises(DataError, match=rf"cut.bin: the header says \d+ tokens \({len(good)} bytes\) "
                                        rf"but the file has {len(good) - 6} bytes"):
        read_shard(cut)

    future = tmp_path / "future.bin"
    future.write_bytes(good[:8] + struct.pack("<I", 2) + good[12:])
    with pytest.raises(DataError, match="format version 2 is not supported"):
        shard_info(future)


def _docs_dir(folder: Path, train: list[str], val: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", train), ("val", val)):
        lines = [Document(id=f"{name}{i}", text=t, source="t", meta={}).to_json() for i, t in enumerate(texts)]
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def test_pack_stage(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tok")
    docs = _docs_dir(tmp_path / "docs", DOCS[:3], DOCS[3:])
    cfg = RunConfig.model_validate({"model": {"context": 16}})
    stats = pack.main(cfg, docs, tmp_path / "tok", tmp_path / "tokens", shard_tokens=1000)
    assert stats["train"]["docs"] == 3 and stats["val"]["docs"] == 1
    assert stats["val"]["tokens"] == len(tok.encode(DOCS[3])) + 1
    text_tokens = sum(len(tok.encode(d)) for d in DOCS)
    assert stats["bytes_per_token"] == pytest.approx(sum(len(d.encode()) for d in DOCS) / text_tokens)
    assert [p.name for p in list_shards(tmp_path / "tokens", "val")] == ["val_000.bin"]

    big = RunConfig.model_validate({"model": {"context": 256}})
    n = stats["train"]["tokens"]
    with pytest.raises(DataError, match=f"training text has {n} tokens, fewer than one sequence of "
                                        r"model.context\+1 = 257"):
        pack.main(big, docs, tmp_path / "tok", tmp_path / "tokens")


# ----------------------------------------------------------------------- loader
def _distinct_shards(folder: Path, sizes: list[int]) -> list[Path]:
    """Shards whose tokens are 0, 1, 2, ... across all shards, so a token's value says where it came from."""
    writer = ShardWriter(folder, "train", vocab_size=100_000, shard_tokens=1)  # one document per shard
    start = 0
    for n in sizes:
        writer.add(list(range(start, start + n)))
        start += n
    return writer.close()


def _take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_batches_shapes_and_shift(tmp_path: Path) -> None:
    _distinct_shards(tmp_path, [200, 131])
    loader = TokenLoader(tmp_path, "train", batch_size=4, context=8, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: targets are the next tokens
    assert loader.n_windows == 199 // 8 + 130 // 8
    assert loader.tokens_per_epoch == loader.n_windows * 8


def test_determinism_and_seeds(tmp_path: Path) -> None:
    paths = _distinct_shards(tmp_path, [300, 157])
    a = _take(TokenLoader(paths, "train", 3, 10, seed=7), 6)
    b = _take(TokenLoader(paths, "train", 3, 10, seed=7), 6)
    c = _take(TokenLoader(paths, "train", 3, 10, seed=8), 6)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b, strict=True))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=True))


def test_epoch_covers_every_window_once(tmp_path: Path) -> None:
    paths = _distinct_shards(tmp_path, [101, 57, 40])
    context = 9
    loader = TokenLoader(paths, "train", batch_size=1, context=context, seed=3)
    first = [0, 101, 158]
    for epoch in range(3):
        assert loader.epoch == epoch
        planned = loader.epoch_windows()
        served = [int(loader.next_batch()[0][0, 0]) for _ in range(loader.n_windows)]
        assert served == [first[s] + start for s, start in planned]
        assert len(set(served)) == loader.n_windows == 100 // 9 + 56 // 9 + 39 // 9
        for s, n in enumerate([101, 57, 40]):
            starts = sorted(start for shard, start in planned if shard == s)
            assert np.diff(starts).tolist() == [context] * (len(starts) - 1)  # windows tile the shard
            assert starts[-1] + context + 1 <= n
    assert loader.epoch == 3


def test_ranks_are_disjoint(tmp_path: Path) -> None:
    paths = _distinct_shards(tmp_path, [500])
    ranks = [TokenLoader(paths, "train", 2, 8, seed=1, rank=r, world_size=3) for r in range(3)]
    windows = [set(r.epoch_windows()) for r in ranks]
    assert [len(w) for w in windows] == [21, 21, 20]  # 499 // 8 = 62 windows dealt in turn, none dropped
    assert not (windows[0] & windows[1]) and not (windows[0] & windows[2]) and not (windows[1] & windows[2])
    whole = set(TokenLoader(paths, "train", 2, 8, seed=1).epoch_windows())
    assert set.union(*windows) == whole


def test_resume_continues_the_same_sequence(tmp_path: Path) -> None:
    paths = _distinct_shards(tmp_path, [90, 60])
    loader = TokenLoader(paths, "train", batch_size=5, context=7, seed=11)  # 12 + 8 = 20 windows
    _take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON, as in a checkpoint
    expected = _take(loader, 6)  # crosses into the next epochs
    assert loader.epoch >= 1
    fresh = TokenLoader(paths, "train", batch_size=5, context=7, seed=11)
    fresh.load_state_dict(state)
    got = _take(fresh, 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got, strict=True))

    other = TokenLoader(paths, "train", batch_size=5, context=8, seed=11)
    with pytest.raises(DataError, match="context was 7, now 8"):
        other.load_state_dict(state)


def test_too_short_split(tmp_path: Path) -> None:
    paths = _distinct_shards(tmp_path, [10, 12])
    with pytest.raises(DataError, match=r"22 tokens in 2 shard\(s\), the longest 12; one window needs "
                                        r"context\+1 = 17"):
        TokenLoader(paths, "train", 2, 16, seed=0)
    with pytest.raises(DataError, match="no val token shards in"):
        TokenLoader(tmp_path, "val", 2, 4, seed=0)
