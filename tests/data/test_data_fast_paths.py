"""The clean stage's fast paths give the values of the plain ones: repetition rule, word hashes, MinHash,
whitespace and the PII step's number test.

Each fast path is checked against a plain reference written here (the code it replaced), on
texts made to hit every branch, and the clean stage as a whole keeps the same documents, ids
and bytes, with the references patched in.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from lmforge.config import RunConfig
from lmforge.data import clean, curate, dedup, quality, tasks
from lmforge.data.shards import read_shard, shard_paths
from lmforge.data.sources import Document, embedded_corpus
from lmforge.pipeline import run


def plain_repetition(text: str) -> tuple[str, str] | None:
    """Gopher's repetition rule computed plainly: every n-gram a tuple of words, counted with Counter."""
    frac, chars = quality.duplicate_fractions(quality._nonblank_lines(text))
    if frac > quality.DUP_LINE_FRAC:
        return ("duplicate_lines", f"{frac:.0%} of lines repeat")
    if chars > quality.DUP_LINE_CHARS:
        return ("duplicate_line_chars", f"{chars:.0%} of characters in repeated lines")
    frac, chars = quality.duplicate_fractions([p.strip() for p in quality._PARAGRAPHS.split(text) if p.strip()])
    if frac > quality.DUP_PARA_FRAC:
        return ("duplicate_paragraphs", f"{frac:.0%} of paragraphs repeat")
    if chars > quality.DUP_PARA_CHARS:
        return ("duplicate_paragraph_chars", f"{chars:.0%} of characters in repeated paragraphs")
    words = text.split()
    if len(words) < 2:
        return None
    lengths = [len(w) for w in words]
    total = sum(lengths)
    for n, limit in quality.TOP_NGRAM_CHARS:  # the n-grams themselves, as tuples of words: no hashing
        grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            break
        gram, count = Counter(grams).most_common(1)[0]  # ties: the first to occur
        if count > 1:
            share = sum(map(len, gram)) * count / total
            if share > limit:
                return ("top_ngram", f"one {n}-gram covers {share:.0%} of characters")
    for n, limit in quality.DUP_NGRAM_CHARS:
        grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            break
        covered = [False] * len(words)
        seen: set[tuple[str, ...]] = set()
        for start, gram in enumerate(grams):
            if gram in seen:
                covered[start: start + n] = [True] * n
            seen.add(gram)
        share = sum(length for length, c in zip(lengths, covered, strict=True) if c) / total
        if share > limit:
            return ("duplicate_ngrams", f"repeated {n}-grams cover {share:.0%} of characters")
    return None


def odd_texts(seed: int, count: int) -> list[str]:
    """Short texts drawn from the characters the whitespace and PII rules look at, ASCII and not."""
    rng = random.Random(seed)
    alphabet = " \t\n\r\x0b\x0c\x85\u2028\u2029\u00a0\u3000\u200b\ufeffaF.:-19"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(count)]


def test_whitespace_rules_run_only_where_they_can_match() -> None:
    def plain(doc: Document) -> Document | clean.Drop:
        text = clean._LINE_BREAKS.sub("\n", doc.text)
        text = clean._INVISIBLE.sub("", clean._SPACES.sub(" ", text))
        return clean._with_text(doc, clean._BLANK_RUNS.sub("\n\n", clean._TRAILING.sub("", text)).strip("\n"))

    texts = odd_texts(0, 20000) + [p for d in embedded_corpus() for p in d.text[:20000].split("\n\n")][:300]
    docs = [Document(id=str(i), text=t, source="t") for i, t in enumerate(texts)]
    fast = [clean.normalize_whitespace(d) for d in docs]
    assert fast == [plain(d) for d in docs]
    changed = [d for d, r in zip(docs, fast, strict=True) if isinstance(r, Document) and r.text != d.text]
    assert sum(isinstance(r, clean.Drop) for r in fast) > 100 and len(changed) > 1000  # both branches reached


