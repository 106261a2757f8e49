"""Token shards: documents -> token ids -> flat binary files with a header (the "pack" stage).

File format (a contract; readers check it):

``<split>_<NNN>.bin`` = a 64-byte little-endian header, then the token array.

======  =====  ===========================================================
offset  bytes  field
======  =====  ===========================================================
0       8      magic ``b"LMFTOKS\\x00"``
8       4      format version, uint32 = 1
12      4      dtype code, uint32: 1 = uint16 (vocab_size <= 65536), 2 = uint32
16      8      token count, uint64
24      8      document count, uint64
32      4      vocab_size, uint32
36      28     zeros
======  =====  ===========================================================

``<split>_<NNN>.idx.npy`` = int64 document start offsets, ``n_docs + 1`` entries, the
last one equal to the token count. Every document is followed by the EOT id, so
EOT also marks every boundary inside the token stream.

Usage::

    stats = main(cfg, Path("runs/demo/docs"), Path("runs/demo/tokenizer"), Path("runs/demo/pack"))
    tokens = read_shard(list_shards(Path("runs/demo/pack"), "train")[0])   # np.memmap
    # embedded corpus, bpe 2048: train ~1.7 M tokens in 1 shard, ~2.7 bytes per token
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.artifacts import AtomicFile
from lmforge.config import RunConfig
from lmforge.data.encode import batch_encoder, flatten
from lmforge.data.readers.files import docs_texts
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import Tokenizer

MAGIC = b"LMFTOKS\x00"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, dtype code, tokens, docs, vocab_size (36 bytes)
DTYPES: dict[int, type[np.unsignedinteger]] = {1: np.uint16, 2: np.uint32}
ENCODE_BATCH = 256  # documents per encode_batch call


def dtype_code(vocab_size: int) -> int:
    return 1 if vocab_size <= 65536 else 2


def pack_header(tokens: int, docs: int, vocab_size: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, dtype_code(vocab_size), tokens, docs, vocab_size)
    return head + bytes(HEADER_BYTES - len(head))


def index_path(shard: Path) -> Path:
    """``train_000.bin`` -> ``train_000.idx.npy``."""
    return shard.with_name(shard.name.removesuffix(".bin") + ".idx.npy")


def shard_info(path: Path | str) -> dict:
    """The header fields of a shard, checked against the file's size."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"token shard not found: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{p} is not an lmforge token shard (bad magic); are you passing the right file?")
    if len(head) < HEADER_BYTES:
        raise DataError(f"{p}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
    _, version, code, tokens, docs, vocab_size = _HEADER.unpack(head[: _HEADER.size])
    if version != VERSION:
        raise DataError(f"{p}: token shard format version {version} is not supported "
                        f"(this lmforge reads version {VERSION}); re-run the pack stage")
    if code not in DTYPES:
        raise DataError(f"{p}: unknown dtype code {code} in the header (expected 1 or 2)")
    dtype = np.dtype(DTYPES[code])
    expected = HEADER_BYTES + tokens * dtype.itemsize
    if size != expected:
        raise DataError(f"{p}: the header says {tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                        "it is truncated or damaged, re-run the pack stage")
    return {"path": str(p), "version": version, "dtype": dtype.name, "tokens": tokens, "docs": docs,
            "vocab_size": vocab_size}


def read_shard(path: Path | str) -> np.ndarray:
    """The tokens of a shard as a read-only ``np.memmap`` (a plain empty array for an empty shard)."""
    info = shard_info(path)
    if info["tokens"] == 0:
        return np.zeros(0, dtype=info["dtype"])  # mmap cannot map zero bytes
    return np.memmap(path, dtype=info["dtype"], mode="r", offset=HEADER_BYTES, shape=(info["tokens"],))


def read_index(shard: Path | str) -> np.ndarray:
    """Document start offsets of a shard (``n_docs + 1`` int64, last = token count)."""
    shard = Path(shard)
    info = shard_info(shard)
    idx_file = index_path(shard)
    if not idx_file.is_file():
        raise DataError(f"{idx_file} not found (the document index of {shard}); re-run the pack stage")
    try:
        idx = np.load(idx_file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{idx_file}: not a valid .npy index ({e})") from None
    if idx.ndim != 1 or len(idx) != info["docs"] + 1 or (len(idx) and idx[-1] != info["tokens"]):
        raise DataError(f"{idx_file} does not match {shard} ({info['docs']} documents, {info['tokens']} tokens)")
    return idx


def list_shards(directory: Path | str, split: str) -> list[Path]:
    """The shards of ``split`` in ``directory``, in shard order."""
    directory = Path(directory)
    pattern = re.compile(rf"^{re.escape(split)}_(\d{{3,}})\.bin$")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{split}_*.bin") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


class ShardWriter:
    """Appends documents' tokens to ``<split>_<NNN>.bin`` files, opening a new one past ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir, self.split, self.vocab_size, self.shard_tokens = out_dir, split, vocab_size, shard_tokens
        self.dtype = np.dtype(DTYPES[dtype_code(vocab_size)])
        self.paths: list[Path] = []
        self._file: AtomicFile | None = None
        self._tokens = 0
        self._offsets = array("q", [0])

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Write one document's ids (the caller appends EOT)."""
        self.add_many(np.asarray(ids, dtype=self.dtype), np.array([len(ids)], dtype=np.int64))

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Write consecutive documents at once: ``tokens`` flat, ``lengths`` one per document (EOT included).

        The shards are the ones :meth:`add` called per document writes: a shard closes after the
        first document that brings it to ``shard_tokens``.
        """
        tokens = np.asarray(tokens, dtype=self.dtype)
        ends = np.cumsum(lengths, dtype=np.int64)
        done = 0  # documents written so far
        while done < len(ends):
            if self._file is None:
                self._open()
            assert self._file is not None
            base = int(ends[done - 1]) if done else 0
            # The first document after which this shard holds shard_tokens or more closes it.
            last = int(np.searchsorted(ends, base + self.shard_tokens - self._tokens, side="left"))
            last = min(last, len(ends) - 1)
            self._file.write(tokens[base : ends[last]].tobytes())
            self._offsets.extend((ends[done : last + 1] - base + self._tokens).tolist())
            self._tokens += int(ends[last]) - base
            done = last + 1
            if self._tokens >= self.shard_tokens:
                self._close_shard()  # only ever at a document boundary

    def _open(self) -> None:
        path = self.out_dir / f"{self.split}_{len(self.paths):03d}.bin"
        self._file = AtomicFile(path, "wb")
        self._file.write(pack_header(0, 0, self.vocab_size))  # rewritten with the counts at close
        self._tokens = 0
        self._offsets = array("q", [0])
        self.paths.append(path)

    def _close_shard(self) -> None:
        assert self._file is not None
        path = self.paths[-1]
        self._file.file.seek(0)
        self._file.write(pack_header(self._tokens, len(self._offsets) - 1, self.vocab_size))
        with AtomicFile(index_path(path)) as f:  # the index first: a shard on disk always has its index
            np.save(f, np.frombuffer(self._offsets, dtype=np.int64))
        self._file.commit()
        self._file = None

    def close(self) -> list[Path]:
        if self._file is not None:
            self._close_shard()
        return self.paths

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
            self._file = None


def _remove_shards(out_dir: Path, split: str) -> None:
    """Old shards of ``split`` would be read with the new ones; remove them first."""
    for p in list_shards(out_dir, split):
        p.unlink()
        index_path(p).unlink(missing_ok=True)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in docs:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shards(docs: Iterable[str], tok: Tokenizer, out_dir: Path, split: str,
                 shard_tokens: int = 100_000_000, fast: bool = True) -> dict:
    """Encode ``docs`` (streamed) into shards of ``split``; return {tokens, docs, shards, bytes, encoder}.

    ``fast=False`` encodes with ``tokenizers`` even where tiktoken gives the same ids (for comparisons).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_shards(out_dir, split)
    writer = ShardWriter(out_dir, split, tok.vocab_size, shard_tokens)
    encode, encoder = batch_encoder(tok, fast)
    n_tokens = n_docs = n_bytes = 0
    try:
        for batch in _batches(docs, ENCODE_BATCH):
            tokens, lengths = flatten(encode(batch), tok.eot_id, writer.dtype)
            writer.add_many(tokens, lengths)
            n_tokens += len(tokens)
            n_docs += len(batch)
            n_bytes += sum(map(len, map(str.encode, batch)))
        paths = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"tokens": n_tokens, "docs": n_docs, "shards": len(paths), "bytes": n_bytes, "encoder": encoder}


def main(cfg: RunConfig, docs_dir: Path, tokenizer_dir: Path, out_dir: Path,
         shard_tokens: int = 100_000_000) -> dict:
    """The pack stage: ``docs_dir/{train,val}.jsonl`` -> ``out_dir/{train,val}_NNN.bin``."""
    docs_dir, out_dir = Path(docs_dir), Path(out_dir)
    tok = Tokenizer.load(tokenizer_dir)
    show = sys.stderr.isatty()
    result: dict = {}
    for split in ("train", "val"):
        if cfg.data.tasks > 1:
            result[split] = _pack_in_tasks(cfg, docs_dir / f"{split}.jsonl", tok, tokenizer_dir, out_dir, split,
                                           shard_tokens)
            continue
        texts = tqdm(docs_texts(docs_dir / f"{split}.jsonl"), desc=f"pack {split}", unit="doc", disable=not show)
        result[split] = write_shards(texts, tok, out_dir, split, shard_tokens)
    need = cfg.model.context + 1
    if result["train"]["tokens"] < need:
        raise DataError(f"training text has {result['train']['tokens']} tokens, fewer than one sequence of "
                        f"model.context+1 = {need}; add text or lower model.context")
    if result["val"]["tokens"] < 2:
        raise DataError(f"validation text has {result['val']['tokens']} tokens, fewer than 2 "
                        f"(one input and one target); add validation text in {docs_dir / 'val.jsonl'}")
    # EOT separators are not text: leave them out so the figure matches the tokenizer stage's.
    text_tokens = sum(result[s]["tokens"] - result[s]["docs"] for s in ("train", "val"))
    text_bytes = sum(result[s]["bytes"] for s in ("train", "val"))
    result["bytes_per_token"] = text_bytes / text_tokens if text_tokens else None
    result["vocab_size"] = tok.vocab_size
    result["dtype"] = np.dtype(DTYPES[dtype_code(tok.vocab_size)]).name
    return result


def merge_ranges(parts: list[Path], vocab_size: int, out_dir: Path, split: str, shard_tokens: int) -> list[Path]:
    """The pack tasks' token files (``tasks.PackTask``: tokens, then ``.len.npy`` with each document's length),
    in task order, written as the shards one writer would have made."""
    _remove_shards(out_dir, split)
    writer = ShardWriter(out_dir, split, vocab_size, shard_tokens)
    try:
        for part in parts:
            writer.add_many(np.fromfile(part, dtype=writer.dtype), np.load(part.with_suffix(".len.npy")))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _pack_in_tasks(cfg: RunConfig, docs: Path, tok: Tokenizer, tokenizer_dir: Path, out_dir: Path, split: str,
                   shard_tokens: int) -> dict:
    """One split encoded by ``data.tasks`` datatrove tasks (contiguous ranges of documents), then merged into
    the same shards a single process writes, so the task count never changes what training reads."""
    import json
    import shutil

    from lmforge.data.executor import run_tasks
    from lmforge.data.tasks import PackTask, count_lines

    if not docs.is_file():
        raise DataError(f"{docs} not found; run the docs stage first (lmforge docs)")
    work = out_dir / "work" / split
    shutil.rmtree(work, ignore_errors=True)  # the pack stage always starts over
    dtype = np.dtype(DTYPES[dtype_code(tok.vocab_size)]).name
    step = PackTask(str(docs), count_lines(docs), str(tokenizer_dir), str(work), dtype, ENCODE_BATCH)
    run_tasks(cfg.data, "encode", [step], cfg.data.tasks, work / "logs", label="pack")
    parts = [work / f"{task:05d}.bin" for task in range(cfg.data.tasks)]
    paths = merge_ranges(parts, tok.vocab_size, out_dir, split, shard_tokens)
    total = {"tokens": 0, "docs": 0, "bytes": 0}
    encoders = set()
    for part in parts:
        counts = json.loads(part.with_suffix(".json").read_text(encoding="utf-8"))
        total = {k: total[k] + counts[k] for k in total}
        encoders.add(counts["encoder"])
    shutil.rmtree(work)
    if not any((out_dir / "work").iterdir()):
        (out_dir / "work").rmdir()
    return {**total, "shards": len(paths), "encoder": "+".join(sorted(encoders))}
