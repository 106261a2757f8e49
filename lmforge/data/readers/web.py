"""Web reader: pages from a list of URLs, a file of URLs or a sitemap, as documents.

Each page is fetched politely by :class:`~lmforge.data.readers.fetch.Fetcher`
(robots.txt, per-host delay, retries, size cap, user agent). HTML pages are reduced
to their main text with trafilatura; ``text/plain`` and ``text/markdown`` pages are
kept as they are; other content types are skipped. A sitemap may be a sitemap index
(followed up to 3 levels) and may be gzip-compressed. ::

    stats = ReadStats()
    for doc in read_web(source, cfg.collect.web, stats, strict=False):
        doc.meta   # {'url', 'status', 'fetched_at', 'content_type', 'bytes', 'title', ...}
    stats.skipped  # e.g. {'http_404': 1, 'robots_disallowed': 2, 'timeout': 1}

A page that fails is counted under its reason and the rest go on; with ``strict``
the first failure raises :class:`DataError`.
"""

from __future__ import annotations

import datetime as dt
import gzip
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import SourceConfig, WebConfig
from lmforge.data.readers.fetch import Fetcher, FetchError
from lmforge.data.readers.markup import html_to_text
from lmforge.data.sources import DataError, Document, FileOptions, ReadStats, problem

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown")
SITEMAP_DEPTH = 3


def _urls_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"urls_file not found: {path}")
    urls = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):  # whole-line comments only: URLs may hold '#'
            urls.append(line)
    return urls


def _xml_locs(body: bytes) -> tuple[str, list[str]]:
    """``('urlset' | 'sitemapindex', [loc, ...])`` of a sitemap document."""
    from lxml import etree

    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, recover=True)
    root = etree.fromstring(body, parser=parser)
    if root is None:
        raise ValueError("not XML")
    kind = etree.QName(root).localname
    locs = [str(t).strip() for t in root.xpath("//*[local-name()='loc']/text()") if str(t).strip()]
    return kind, locs


def sitemap_urls(url: str, fetcher: Fetcher, stats: ReadStats, opts: FileOptions, depth: int = 0) -> Iterator[str]:
    """The page URLs a sitemap lists, following sitemap indexes."""
    try:
        page = fetcher.get(url)
        kind, locs = _xml_locs(page.body)
    except FetchError as e:
        problem(stats, opts, f"sitemap_{e.reason}", f"sitemap {e}")
        return
    except (ValueError, OSError, SyntaxError) as e:
        problem(stats, opts, "sitemap_invalid", f"sitemap {url}: not a readable sitemap ({e})")
        return
    if kind == "sitemapindex":
        if depth >= SITEMAP_DEPTH:
            problem(stats, opts, "sitemap_too_deep", f"sitemap {url}: nested more than {SITEMAP_DEPTH} levels")
            return
        for child in locs:
            yield from sitemap_urls(child, fetcher, stats, opts, depth + 1)
    else:
        yield from locs


def page_urls(source: SourceConfig, fetcher: Fetcher, stats: ReadStats, opts: FileOptions) -> Iterator[str]:
    """Every URL of a web source, in order: ``urls``, then ``urls_file``, then the sitemap's; each once."""
    seen: set[str] = set()
    lists = [iter(source.urls), iter(_urls_file(source.urls_file)) if source.urls_file else iter(()),
             sitemap_urls(source.sitemap, fetcher, stats, opts) if source.sitemap else iter(())]
    for urls in lists:
        for url in urls:
            if url in seen:
                stats.skip("duplicate_url", url)
                continue
            seen.add(url)
            yield url


def page_document(url: str, fetcher: Fetcher) -> Document:
    """Fetch one page and turn it into a document; raises :class:`FetchError` when it gives no text."""
    fetched_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    page = fetcher.get(url)
    meta: dict = {}
    if page.content_type in HTML_TYPES:
        text, meta = html_to_text(page.body, url=page.final_url)
    elif page.content_type in TEXT_TYPES:
        text = page.body.decode(page.charset or "utf-8", errors="replace")
    else:
        raise FetchError("unsupported_content", f"{url}: content type '{page.content_type}' is not text or HTML")
    if not text.strip():
        raise FetchError("no_text", f"{url}: no main text found")
    meta = {"url": url, **({"final_url": page.final_url} if page.final_url != url else {}),
            "status": page.status, "fetched_at": fetched_at, "content_type": page.content_type,
            "bytes": len(page.body), **meta}
    return Document(id=url, text=text, source=url, meta=meta)


def read_web(source: SourceConfig, web: WebConfig, stats: ReadStats, strict: bool,
             fetcher: Fetcher | None = None) -> Iterator[Document]:
    """The pages of a web source as documents; failed pages are counted by reason (or raise with strict)."""
    opts = FileOptions(strict=strict)
    own = fetcher is None
    fetcher = fetcher or Fetcher(web)
    try:
        fetched = 0
        for url in page_urls(source, fetcher, stats, opts):
            if web.max_pages and fetched >= web.max_pages:
                stats.skip("over_max_pages", url)
                continue
            fetched += 1
            try:
                doc = page_document(url, fetcher)
            except FetchError as e:
                problem(stats, opts, e.reason, str(e))
                continue
            stats.files += 1
            stats.documents += 1
            yield doc
    finally:
        if own:
            fetcher.client.close()
