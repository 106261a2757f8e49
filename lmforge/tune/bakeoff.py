"""The architecture bake-off: ``lmforge compare-archs``, a tuning of the one choice that is the model family.

Trains every architecture of ``compare.archs`` on the same text with the same
tokenizer and the same training-time budget, then compares them. Each family is
an ordinary run, ``runs_dir/NAME-ARCH/`` (data, tokenizer, shards, checkpoints,
evaluation, samples and its own run card), made from this config with the
family's recipe (``compare.recipes.ARCH``: its size, learning rate, options) laid
over it. Only the model and training sections differ between the runs, so the
documents, the tokenizer and the token shards are the same for all (the
tokenizer digests are checked and recorded).

How the time budget is kept fair: a short probe times a few steps of THE
training loop (:func:`lmforge.train.loop.main`, in a scratch folder on the
run's own shards) for each model, the run gets as many steps as fit in
``compare.budget_seconds`` (so its learning-rate schedule completes), and
``train.max_seconds`` stops it at the budget whatever the probe said. The plan
is kept in ``runs_dir/NAME/plan.json``, so rerunning the command reuses the
finished runs (and resumes an interrupted one) instead of training again.

Measured per family: parameters, training tokens/s, validation bits per byte
over time (the in-training estimates) and at the end (the eval stage, over the
whole validation text), and greedy decoding tokens/s at batch 1 with the one
generator (:class:`lmforge.serve.engine.Engine`). The table (Markdown and JSON)
and the plot are written by :mod:`lmforge.report.bakeoff` under ``runs_dir/NAME/``::

    lmforge compare-archs --config configs/compare-archs.yaml                      # 4 x 5 minutes
    lmforge compare-archs --config configs/compare-archs.yaml --budget-seconds 10  # a quick check
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge import artifacts
from lmforge.config import ConfigError, RunConfig, load_config, save_config
from lmforge.data.tokenizer import tokenizer_digest
from lmforge.runtime import pick_device
from lmforge.train import loop
from lmforge.train.metrics import read_metrics
from lmforge.trained import load_model

PROBE_WARMUP, PROBE_STEPS = 2, 5  # untimed steps (allocations, caches), then timed ones; the median counts
DECODE_REPEATS = 3


def _overlay(base: dict, top: dict) -> dict:
    """``top``'s sections laid over ``base``'s, key by key, at any depth."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def arch_config(cfg: RunConfig, arch: str) -> RunConfig:
    """The run config of one family: ``cfg``, its recipe on top, its own name, the shared time budget."""
    tree = _overlay(cfg.model_dump(), cfg.compare.recipes.get(arch, {}))
    tree["name"] = f"{cfg.name}-{arch}"
    tree["model"]["arch"] = arch
    tree["train"]["max_seconds"] = cfg.compare.budget_seconds
    try:
        return load_config(None, base=tree)
    except ConfigError as e:
        raise ConfigError(f"compare.recipes.{arch} (model.arch={arch}): {str(e).removeprefix('config: ')}") from None


def seconds_per_step(cfg: RunConfig) -> float:
    """Median time of one optimizer step of ``cfg``'s model: a few steps of THE training loop, timed by it.

    The probe trains in a scratch run folder that borrows this run's tokenizer and token shards, so it
    times exactly what training will run (loader, forward, backward, clip, update; DDP or compile when set).
    """
    steps = PROBE_WARMUP + PROBE_STEPS
    tc = cfg.train.model_copy(update={"steps": steps, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                                      "max_seconds": None, "stop_at": None, "resume": False, "progress": False,
                                      "tensorboard": False, "tasks_every": 0, "early_stop_patience": 0})
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-") as tmp:
        scratch = Path(tmp)
        for part in ("tokenizer", "pack"):
            (scratch / part).symlink_to((cfg.run_dir / part).resolve(), target_is_directory=True)
        loop.main(cfg.model_copy(update={"train": tc}), scratch)
        seconds = [r["seconds"] for r in read_metrics(scratch / "train" / "metrics.jsonl") if r.get("kind") == "train"]
    times = [b - a for a, b in zip([0.0, *seconds], seconds, strict=False)]  # the loop logs cumulative seconds
    return statistics.median(times[PROBE_WARMUP:])


def _plan_key(cfg: RunConfig) -> str:
    """What a plan entry depends on: the fields marked as shaping the bake-off's step time (``reuse(bakeoff=...)``
    in lmforge.config: data, tokenizer, model, training), not the step counts the plan itself sets."""
    return artifacts.fingerprint(cfg, "bakeoff")


