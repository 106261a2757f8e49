"""Cleaning steps: pure functions ``Document -> Document | Drop``, each switched on or off by config.

:func:`build_steps` turns ``cfg.clean`` into an ordered list of named steps (the
order of FineWeb's pipeline: extract, repair, filter, then scrub)::

    html            raw HTML markup -> main text (trafilatura), its metadata optionally
    unicode         mojibake and HTML entities repaired (ftfy), then NFC or NFKC
    control_chars   C0/C1 control characters, lone surrogates, non-characters removed
    whitespace      one line ending, odd spaces to spaces, no trailing spaces, <= 1 blank line
    lines           navigation, boilerplate, lorem ipsum, too-short, unpunctuated lines removed
    language        py3langid tags meta.lang / meta.lang_score; other languages dropped
    gopher_repetition, gopher_quality, c4, fineweb     document filters (lmforge/data/quality.py)
    pii             e-mail addresses, phone numbers, IP addresses replaced
    lowercase, special_chars                          the classic recipe (off by default)

A step returns the document (changed or not) or a :class:`Drop` with a reason. No
step keeps state between documents, so shards can be cleaned in any order, in any
process, with the same result::

    steps = build_steps(cfg.clean)
    doc = Document(id="a", text="cafÃ© ...", source="x")
    for name, step in steps:
        doc = step(doc)
        if isinstance(doc, Drop):
            break
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

from lmforge.config import CleanConfig, LanguageConfig, LinesConfig, PIIConfig
from lmforge.data import quality
from lmforge.data.sources import Document


@dataclass(frozen=True)
class Drop:
    """A document removed by a step: the accounting key and a human detail (e.g. ``'de 0.99'``)."""

    reason: str
    detail: str = ""


Step = Callable[[Document], "Document | Drop"]


def _with_text(doc: Document, text: str) -> Document | Drop:
    if not text.strip():
        return Drop("empty")
    return doc if text == doc.text else replace(doc, text=text)


# ---------------------------------------------------------------- characters
_HTML_HINT = re.compile(r"<(?:!doctype\s+html|html|head|body|div|p|article|main|table|span|br|a)[\s/>]", re.I)


def looks_like_html(text: str) -> bool:
    """True for markup (a page saved as text), not for prose that mentions a tag or two."""
    head = text[:4096]
    return len(_HTML_HINT.findall(head)) >= 3


def html_step(metadata: bool) -> Step:
    """HTML markup to its main text; with ``metadata``, the page's title, author, date ... join meta."""
    def html(doc: Document) -> Document | Drop:
        if not looks_like_html(doc.text):
            return doc
        from lmforge.data.readers.markup import html_to_text

        text, meta = html_to_text(doc.text, url=doc.meta.get("url"), metadata=metadata)
        if not text:
            return Drop("html_no_text", "no main text in the markup")
        return replace(doc, text=text, meta={**meta, **doc.meta})  # the record's own metadata wins
    return html


_ENTITY = re.compile(r"&(?:[A-Za-z]+\d*|#\d+|#[xX][0-9A-Fa-f]+);")


@lru_cache(maxsize=1)
def _ftfy_config():
    import ftfy

    # Curly quotes and line breaks are left alone (the whitespace step owns line breaks);
    # normalization is the separate NFC/NFKC choice below.
    return ftfy.TextFixerConfig(uncurl_quotes=False, fix_line_breaks=False, normalization=None)


def unicode_step(fix: bool, form: str) -> Step:
    def unicode(doc: Document) -> Document | Drop:
        text = doc.text
        # Pure ASCII can hold no mojibake; only entities (&amp;) and terminal escapes need ftfy there.
        if fix and not (text.isascii() and "\x1b" not in text and not _ENTITY.search(text)):
            import ftfy

            text = ftfy.fix_text(text, config=_ftfy_config())
        if form != "none":
            text = unicodedata.normalize(form, text)
        return _with_text(doc, text)
    return unicode


# Tab, newline and the other line breaks are whitespace, handled by the whitespace step.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def remove_control_chars(doc: Document) -> Document | Drop:
    return _with_text(doc, _CONTROL.sub("", doc.text))


