"""Training throughput: lmforge against transformers' LlamaForCausalLM at the identical config, data and optimizer.

What it measures, side by side in one process (absolute numbers on a shared
machine are noisy; read the ratios):

1. ``issue``: the issue's 1.05M-parameter Llama (vocabulary 2,048, width 128, 4
   layers, 4 heads, tied embeddings, context 128, batch 12);
2. ``speedrun``: the model and batch of ``configs/speedrun-cpu.yaml``.

Both sides start from the same weights (ours exported with
``to_hf_llama_state_dict``), see the same batches of real tokens (the embedded
corpus through a BPE of the model's vocabulary) and take the same AdamW steps
(lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, gradient clipping at 1):
forward, loss, backward, clip, step, zero_grad, as lmforge's loop does. Llama has
no QK-norm, so both sides run the speedrun model without it; the recipe as it is
(QK-norm, Muon) is timed apart, once with Muon's Newton-Schulz orthogonalisation in
fp32 (``lmforge recipe fp32``, what ``train.muon_precision: auto`` picks on CPUs
without fast bf16) and once in bf16 (``lmforge recipe bf16``, torch.optim.Muon's
numerics), against the recipe's model with AdamW (``recipe model adamw``).
transformers computes its loss from ``labels`` as a user would. The two run in
turns of ``--steps`` steps, ``--repeats`` times; the median of each is kept. MFU
is against the measured fp32 matmul peak (``lmforge.train.metrics.peak_flops``)
with the model's ``flops_per_token``. Run::

    .venv/bin/python benchmarks/train_throughput.py                  # a few minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --steps 2 --repeats 1 --configs issue   # quick check
    .venv/bin/python benchmarks/train_throughput.py --configs issue --compile   # + both under torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.config import ModelConfig, TokenizerConfig, TrainConfig, load_config  # noqa: E402
from lmforge.data.sources import embedded_corpus  # noqa: E402
from lmforge.data.tokenizer import train_tokenizer  # noqa: E402
from lmforge.export.hf_llama import hf_llama_config, to_hf_llama_state_dict  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.runtime import bf16_time_ratio  # noqa: E402
from lmforge.train.metrics import peak_flops  # noqa: E402
from lmforge.train.optim import build_optimizer, muon_precision, param_groups  # noqa: E402


def configs() -> dict[str, tuple[ModelConfig, int]]:
    speed = load_config(ROOT / "configs" / "speedrun-cpu.yaml")
    issue = ModelConfig(arch="transformer", context=128, d_model=128, n_layers=4, tie_embeddings=True,
                        transformer={"n_heads": 4})
    return {"issue": (issue, 12), "speedrun": (speed.model, speed.train.batch_size)}


def batches(vocab: int, context: int, batch: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of ``context + 1`` real tokens (a BPE of ``vocab`` over a few embedded works)."""
    texts = [d.text for d in embedded_corpus()][:6]
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=vocab), texts)
    ids = np.array([t for text in texts[:2] for t in tok.encode(text)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - context - 1, size=(n, batch))
    return [torch.from_numpy(np.stack([ids[s: s + context + 1] for s in row])) for row in starts]


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, hf: bool) -> Callable[[torch.Tensor], None]:
    def step(window: torch.Tensor) -> None:
        x, y = window[:, :-1], window[:, 1:]
        loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step: Callable[[torch.Tensor], None], data: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for window in data:
        step(window)
    return sum(w[:, :-1].numel() for w in data) / (time.perf_counter() - start)  # tokens/s


