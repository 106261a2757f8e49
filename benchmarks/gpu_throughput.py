"""GPU training throughput of configs/gpu-124m.yaml: tokens/s and MFU, eager and torch.compile side by side.

Builds the recipe's model (124M parameters, context 1024) on one CUDA device and times full
training steps (bf16 autocast forward, backward, gradient clipping, fused AdamW) on random
tokens (speed does not depend on the text), first eager and then compiled, through the
same code the training loop uses (:class:`lmforge.train.distributed.Parallel`). MFU is the
model's FLOPs per token times tokens/s over the card's dense bf16 peak
(:func:`lmforge.train.metrics.peak_flops`). With ``--vs-transformers`` (needs the ``hf``
extra) transformers' ``LlamaForCausalLM`` at the identical config, weights, batch, autocast
and fused AdamW is timed too, eager and compiled, its loss computed from ``labels`` as a
user would. Run::

    python benchmarks/gpu_throughput.py                          # one CUDA GPU, about 2-3 minutes
    python benchmarks/gpu_throughput.py --vs-transformers        # + transformers, about 5 minutes
    python benchmarks/gpu_throughput.py --micro-batch 16 --steps 50 --out gpu.json
    python benchmarks/gpu_throughput.py --smoke                   # anywhere: a tiny model, 3 steps

Without a CUDA device it refuses (exit 2) unless ``--smoke``, which scales everything down
to check that the code path runs; smoke figures are not GPU figures and are labelled so.
Expected output on a GPU: one line per mode with tokens/s, MFU, first-step seconds (the
compile cost) and peak memory, then the compiled/eager speed ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.config import ConfigError, load_config  # noqa: E402
from lmforge.export.hf_llama import hf_llama_config, to_hf_llama_state_dict  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.runtime import Runtime  # noqa: E402
from lmforge.train.distributed import Parallel  # noqa: E402
from lmforge.train.metrics import peak_flops  # noqa: E402
from lmforge.train.optim import build_optimizer, param_groups  # noqa: E402

SMOKE = ["model.d_model=64", "model.n_layers=2", "model.transformer.n_heads=2", "model.context=128",
         "model.transformer.n_kv_heads=2", "model.transformer.ffn_hidden=128", "tokenizer.vocab_size=512",
         "train.dtype=float32", "train.device=cpu"]


def hf_twin(ours: torch.nn.Module, compile_: bool) -> tuple[torch.nn.Module, Callable]:
    """transformers' ``LlamaForCausalLM`` holding ``ours``'s weights, and its loss function of (x, y)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config(ours.cfg), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights did not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    hf = hf.to(next(ours.parameters()).device).train()
    call = torch.compile(hf) if compile_ else hf
    # labels = the input: transformers shifts them itself (the same next tokens as y, less the wrapped last one).
    return hf, lambda x, y: (None, call(input_ids=x, labels=x).loss)


def measure(cfg, rt: Runtime, compile_: bool, micro_batch: int, steps: int, warmup: int,
            transformers: bool = False) -> dict:
    """Seconds per step over ``steps`` timed steps after ``warmup`` untimed ones (the first one compiles)."""
    torch.manual_seed(0)
    tc = cfg.train.model_copy(update={"compile": compile_})
    model = build_model(cfg.model).to(rt.device)
    flops = model.flops_per_token()  # the same model either side
    if transformers:
        model, fwd = hf_twin(model, compile_)
        optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                      eps=tc.eps, fused=rt.device.type == "cuda")
    else:
        fwd = Parallel(tc, rt).wrap(model)
        optimizer = build_optimizer(model, tc, rt.device.type)
    x = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.model.context), device=rt.device)  # (B, T)
    y = torch.roll(x, -1, dims=1)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)

    def step() -> float:
        with rt.autocast():
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    step()
    rt.sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    rt.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    rt.sync()
    seconds = (time.perf_counter() - t0) / steps
    tps = micro_batch * cfg.model.context / seconds
    peak = peak_flops(rt.device)
    memory = torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device.type == "cuda" else None
    return {"side": "transformers" if transformers else "lmforge", "compile": compile_, "tokens_per_s": round(tps),
            "mfu": round(tps * flops / peak, 4),
            "step_ms": round(seconds * 1000, 2), "first_step_s": round(first, 2), "loss": round(loss, 4),
            "peak_memory_gib": None if memory is None else round(memory, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpu-124m.yaml"), help="recipe (model and train.*)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: train.batch_size)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps after the first, per mode")
    ap.add_argument("--smoke", action="store_true", help="tiny model on any device: checks the code path only")
    ap.add_argument("--vs-transformers", action="store_true",
                    help="also time transformers' LlamaForCausalLM at the same config, eager and compiled")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() and not args.smoke:
        print("error: no CUDA GPU here; this benchmark measures GPU throughput. Run it on a GPU machine, or pass "
              "--smoke for a scaled-down check of the code path (its figures are not GPU figures)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, SMOKE if args.smoke else [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    if args.smoke:
        args.micro_batch, args.steps, args.warmup = args.micro_batch or 4, min(args.steps, 3), min(args.warmup, 1)
    micro = args.micro_batch or cfg.train.batch_size
    rt = Runtime.setup(cfg.train, seed=cfg.seed)  # TF32 and the autocast dtype as training sets them
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu (smoke mode: not a GPU figure)"
    print(f"{Path(args.config).name}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, context "
          f"{cfg.model.context}, micro-batch {micro}, {str(rt.dtype).removeprefix('torch.')} on {device}")
    results = []
    sides = [(False, c) for c in (False, True)] + ([(True, c) for c in (False, True)] if args.vs_transformers else [])
    for transformers, compile_ in sides:
        name = f"{'transformers' if transformers else 'lmforge'} {'compiled' if compile_ else 'eager'}"
        try:
            r = measure(cfg, rt, compile_, micro, args.steps, args.warmup, transformers)
        except Exception as e:  # one side failing (say transformers under compile) must not lose the others
            print(f"{name:>21}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        results.append(r)
        print(f"{name:>21}: {r['tokens_per_s']:>10,} tokens/s  MFU {r['mfu']:.1%}  {r['step_ms']} ms/step  "
              f"first step {r['first_step_s']} s  loss {r['loss']}  peak memory {r['peak_memory_gib']} GiB")
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
    rate = {(r["side"], r["compile"]): r["tokens_per_s"] for r in results}
    ratio = rate.get(("lmforge", True), 0) / rate.get(("lmforge", False), 1)
    print(f"lmforge compiled / eager: {ratio:.2f}x")
    for compile_ in (False, True):
        if ("transformers", compile_) in rate and ("lmforge", compile_) in rate:
            print(f"lmforge / transformers, {'compiled' if compile_ else 'eager'}: "
                  f"{rate[('lmforge', compile_)] / rate[('transformers', compile_)]:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "device": device, "micro_batch": micro,
                                              "smoke": args.smoke, "results": results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
