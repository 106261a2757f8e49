"""Helpers for the serving and export tests: tiny runs on disk and live servers on 127.0.0.1.

A "tiny run" is a real run folder (tokenizer/ and train/ckpt/step_000000) holding a
byte-level BPE tokenizer trained on two works of the embedded corpus and a randomly
initialised model, written through the checkpoint module exactly as training does,
so ``lmforge serve`` / ``export`` load it like any run. The wide init (0.3) spreads
the logits, so greedy decoding is decisive and stop strings are reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import RunConfig, ServeConfig, TokenizerConfig
from lmforge.data.sources import embedded_corpus
from lmforge.data.tokenizer import tokenizer_digest, train_tokenizer
from lmforge.models import build_model
from lmforge.serve.api import create_app
from lmforge.serve.background import BackgroundServer
from lmforge.serve.engine import Engine
from lmforge.train.checkpoint import Checkpointer
from lmforge.trained import load_model

CONTEXT = 128


def make_run(root: Path, arch: str = "transformer", context: int = CONTEXT, **model: object) -> Path:
    """A run folder with a trained tokenizer and an untrained ``arch`` model saved as its checkpoint."""
    texts = [d.text[:150_000] for d in embedded_corpus() if d.id in ("sonnets", "tempest")]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400), texts)
    run = root / f"tiny-{arch}"
    tok_path = tok.save(run / "tokenizer")
    spec = {"arch": arch, "vocab_size": tok.vocab_size, "context": context, "d_model": 32, "n_layers": 2,
            "init_std": 0.3, "transformer": {"n_heads": 2}, **model}
    cfg = RunConfig(name=f"tiny-{arch}", model=spec)
    torch.manual_seed(0)
    state = {"step": 0, "config": cfg.model_dump(mode="json"), "tokenizer_sha256": tokenizer_digest(tok_path)}
    Checkpointer(run / "train" / "ckpt", build_model(cfg.model), None, state).write(0)
    return run


def server_for(run: Path, model: torch.nn.Module | None = None, **serve: object) -> BackgroundServer:
    """A started server for ``run`` (optionally with another model object), with ServeConfig overrides."""
    tm = load_model(run)
    cfg = ServeConfig(**serve)
    engine = Engine(model if model is not None else tm.model, tm.tokenizer, max_batch=cfg.max_batch)
    app = create_app(engine, cfg, cfg.model_name or tm.cfg.name, api_key=cfg.api_key)
    return BackgroundServer(app).start()


def sse_events(lines: list[str]) -> list[dict | str]:
    """The payloads of ``data:`` lines (JSON decoded, ``[DONE]`` kept as text)."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(response, status: int, param: str | None = "any") -> dict:
    """The response is a vLLM-style error with this status; returns its ``error`` object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param
    return error
