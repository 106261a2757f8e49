"""Cleaning steps, quality filters, deduplication and decontamination on hand-made examples."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from lmforge.config import CleanConfig, DedupConfig, LanguageConfig, LinesConfig, PIIConfig, QualityConfig
from lmforge.data import quality
from lmforge.data.clean import (
    Drop,
    build_steps,
    html_step,
    language_step,
    lines_step,
    lowercase,
    normalize_whitespace,
    pii_step,
    remove_control_chars,
    remove_special_chars,
    unicode_step,
)
from lmforge.data.dedup import DuplicateFinder, contaminated, eval_ngrams, fingerprint
from lmforge.data.sources import Document, embedded_corpus

ENGLISH = ("The river runs past the old mill and into the valley, where the farmers have planted wheat "
           "and barley for as long as anyone can remember. In the spring the water rises, and the children "
           "of the village walk along the bank to see how high it has come. The miller keeps a record of "
           "every flood on the wall of the mill, with the year and the height of the water, so that the "
           "people who live there can compare one spring with another and prepare for the worst.")
GERMAN = ("Der Fluss fließt an der alten Mühle vorbei und hinunter ins Tal, wo die Bauern seit jeher Weizen "
          "und Gerste anbauen. Im Frühling steigt das Wasser, und die Kinder des Dorfes gehen am Ufer entlang, "
          "um zu sehen, wie hoch es gekommen ist. Der Müller schreibt jedes Hochwasser an die Wand der Mühle.")


def _doc(text: str, **meta: object) -> Document:
    return Document(id="d", text=text, source="test", meta=dict(meta))


def test_mojibake_and_entities_are_repaired() -> None:
    step = unicode_step(fix=True, form="NFC")
    assert step(_doc("The cafÃ© doesnâ€™t open on Sundays.")).text == "The café doesn’t open on Sundays."
    assert step(_doc("Fish &amp; chips &egrave;")).text == "Fish & chips è"
    assert step(_doc("cafe\u0301")).text == "café"  # NFC composes the accent
    assert unicode_step(fix=False, form="NFKC")(_doc("ﬁne ２")).text == "fine 2"
    plain = _doc("Nothing to repair here.")
    assert step(plain) is plain


def test_html_boilerplate_is_removed() -> None:
    page = ("<html><head><title>Harbour news</title></head><body><nav><a href='/'>Home</a><a href='/b'>Blog</a></nav><div class='cookie'>We use cookies"
            "</div><article><p>" + ENGLISH + "</p></article><footer>Copyright 2024 | Privacy policy</footer>"
            "</body></html>")
    out = html_step(metadata=False)(_doc(page))
    assert out.text == ENGLISH
    assert "title" not in out.meta  # the metadata search is opt-in: it costs twice the extraction
    assert html_step(metadata=False)(_doc("Prose that mentions <p> once.")).text == "Prose that mentions <p> once."
    with_meta = html_step(metadata=True)(_doc(page))
    assert with_meta.text == ENGLISH
    assert with_meta.meta["title"] == "Harbour news"


def test_control_characters_and_whitespace() -> None:
    raw = "\ufeffTitle\x00\r\n\r\nLine\u00a0one\x07  \t\n\n\n\nLine\u2028two\u200b\x85end  "
    cleaned = normalize_whitespace(remove_control_chars(_doc(raw)))
    assert cleaned.text == "Title\n\nLine one\n\nLine\ntwo\nend"
    assert remove_control_chars(_doc("\x00\x01")) == Drop("empty")


def test_line_filters() -> None:
    text = ("Home | News | Sport | Weather\nSkip to content\n" + ENGLISH + "\nThis site uses cookies to improve it."
            "\nLorem ipsum dolor sit amet, consectetur.\nPlease enable JavaScript to view comments.\nI will subscribe "
            "to thy advice, my lord.\nShort line")
    out = lines_step(LinesConfig())(_doc(text))
    assert out.text.split("\n") == [ENGLISH, "I will subscribe to thy advice, my lord.", "Short line"]
    strict = lines_step(LinesConfig(min_words=3, terminal_punct=True))(_doc(text))
    assert strict.text.split("\n") == [ENGLISH, "I will subscribe to thy advice, my lord."]
    assert lines_step(LinesConfig())(_doc("Home | About | Contact")) == Drop("no_lines_left")


def test_german_document_is_dropped_by_the_language_filter() -> None:
    step = language_step(LanguageConfig())
    kept = step(_doc(ENGLISH))
    assert kept.meta["lang"] == "en" and kept.meta["lang_score"] > 0.9
    dropped = step(_doc(GERMAN))
    assert isinstance(dropped, Drop) and dropped.reason == "wrong_language" and dropped.detail.startswith("de ")
    assert language_step(LanguageConfig(keep=[]))(_doc(GERMAN)).meta["lang"] == "de"


def test_pii_is_scrubbed() -> None:
    out = pii_step(PIIConfig())(_doc("Write to jane.doe@example.org or call +44 20 7946 0958; the server is "
                                      "10.0.0.12 (2001:db8::ff00:42:8329). In 1999-2005 sales rose 12.5%."))
    assert out.text == ("Write to email@example.com or call <PHONE>; the server is 192.0.2.1 (192.0.2.1). "
                        "In 1999-2005 sales rose 12.5%.")
    assert out.meta["pii"] == {"email": 1, "ip": 2, "phone": 1}
    off = pii_step(PIIConfig(emails=False, phones=False, ips=False))
    assert off(_doc("a@b.co")).text == "a@b.co"


def test_classic_recipe_steps() -> None:
    assert lowercase(_doc("Hello World")).text == "hello world"
    assert remove_special_chars(_doc("Price: 5€ — «ok» ✓ (really)!")).text == "Price: 5  ok  (really)!"


def test_gopher_c4_and_fineweb_rules() -> None:
    gopher = quality.gopher_quality(QualityConfig())
    assert gopher(ENGLISH) is None
    assert gopher("too short")[0] == "too_few_words"
    assert gopher(" ".join(["#tag"] * 60))[0] == "symbols"
    assert gopher(" ".join(["1234"] * 60))[0] == "few_alphabetic_words"
    assert gopher(" ".join(["supercalifragilistic"] * 60))[0] == "mean_word_length"
    assert gopher(" ".join(["river", "mill", "water"] * 20))[0] == "few_stop_words"
    assert gopher("\n".join([f"- bulleted sentence number {i} describes something" for i in range(20)]))[0] == \
        "bullet_lines"
    assert quality.gopher_repetition(ENGLISH) is None
    assert quality.gopher_repetition("\n".join(["Buy now!"] * 5 + ["Something else entirely here."]))[0] == \
        "duplicate_lines"
    assert quality.gopher_repetition(" ".join(["click here to win a prize"] * 30))[0] == "top_ngram"
    assert quality.c4_page(ENGLISH + " " + ENGLISH) is None  # six sentences
    assert quality.c4_page(ENGLISH + " function() { return 1; }")[0] == "curly_bracket"
    assert quality.c4_page("One sentence. Two sentences.")[0] == "too_few_sentences"
    assert quality.fineweb(ENGLISH) is None
    assert quality.fineweb("\n".join(["menu item"] * 3 + ["a longer line that ends with a full stop."]))[0] in \
        ("short_lines", "few_punctuated_lines")


def test_build_steps_follows_the_config() -> None:
    names = [n for n, _ in build_steps(CleanConfig())]
    assert names == ["html", "unicode", "control_chars", "whitespace", "lines", "language", "gopher_quality", "pii"]
    everything = CleanConfig.model_validate({"quality": {"gopher_repetition": True, "c4": True, "fineweb": True},
                                             "normalize": {"lowercase": True, "special_chars": True}})
    assert [n for n, _ in build_steps(everything)][5:] == ["language", "gopher_repetition", "gopher_quality", "c4",
                                                          "fineweb", "pii", "lowercase", "special_chars"]


def test_exact_and_near_duplicates() -> None:
    cfg = DedupConfig()
    finder = DuplicateFinder(cfg)
    sonnets = next(d.text for d in embedded_corpus() if d.id == "sonnets")
    text = sonnets[2000:6000]  # about 700 words of real text
    words = text.split()
    near = words.copy()
    for i in (50, 300, 600):  # a near-copy: three words changed
        near[i] = "changed"
    docs = {"orig": text, "exact": text.upper().replace(",", " ,"), "near": " ".join(near),
            "other": sonnets[6000:10000], "other2": ENGLISH}
    verdicts = {}
    for doc_id, text in docs.items():
        fp = fingerprint(text, cfg)
        verdicts[doc_id] = finder.check(doc_id, fp.key, fp.signature)
    assert verdicts == {"orig": None, "exact": ("exact_duplicate", "orig"), "near": ("near_duplicate", "orig"),
                        "other": None, "other2": None}
    loose = DuplicateFinder(DedupConfig(near=False))
    for doc_id in ("orig", "near"):
        fp = fingerprint(docs[doc_id], DedupConfig(near=False))
        assert fp.signature is None and loose.check(doc_id, fp.key, fp.signature) is None


def test_decontamination_against_eval_files(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text('{"text": "Q: where does the river run? A: past the old mill and into the '
                                         'valley, where the farmers have planted wheat"}\n', encoding="utf-8")
    ngrams = eval_ngrams([str(tmp_path / "eval.jsonl")], 13)
    assert ngrams.dtype == np.uint64 and len(ngrams) > 0
    cfg = DedupConfig()
    assert contaminated(fingerprint(ENGLISH, cfg), ngrams, 13) >= 1
    assert contaminated(fingerprint(GERMAN, cfg), ngrams, 13) == 0
    assert contaminated(fingerprint(ENGLISH, cfg), eval_ngrams([], 13), 13) == 0


def _near_copy(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """``words`` with ``rate`` of them edited at random places: substituted, deleted or a word inserted."""
    out = list(words)
    for pos in sorted(rng.sample(range(len(words)), max(1, round(rate * len(words)))), reverse=True):
        op = rng.randrange(3)
        if op == 0:
            out[pos] = rng.choice(words)
        elif op == 1:
            del out[pos]
        else:
            out.insert(pos, rng.choice(words))
    return out


def test_near_copies_up_to_five_percent_edited_are_dropped_distinct_passages_kept() -> None:
    """The defaults against the curve in docs/data.md: copies with 1-5% of words edited go, distinct passages stay.

    Before the defaults were measured (5-word shingles, threshold 0.8) most copies at 3% and all at 5% were kept.
    """
    works = {d.id: d.text.split() for d in embedded_corpus() if d.id in ("hamlet", "macbeth", "tempest")}
    # Distinct passages of the same plays (the hard negatives): 8 per play, 100 to 400 words, 2,000 words apart.
    passages = {f"{name}-{i}": words[i * 2000: i * 2000 + (100, 200, 400)[i % 3]]
                for name, words in works.items() for i in range(8)}
    cfg = DedupConfig()
    finder = DuplicateFinder(cfg)
    for doc_id, words in passages.items():
        fp = fingerprint(" ".join(words), cfg)
        assert finder.check(doc_id, fp.key, fp.signature) is None, doc_id
    rng = random.Random(0)
    missed = []
    for rate in (0.01, 0.02, 0.03, 0.04, 0.05):
        for doc_id, words in passages.items():
            fp = fingerprint(" ".join(_near_copy(words, rate, rng)), cfg)
            if finder.check(f"copy of {doc_id}", fp.key, fp.signature) != ("near_duplicate", doc_id):
                missed.append((rate, doc_id))
    assert missed == []
