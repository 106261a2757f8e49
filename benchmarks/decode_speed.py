"""Batch-1 decoding speed: lmforge's engine for every architecture, and against transformers' generate.

What it measures, side by side in one process on one machine (absolute numbers on
a shared machine are noisy; the ratios are what to read):

1. For the Transformer (the issue's 1.05M-parameter Llama: vocabulary 2,048, width
   128, 4 layers, 4 heads, tied embeddings): greedy decoding of ``--tokens`` new tokens
   at batch 1 with ``lmforge.serve.engine.Engine.generate``, against
   ``transformers``' ``generate`` on the same weights exported with
   ``lmforge.export.hf.export_hf`` (its ``LlamaForCausalLM`` with SDPA). The two
   are run in turns, ``--repeats`` times, and the best of each is kept, so both see
   the same machine load. Both must produce the same tokens (checked). With
   ``--compile`` (the default) a third side, ``Engine(compile=True)`` on a copy of
   the model, decodes through the compiled batch-1 step; it must choose the same
   tokens as the eager engine (checked); its compile time is printed.
2. For the LSTM, GRU and gated CNN of the same width and depth: the engine's tokens/s
   (transformers has no equal model to compare with).

The weights are random (speed does not depend on their values); the tokenizer is a
BPE trained on a few embedded works. Run::

    .venv/bin/python benchmarks/decode_speed.py                       # ~1 minute on 2 idle cores
    .venv/bin/python benchmarks/decode_speed.py --tokens 50 --repeats 2 --archs transformer   # quick check

Output: one line per architecture and the ratio; figures go to docs/benchmarks.md ("Speed").
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.config import RunConfig, TokenizerConfig  # noqa: E402
from lmforge.data.sources import embedded_corpus  # noqa: E402
from lmforge.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.serve.engine import Engine, SamplingParams  # noqa: E402
from lmforge.trained import TrainedModel  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def build(arch: str, tok: Tokenizer, args: argparse.Namespace) -> TrainedModel:
    cfg = RunConfig(name="decode-bench", model={
        "arch": arch, "vocab_size": tok.vocab_size, "context": args.context, "d_model": args.d_model,
        "n_layers": args.layers, "tie_embeddings": True, "transformer": {"n_heads": args.heads}})
    torch.manual_seed(0)
    return TrainedModel(build_model(cfg.model).eval(), tok, cfg, Path("."), 0)


def lmforge_rate(engine: Engine, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=tokens, stop_token_ids=[])
    start = time.perf_counter()
    [c] = engine.generate([ids], params)
    return c.completion_tokens / (time.perf_counter() - start), c.token_ids


def hf_rate(hf: torch.nn.Module, ids: list[int], tokens: int, pad_id: int) -> tuple[float, list[int]]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(torch.tensor([ids], device=hf.device), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=pad_id)
        seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    return len(new) / seconds, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per generation (greedy, no stop token)")
    ap.add_argument("--repeats", type=int, default=5, help="turns of each side; the best of each is kept")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--d-model", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="blocks")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (Transformer)")
    ap.add_argument("--context", type=int, default=256, help="context (>= prompt + tokens, so no re-prefill)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    ap.add_argument("--device", default="cpu", help="where both sides decode: cpu, cuda, cuda:1, ...")
    ap.add_argument("--archs", default="transformer,lstm,gru,cnn", help="comma-separated architectures")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the Transformer with its compiled decode step (Engine(compile=True))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    texts = [d.text for d in embedded_corpus()][:6]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=args.vocab), texts)
    ids = tok.encode(PROMPT)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"batch-1 greedy decoding, {args.tokens} new tokens after a {len(ids)}-token prompt, "
          f"{where}, best of {args.repeats}")
    for arch in args.archs.split(","):
        tm = build(arch, tok, args)
        engine = Engine(tm.model, tok, device=args.device)
        lmforge_rate(engine, ids, 8)  # warm-up: first-call allocations
        if arch != "transformer":
            best = max(lmforge_rate(engine, ids, args.tokens)[0] for _ in range(args.repeats))
            print(f"{arch:<12} lmforge {best:8.1f} tokens/s  ({tm.model.num_params():,} parameters)")
            continue
        from transformers import AutoModelForCausalLM

        from lmforge.export.hf import export_hf

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(tm, Path(tmp))
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
        hf = hf.to(args.device).eval()
        hf_rate(hf, ids, 8, tok.pad_id)
        compiled = None
        if args.compile:
            start = time.perf_counter()
            compiled = Engine(copy.deepcopy(tm.model), tok, device=args.device, compile=True)  # own copy: the engines share nothing
            print(f"compiling the decode step took {time.perf_counter() - start:.1f} s")
        ours = ours_c = theirs = 0.0
        for _ in range(args.repeats):  # in turns: all sides see the same machine load
            rate, our_ids = lmforge_rate(engine, ids, args.tokens)
            ours = max(ours, rate)
            if compiled is not None:
                rate, compiled_ids = lmforge_rate(compiled, ids, args.tokens)
                ours_c = max(ours_c, rate)
                assert compiled_ids == our_ids, "the compiled step chose other tokens than the eager one"
            rate, their_ids = hf_rate(hf, ids, args.tokens, tok.pad_id)
            theirs = max(theirs, rate)
        same = our_ids == their_ids
        print(f"{arch:<12} lmforge {ours:8.1f} tokens/s  transformers generate {theirs:8.1f} tokens/s  "
              f"ratio {ours / theirs:.2f}x  same tokens: {same}  ({tm.model.num_params():,} parameters)")
        if compiled is not None:
            print(f"{arch:<12} lmforge compiled {ours_c:8.1f} tokens/s  ratio {ours_c / theirs:.2f}x "
                  f"to transformers generate, {ours_c / ours:.2f}x to lmforge eager")


if __name__ == "__main__":
    main()
