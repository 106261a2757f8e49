"""The clean stage's datatrove pipeline steps: read, clean, fingerprint, find copies, drop them, write.

``lmforge/data/curate.py`` runs them with a datatrove executor (local processes or a
Slurm job array) in four stages over a shared folder ``work/``::

    A  tasks    ReadRange -> CleanTask -> Signatures                 cleaned docs, exact keys, MinHash signatures
    B  buckets  MinhashDedupBuckets + ExactBuckets                    candidate pairs per band, exact copies
    C  1 task   PickCopies                                            which document goes (candidates confirmed
                                                                      on the whole signature), the copy it repeats
    D  tasks    ReadKept -> DropCopies                                the final shards, the dedup rejects

Task ``r`` of ``n`` reads the documents ``[N*r//n, N*(r+1)//n)`` of the collected
shards, taken in order, so ``(task, index in task)`` sorts the same way as the
corpus whatever ``n`` is. Every choice of "the first copy" uses that order, which is
why ``tasks=1`` and ``tasks=8`` keep the same documents. Each step writes its files
atomically and datatrove marks a task complete only after its whole pipeline ran, so
a killed run redoes exactly the unfinished tasks. ::

    steps = [ReadRange(shards, counts), CleanTask(cfg.clean, ngrams, out)]   # stage A without near dedup
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.word_tokenizers import WordTokenizer

from lmforge import artifacts
from lmforge.config import CleanConfig
from lmforge.data.clean import Drop, build_steps
from lmforge.data.dedup import exact_key, word_hashes
from lmforge.data.ledger import Ledger, RejectWriter
from lmforge.data.quality import ngram_hashes
from lmforge.data.readers.files import docs_texts
from lmforge.data.shards import ShardWriter, read_shard
from lmforge.data.sources import Document

NO_LIMIT = 1 << 62  # shard size for the final writer: one output file per task
KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("idx", "<u4")])  # a kept document's exact key
COPY_DTYPE = np.dtype([("rank", "<u4"), ("idx", "<u4"), ("krank", "<u4"), ("kidx", "<u4")])  # a copy, and what it repeats
EXACT, NEAR = "exact_duplicate", "near_duplicate"
MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's MinHash modulus


def task_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The corpus positions ``[start, end)`` task ``rank`` of ``world_size`` works on."""
    return total * rank // world_size, total * (rank + 1) // world_size


class Words(WordTokenizer):
    """Lowercase ``\\w+`` words, as lmforge's exact key and decontamination use; no spaCy."""

    _WORD = re.compile(r"\w+")
    _SENTENCE = re.compile(r"[^.!?]+[.!?]*")

    def word_tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._SENTENCE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._SENTENCE.finditer(text) if m.group().strip()]


class Signatures(MinhashDedupSignature):
    """datatrove's MinHash signature step, with shingles hashed in numpy from lmforge's word hashes, and
    each document's whole signature kept for stage C.

    datatrove hashes every shingle's joined string in Python (about 1 s per 5 MB); here each distinct
    word is hashed once and a shingle is a 64-bit mix of its words' hashes (``quality.ngram_hashes``).
    A text shorter than one shingle is one shingle, as in lmforge's in-memory finder. Repeated shingles
    are kept: a signature is a minimum, which a repeat does not change, and removing them costs more
    than hashing them.

    datatrove writes each band to its own file; the buckets stage sees one band at a time. This step also
    writes ``<full>/<task>.u32``: one row per document, in task order, of the low 32 bits of all its
    hashes (zeros for a text without words), from which stage C estimates a candidate pair's Jaccard
    similarity on the whole signature.
    """

    def __init__(self, output_folder: str, full_folder: str, config, language: WordTokenizer) -> None:
        super().__init__(output_folder, config=config, language=language)
        self.full = Path(full_folder)
        self._signed: np.ndarray | None = None  # the last document's signature, as get_signature made it

    def run(self, data, rank: int = 0, world_size: int = 1):
        width = self.config.num_buckets * self.config.hashes_per_bucket
        with artifacts.AtomicFile(self.full / f"{rank:05d}.u32") as f:
            def recorded(docs):
                for doc in docs:
                    self._signed = None
                    yield doc  # datatrove signs it (or finds no shingles) before it asks for the next one
                    row = np.zeros(width, np.uint32) if self._signed is None else self._signed.astype(np.uint32)
                    f.write(row.tobytes())

            super().run(recorded(data), rank, world_size)

    def get_shingles(self, text: str) -> np.ndarray:
        hashes = word_hashes(text)[1]
        if len(hashes) == 0:
            return np.zeros((0, 1), np.uint64)
        shingles = ngram_hashes(hashes, min(self.config.n_grams, len(hashes)))
        if self.config.hash_config.precision == 32:
            shingles = shingles & np.uint64(0xFFFFFFFF)
        return shingles.reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """datatrove's signature, the same values: ``(a * x + b) mod (2^61 - 1)`` with the Mersenne modulus
        taken as a shift and an add, in place, instead of numpy's 64-bit division (twice as slow here)."""
        a, b = self.parameters
        phv = shingles * a
        phv += b
        high = phv >> np.uint64(61)
        phv &= MERSENNE
        phv += high  # <= MERSENNE + 7: one subtraction finishes the reduction, needed about once in 2^58
        if phv.max() >= MERSENNE:  # one pass to check is cheaper than a mask and a product every time
            phv -= MERSENNE * (phv >= MERSENNE)
        if self.config.hash_config.precision == 32:
            phv &= np.uint64(self.config.hash_config.max)
        lowest = phv.min(axis=0).astype(self.config.hash_config.np_dtype)
        self._signed = lowest  # its low 32 bits go to the full-signature row (astype truncates)
        return lowest.reshape(self.config.num_buckets, -1).tolist()  # np.split into equal buckets, as lists


