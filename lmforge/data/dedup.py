"""Deduplication and decontamination: exact hashes, MinHash LSH (datasketch), eval n-gram overlap.

Every document is reduced once to a :class:`Fingerprint`: its lowercase word tokens
hashed to 64 bits (blake2b, the same in every process), from which come

- the **exact key**: a 16-byte blake2b of the normalised text (lowercase words joined by
  single spaces), so copies that differ only in case, punctuation or spacing collide;
- the **MinHash signature** over ``shingle_words``-word shingles (datasketch's
  ``affine32`` scheme, ``num_perm`` permutations);
- the **n-grams** checked against the evaluation sets (``ngram`` words, 13 by default,
  as in the GPT-3 paper's contamination study).

The clean stage (:mod:`lmforge.data.tasks`) takes the word hashes, exact keys and the
n-gram check from here and finds near-copies with datatrove's multi-stage MinHash
(signatures per task, buckets, clusters): a document sharing an LSH band with an
earlier one whose whole signature agrees with its own in at least ``threshold`` of the
hashes is a ``near_duplicate``. :class:`DuplicateFinder` is the in-memory finder it
replaced, with the same rule; ``benchmarks/dedup_curve.py`` measures against it as the
reference. ::

    finder = DuplicateFinder(cfg.clean.dedup)
    fp = fingerprint("Some text ...", cfg.clean.dedup)
    finder.check("doc-1", fp.key, fp.signature)   # None: first of its kind
    contaminated(fp, eval_ngrams(["eval.jsonl"], 13))   # shared n-grams with the eval set

Memory: the finder holds about 1 KB per kept document (signature and LSH buckets);
everything else streams.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmforge.config import DedupConfig
from lmforge.data.quality import ngram_hashes
from lmforge.data.readers.files import read_documents
from lmforge.data.sources import FileOptions, ReadStats

SEED = 1  # MinHash permutation seed: signatures from different runs stay comparable
SCHEME = "affine32"
BATCH = 4096  # shingles per MinHash update: bounds the (batch x num_perm) work array
_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class _HashTable(dict):
    """Words hashed so far in this process: a lookup of a new word hashes it and remembers it."""

    def __missing__(self, word: str) -> int:
        value = self[word] = _word_hash(word)
        return value


# Most words of a corpus are common ones, so most lookups hit, and the lookups run in C (map over
# __getitem__; only a new word calls back into Python). The table is emptied once it holds more than
# HASHED_WORDS entries (about 25 MB), so memory stays bounded.
_HASHED = _HashTable()
HASHED_WORDS = 200_000


@lru_cache(maxsize=2)  # the clean stage asks twice per document: exact key, then MinHash shingles
def word_hashes(text: str) -> tuple[list[str], np.ndarray]:
    """Lowercase word tokens and their stable 64-bit hashes (each distinct word hashed once); do not modify them."""
    words = _WORD.findall(text.lower())
    if len(_HASHED) > HASHED_WORDS:
        _HASHED.clear()
    return words, np.fromiter(map(_HASHED.__getitem__, words), dtype=np.uint64, count=len(words))


@dataclass
class Fingerprint:
    key: bytes  # exact-duplicate key
    signature: np.ndarray | None  # (num_perm,) uint32 MinHash values; None when near dedup is off
    hashes: np.ndarray  # word hashes, for decontamination


def exact_key(words: list[str]) -> bytes:
    """16-byte key of a text's lowercase words: copies differing only in case, punctuation or spacing collide."""
    return hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).digest()


def fingerprint(text: str, cfg: DedupConfig) -> Fingerprint:
    words, hashes = word_hashes(text)
    key = exact_key(words)
    signature = minhash(hashes, cfg.shingle_words, cfg.num_perm) if cfg.near else None
    return Fingerprint(key, signature, hashes)


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> np.ndarray:
    """datasketch's permutation parameters for (SEED, num_perm), made once instead of per document."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations


def minhash(hashes: np.ndarray, shingle_words: int, num_perm: int) -> np.ndarray:
    """MinHash signature of the word shingles; a text shorter than one shingle is one shingle."""
    from datasketch import MinHash

    shingles = ngram_hashes(hashes, min(shingle_words, max(len(hashes), 1))) if len(hashes) else np.zeros(1, np.uint64)
    shingles = np.unique(shingles & _MASK32)  # affine32 takes 32-bit inputs; repeats add nothing
    m = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int, scheme=SCHEME, permutations=_permutations(num_perm))
    for start in range(0, len(shingles), BATCH):
        m.update_batch(shingles[start: start + BATCH])
    return m.hashvalues.astype(np.uint32, copy=True)


class DuplicateFinder:
    """Remembers the documents kept so far; says whether a new one is an exact or near copy of one."""

    def __init__(self, cfg: DedupConfig) -> None:
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.keys: dict[bytes, str] = {}
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []

    def check(self, doc_id: str, key: bytes, signature: np.ndarray | None) -> tuple[str, str] | None:
        """``(reason, id of the earlier copy)`` for a duplicate, else None (and the document is remembered)."""
        from datasketch import LeanMinHash

        if self.cfg.exact:
            first = self.keys.get(key)
            if first is not None:
                return "exact_duplicate", first
        lean = None
        if self.lsh is not None and signature is not None:
            lean = LeanMinHash(seed=SEED, hashvalues=signature, scheme=SCHEME)
            for index in self.lsh.query(lean):
                # LSH buckets give candidates; the full signatures decide.
                if float(np.mean(self.signatures[index] == signature)) >= self.cfg.threshold:
                    return "near_duplicate", self.ids[index]
        if self.cfg.exact:
            self.keys[key] = doc_id
        if lean is not None:
            self.lsh.insert(len(self.signatures), lean, check_duplication=False)
            self.signatures.append(signature)
            self.ids.append(doc_id)
        return None


def eval_ngrams(paths: list[str], n: int) -> np.ndarray:
    """Sorted unique hashes of every ``n``-word n-gram in the evaluation files (any readable format)."""
    if not paths:
        return np.zeros(0, dtype=np.uint64)
    parts = [ngram_hashes(word_hashes(doc.text)[1], n)
             for doc in read_documents(paths, ReadStats(), FileOptions(strict=True))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def contaminated(fp: Fingerprint, ngrams: np.ndarray, n: int) -> int:
    """How many of the document's n-grams also occur in the evaluation n-grams."""
    if len(ngrams) == 0:
        return 0
    h = ngram_hashes(fp.hashes, n)
    if len(h) == 0:
        return 0
    pos = np.searchsorted(ngrams, h).clip(max=len(ngrams) - 1)
    return int(np.count_nonzero(ngrams[pos] == h))
