"""Serving benchmark: concurrent streaming clients against `lmforge serve`, and batch-1 decoding vs transformers.

What it measures, side by side in one run on one machine:

1. 32 concurrent streaming clients (``--burst``) all finish: each gets exactly
   ``--tokens`` tokens (``ignore_eos``), a final chunk with ``finish_reason`` and ``[DONE]``;
2. aggregate generated tokens/s with 16 concurrent clients (``--clients``) vs 1 client:
   continuous batching should make the ratio well above 1 (the issue asks for >= 4);
3. decoding tokens/s at batch 1 (no HTTP): lmforge's engine vs ``transformers``'
   ``generate`` on the same weights exported with ``lmforge export --format hf``.

The model is a randomly initialised Transformer of the given size (speed does not
depend on the weights' values) with a BPE tokenizer trained on the embedded corpus,
saved as a run; the server runs as ``python -m lmforge serve`` in a subprocess so
the clients do not share its interpreter. Run::

    .venv/bin/python benchmarks/serve_load.py                       # full size (several minutes)
    .venv/bin/python benchmarks/serve_load.py --d-model 64 --layers 2 --context 128 --tokens 16 \\
        --rounds 1 --burst 8 --clients 4 --vocab 512                  # a quick check that it runs

It prints one line per measurement and the two ratios; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.config import RunConfig, TokenizerConfig  # noqa: E402
from lmforge.data.sources import embedded_corpus  # noqa: E402
from lmforge.data.tokenizer import tokenizer_digest, train_tokenizer  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.train.checkpoint import Checkpointer  # noqa: E402
from lmforge.trained import load_model  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def make_run(root: Path, args: argparse.Namespace) -> Path:
    """A run folder holding a trained tokenizer and a random Transformer checkpoint of the requested size."""
    texts = [d.text for d in embedded_corpus()][:8]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=args.vocab), texts)
    run = root / "bench"
    tok_path = tok.save(run / "tokenizer")
    cfg = RunConfig(name="bench", model={"arch": "transformer", "vocab_size": tok.vocab_size, "context": args.context,
                                         "d_model": args.d_model, "n_layers": args.layers,
                                         "transformer": {"n_heads": args.heads}})
    torch.manual_seed(0)
    state = {"step": 0, "config": cfg.model_dump(mode="json"), "tokenizer_sha256": tokenizer_digest(tok_path)}
    Checkpointer(run / "train" / "ckpt", build_model(cfg.model), None, state).write(0)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge", "serve", str(run), f"--serve.port={port}",
           f"--serve.max_batch={max(args.burst, args.clients)}", f"--serve.max_waiting={2 * args.burst}",
           f"--serve.threads={args.threads}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # a benchmark may poll: wait until the server answers
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


async def stream_one(client: httpx.AsyncClient, url: str, tokens: int) -> dict:
    """One streaming completion; returns its token count, finish reason and whether [DONE] came."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = {"tokens": 0, "finish": None, "done": False}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                out["finish"] = choice["finish_reason"] or out["finish"]
    return out


async def load(url: str, clients: int, rounds: int, tokens: int) -> tuple[float, list[dict]]:
    """``clients`` concurrent clients, each making ``rounds`` requests in turn: (seconds, results)."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker() -> list[dict]:
            return [await stream_one(client, url, tokens) for _ in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - start, [r for rs in results for r in rs]


def decode_speed(run: Path, tokens: int, repeats: int) -> tuple[float, float]:
    """Batch-1 greedy decoding tokens/s: (lmforge engine, transformers generate) on the same weights."""
    from transformers import AutoModelForCausalLM

    from lmforge.export.hf import export_hf
    from lmforge.serve.engine import Engine, SamplingParams

    tm = load_model(run)
    out = run / "export" / "hf"
    export_hf(tm, out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    engine = Engine(tm.model, tm.tokenizer)
    ids = tm.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, max_new_tokens=tokens, stop_token_ids=[])
    best = {"lmforge": 0.0, "transformers": 0.0}
    for _ in range(repeats):  # interleaved, best of each: both see the same machine load
        start = time.perf_counter()
        [c] = engine.generate([ids], params)
        best["lmforge"] = max(best["lmforge"], c.completion_tokens / (time.perf_counter() - start))
        with torch.inference_mode():
            start = time.perf_counter()
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=tm.tokenizer.pad_id)
        n = gen.shape[1] - len(ids)
        best["transformers"] = max(best["transformers"], n / (time.perf_counter() - start))
    return best["lmforge"], best["transformers"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128, help="model width (128 x 4 layers: the CPU demo size)")
    ap.add_argument("--layers", type=int, default=4, help="Transformer blocks")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--context", type=int, default=512, help="context length in tokens")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--burst", type=int, default=32, help="concurrent streaming clients in the all-finish check")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients for the throughput ratio")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client in the throughput runs")
    ap.add_argument("--repeats", type=int, default=3, help="batch-1 decoding runs per side (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for server and decoding (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; model d_model="
          f"{args.d_model} layers={args.layers} heads={args.heads} context={args.context} vocab={args.vocab}")
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        run = make_run(Path(tmp), args)
        port = free_port()
        server = start_server(run, port, args)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            asyncio.run(load(url, 1, 1, 4))  # warm-up
            seconds, results = asyncio.run(load(url, args.burst, 1, args.tokens))
            ok = sum(r["done"] and r["finish"] == "length" and r["tokens"] == args.tokens for r in results)
            print(f"burst: {ok}/{args.burst} concurrent streaming clients finished correctly in {seconds:.1f} s")
            rates = {}
            for clients in (1, args.clients):
                seconds, results = asyncio.run(load(url, clients, args.rounds, args.tokens))
                rates[clients] = sum(r["tokens"] for r in results) / seconds
                print(f"{clients:>3} client(s): {rates[clients]:8.1f} generated tokens/s "
                      f"({len(results)} requests x {args.tokens} tokens in {seconds:.1f} s)")
            print(f"batching ratio: {rates[args.clients] / rates[1]:.2f}x aggregate tokens/s at {args.clients} "
                  f"clients vs 1")
        finally:
            server.terminate()
            server.wait(30)
        ours, theirs = decode_speed(run, args.tokens, args.repeats)
        print(f"batch-1 decoding: lmforge {ours:.1f} tokens/s, transformers generate {theirs:.1f} tokens/s "
              f"(ratio {ours / theirs:.2f}x)")
        if ok != args.burst:
            raise SystemExit(f"{args.burst - ok} of {args.burst} burst clients did not finish correctly")


if __name__ == "__main__":
    main()