def count_lines(path: Path) -> int:
    """Documents in a JSONL file (one per line), counted without parsing them."""
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


class PackTask(PipelineStep):
    """The pack stage's task: encode this task's range of a docs-stage file, each document followed by EOT,
    into ``<work>/<task>.bin`` (flat tokens), ``<task>.len.npy`` (document lengths) and ``<task>.json``
    (counts); ``pack.merge_ranges`` turns the tasks' files into shards."""

    name = "encode"

    def __init__(self, docs: str, total: int, tokenizer_dir: str, work: str, dtype: str, batch: int) -> None:
        super().__init__()
        self.docs, self.total, self.tokenizer_dir, self.work = docs, total, tokenizer_dir, Path(work)
        self.dtype, self.batch = np.dtype(dtype), batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        from lmforge.data.encode import batch_encoder, flatten
        from lmforge.data.tokenizer import Tokenizer

        tok = Tokenizer.load(Path(self.tokenizer_dir))
        encode, encoder = batch_encoder(tok)
        lengths: list[np.ndarray] = []
        n_bytes, batch = 0, []
        with artifacts.AtomicFile(self.work / f"{rank:05d}.bin") as f:
            # Streamed; the None at the end flushes the last batch.
            for text in itertools.chain(docs_texts(Path(self.docs), *task_range(self.total, rank, world_size)), [None]):
                if text is not None:
                    batch.append(text)
                    n_bytes += len(text.encode("utf-8"))
                if batch and (text is None or len(batch) == self.batch):
                    tokens, sizes = flatten(encode(batch), tok.eot_id, self.dtype)
                    f.write(tokens.tobytes())
                    lengths.append(sizes)
                    batch = []
        every = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        with artifacts.AtomicFile(self.work / f"{rank:05d}.len.npy") as f:
            np.save(f, every)
        counts = {"tokens": int(every.sum()), "docs": len(every), "bytes": n_bytes, "encoder": encoder}
        artifacts.write_json(self.work / f"{rank:05d}.json", counts, indent=None)
        return
        yield


class ReadRange(PipelineStep):
    """Stage A's reader: this task's contiguous share of the collected shards."""

    name = "read collected shards"

    def __init__(self, shards: list[str], counts: list[int]) -> None:
        super().__init__()
        self.shards, self.counts = shards, counts

    def run(self, data, rank: int = 0, world_size: int = 1):
        start, end = task_range(sum(self.counts), rank, world_size)
        first = 0
        for shard, count in zip(self.shards, self.counts, strict=True):
            if first + count > start and first < end:
                for i, doc in enumerate(read_shard(Path(shard)), start=first):
                    if i >= end:
                        break
                    if i >= start:
                        yield doc
            first += count