_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")  # zero-width space, word joiner, stray byte-order marks
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_whitespace(doc: Document) -> Document | Drop:
    # Each rule runs only where a plain substring test says it can match (the same text, a few
    # times faster): odd spaces and invisibles are never ASCII, trailing blanks precede a line end.
    text = doc.text
    if "\r" in text or "\x0b" in text or "\x0c" in text or not text.isascii():
        text = _LINE_BREAKS.sub("\n", text)
    if not text.isascii():
        text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return _with_text(doc, text.strip("\n"))


# --------------------------------------------------------------------- lines
_NAV_SPLIT = re.compile(r"\s*(?:\||»|›|·|•|>|/)\s*")
# Interface phrases that open a short line ("Subscribe to our newsletter"); verse that merely uses
# "subscribe" mid-line is left alone.
_NAV_PHRASES = re.compile(r"^\W*(?:skip to (?:main )?content|back to top|toggle navigation|main menu|read more|"
                          r"click here|sign in|log ?in|sign up|subscribe|share (?:this|on)|next post|previous post|"
                          r"copyright|\u00a9|powered by)\b", re.I)
_NAV_HINT = re.compile("[|\u00bb\u203a\u00b7\u2022>/]|" + _NAV_PHRASES.pattern, re.I | re.M)
BOILERPLATE_PHRASES = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies",
                       "use of cookies", "use cookies")
_BOILERPLATE = re.compile("|".join(BOILERPLATE_PHRASES), re.I)
_LOREM = re.compile(r"lorem ipsum", re.I)
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", ":", ";")


def is_navigation(line: str) -> bool:
    """Menu / breadcrumb lines: three or more short items between separators, or a short UI phrase."""
    stripped = line.strip()
    if not stripped or stripped.endswith((".", "!", "?")):
        return False
    items = [i for i in _NAV_SPLIT.split(stripped) if i]
    if len(items) >= 3 and all(len(i.split()) <= 4 for i in items):
        return True
    return len(stripped.split()) <= 8 and bool(_NAV_PHRASES.match(stripped))


def lines_step(cfg: LinesConfig) -> Step:
    def lines(doc: Document) -> Document | Drop:
        text = doc.text
        # One scan of the whole text decides which rules can fire at all; most documents need no line loop.
        low = text.lower()
        nav = cfg.navigation and bool(_NAV_HINT.search(text))
        boiler = cfg.boilerplate and any(phrase in low for phrase in BOILERPLATE_PHRASES)
        lorem = cfg.lorem_ipsum and "lorem ipsum" in low
        if not (nav or boiler or lorem or cfg.min_words or cfg.terminal_punct):
            return doc
        kept = []
        for line in text.split("\n"):
            words = len(line.split())
            if words and ((nav and is_navigation(line))
                          or (boiler and _BOILERPLATE.search(line))
                          or (lorem and _LOREM.search(line))
                          or words < cfg.min_words
                          or (cfg.terminal_punct and not line.rstrip().endswith(_TERMINAL))):
                continue
            kept.append(line)
        if len(kept) == doc.text.count("\n") + 1:
            return doc
        text = _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n")
        return Drop("no_lines_left") if not text.strip() else replace(doc, text=text)
    return lines


# ------------------------------------------------------------------ language
def identify_language(text: str) -> tuple[str, float]:
    """``(ISO 639-1 code, probability)`` from py3langid's bundled model, scored in numpy (lmforge/data/langid.py)."""
    from lmforge.data.langid import load_identifier

    lang, score = load_identifier().classify(text)
    return lang, float(score)


def language_step(cfg: LanguageConfig) -> Step:
    keep = set(cfg.keep)

    def language(doc: Document) -> Document | Drop:
        lang, score = identify_language(doc.text[: cfg.max_chars])
        if keep and lang not in keep:
            return Drop("wrong_language", f"{lang} {score:.2f}")
        if keep and score < cfg.min_score:
            return Drop("unsure_language", f"{lang} {score:.2f}")
        return replace(doc, meta={**doc.meta, "lang": lang, "lang_score": round(score, 3)})
    return language


# ----------------------------------------------------------------------- PII
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|"
                   r"(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}|(?:[0-9A-Fa-f]{1,4}:){1,7}:)(?![\w:])")
