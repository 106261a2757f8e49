"""Serving wrapped and imported Hugging Face models: the OpenAI-compatible API and ``lmforge chat``.

Run: ``pytest tests/serve/test_serve_hf.py``. Greedy completions over HTTP must equal
transformers' own ``generate`` from the same prompt ids, for every family of
tests/hf_families.py, also while two requests of different lengths share the decode batch.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmforge.data.chat import render_chat
from lmforge.serve.background import BackgroundServer
from lmforge.trained import load_model
from tests.conftest import ROOT
from tests.hf_families import FAMILIES, reference_greedy
from tests.in_process import call_cli

PROMPTS = ["To be, or not", "whether 'tis nobler in the mind to suffer the slings and arrows"]


def expected_text(folder, prompt: str, n: int) -> str:
    tok = load_tokenizer(folder)
    return tok.decode(reference_greedy(folder, tok.with_bos(tok.encode(prompt)), n, tok.end_ids),
                      skip_special_tokens=True)


@functools.cache
def load_tokenizer(folder):
    return load_model(folder).tokenizer


def complete(url: str, prompt: str, n: int, model: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_completions_over_http_equal_transformers_generate(name, hf_family_folders):
    folder = hf_family_folders[name]
    # Two requests at once: rows of different lengths in one batch.
    with BackgroundServer.for_model(folder) as server, ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda p: complete(server.url, p, 10, name), PROMPTS))
    assert texts == [expected_text(folder, p, 10) for p in PROMPTS]


def test_lmforge_serve_command_serves_a_wrapped_model(hf_family_folders, tmp_path):
    """``lmforge serve FOLDER`` in its own process, on a Gemma 3 (sliding-window layers) that loads wrapped."""
    folder = hf_family_folders["gemma3"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(folder), f"--serve.port={port}"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # wait for the process to listen (start-up imports take a few seconds)
            assert proc.poll() is None, proc.communicate()[1]
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["id"] == "gemma3" and models[0]["max_model_len"] == 64
        assert complete(url, PROMPTS[1], 12, "gemma3") == expected_text(folder, PROMPTS[1], 12)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_chat_replies_with_the_models_own_greedy_tokens(hf_family_folders, capsys, monkeypatch):
    folder = hf_family_folders["qwen2.5"]
    tok = load_model(folder).tokenizer
    messages = [{"role": "user", "content": "hello"}]
    ids = tok.with_bos(render_chat(tok, messages, add_generation_prompt=True))
    reply = tok.decode(reference_greedy(folder, ids, 8, tok.end_ids), skip_special_tokens=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert call_cli("chat", str(folder), "--sample.temperature=0", "--sample.max_new_tokens=8") == 0
    assert f"model> {reply}\n" in capsys.readouterr().out