class CleanTask(PipelineStep):
    """Cleaning steps, decontamination and exact keys for one task; yields the documents kept.

    Writes ``work/a/<task>.jsonl`` (kept, in order), ``work/ids/<task>.json`` (their ids),
    ``work/keys/<bucket>/<task>.npy`` (exact keys by bucket), ``work/ledger/a/<task>.json`` and
    ``rejects/<task>.jsonl``.
    """

    name = "clean"

    def __init__(self, cfg: CleanConfig, ngrams: np.ndarray, out: str, buckets: int) -> None:
        super().__init__()
        self.cfg, self.ngrams, self.out, self.buckets = cfg, ngrams, Path(out), buckets

    def run(self, data, rank: int = 0, world_size: int = 1):
        steps = build_steps(self.cfg) if self.cfg.enabled else []
        ledger = Ledger()
        rejects = RejectWriter(self.out / "rejects" / f"{rank:05d}.jsonl" if self.cfg.rejects else None,
                               self.cfg.rejects_max_chars)
        kept = artifacts.AtomicFile(self.out / "work" / "a" / f"{rank:05d}.jsonl", "wb")
        keys = bytearray()  # the kept documents' 16-byte exact keys, end to end: 16 bytes a document
        ids: list[str] = []  # of the documents kept, in order: stage C names the copy a duplicate repeats
        for doc in data:
            doc, size = _clean_one(doc, steps, ledger, rejects)
            if doc is None:
                continue
            words, hashes = word_hashes(doc.text) if self.cfg.dedup.exact or len(self.ngrams) else ([], None)
            if len(self.ngrams):
                shared = _shared_ngrams(hashes, self.ngrams, self.cfg.dedup.ngram)
                if shared:
                    detail = f"{shared} {self.cfg.dedup.ngram}-grams shared with the evaluation sets"
                    ledger.drop(doc, "decontaminate", "contaminated", detail, size)
                    rejects.write(doc, "decontaminate", "contaminated", detail)
                    continue
                ledger.passed("decontaminate", doc, doc)
            ledger.keep(doc, size)
            if self.cfg.dedup.exact:
                key = exact_key(words)
                keys += key
            kept.write((doc.to_json() + "\n").encode("utf-8", errors="surrogatepass"))
            ids.append(doc.id)
            yield doc
        kept.commit()
        artifacts.write_json(self.out / "work" / "ids" / f"{rank:05d}.json", ids, indent=None)
        rejects.close()
        if self.cfg.dedup.exact:
            _write_keys(_key_table(keys), self.out / "work" / "keys", rank, self.buckets)
        artifacts.write_json(self.out / "work" / "ledger" / "a" / f"{rank:05d}.json", ledger.to_dict(), indent=None)


def _clean_one(doc: Document, steps: list, ledger: Ledger, rejects: RejectWriter) -> tuple[Document | None, int]:
    """Run the cleaning steps on one document: ``(cleaned, bytes in)`` or ``(None, bytes in)`` when dropped."""
    size = ledger.take(doc)
    for name, step in steps:
        t0 = time.process_time()  # CPU time: the step's own cost, whatever else the machine runs
        result = step(doc)
        ledger.timed(name, time.process_time() - t0)
        if isinstance(result, Drop):
            ledger.drop(doc, name, result.reason, result.detail, size)
            rejects.write(doc, name, result.reason, result.detail)
            return None, size
        ledger.passed(name, doc, result)
        doc = result
    return doc, size


def _shared_ngrams(hashes: np.ndarray, ngrams: np.ndarray, n: int) -> int:
    from lmforge.data.dedup import Fingerprint, contaminated

    return contaminated(Fingerprint(b"", None, hashes), ngrams, n)


def _key_table(keys: bytearray) -> np.ndarray:
    """The keys as rows of (first 8 bytes, last 8 bytes, as little-endian integers; index among the kept)."""
    halves = np.frombuffer(bytes(keys), dtype=np.dtype([("hi", "<u8"), ("lo", "<u8")]))
    table = np.zeros(len(halves), KEY_DTYPE)
    table["hi"], table["lo"], table["idx"] = halves["hi"], halves["lo"], np.arange(len(halves))
    return table


def _write_keys(keys: np.ndarray, folder: Path, rank: int, buckets: int) -> None:
    """One file per hash bucket, so stage B's task for a bucket reads only its share of all keys."""
    which = keys["hi"] % np.uint64(buckets)
    for b in range(buckets):
        with artifacts.AtomicFile(folder / f"{b:03d}" / f"{rank:05d}.npy") as f:
            np.save(f, keys[which == b])


