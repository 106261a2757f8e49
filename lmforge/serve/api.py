"""``lmforge serve RUN_OR_DIR``: an OpenAI-compatible HTTP server, a chat page, health and metrics.

Endpoints::

    POST /v1/completions        prompt (string, strings, token ids); echo + logprobs scores prompts
    POST /v1/chat/completions   messages, rendered with the ChatML template of lmforge's tokenizer
    GET  /v1/models             the served model, with its context length
    GET  /health                200 {"status": "ok"} while the scheduler runs
    GET  /metrics               Prometheus text
    GET  /                      the chat page (lmforge/serve/web)

Run it::

    lmforge serve runs/demo                          # http://127.0.0.1:8000
    lmforge serve runs/demo --serve.port=8080 --serve.api_key=secret --serve.max_batch=64

and call it with any OpenAI client (``base_url="http://127.0.0.1:8000/v1"``). Errors
follow vLLM: ``{"error": {"message", "type", "param", "code"}}`` with status 400 (bad
JSON or fields, too long for the context), 401 (API key), 404 (unknown model or
path), 413 (body too large), 429 (queue full, with Retry-After). The server binds
127.0.0.1 unless ``serve.host`` says otherwise. See docs/serving.md.
"""

from __future__ import annotations

import hmac
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from lmforge.config import RunConfig, ServeConfig
from lmforge.serve import responses as R
from lmforge.serve.engine import Engine
from lmforge.serve.handlers import Generation
from lmforge.serve.protocol import APIError
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.telemetry import MetricsMiddleware, ServerMetrics

WEB = Path(__file__).parent / "web"


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {int(declared)} bytes; this server accepts at most {limit} "
                            f"(serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON error body with its status code; never a traceback."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return _error(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(APIError(400, str(exc.errors()[0].get("msg", exc))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def create_app(engine: Engine, cfg: ServeConfig, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server's ASGI app; the scheduler thread starts and stops with the app's lifespan.

    ``app.state.scheduler`` is the :class:`~lmforge.serve.scheduler.Scheduler` (tests
    wait on it), ``app.state.metrics`` the :class:`~lmforge.serve.telemetry.ServerMetrics`.
    """
    scheduler = Scheduler(engine, max_batch=cfg.max_batch, max_waiting=cfg.max_waiting)
    metrics = ServerMetrics(scheduler)
    generation = Generation(engine, scheduler, metrics, model_name, cfg.default_max_tokens)
    created = R.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.model_name = scheduler, metrics, model_name
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not scheduler.alive:
            raise APIError(503, "the decoding thread is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        limit = engine.max_state_len
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge", "root": model_name,
                "max_model_len": limit, "context_length": limit}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        return await generation.completions(request, await read_body(request, cfg.max_body_bytes))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        return await generation.chat(request, await read_body(request, cfg.max_body_bytes))

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    return app


def main(cfg: RunConfig, args: list[str]) -> None:
    """The ``serve`` verb: load the model (run folder, checkpoint or exported folder), then serve until ^C."""
    import torch
    import uvicorn

    from lmforge.runtime import pick_device
    from lmforge.trained import load_model

    sc = cfg.serve
    if sc.threads:
        torch.set_num_threads(sc.threads)
    path = Path(args[0] if args else cfg.run_dir)
    device = pick_device(sc.device)
    tm = load_model(path, device)
    name = sc.model_name or tm.name
    engine = Engine(tm.model, tm.tokenizer, device=device, max_batch=sc.max_batch, compile=sc.compile,
                    lookahead=sc.lookahead)
    key = sc.api_key or os.environ.get("LMFORGE_API_KEY") or None
    app = create_app(engine, sc, name, api_key=key)
    print(f"serving '{name}' ({tm.cfg.model.arch}, {tm.model.num_params():,} parameters, context "
          f"{engine.max_state_len or 'unbounded'}) from {tm.path} on {device}; API key "
          f"{'required' if key else 'off'}", file=sys.stderr)
    uvicorn.run(app, host=sc.host, port=sc.port, log_level="info", timeout_graceful_shutdown=5)
