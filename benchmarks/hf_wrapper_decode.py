"""Batch-1 greedy decoding of one Llama folder, loaded natively and through the ``hf`` wrapper.

lmforge opens a Hugging Face Llama with plain rotary positions into its own Transformer
(lmforge.trained.hf_config.native_config) because that decodes faster than the wrapper around
transformers' own code (lmforge.models.hf_causal), which every other family uses. This measures
that choice, side by side in one process: the same folder (a random 1.05M-parameter Llama:
vocabulary 2,048, width 128, 4 layers, 4 heads, tied embeddings) decoded greedily at batch 1 by
``lmforge.serve.engine.Engine`` on both models, in turns, ``--repeats`` times, keeping the best
of each so both see the same machine load; both must choose the same tokens (checked). Run::

    .venv/bin/python benchmarks/hf_wrapper_decode.py                 # ~30 s on 2 cores
    .venv/bin/python benchmarks/hf_wrapper_decode.py --tokens 50 --repeats 2

Output: tokens/s of each and the ratio native / wrapped; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.models import HFCausalLM  # noqa: E402
from lmforge.serve.engine import Engine, SamplingParams  # noqa: E402
from lmforge.trained import load_model  # noqa: E402
from lmforge.trained.hf import load_wrapped  # noqa: E402
from lmforge.trained.hf_config import wrapped_config  # noqa: E402
from tests.hf_families import FAMILIES, save_tokenizer  # noqa: E402


def make_folder(root: Path) -> Path:
    """A random Llama (plain rotary positions) with a small BPE tokenizer, as save_pretrained writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fast = save_tokenizer(FAMILIES["smollm"], root)
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(root)
    return root


def rate(engine: Engine, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Tokens/s of one greedy generation of exactly ``tokens`` tokens (no end token stops it)."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_token_ids=[])
    start = time.perf_counter()
    [c] = engine.generate([ids], params)
    return len(c.token_ids) / (time.perf_counter() - start), c.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per side (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp))
        native = load_model(folder)
        hf = json.loads((folder / "config.json").read_text())
        wrapped: HFCausalLM = load_wrapped(folder, wrapped_config(hf, folder / "config.json")).eval()
        ids = native.tokenizer.encode("To be, or not to be")
        engines = {"native": Engine(native.model, native.tokenizer), "wrapped": Engine(wrapped, native.tokenizer)}
        best = {k: 0.0 for k in engines}
        chosen = {}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                r, toks = rate(engine, ids, args.tokens)
                best[name], chosen[name] = max(best[name], r), toks
        assert chosen["native"] == chosen["wrapped"], "the two models chose different tokens"
    print(f"native Transformer {best['native']:8.1f} tokens/s   hf wrapper {best['wrapped']:8.1f} tokens/s   "
          f"native / wrapped = {best['native'] / best['wrapped']:.2f}x  ({args.tokens} tokens, batch 1, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