class ExactBuckets(PipelineStep):
    """Stage B, one task per key bucket: every later copy of a key, with the first (in corpus order)."""

    name = "exact copies"

    def __init__(self, work: str, tasks: int) -> None:
        super().__init__()
        self.work, self.tasks = Path(work), tasks

    def run(self, data, rank: int = 0, world_size: int = 1):
        parts = []
        for task in range(self.tasks):
            keys = np.load(self.work / "keys" / f"{rank:03d}" / f"{task:05d}.npy")
            parts.append((keys, np.full(len(keys), task, np.uint32)))
        keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, KEY_DTYPE)
        ranks = np.concatenate([r for _, r in parts]) if parts else np.zeros(0, np.uint32)
        order = np.lexsort((keys["idx"], ranks, keys["lo"], keys["hi"]))  # by key, then corpus position
        keys, ranks = keys[order], ranks[order]
        same = (keys["hi"][1:] == keys["hi"][:-1]) & (keys["lo"][1:] == keys["lo"][:-1])
        first = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(keys)), 0))
        copy = np.flatnonzero(np.concatenate([[False], same]))
        out = np.zeros(len(copy), COPY_DTYPE)
        out["rank"], out["idx"] = ranks[copy], keys["idx"][copy]
        out["krank"], out["kidx"] = ranks[first[copy]], keys["idx"][first[copy]]
        with artifacts.AtomicFile(self.work / "exact" / f"{rank:03d}.npy") as f:
            np.save(f, out)
        return
        yield  # a generator like every step, with nothing to pass on


class PickCopies(PipelineStep):
    """Stage C, one task: decide which documents go, in corpus order, as the old single-process finder did.

    Exact copies go first. For near copies, the documents sharing a MinHash band with a document are
    its candidates (within one band, equal band hashes are one group: datatrove writes them as a chain
    of pairs); it goes when the whole signatures of it and of a candidate kept earlier agree in at least
    ``threshold`` of their hashes (the estimated Jaccard similarity). One shared band alone, at 25 bands
    of 5 rows, also catches many pairs near 0.3. Writes ``work/remove/<task>.json``: ``[[index, reason,
    id of the copy kept], ...]``.
    """

    name = "pick copies"

    def __init__(self, work: str, tasks: int, threshold: float, width: int) -> None:
        """``threshold``: the share of hashes that must agree; ``width``: hashes in a whole signature."""
        super().__init__()
        self.work, self.tasks, self.threshold, self.width = Path(work), tasks, threshold, width

    def run(self, data, rank: int = 0, world_size: int = 1):
        removed: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}
        for path in sorted((self.work / "exact").glob("*.npy")):
            for row in np.load(path):
                removed[(int(row["rank"]), int(row["idx"]))] = (EXACT, (int(row["krank"]), int(row["kidx"])))
        groups_of = _band_groups(self.work / "minhash" / "buckets")
        with _FullSignatures(self.work / "minhash" / "full", self.width) as signature:
            _pick_near(groups_of, removed, signature, self.threshold)
        ids = _ids_of({kept for _, kept in removed.values()}, self.work / "ids")
        per_task: dict[int, list] = {t: [] for t in range(self.tasks)}
        for (task, idx), (reason, kept) in sorted(removed.items()):
            per_task[task].append([idx, reason, ids[kept]])
        for task, rows in per_task.items():
            artifacts.write_json(self.work / "remove" / f"{task:05d}.json", rows, indent=None)
        return
        yield


def _band_groups(folder: Path) -> dict[tuple[int, int], list[int]]:
    """For each document in a candidate pair, the groups it belongs to: documents with equal hashes
    in one band, read from datatrove's ``.dups`` pair files."""
    import struct

    groups_of: dict[tuple[int, int], list[int]] = {}
    count = 0
    for path in sorted(folder.glob("*.dups")) if folder.is_dir() else []:
        group_in_band: dict[tuple[int, int], int] = {}
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", path.read_bytes()):
            a, b = (f1, d1), (f2, d2)
            g = group_in_band.get(a)
            if g is None:  # a chain (a, b), (b, c) ... within one band is one group; it starts here
                g = group_in_band[a] = count
                count += 1
                groups_of.setdefault(a, []).append(g)
            group_in_band[b] = g
            groups_of.setdefault(b, []).append(g)
    return groups_of


