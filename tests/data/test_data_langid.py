"""lmforge's vectorised language identifier gives py3langid's own (lang, probability), bit for bit.

Checked against ``py3langid``'s ``LanguageIdentifier.classify`` on the embedded corpus, texts in several
languages and scripts, edge cases (empty, one byte, all upper case, emoji, lone surrogates, bytes) and
random strings; plus the automaton depth search, the first-occurrence counting and the unpacked-model cache.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from lmforge.data.langid import VectorIdentifier, dfa_depth, first_occurrence_counts, load_identifier
from lmforge.data.sources import embedded_corpus

SENTENCES = [
    "The quick brown fox jumps over the lazy dog, and then it runs back home.",
    "Le renard brun saute par-dessus le chien paresseux, puis il rentre chez lui.",
    "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann nach Hause.",
    "El rápido zorro marrón salta sobre el perro perezoso y luego vuelve a casa.",
    "La volpe marrone salta sopra il cane pigro e poi torna a casa.",
    "A rápida raposa marrom pula sobre o cão preguiçoso e depois volta para casa.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку и бежит домой.",
    "敏捷的棕色狐狸跳过了那只懒狗，然后跑回家。",
    "素早い茶色の狐が怠け者の犬を飛び越えて、家に帰った。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘고 집으로 돌아갔다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول ثم يعود إلى المنزل.",
    "השועל החום המהיר קופץ מעל הכלב העצלן וחוזר הביתה.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है और फिर घर लौटती है।",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Szybki brązowy lis przeskakuje nad leniwym psem i wraca do domu.",
    "Hızlı kahverengi tilki tembel köpeğin üzerinden atlar ve eve döner.",
    "Nopea ruskea kettu hyppää laiskan koiran yli ja palaa kotiin.",
    "Rýchla hnedá líška preskočí lenivého psa a vráti sa domov.",
    "Brza smeđa lisica preskače lijenog psa i vraća se kući.",
    "Брза смеђа лисица прескаче лењог пса и враћа се кући.",
]
EDGE_CASES: list[str | bytes] = [
    "", "a", "Z", " ", "\n", "é", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "ÉCOLE ÉTÉ ÇA",
    "🙂🙂🙂 🚀", "emoji 🙂 in an English sentence 🚀 that goes on", "lone \ud800 surrogate \udfff here",
    "\ud83d", "1234567890 !!! ??? ...", "a" * 5000, "ab" * 3, "\x00\x01\x02", "Ⅻ ﬁ ＡＢＣ",
    b"", b"\xff", b"plain bytes in English", "caf\u00e9 cre\u0300me".encode(), "trimmed é".encode()[:-1],
    b"\xc3\x28 invalid utf-8 in the middle",
]


@pytest.fixture(scope="module")
def identifiers() -> tuple[LanguageIdentifier, VectorIdentifier]:
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True), load_identifier()


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings from ASCII, Latin-1, Cyrillic, CJK, emoji and surrogate code points, of lengths 0 to 300."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x20, 0x7E), (0xA0, 0x17F), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F),
              (0xD800, 0xDFFF)]
    texts = []
    for _ in range(count):
        low, high = rng.choice(ranges)
        texts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(0, 300))))
    return texts


def test_same_as_py3langid_on_corpus_languages_edges_and_random(identifiers) -> None:
    reference, vector = identifiers
    texts: list[str | bytes] = [doc.text[:2000] for doc in embedded_corpus()]
    texts += SENTENCES + [s.upper() for s in SENTENCES] + [" ".join(SENTENCES)] + EDGE_CASES + random_texts(300)
    mixed = [reference.classify(t) for t in texts]
    assert [vector.classify(t) for t in texts] == mixed
    assert {lang for lang, _ in mixed} >= {"en", "fr", "de", "es", "ru", "zh", "ja", "ar"}


def test_raw_scores_identical_without_normalising(identifiers) -> None:
    reference, vector = identifiers
    raw = VectorIdentifier(vector.nb_ptc, vector.nb_pc, vector.nb_classes, vector.tk_nextmove, vector.tk_output,
                           tk_row=vector.tk_row)
    plain = LanguageIdentifier(reference.nb_ptc, reference.nb_pc, reference.nb_classes, reference.tk_nextmove,
                               reference.tk_output, tk_row=reference.tk_row)
    assert raw.depth == vector.depth == 6  # the depth is searched at construction, cached with the arrays
    for text in SENTENCES[:5] + ["", "🙂"]:
        np.testing.assert_array_equal(raw._decide(text), plain._decide(text))
        assert raw.rank(text) == plain.rank(text)


def test_dfa_depth_of_a_small_automaton() -> None:
    # Aho-Corasick automaton for {"a", "ab", "abc"}: root 0, "a" 1, "ab" 2, "abc" 3; other bytes lead home
    moves = np.zeros((4, 256), dtype=np.uint32)
    moves[:, ord("a")] = 1
    moves[1, ord("b")] = 2
    moves[2, ord("c")] = 3
    assert dfa_depth(moves.ravel(), np.arange(4)) == 3
    assert dfa_depth(np.zeros(256, dtype=np.uint32), np.zeros(1, dtype=np.uint32)) == 0


def test_first_occurrence_counts() -> None:
    order, counts = first_occurrence_counts(np.array([7, 3, 7, 0, 3, 7, 9], dtype=np.int32))
    assert order.tolist() == [7, 3, 0, 9]
    assert counts.tolist() == [3, 2, 1, 1]


def test_model_cache_written_once_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    load_identifier.cache_clear()
    try:
        first = load_identifier()
        folders = list((tmp_path / "py3langid").iterdir())
        assert len(folders) == 1 and (folders[0] / "meta.json").exists()
        stamp = (folders[0] / "ptc.npy").stat().st_mtime_ns
        load_identifier.cache_clear()
        second = load_identifier()
        assert (folders[0] / "ptc.npy").stat().st_mtime_ns == stamp
        assert second.classify(SENTENCES[1]) == first.classify(SENTENCES[1])
        assert first.nb_ptc.dtype == np.float32 and second.depth == 6
    finally:
        load_identifier.cache_clear()
