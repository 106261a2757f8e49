"""Polite HTTP fetching for the web reader: robots.txt, a per-host rate limit, retries, a size cap.

:class:`Fetcher` wraps one ``httpx.Client`` (sending ``web.user_agent``) and, for
every request, in order:

1. checks the URL against its site's robots.txt (fetched once per site and cached;
   read as RFC 9309 says: a 4xx robots.txt allows everything, a 5xx or an unreachable
   one disallows everything). A ``Crawl-delay`` there raises the host's delay;
2. waits until ``web.delay_s`` seconds have passed since the last request to that host;
3. sends the request; a timeout, connection error, 429 or 5xx is retried up to
   ``web.retries`` times, waiting ``backoff_s``, then twice that, ... (a 429's
   ``Retry-After`` is honoured up to a minute);
4. follows up to 5 redirects itself, so each hop passes steps 1 and 2;
5. streams the body and gives up past ``web.max_bytes`` (after decompression).

Failures raise :class:`FetchError` with a short ``reason`` (``timeout``, ``http_404``,
``robots_disallowed``, ``too_large``, ...) that the collect stage counts::

    with Fetcher(cfg.collect.web) as fetcher:
        page = fetcher.get("https://example.org/")   # Page(url, status, content_type, body, ...)
"""

from __future__ import annotations

import time
import urllib.robotparser
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from lmforge.config import WebConfig
from lmforge.data.sources import DataError

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_S = 60.0


class FetchError(Exception):
    """A page that could not be fetched; ``reason`` is the accounting key, the message says what happened."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Page:
    url: str  # as requested
    final_url: str  # after redirects
    status: int
    content_type: str  # media type without parameters, lowercased
    charset: str | None
    body: bytes


class HostLimiter:
    """At least ``delay`` seconds between the starts of two requests to one host."""

    def __init__(self, delay_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.delay_s = delay_s
        self.clock, self.sleep = clock, sleep
        self.next_at: dict[str, float] = {}
        self.delays: dict[str, float] = {}  # per-host delays raised by robots.txt Crawl-delay

    def wait(self, host: str) -> None:
        now = self.clock()
        ready = self.next_at.get(host, now)
        if ready > now:
            self.sleep(ready - now)
            now = ready
        self.next_at[host] = now + max(self.delay_s, self.delays.get(host, 0.0))


class Fetcher:
    """HTTP GET with robots.txt, rate limit, retries and a size cap; use as a context manager."""

    def __init__(self, web: WebConfig, limiter: HostLimiter | None = None) -> None:
        try:
            import httpx
        except ImportError:
            raise DataError("web sources need httpx (pip install 'lmforge[data]')") from None

        self.web = web
        self.limiter = limiter or HostLimiter(web.delay_s)
        self.client = httpx.Client(headers={"User-Agent": web.user_agent}, timeout=httpx.Timeout(web.timeout_s),
                                   follow_redirects=False)
        self.robots: dict[str, urllib.robotparser.RobotFileParser | bool] = {}
        self.requests = 0

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    # ------------------------------------------------------------------ robots
    def allowed(self, url: str) -> bool:
        """Whether robots.txt lets ``web.user_agent`` fetch ``url`` (always True with web.robots off)."""
        if not self.web.robots:
            return True
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:
            self.robots[origin] = self._load_robots(origin, parts.netloc)
        rules = self.robots[origin]
        return rules if isinstance(rules, bool) else rules.can_fetch(self.web.user_agent, url)

    def _load_robots(self, origin: str, host: str) -> urllib.robotparser.RobotFileParser | bool:
        url = origin + "/robots.txt"
        try:
            for _ in range(MAX_REDIRECTS + 1):
                status, headers, _, body = self._request(url)
                if status not in REDIRECTS or not headers.get("location"):
                    break
                url = urljoin(url, headers["location"])
        except FetchError:
            return False  # unreachable: RFC 9309 says assume complete disallow
        if 400 <= status < 500:
            return True
        if status >= 300:
            return False
        rules = urllib.robotparser.RobotFileParser()
        rules.parse(body.decode("utf-8", errors="replace").splitlines())
        delay = rules.crawl_delay(self.web.user_agent)
        if delay:
            self.limiter.delays[host] = float(delay)
        return rules

    # ---------------------------------------------------------------- fetching
    def get(self, url: str) -> Page:
        """Fetch ``url``, following redirects; raises :class:`FetchError` on any failure."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(current).scheme not in ("http", "https"):
                raise FetchError("bad_url", f"{current}: only http and https URLs can be fetched")
            if not self.allowed(current):
                raise FetchError("robots_disallowed", f"{current}: disallowed by robots.txt")
            status, headers, media, body = self._request(current)
            if status in REDIRECTS and headers.get("location"):
                current = urljoin(current, headers["location"])
                continue
            if status != 200:
                raise FetchError(f"http_{status}", f"{current}: HTTP {status}")
            content_type, _, params = media.partition(";")
            charset = None
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key.lower() == "charset" and value:
                    charset = value.strip('"').lower()
            return Page(url, current, status, content_type.strip().lower(), charset, body)
        raise FetchError("too_many_redirects", f"{url}: more than {MAX_REDIRECTS} redirects")

    def _request(self, url: str) -> tuple[int, dict[str, str], str, bytes]:
        """One GET with retries: ``(status, headers, content type, body)``."""
        import httpx

        host = urlsplit(url).netloc
        attempts = self.web.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            self.limiter.wait(host)
            self.requests += 1
            wait = self.web.backoff_s * 2**attempt
            try:
                with self.client.stream("GET", url) as response:
                    status = response.status_code
                    if (status == 429 or status >= 500) and not last:
                        retry_after = response.headers.get("retry-after", "")
                        if retry_after.isdigit():
                            wait = min(float(retry_after), MAX_RETRY_AFTER_S)
                        self.limiter.sleep(wait)
                        continue
                    body = self._body(url, response) if status == 200 else b""
                    return status, dict(response.headers), response.headers.get("content-type", ""), body
            except httpx.TimeoutException:
                reason, message = "timeout", f"{url}: no answer within {self.web.timeout_s:g}s"
            except httpx.TransportError as e:
                reason, message = "connection_error", f"{url}: {type(e).__name__}: {e}"
            except httpx.HTTPError as e:  # e.g. a malformed response
                reason, message = "http_error", f"{url}: {type(e).__name__}: {e}"
            if last:
                tries = f" (after {attempts} tries)" if attempts > 1 else ""
                raise FetchError(reason, message + tries)
            self.limiter.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _body(self, url: str, response) -> bytes:
        cap = self.web.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise FetchError("too_large", f"{url}: {int(declared):,} bytes is over web.max_bytes ({cap:,})")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > cap:  # counted after decompression, so a small gzip bomb stops here too
                raise FetchError("too_large", f"{url}: more than web.max_bytes ({cap:,}) bytes")
            chunks.append(chunk)
        return b"".join(chunks)