def _pick_near(groups_of: dict, removed: dict, signature: _FullSignatures, threshold: float) -> None:
    """Add to ``removed`` each document, in corpus order, whose whole signature agrees in at least
    ``threshold`` of its hashes with an earlier kept document of one of its band groups."""
    members: dict[int, list[tuple[int, int]]] = {}  # group -> the documents of it kept so far
    for node in sorted(groups_of):
        if node in removed:  # an exact copy: gone already, and its twin carries the same bands
            continue
        candidates = sorted({m for g in groups_of[node] for m in members.get(g, ())})
        if candidates:
            agree = (np.stack([signature(c) for c in candidates]) == signature(node)).mean(axis=1)
            similar = np.flatnonzero(agree >= threshold)
            if len(similar):
                removed[node] = (NEAR, candidates[similar[0]])  # the earliest such document
                continue
        for g in groups_of[node]:
            members.setdefault(g, []).append(node)


class _FullSignatures:
    """A document's whole signature, ``(task, index) -> row``, read from the tasks' ``.u32`` files.

    Each row is read on its own (``os.pread``): a memory map would count every page a candidate touches
    in the process's resident memory, which then grows with the corpus.
    """

    def __init__(self, folder: Path, width: int) -> None:
        self.folder, self.row_bytes = folder, width * 4
        self.files: dict[int, int] = {}  # task -> open file descriptor

    def __call__(self, node: tuple[int, int]) -> np.ndarray:
        task, index = node
        if task not in self.files:
            self.files[task] = os.open(self.folder / f"{task:05d}.u32", os.O_RDONLY)
        row = os.pread(self.files[task], self.row_bytes, index * self.row_bytes)
        if len(row) != self.row_bytes:
            raise ValueError(f"{self.folder / f'{task:05d}.u32'}: no signature for document {index}")
        return np.frombuffer(row, dtype=np.uint32)

    def __enter__(self) -> _FullSignatures:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _ids_of(wanted: set[tuple[int, int]], folder: Path) -> dict[tuple[int, int], str]:
    """The document ids at ``(task, index)`` positions, from stage A's id lists (one task's list at a time)."""
    by_task: dict[int, list[int]] = {}
    for task, index in wanted:
        by_task.setdefault(task, []).append(index)
    ids: dict[tuple[int, int], str] = {}
    for task, indices in sorted(by_task.items()):
        listed = json.loads((folder / f"{task:05d}.json").read_text(encoding="utf-8"))
        ids.update({(task, i): listed[i] for i in indices})
    return ids


class ReadKept(PipelineStep):
    """Stage D's reader: the documents stage A kept for this task, in the same order."""

    name = "read kept"

    def __init__(self, work: str) -> None:
        super().__init__()
        self.work = Path(work)

    def run(self, data, rank: int = 0, world_size: int = 1):
        yield from read_shard(self.work / "a" / f"{rank:05d}.jsonl")


class DropCopies(PipelineStep):
    """Stage D: drop the copies stage C named, write ``docs/<task>.jsonl`` and the dedup rejects and ledger."""

    name = "drop copies"

    def __init__(self, cfg: CleanConfig, out: str, dedup: bool) -> None:
        super().__init__()
        self.cfg, self.out, self.dedup = cfg, Path(out), dedup

    def run(self, data, rank: int = 0, world_size: int = 1):
        work = self.out / "work"
        path = work / "remove" / f"{rank:05d}.json"
        copies = {idx: (reason, kept) for idx, reason, kept in json.loads(path.read_text())} if self.dedup else {}
        ledger = Ledger()
        rejects = RejectWriter(self.out / "rejects" / f"{rank:05d}.dedup.jsonl" if self.cfg.rejects else None,
                               self.cfg.rejects_max_chars)
        writer = ShardWriter(self.out / "docs", NO_LIMIT, first=rank, lossless=False)
        for i, doc in enumerate(data):
            if i in copies:
                reason, kept = copies[i]
                size = ledger.unkeep(doc)
                ledger.drop(doc, "dedup", reason, f"copy of {kept}", size)
                rejects.write(doc, "dedup", reason, f"copy of {kept}")
                continue
            if self.dedup:
                ledger.passed("dedup", doc, doc)
            writer.write(doc)
            yield doc
        writer.close()
        rejects.close()
        artifacts.write_json(work / "ledger" / "d" / f"{rank:05d}.json", ledger.to_dict(), indent=None)