def plan_run(cfg: RunConfig, plan: dict) -> tuple[dict, bool]:
    """Steps for one family and whether they are new: reused from ``plan`` when its config is unchanged,
    else measured by the probe."""
    key = _plan_key(cfg)
    known = plan.get(cfg.model.arch)
    if known and known.get("key") == key:
        return known, False
    sps = seconds_per_step(cfg)
    steps = max(1, int(cfg.compare.budget_seconds / sps))
    return {"key": key, "seconds_per_step": sps, "steps": steps,
            "eval_every": max(1, steps // cfg.compare.val_points)}, True


def decode_speed(run_dir: Path, prompt: str, n_tokens: int) -> float:
    """Greedy decoding tokens/s at batch 1 (prompt prefill included), the median of a few timed runs."""
    from lmforge.serve.engine import Engine, SamplingParams

    tm = load_model(run_dir / "train")  # the pre-trained model, also in a run that has a fine-tuned one
    engine = Engine(tm.model, tm.tokenizer, device=None)
    # stop_token_ids=[]: never stop early, so every run generates exactly n_tokens.
    engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[]))  # warm-up
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.0, stop_token_ids=[])
    rates = []
    for _ in range(DECODE_REPEATS):
        t0 = time.perf_counter()
        completion = engine.generate([prompt], params)[0]
        rates.append(completion.completion_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def _curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds, validation bits per byte) of every in-training validation estimate."""
    rows = read_metrics(run_dir / "train" / "metrics.jsonl")
    return [(r["seconds"], r["bpb"]) for r in rows if r.get("kind") == "val" and "seconds" in r and "bpb" in r]


def _row(cfg: RunConfig, run_dir: Path, plan: dict, decode_tps: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    train = artifacts.read_manifest(run_dir / "train")["outputs"]  # the run just trained: it exists
    return {
        "arch": cfg.model.arch, "run": str(run_dir), "params": train["params"],
        "params_non_embedding": train.get("params_non_embedding"), "d_model": train.get("d_model", cfg.model.d_model),
        "n_layers": cfg.model.n_layers, "param_budget": cfg.model.param_budget, "lr": cfg.train.lr,
        "steps": train["steps"], "planned_steps": plan["steps"], "stopped_by": train["stopped_by"],
        "train_seconds": train["train_seconds"], "tokens_seen": train["tokens_seen"],
        "train_tokens_per_s": train["tokens_per_s"], "flops_per_token": train["flops_per_token"],
        "mfu": train["mfu"], "val_bpb": summary["val_bpb"], "val_loss": summary["val_loss"],
        "val_tokens": summary["val_tokens"], "decode_tokens_per_s": decode_tps,
        "curve": _curve(run_dir),
    }


def main(cfg: RunConfig) -> dict:
    """Train and measure every family of ``cfg.compare.archs``; returns the comparison (also written to disk)."""
    from lmforge.pipeline import run
    from lmforge.report.bakeoff import write_bakeoff

    out_dir = cfg.run_dir
    configs = {arch: arch_config(cfg, arch) for arch in cfg.compare.archs}  # every recipe checked before training
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    plan_path = out_dir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    rows, digests = [], {}
    for arch, acfg in configs.items():
        print(f"== {arch}: {cfg.compare.budget_seconds:g} s of training, run {acfg.run_dir}")
        run(acfg, until="pack")  # the probe trains on this run's own tokenizer and shards
        plan[arch], fresh = plan_run(acfg, plan)
        plan_path.write_text(json.dumps(plan, indent=2))
        tree = acfg.model_dump()
        tree["train"].update(steps=plan[arch]["steps"], eval_every=plan[arch]["eval_every"])
        # A new plan is a new schedule: checkpoints of an earlier plan must not be resumed under it.
        # An unchanged plan resumes, so an interrupted bake-off continues where it stopped.
        tree["train"]["resume"] = tree["train"]["resume"] and not fresh
        acfg = RunConfig.model_validate(tree)
        outputs = run(acfg, until="report")
        if "_stopped" in outputs:  # train.stop_at ended it early on purpose: no result to compare yet
            raise ConfigError(f"the {arch} run stopped at train.stop_at; remove it to run the bake-off")
        digests[arch] = tokenizer_digest(acfg.run_dir / "tokenizer" / "tokenizer.json")
        prompt = acfg.sample.prompts[0] if acfg.sample.prompts else "\n"
        tps = decode_speed(acfg.run_dir, prompt, cfg.compare.decode_tokens)
        rows.append(_row(acfg, acfg.run_dir, plan[arch], tps))
    result = {
        "name": cfg.name, "budget_seconds": cfg.compare.budget_seconds, "decode_tokens": cfg.compare.decode_tokens,
        "same_tokenizer": len(set(digests.values())) == 1, "tokenizer_sha256": digests,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(pick_device(cfg.train.device)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "archs": rows,
    }
    result["files"] = {k: str(v) for k, v in write_bakeoff(out_dir, result).items()}
    return result
