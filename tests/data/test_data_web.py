"""The web reader against a real HTTP server on 127.0.0.1: robots.txt, sitemap, 404, timeout, retries, limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.config import SourceConfig, WebConfig
from lmforge.data.readers.fetch import Fetcher, HostLimiter
from lmforge.data.readers.web import read_web
from lmforge.data.sources import DataError, ReadStats

ARTICLE = ("<html><head><title>{t}</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>News</a></nav>"
           "<article><h1>{t}</h1><p>{t} is the subject of this page, which has a paragraph long enough to be "
           "taken as the main text by the extractor, with several clauses and a full stop.</p><p>A second "
           "paragraph adds more about {t}, so that the page reads like an article rather than a stub.</p>"
           "</article><footer>Privacy policy | Terms</footer></body></html>")
UA = "lmforge-test/1.0 (+tests)"


class Site:
    """A small web site: pages, a robots.txt, a sitemap, failures; records every request."""

    def __init__(self) -> None:
        self.release = threading.Event()  # the slow page answers only when this is set (at teardown)
        self.requests: list[tuple[str, str]] = []
        self.flaky_left = 1
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                site.requests.append((self.path, self.headers.get("User-Agent", "")))
                site.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path == "/slow.html":
            self.release.wait(10)
            return self.send(h, 200, "text/html", ARTICLE.format(t="Slow"))
        if path == "/flaky.html" and self.flaky_left > 0:
            self.flaky_left -= 1
            return self.send(h, 503, "text/plain", "busy", {"Retry-After": "3"})
        pages = {
            "/robots.txt": ("text/plain", "User-agent: *\nDisallow: /private/\nCrawl-delay: 2\n"),
            "/sitemap.xml": ("application/xml", self.sitemap()),
            "/a.html": ("text/html; charset=utf-8", ARTICLE.format(t="Apples")),
            "/b.txt": ("text/plain; charset=utf-8", "Plain text page about bees."),
            "/c.html": ("text/html", ARTICLE.format(t="Cherries")),
            "/flaky.html": ("text/html", ARTICLE.format(t="Figs")),
            "/private/secret.html": ("text/html", ARTICLE.format(t="Secrets")),
            "/big.html": ("text/html", "<p>" + "x" * 20_000 + "</p>"),
            "/image.png": ("image/png", "\x89PNG"),
        }
        if path == "/old.html":
            return self.send(h, 301, "text/plain", "", {"Location": "/c.html"})
        if path not in pages:
            return self.send(h, 404, "text/plain", "not found")
        return self.send(h, 200, *pages[path])

    def sitemap(self) -> str:
        locs = ["a.html", "b.txt", "old.html", "private/secret.html", "missing.html", "slow.html", "big.html",
                "image.png", "flaky.html", "a.html"]
        urls = "".join(f"<url><loc>{self.base}/{p}</loc></url>" for p in locs)
        return f'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>'

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, ctype: str, body: str, headers: dict | None = None) -> None:
        data = body.encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


class FakeTime:
    """A clock that only moves when something sleeps: rate limits and backoff are checked without waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def _web(**kw: object) -> WebConfig:
    return WebConfig(**{"user_agent": UA, "delay_s": 0.5, "timeout_s": 0.4, "retries": 1, "backoff_s": 0.25,
                        "max_bytes": 4096, **kw})


def test_sitemap_crawl_counts_every_page(site: Site) -> None:
    web, fake = _web(), FakeTime()
    stats = ReadStats()
    with Fetcher(web, HostLimiter(web.delay_s, fake.clock, fake.sleep)) as fetcher:
        docs = list(read_web(SourceConfig(sitemap=f"{site.base}/sitemap.xml"), web, stats, strict=False, fetcher=fetcher))
    by_url = {d.id.rsplit("/", 1)[1]: d for d in docs}
    assert sorted(by_url) == ["a.html", "b.txt", "flaky.html", "old.html"]
    assert "subject of this page" in by_url["a.html"].text and "Privacy" not in by_url["a.html"].text
    assert by_url["a.html"].meta["title"] == "Apples" and by_url["a.html"].meta["status"] == 200
    assert by_url["b.txt"].text == "Plain text page about bees."
    assert by_url["old.html"].meta["final_url"] == f"{site.base}/c.html" and "Cherries" in by_url["old.html"].text
    assert "fetched_at" in by_url["a.html"].meta
    assert stats.skipped == {"robots_disallowed": 1, "http_404": 1, "timeout": 1, "too_large": 1,
                             "unsupported_content": 1, "duplicate_url": 1}
    assert stats.examples["timeout"] == [f"{site.base}/slow.html: no answer within 0.4s (after 2 tries)"]
    paths = [p for p, _ in site.requests]
    assert paths.count("/robots.txt") == 1 and "/private/secret.html" not in paths
    assert paths.count("/slow.html") == 2  # one retry after the timeout
    assert paths.count("/flaky.html") == 2  # 503, then success
    assert {ua for _, ua in site.requests} == {UA}
    # Crawl-delay 2 raised the per-host delay from 0.5 s; Retry-After 3 was honoured; the timeout backed off 0.25 s.
    assert fetcher.limiter.delays == {site.base.removeprefix("http://"): 2.0}
    assert 3.0 in fake.sleeps and 0.25 in fake.sleeps
    assert all(s <= 3.0 for s in fake.sleeps)


def test_urls_list_and_strict_mode(site: Site, tmp_path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# pages\n{site.base}/a.html\n{site.base}/missing.html\n", encoding="utf-8")
    web, fake = _web(retries=0), FakeTime()
    stats = ReadStats()
    with Fetcher(web, HostLimiter(0.0, fake.clock, fake.sleep)) as fetcher:
        docs = list(read_web(SourceConfig(urls_file=str(listing)), web, stats, strict=False, fetcher=fetcher))
        assert [d.id for d in docs] == [f"{site.base}/a.html"] and stats.skipped == {"http_404": 1}
        with pytest.raises(DataError, match=r"missing\.html: HTTP 404"):
            list(read_web(SourceConfig(urls=[f"{site.base}/missing.html"]), web, ReadStats(), strict=True,
                          fetcher=fetcher))


def test_robots_can_be_ignored_and_pages_capped(site: Site) -> None:
    web, fake = _web(robots=False, max_pages=1), FakeTime()
    stats = ReadStats()
    with Fetcher(web, HostLimiter(0.0, fake.clock, fake.sleep)) as fetcher:
        src = SourceConfig(urls=[f"{site.base}/private/secret.html", f"{site.base}/a.html"])
        docs = list(read_web(src, web, stats, strict=False, fetcher=fetcher))
    assert [d.meta["title"] for d in docs] == ["Secrets"]
    assert stats.skipped == {"over_max_pages": 1}
    assert "/robots.txt" not in [p for p, _ in site.requests]


def test_host_limiter_spaces_requests_per_host() -> None:
    fake = FakeTime()
    limiter = HostLimiter(1.0, fake.clock, fake.sleep)
    limiter.wait("a")
    limiter.wait("b")  # another host: no wait
    limiter.wait("a")
    fake.now += 0.25
    limiter.wait("a")
    assert fake.sleeps == [1.0, 0.75]