def compare(name: str, cfg: ModelConfig, batch: int, args: argparse.Namespace, recipe: TrainConfig | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe_cfg = cfg.model_copy(update={"vocab_size": args.vocab})
    # transformers has no QK-norm in its Llama: both sides run without it; the recipe's model is timed apart.
    cfg = recipe_cfg.model_copy(update={"transformer": recipe_cfg.transformer.model_copy(update={"qk_norm": False})})
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.train()
    tc = TrainConfig(lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    sides = {"lmforge": step_fn(ours, build_optimizer(ours, tc), hf=False),
             "transformers": step_fn(hf, torch.optim.AdamW(param_groups(hf, 0.1), lr=3e-3, betas=(0.9, 0.95)),
                                     hf=True)}
    if recipe is not None:  # the recipe's own model: Muon (each precision) against AdamW, from the same weights
        for side, train in (("recipe model adamw", recipe.model_copy(update={"optimizer": "adamw"})),
                            ("lmforge recipe fp32", recipe.model_copy(update={"muon_precision": "fp32"})),
                            ("lmforge recipe bf16", recipe.model_copy(update={"muon_precision": "bf16"}))):
            torch.manual_seed(0)
            other = build_model(recipe_cfg)
            sides[side] = step_fn(other, build_optimizer(other, train), hf=False)
    if args.compile:  # train.compile=true: the whole model through torch.compile (inductor), both sides
        torch.manual_seed(0)
        twin = build_model(cfg)
        sides["lmforge compiled"] = step_fn(torch.compile(twin), build_optimizer(twin, tc), hf=False)
        hf_twin = LlamaForCausalLM(LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa"))
        hf_twin.load_state_dict(hf.state_dict())
        hf_twin.train()
        sides["transformers compiled"] = step_fn(
            torch.compile(hf_twin), torch.optim.AdamW(param_groups(hf_twin, 0.1), lr=3e-3, betas=(0.9, 0.95)), hf=True)
    data = batches(args.vocab, cfg.context, batch, args.steps)
    for side, step in sides.items():
        start = time.perf_counter()
        step(data[0])  # warm-up: allocations, lazy state and, for the compiled side, the compile
        step(data[1 % len(data)])
        if side.endswith("compiled"):
            print(f"  ({side}: compiled in {time.perf_counter() - start:.0f} s)")
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):  # in turns: every side sees the same machine load
        for k, step in sides.items():
            rates[k].append(timed(step, data))
    flops, peak = ours.flops_per_token(), peak_flops("cpu")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{name}: {ours.num_params():,} parameters, batch {batch} x context {cfg.context}, "
          f"{flops / 1e6:.2f} MFLOP/token, peak {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    for k, v in med.items():
        print(f"  {k:<21} {v:9.0f} tokens/s  MFU {v * flops / peak:6.1%}  (runs: "
              + ", ".join(f"{r:.0f}" for r in rates[k]) + ")")
    print(f"  ratio lmforge / transformers: {med['lmforge'] / med['transformers']:.2f}x")
    if recipe is not None:
        print(f"  ratio recipe (Muon) / its model with AdamW: fp32 orthogonalisation "
              f"{med['lmforge recipe fp32'] / med['recipe model adamw']:.2f}x, bf16 "
              f"{med['lmforge recipe bf16'] / med['recipe model adamw']:.2f}x; muon_precision auto picks "
              f"{muon_precision('auto', 'cpu')} here (bf16/fp32 matmul time {bf16_time_ratio():.2f})")
    if args.compile:
        print(f"  ratio compiled lmforge / compiled transformers: "
              f"{med['lmforge compiled'] / med['transformers compiled']:.2f}x, compiled lmforge / eager "
              f"transformers: {med['lmforge compiled'] / med['transformers']:.2f}x, compiled / eager lmforge: "
              f"{med['lmforge compiled'] / med['lmforge']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="steps per turn")
    ap.add_argument("--repeats", type=int, default=3, help="turns per side; the median is kept")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size (BPE trained on the corpus)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    ap.add_argument("--configs", default="issue,speedrun", help="comma-separated: issue, speedrun")
    ap.add_argument("--compile", action="store_true",
                    help="also time both sides under torch.compile (train.compile=true; compiles for a minute or two)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_config(ROOT / "configs" / "speedrun-cpu.yaml").train
    table = configs()
    for name in args.configs.split(","):
        cfg, batch = table[name]
        compare(name, cfg, batch, args, recipe if name == "speedrun" else None)


if __name__ == "__main__":
    main()
