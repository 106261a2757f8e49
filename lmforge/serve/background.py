"""Run the server inside this process, in a background thread: for notebooks, tests and benchmarks.

``lmforge serve`` is the command line way; this is the Python one::

    from lmforge.serve.background import BackgroundServer
    with BackgroundServer.for_model("runs/demo") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        print(client.completions.create(model=server.model_name, prompt="ROMEO:").choices[0].text)

The socket is bound before the thread starts (port 0 = any free port), so
``server.port`` is known at once; ``start()`` returns when uvicorn has started.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from lmforge.config import ServeConfig


class BackgroundServer:
    """uvicorn serving ``app`` on ``host:port`` in a daemon thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lmforge-uvicorn", daemon=True)

    @classmethod
    def for_model(cls, path: str | Path, cfg: ServeConfig | None = None, device: str = "cpu") -> BackgroundServer:
        """A server for a run, checkpoint or exported folder, as ``lmforge serve PATH`` would build it."""
        from lmforge.serve.api import create_app
        from lmforge.serve.engine import Engine
        from lmforge.trained import load_model

        cfg = cfg or ServeConfig()
        tm = load_model(Path(path), device)
        engine = Engine(tm.model, tm.tokenizer, device=device, max_batch=cfg.max_batch, compile=cfg.compile,
                        lookahead=cfg.lookahead)
        return cls(create_app(engine, cfg, cfg.model_name or tm.name, api_key=cfg.api_key), cfg.host, cfg.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI clients' ``base_url``."""
        return f"{self.url}/v1"

    @property
    def model_name(self) -> str:
        return self.app.state.model_name

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        started = threading.Event()
        # uvicorn flips `started` once its startup (and the app's lifespan) has run; there is no hook to wait on.
        while not self.server.started and self.thread.is_alive() and not started.wait(0.01):
            timeout -= 0.01
            if timeout <= 0:
                raise TimeoutError(f"the server on {self.url} did not start")
        if not self.server.started:
            raise RuntimeError(f"the server on {self.url} failed to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