def test_pii_number_test_is_the_single_pattern() -> None:
    import re

    single = re.compile(r"\d[\d .\-]|::|[0-9A-Fa-f]:[0-9A-Fa-f]")
    texts = odd_texts(1, 20000) + ["fe80::1", "Call 555 0100.", "a:b", "x:y", "F:0", "no numbers here"]
    verdicts = [clean._may_hold_numbers(t) for t in texts]
    assert verdicts == [bool(single.search(t)) for t in texts]
    assert 1000 < sum(verdicts) < len(texts) - 1000


PROSE = next(iter(embedded_corpus())).text[5000:60000].split()


def repetitive_texts(seed: int, count: int) -> list[str]:
    """English-looking texts whose repeated n-grams cover every share from none to all, at every n."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start = rng.randrange(len(PROSE) - 400)
        small = PROSE[start: start + rng.randint(2, 30)]
        texts.append(" ".join(rng.choice(small) for _ in range(rng.randint(1, 300))))
        base = PROSE[start: start + rng.randint(10, 300)]
        start = rng.randrange(len(base))
        texts.append(" ".join(base + base[start: start + rng.randint(5, 12)] * rng.randint(1, 4)))
    return texts


def test_a_tie_between_top_ngrams_goes_to_the_first_to_occur() -> None:
    long_first = "longword1 a longword1 a longword1 a b c b c b c"  # (longword1, a) and (b, c): 3 times each
    assert quality.gopher_repetition(long_first) == ("top_ngram", "one 2-gram covers 83% of characters")
    short_first = "b c b c b c longword1 a longword1 a longword1 a"  # (b, c) first: 17%, under the 20% limit
    assert quality.gopher_repetition(short_first) == ("top_ngram", "one 4-gram covers 22% of characters")
    assert [plain_repetition(long_first), plain_repetition(short_first)] == [
        quality.gopher_repetition(long_first), quality.gopher_repetition(short_first)]


def test_repetition_rule_gives_the_plain_verdicts() -> None:
    texts = repetitive_texts(0, 250)
    texts += [p for d in embedded_corpus() for p in d.text[:40000].split("\n\n") if p.strip()][:400]
    fast = [quality.gopher_repetition(t) for t in texts]
    assert fast == [plain_repetition(t) for t in texts]
    reasons = {v[0] if v else None for v in fast}
    assert {None, "top_ngram", "duplicate_ngrams"} <= reasons  # every n-gram branch was reached
    assert len({v[1] for v in fast if v and v[0] == "duplicate_ngrams"}) > 10


def test_word_hashes_are_blake2b_whether_or_not_the_table_is_full(monkeypatch) -> None:
    def plain(text: str) -> list[int]:
        return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                for w in dedup._WORD.findall(text.lower())]

    texts = [f"Zebra {i} crosses the road, the ROAD{i % 7} again." for i in range(50)]
    assert all(dedup.word_hashes(t)[1].tolist() == plain(t) for t in texts)
    monkeypatch.setattr(dedup, "HASHED_WORDS", 12)  # the table empties itself every few texts
    dedup.word_hashes.cache_clear()
    assert all(dedup.word_hashes(t)[1].tolist() == plain(t) for t in reversed(texts))
    assert len(dedup._HASHED) <= 12 + 10


@pytest.mark.parametrize("precision", [64, 32])
def test_signatures_are_datatroves(tmp_path: Path, precision: int) -> None:
    config = MinhashConfig(n_grams=3, num_buckets=25, hashes_per_bucket=5, seed=1,
                           hash_config=HashConfig(precision=precision))
    ours = tasks.Signatures(str(tmp_path), str(tmp_path / "full"), config=config, language=tasks.Words())
    rng = np.random.default_rng(3)
    for size in (1, 2, 50, 3000):
        shingles = rng.integers(0, 2**63, size=(size, 1), dtype=np.uint64) * np.uint64(2)
        shingles[0, 0] = np.uint64(2**64 - 1)  # the largest input: the product wraps, as in datatrove
        assert ours.get_signature(shingles) == MinhashDedupSignature.get_signature(ours, shingles)
    # inputs whose a * x + b wraps to exactly the modulus, in each column with an odd a: the rare final subtraction
    a, b = (p.ravel().tolist() for p in ours.parameters)
    edge = [((2**61 - 1 - bj) * pow(aj, -1, 2**64)) % 2**64 for aj, bj in zip(a, b, strict=True) if aj % 2]
    assert edge
    shingles = np.array(edge + [5, 2**40], dtype=np.uint64).reshape(-1, 1)
    assert ours.get_signature(shingles) == MinhashDedupSignature.get_signature(ours, shingles)
    assert min(min(bucket) for bucket in ours.get_signature(shingles)) == 0
    # get_shingles keeps repeated shingles: the signature of the distinct ones is the same
    text = "the cat sat on the mat and the cat sat on the mat again " * 3
    repeated = ours.get_shingles(text)
    assert len(np.unique(repeated)) < len(repeated)
    assert ours.get_signature(repeated) == ours.get_signature(np.unique(repeated).reshape(-1, 1))


def _kept(out: Path) -> list[tuple[str, bytes]]:
    return [(d.id, d.text.encode("utf-8")) for p in shard_paths(out / "docs") for d in read_shard(p)]


def test_the_clean_stage_keeps_what_the_plain_paths_keep(tmp_path: Path, monkeypatch) -> None:
    rows = [{"id": d.id, "text": d.text[9000:12000]} for d in embedded_corpus()]
    rows += [{"id": f"rep{i}", "text": t} for i, t in enumerate(repetitive_texts(1, 20)) if len(t) > 400]
    rows.append({"id": "prize", "text": " ".join(["You could win a prize in the draw, the big one."] * 30)})
    rows += [{"id": f"copy{i}", "text": rows[i]["text"].upper()} for i in range(0, 20, 4)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = RunConfig.model_validate({"name": "t", "runs_dir": str(tmp_path / "runs"), "data": {"train": [str(corpus)]},
                                    "clean": {"quality": {"gopher_repetition": True, "c4": True, "fineweb": True}}})
    up = run(cfg, until="collect")
    fast = curate.main(cfg, cfg.run_dir / "collect", tmp_path / "fast", up["collect"], up["_fp"]["collect"])
    monkeypatch.setattr(quality, "gopher_repetition", plain_repetition)
    monkeypatch.setattr(tasks.Signatures, "get_signature", MinhashDedupSignature.get_signature)
    monkeypatch.setattr(dedup, "HASHED_WORDS", 0)  # every text's words hashed afresh
    plain = curate.main(cfg, cfg.run_dir / "collect", tmp_path / "plain", up["collect"], up["_fp"]["collect"])
    assert _kept(tmp_path / "fast") == _kept(tmp_path / "plain")
    assert fast["dropped"] == plain["dropped"]
    assert {"duplicate_ngrams", "top_ngram", "exact_duplicate"} <= set(fast["dropped"])
    assert fast["documents"]["kept"] > 20


def test_sorted_runs_give_np_uniques_counts_and_first_occurrences() -> None:
    """The repetition rule's unstable-sort helpers against np.unique (stable), on values with many ties."""
    rng = np.random.default_rng(5)
    for size in (1, 2, 7, 100, 5000):
        for high in (2, 5, 1 << 62):
            h = rng.integers(0, high, size=size, dtype=np.uint64)
            _, first, counts = np.unique(h, return_index=True, return_counts=True)
            top = int(counts.max())  # of the most frequent values, the first to occur; (1, 0) when none repeats
            assert quality._top_ngram(h) == (top, int(first[counts == top].min()) if top > 1 else 0)
            order = np.argsort(h)
            ours = np.minimum.reduceat(order, quality._run_starts(h[order]))
            assert sorted(ours.tolist()) == sorted(first.tolist())
