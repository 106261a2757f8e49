"""Prometheus metrics of the server (``GET /metrics``), with ``prometheus_client``.

Each app has its own registry (several servers may live in one process, as in
the tests). Gauges and token counters are read from the scheduler when scraped;
responses, errors and latencies are recorded by an ASGI middleware that sees
every response's status, including streams, whose latency ends with their last
byte.

Metric names::

    lmforge_requests_running          requests admitted to the decode batch
    lmforge_requests_waiting          requests queued for a slot
    lmforge_batch_rows                sequences in the decode batch (n counts each)
    lmforge_prompt_tokens_total       prompt tokens prefilled
    lmforge_generation_tokens_total   tokens generated
    lmforge_decode_steps_total        batched decode steps run (a step gives each row 1 token, up to serve.lookahead greedy ones)
    lmforge_http_responses_total{endpoint,status}
    lmforge_errors_total{status}      error responses, and errors sent inside a stream (status 500)
    lmforge_request_latency_seconds{endpoint}   from request to last byte
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.scheduler import Scheduler

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class _SchedulerCounters(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.scheduler
        yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens prefilled.", value=s.prompt_tokens)
        yield CounterMetricFamily("lmforge_generation_tokens", "Tokens generated.", value=s.generated_tokens)
        yield CounterMetricFamily("lmforge_decode_steps", "Batched decode steps run.", value=s.steps)


class ServerMetrics:
    """The metrics of one server; :meth:`render` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lmforge_requests_running", "Requests admitted to the decode batch.", registry=r) \
            .set_function(lambda: scheduler.running)
        Gauge("lmforge_requests_waiting", "Requests queued for a slot in the batch.", registry=r) \
            .set_function(lambda: scheduler.waiting)
        Gauge("lmforge_batch_rows", "Sequences in the decode batch.", registry=r) \
            .set_function(lambda: scheduler.running_rows)
        r.register(_SchedulerCounters(scheduler))
        self.responses = Counter("lmforge_http_responses", "HTTP responses by endpoint and status.",
                                 ["endpoint", "status"], registry=r)
        self.errors = Counter("lmforge_errors", "Error responses and in-stream errors by status.", ["status"],
                              registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to the last byte sent.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def stream_error(self) -> None:
        """An error event sent inside a stream that had begun with status 200."""
        self.errors.labels(status="500").inc()


class MetricsMiddleware:
    """Pure ASGI middleware (so streams and disconnect handling pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        start, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.responses.labels(endpoint=endpoint, status=str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
