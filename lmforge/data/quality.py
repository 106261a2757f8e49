"""Document quality filters in the manner of Gopher, C4 and FineWeb, as pure cleaning steps.

Each filter reads a document's text and returns ``None`` to keep it or
``(reason, detail)`` to drop it; ``lmforge/data/clean.py`` wraps them as steps.
The thresholds are the published ones:

- Gopher quality (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", appendix A.1.1): 50 to 100,000 words; mean word
  length 3 to 10 characters; at most 0.1 '#' or ellipses per word; at most 90% of
  lines starting with a bullet and 30% ending with an ellipsis; at least 80% of words
  with a letter; at least 2 of the stop words *the, be, to, of, and, that, have, with*.
  The first four are configurable in ``clean.quality``.
- Gopher repetition (same paper, table A1): duplicate lines <= 30% of lines and
  <= 20% of characters, the same for paragraphs; the most frequent 2/3/4-gram covers
  <= 20/18/16% of the characters; duplicated 5..10-grams cover <= 15..10%.
- C4 (Raffel et al. 2020, section 2.2), page rules: no curly bracket, no "lorem
  ipsum", at least 5 sentences. Its line rules (terminal punctuation, at least 3
  words, "javascript") are the line filters of ``clean.lines``.
- FineWeb (Penedo et al. 2024, section 3.3): more than 12% of lines end in
  punctuation, less than 67% of lines are shorter than 30 characters, and less than
  10% of the characters are in duplicated lines.

Words are whitespace-separated tokens, as in Gopher. Repeated n-grams are found with
64-bit hashes in numpy, so a 100 KB document takes milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from lmforge.config import QualityConfig

Verdict = "tuple[str, str] | None"  # (reason, detail) to drop the document, None to keep it

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("\u2022", "\u2023", "\u25e6", "\u2043", "\u25cf", "\u25aa", "\u25cb", "-", "*", "\u00b7", "\u2013")
ELLIPSES = ("...", "\u2026")
TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026")

# Gopher table A1.
DUP_LINE_FRAC, DUP_LINE_CHARS = 0.30, 0.20
DUP_PARA_FRAC, DUP_PARA_CHARS = 0.30, 0.20
TOP_NGRAM_CHARS = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_NGRAM_CHARS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
# Gopher A.1.1 rules that are not configurable.
MAX_BULLET_LINES, MAX_ELLIPSIS_LINES, MIN_ALPHA_WORDS = 0.9, 0.3, 0.8
# C4 and FineWeb.
C4_MIN_SENTENCES = 5
FW_MIN_PUNCT_LINES, FW_MAX_SHORT_LINES, FW_SHORT_LINE_CHARS, FW_MAX_DUP_LINE_CHARS = 0.12, 0.67, 30, 0.10

# A whitespace-separated token without a single letter (digits, symbols, punctuation only).
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"'\u201d\u2019)]*)(?:\s|$)")
# Fixed odd multipliers: n-gram hash = sum(word id * M[k]) mod 2**64, the same in every process.
_MULT = np.random.default_rng(20240601).integers(1, 2**63, size=16, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


# The rules run one after another on the same text, so its lines and words are split once (the same
# str object comes back: the cache compares by identity first). Callers must not modify the lists.
@lru_cache(maxsize=1)
def _nonblank_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


@lru_cache(maxsize=1)
def _words(text: str) -> list[str]:
    return text.split()


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items equal to an earlier one, share of their characters), both 0 for no items."""
    seen: set[str] = set()
    dups = dup_chars = total = 0
    for item in items:
        total += len(item)
        if item in seen:
            dups += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return (dups / len(items), dup_chars / max(total, 1)) if items else (0.0, 0.0)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the n-grams of a sequence of integer ids (length ``len(ids) - n + 1``)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    ids = ids.astype(np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        for k in range(n):
            h += ids[k: k + m] * _MULT[k]
    return h


def _ngrams_growing(ids: np.ndarray, longest: int):
    """``(n, hashes)`` for n = 1 .. ``longest``, each from the last (the values of :func:`ngram_hashes`:
    the sum wraps around the same way in any order)."""
    ids = ids.astype(np.uint64)
    h = np.zeros(len(ids), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for n in range(1, min(longest, len(ids)) + 1):
            h = h[: len(ids) - n + 1] + ids[n - 1:] * _MULT[n - 1]
            yield n, h


def _run_starts(ranked: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in a sorted array."""
    return np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))


def _top_ngram(h: np.ndarray) -> tuple[int, int]:
    """``(count, first position)`` of the most frequent value; of equally frequent values, the one that
    occurs first (as ``Counter.most_common`` in datatrove's Gopher filter picks it), so the choice does
    not depend on the hash values."""
    ranked = np.sort(h)  # numpy's default sort (SIMD, unstable) is several times faster than np.unique's
    starts = _run_starts(ranked)
    counts = np.diff(np.append(starts, len(ranked)))
    top = int(counts.max())
    if top == 1:
        return 1, 0
    tied = ranked[starts[counts == top]]
    return top, int(np.argmax(h == tied[0]) if len(tied) == 1 else np.argmax(np.isin(h, tied)))


def _repeated_share(h: np.ndarray, n: int, lengths: np.ndarray, total: int) -> float:
    """Share of the characters inside n-grams that occur earlier in the text (each word counted once)."""
    repeat = np.ones(len(h), dtype=bool)
    # first occurrences are not duplicates; after numpy's default sort (faster than the stable one
    # np.unique needs for first occurrences) a value's first occurrence is its run's smallest index
    order = np.argsort(h)
    repeat[np.minimum.reduceat(order, _run_starts(h[order]))] = False
    starts = np.flatnonzero(repeat)
    # +1 where a repeated n-gram starts, -1 where it ends: a running sum above 0 is inside one
    marks = np.bincount(starts, minlength=len(lengths) + 1) - np.bincount(starts + n, minlength=len(lengths) + 1)
    covered = np.cumsum(marks[:-1]) > 0
    return int(lengths[covered].sum()) / total


def gopher_repetition(text: str) -> Verdict:
    lines = _nonblank_lines(text)
    frac, chars = duplicate_fractions(lines)
    if frac > DUP_LINE_FRAC:
        return ("duplicate_lines", f"{frac:.0%} of lines repeat")
    if chars > DUP_LINE_CHARS:
        return ("duplicate_line_chars", f"{chars:.0%} of characters in repeated lines")
    frac, chars = duplicate_fractions([p.strip() for p in _PARAGRAPHS.split(text) if p.strip()])
    if frac > DUP_PARA_FRAC:
        return ("duplicate_paragraphs", f"{frac:.0%} of paragraphs repeat")
    if chars > DUP_PARA_CHARS:
        return ("duplicate_paragraph_chars", f"{chars:.0%} of characters in repeated paragraphs")
    words = _words(text)
    if len(words) < 2:
        return None
    # A word's id is its str hash: equal words, equal ids, with map() keeping the loop in C. The hashes
    # differ between processes (PYTHONHASHSEED), which changes no verdict: only equality counts, and
    # ties go to the first occurrence.
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    top_limits, dup_limits = dict(TOP_NGRAM_CHARS), dict(DUP_NGRAM_CHARS)
    for n, h in _ngrams_growing(ids, max(dup_limits)):
        if n in top_limits:
            count, first = _top_ngram(h)
            if count > 1:
                share = int(lengths[first: first + n].sum()) * count / total
                if share > top_limits[n]:
                    return ("top_ngram", f"one {n}-gram covers {share:.0%} of characters")
        if n in dup_limits:
            share = _repeated_share(h, n, lengths, total)
            if share > dup_limits[n]:
                return ("duplicate_ngrams", f"repeated {n}-grams cover {share:.0%} of characters")
            # A repeated (n+1)-gram holds two repeated n-grams, so the longer n-grams cover no more
            # characters than these; below every later limit, none of them can fire.
            later = [limit for m, limit in dup_limits.items() if m > n]
            if not later or share <= min(later):
                return None
    return None


def gopher_quality(q: QualityConfig) -> Callable[[str], Verdict]:
    def gopher_quality(text: str) -> Verdict:
        words = _words(text)
        n = len(words)
        if n < q.min_words:
            return ("too_few_words", f"{n} words")
        if n > q.max_words:
            return ("too_many_words", f"{n} words")
        mean = len("".join(words)) / n
        if not q.min_mean_word_len <= mean <= q.max_mean_word_len:
            return ("mean_word_length", f"{mean:.1f} characters")
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / n > q.max_symbol_ratio:
            return ("symbols", f"{symbols / n:.2f} '#' or ellipses per word")
        lines = _nonblank_lines(text)
        bullets = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
        if bullets > MAX_BULLET_LINES:
            return ("bullet_lines", f"{bullets:.0%} of lines are bullets")
        ellipsis = sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines)
        if ellipsis > MAX_ELLIPSIS_LINES:
            return ("ellipsis_lines", f"{ellipsis:.0%} of lines end in an ellipsis")
        alpha = 1.0 - len(_NO_LETTER_WORD.findall(text)) / n
        if alpha < MIN_ALPHA_WORDS:
            return ("few_alphabetic_words", f"{alpha:.0%} of words have a letter")
        if q.min_stop_words:
            found = 0
            for w in words:
                if w.lower().strip(".,;:!?\"'()") in STOP_WORDS:
                    found += 1
                    if found >= q.min_stop_words:
                        break
            else:
                return ("few_stop_words", f"{found} English stop words")
        return None
    return gopher_quality


def c4_page(text: str) -> Verdict:
    if "{" in text:
        return ("curly_bracket", "contains '{' (code)")
    if "lorem ipsum" in text.lower():
        return ("lorem_ipsum", "placeholder text")
    sentences = len(_SENTENCE_END.findall(text))
    if sentences < C4_MIN_SENTENCES:
        return ("too_few_sentences", f"{sentences} sentences")
    return None


def fineweb(text: str) -> Verdict:
    lines = [line.strip() for line in _nonblank_lines(text)]
    if not lines:
        return ("no_lines", "no text lines")
    punct = sum(line.endswith(TERMINAL) for line in lines) / len(lines)
    if punct <= FW_MIN_PUNCT_LINES:
        return ("few_punctuated_lines", f"{punct:.0%} of lines end in punctuation")
    short = sum(len(line) <= FW_SHORT_LINE_CHARS for line in lines) / len(lines)
    if short >= FW_MAX_SHORT_LINES:
        return ("short_lines", f"{short:.0%} of lines are short")
    _, chars = duplicate_fractions(lines)
    if chars >= FW_MAX_DUP_LINE_CHARS:
        return ("duplicate_line_chars", f"{chars:.0%} of characters in repeated lines")
    return None
