"""Markup readers: HTML pages and EPUB books to plain text, with trafilatura.

trafilatura finds the main text of a page and leaves out navigation, headers,
footers and other boilerplate; it needs ``lxml_html_clean``, which lxml no longer
bundles, so lmforge depends on it explicitly. EPUB books are read with the standard
``zipfile`` and lxml (the OPF package file gives the reading order); each chapter
goes through the same extraction, and the chapters are joined with blank lines::

    text, meta = html_to_text(page_bytes, url="https://example.org/a")   # meta: title, author, date, ...
    for doc in read_documents(["books/"]):    # .html and .epub files use the readers below
        ...

A page with no extractable text yields nothing and is counted as ``no_text``.
"""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.sources import (
    REASON_TEXT,
    Document,
    FileOptions,
    ReadStats,
    binary_reason,
    open_binary,
    problem,
)

HTML_META = ("title", "author", "date", "sitename", "language")


def html_to_text(html: bytes | str, url: str | None = None, recall: bool = False,
                 metadata: bool = True) -> tuple[str, dict]:
    """The main text of an HTML page and its metadata; ``("", {})`` when nothing is found.

    ``recall=True`` keeps more of the page (for book chapters, where nothing is boilerplate).
    ``metadata=False`` skips trafilatura's metadata search (the text is the same, the meta empty): on
    generated web pages it takes two thirds of the extraction's CPU time, most of it the date search.
    """
    import trafilatura

    result = trafilatura.bare_extraction(html, url=url, with_metadata=metadata, include_comments=False,
                                         include_tables=True, favor_recall=recall)
    if result is None or not (result.text or "").strip():
        if not recall:
            return "", {}
        # Short chapters (a title page, a dedication) fall below trafilatura's main-text threshold.
        text = trafilatura.html2txt(html) or ""
        return text.strip(), {}
    meta = {k: getattr(result, k) for k in HTML_META if getattr(result, k, None)}
    return result.text.strip(), meta


def read_html_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                   opts: FileOptions) -> Iterator[Document]:
    """One document per HTML file: its main text, with the page title in meta."""
    with open_binary(path, compression) as f:
        data = f.read()
    if b"\x00" in data:
        if explicit:
            problem(stats, opts, "binary", f"{path} {REASON_TEXT['binary']}; pass HTML files")
        else:
            stats.skip("binary", path)
        return
    # trafilatura reads the page's declared charset itself, so HTML need not be UTF-8.
    text, meta = html_to_text(data)
    stats.files += 1
    if not text:
        stats.skip("no_text", f"{path}: no main text found in the HTML")
        return
    stats.documents += 1
    yield Document(id=base, text=text, source=str(path), meta={"path": str(path), "bytes": len(data), **meta})


def _xml(data: bytes):
    from lxml import etree

    # Never fetch or expand external entities from a file someone else made.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, recover=True)
    root = etree.fromstring(data, parser=parser)
    if root is None:
        raise ValueError("not an XML document")
    return root


def _first(root, name: str) -> str | None:
    found = root.xpath(f"//*[local-name()='{name}']")
    text = found[0].text if found else None
    return text.strip() if text and text.strip() else None


def _epub_chapters(book: zipfile.ZipFile) -> tuple[list[str], dict]:
    """Paths of the chapters in reading order, and the book's title, author and language."""
    container = _xml(book.read("META-INF/container.xml"))
    rootfiles = container.xpath("//*[local-name()='rootfile']/@full-path")
    if not rootfiles:
        raise ValueError("META-INF/container.xml names no package (.opf) file")
    opf_path = str(rootfiles[0])
    opf = _xml(book.read(opf_path))
    folder = posixpath.dirname(opf_path)
    hrefs = {item.get("id"): item.get("href") for item in opf.xpath("//*[local-name()='manifest']/*[@href]")}
    chapters = []
    for ref in opf.xpath("//*[local-name()='spine']/*[local-name()='itemref']/@idref"):
        href = hrefs.get(str(ref))
        if href:
            chapters.append(posixpath.normpath(posixpath.join(folder, href.split("#")[0])))
    meta = {k: v for k, v in (("title", _first(opf, "title")), ("author", _first(opf, "creator")),
                              ("language", _first(opf, "language"))) if v}
    return chapters, meta


def read_epub_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                   opts: FileOptions) -> Iterator[Document]:
    """One document per EPUB book: the text of its chapters in spine order, joined by blank lines."""
    def bad(message: str) -> None:
        if explicit:
            problem(stats, opts, "unreadable", message)
        else:
            stats.skip("unreadable", message)

    if compression:
        bad(f"{path}: an EPUB is already a zip archive; pass it uncompressed")
        return
    try:
        with path.open("rb") as raw, zipfile.ZipFile(raw) as book:
            chapters, meta = _epub_chapters(book)
            texts = []
            for name in chapters:
                data = book.read(name)
                if binary_reason(data) == "binary":
                    continue  # an image or font listed in the spine by mistake
                text, _ = html_to_text(data, recall=True)
                if text:
                    texts.append(text)
    except (zipfile.BadZipFile, KeyError, ValueError, SyntaxError) as e:
        bad(f"{path}: not a readable EPUB ({e})")
        return
    stats.files += 1
    if not texts:
        stats.skip("no_text", f"{path}: no text in the EPUB chapters")
        return
    stats.documents += 1
    yield Document(id=base, text="\n\n".join(texts), source=str(path),
                   meta={"path": str(path), "chapters": len(texts), **meta})