# Optional +country code, optional (area code), then 2-5 groups of digits split by space, dot or dash;
# a match counts only with 9 to 15 digits, so dates, years and prices stay.
_PHONE = re.compile(r"(?<![\w+\-/.])(?<!\d )(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]\d{2,4}){1,4}"
                    r"(?![\w\-/]|\.\d)")


# Every IP address or phone number holds two digits in a row (or split by a separator) or a colon pair.
# Three tests instead of one alternation: a pattern that opens with a literal (":") is found by a fast
# scan for that character, where an alternation is tried at every position (2.4x slower here).
_DIGIT_PAIR = re.compile(r"\d[\d .\-]")
_HEX_COLON = re.compile(r":(?<=[0-9A-Fa-f]:)[0-9A-Fa-f]")


def _may_hold_numbers(text: str) -> bool:
    return "::" in text or bool(_DIGIT_PAIR.search(text)) or bool(_HEX_COLON.search(text))


def pii_step(cfg: PIIConfig) -> Step:
    def pii(doc: Document) -> Document | Drop:
        text, found = doc.text, {"email": 0, "ip": 0, "phone": 0}
        if cfg.emails and "@" in text:
            text, found["email"] = _EMAIL.subn(cfg.email_replacement, text)
        numbers = _may_hold_numbers(text)
        if cfg.ips and numbers:
            text, n4 = _IPV4.subn(cfg.ip_replacement, text)
            text, n6 = _IPV6.subn(cfg.ip_replacement, text)
            found["ip"] = n4 + n6
        if cfg.phones and numbers:
            def phone(match: re.Match) -> str:
                if 9 <= sum(c.isdigit() for c in match.group()) <= 15:
                    found["phone"] += 1
                    return cfg.phone_replacement
                return match.group()
            text = _PHONE.sub(phone, text)
        found = {k: v for k, v in found.items() if v}
        if not found:
            return doc
        return replace(doc, text=text, meta={**doc.meta, "pii": found})
    return pii


# ----------------------------------------------------------- classic recipe
_SPECIAL = re.compile(r"[^\w\s.,;:!?'\"()\-]|_")


def lowercase(doc: Document) -> Document | Drop:
    return _with_text(doc, doc.text.lower())


def remove_special_chars(doc: Document) -> Document | Drop:
    return _with_text(doc, _SPECIAL.sub("", doc.text))


# ---------------------------------------------------------------- assembly
def rule_step(rule: Callable[[str], tuple[str, str] | None]) -> Step:
    """A quality rule (text -> None or (reason, detail)) as a step."""
    def step(doc: Document) -> Document | Drop:
        verdict = rule(doc.text)
        return doc if verdict is None else Drop(*verdict)
    return step


def build_steps(cfg: CleanConfig) -> list[tuple[str, Step]]:
    """The enabled steps of ``cfg`` in order, as ``(name, step)``."""
    n, q = cfg.normalize, cfg.quality
    steps: list[tuple[str, Step | None]] = [
        ("html", html_step(n.html_metadata) if n.html else None),
        ("unicode", unicode_step(n.fix_unicode, n.form) if n.fix_unicode or n.form != "none" else None),
        ("control_chars", remove_control_chars if n.control_chars else None),
        ("whitespace", normalize_whitespace if n.whitespace else None),
        ("lines", lines_step(cfg.lines) if _any_line_filter(cfg.lines) else None),
        ("language", language_step(cfg.language) if cfg.language.enabled else None),
        ("gopher_repetition", rule_step(quality.gopher_repetition) if q.gopher_repetition else None),
        ("gopher_quality", rule_step(quality.gopher_quality(q)) if q.gopher_quality else None),
        ("c4", rule_step(quality.c4_page) if q.c4 else None),
        ("fineweb", rule_step(quality.fineweb) if q.fineweb else None),
        ("pii", pii_step(cfg.pii) if cfg.pii.emails or cfg.pii.phones or cfg.pii.ips else None),
        ("lowercase", lowercase if n.lowercase else None),
        ("special_chars", remove_special_chars if n.special_chars else None),
    ]
    return [(name, step) for name, step in steps if step is not None]


def _any_line_filter(cfg: LinesConfig) -> bool:
    return cfg.navigation or cfg.boilerplate or cfg.lorem_ipsum or cfg.min_words > 0 or cfg.terminal_punct
