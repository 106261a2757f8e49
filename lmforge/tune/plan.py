"""``lmforge plan``: the recipe expected to give the lowest held-out bits per byte for a time budget.

1. The corpus (``data.*``, default the embedded one) is prepared once with the speedrun's rules and
   tokenizer (the last 10% of the characters held out; a 2,048-token BPE) in the plan's folder, where
   the recipe's own run will find it done.
2. Probes train a few model sizes (``plan.probe_sizes``) for a few lengths (``plan.probe_seconds``) on
   this machine, with THE training loop and the speedrun's recipe (Muon, warmup-stable-decay,
   ``train.steps: auto``), in scratch folders; each records parameters, tokens/s, tokens seen and
   held-out bits per byte. They are cached per machine and config (``~/.cache/lmforge/plan``), so a
   second plan, for another budget, runs no probe (only its own confirmations).
3. :func:`lmforge.tune.scaling.fit_loss` fits ``bpb(N, D) = E + A / N^a + B / D^b`` to the probes, and
   tokens/s is fitted as a power law of the FLOPs per token (or, with ``--gpu``, is the datasheet peak
   times ``plan.mfu`` over the FLOPs per token).
4. Every candidate shape (widths 64-1024, 2-24 layers, 32-wide heads) is scored at the budget: the
   tokens it would see in 97% of it (what ``steps: auto`` aims at), discounted for repeats of the
   corpus, give its predicted bits per byte. On this machine candidates stay within 4x the largest
   probe's parameters: the fit is not trusted further.
5. Confirmation (this machine only): the fit's first choice and the speedrun's 128x4 (or the runner-up)
   train for ``plan.confirm_fraction`` of the budget, much nearer its tokens than the probes (a shape no
   probe measured is probed first). The shared curve is refitted on probes and confirmations, weighted
   toward the budget's tokens. Each confirmed shape is predicted at its median measured speed by its own
   curve through its runs (:func:`lmforge.tune.scaling.fit_shape_curve`: its own floor and exponent, so
   a small model's gains can run out sooner than a large one's), or, with fewer than three lengths, by
   the refitted curve plus its miss at the confirmation; the smallest confirmed shape within TIE of the
   best is chosen.
6. It writes ``plan.yaml`` (a config ``lmforge run --config`` trains: the width and depth chosen, the
   speedrun's vocabulary, batch and learning rate, ``steps: auto``, ``max_seconds`` = the budget, the
   prediction in a comment), ``plan.json`` (probes, fits, candidates, the curve, assumptions) and
   ``plan.png`` (predicted bits per byte against budget, the chosen point, and the bits per byte
   achieved by plans already run; :mod:`lmforge.report.plan_plot`)::

    lmforge plan --budget 5m                      # 5 minutes on this machine
    lmforge plan --budget 2h --gpu h100           # 2 hours on an H100 (datasheet bf16 x 40% MFU)
    lmforge run --config runs/plan-5m/plan.yaml   # train the recipe; plan again to plot the result
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from lmforge import artifacts
from lmforge.cache import cache_dir
from lmforge.config import ConfigError, ModelConfig, RunConfig, load_config
from lmforge.models import build_model
from lmforge.train import budget, loop
from lmforge.train.metrics import cpu_model, gpu_peak_flops
from lmforge.tune.scaling import (
    BPB_FLOOR,
    EXPONENT_BOUNDS,
    REPEAT_HALF_LIFE,
    LossFit,
    effective_tokens,
    fit_loss,
    fit_shape_curve,
    parse_budget,
)

# The speedrun's choices (configs/speedrun-cpu.yaml, docs/speedrun.md); only width and depth vary here.
RECIPE = {
    "tokenizer": {"kind": "bpe", "vocab_size": 2048},
    "model": {"arch": "transformer", "context": 128, "tie_embeddings": False, "transformer": {"qk_norm": True}},
    "train": {"batch_size": 16, "optimizer": "muon", "lr": 6.0e-3, "schedule": "wsd", "warmup_steps": 50,
              "decay_fraction": 0.3, "min_lr_ratio": 0.0, "eval_every": 200, "eval_batches": 16, "ckpt_every": 0},
}
SPLIT = {"split": "tail", "val_fraction": 0.1}  # nanoGPT's split, as the speedrun's figures use
WIDTHS = (64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)
DEPTHS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24)
HEAD_DIM = 32
SPEEDRUN_SHAPE = (128, 4)  # configs/speedrun-cpu.yaml's width and depth: always confirmed, so a plan can match it
EXTRAPOLATE = 4.0  # on this machine: candidates up to 4x the largest probe's parameters
MAX_STEPS = 20_000  # with --gpu: the batch grows (powers of 2) so the schedule stays under this many steps
TIE = 0.005  # bits per byte: the smallest candidate this close to the best prediction is chosen (cheaper, and a
# saturated fit, on a corpus the budget repeats many times, no longer tells big models apart)
MANY_EPOCHS = 4  # beyond about 4 passes over the corpus more training buys little (Muennighoff et al. 2023)
CURVE = {"cpu": [1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60], "gpu": [15, 30, 60, 120, 240, 480, 960, 1440]}  # minutes


def _model(width: int, layers: int) -> dict:
    """The recipe's model section at this shape (heads HEAD_DIM wide)."""
    transformer = {**RECIPE["model"]["transformer"], "n_heads": max(1, width // HEAD_DIM)}
    return {**RECIPE["model"], "d_model": width, "n_layers": layers, "transformer": transformer}


def _tree(cfg: RunConfig, name: str, width: int, layers: int, train: dict) -> dict:
    """A run config tree: ``cfg``'s data and seed, the recipe at this shape, ``train`` laid over its training."""
    return {"name": name, "runs_dir": cfg.runs_dir, "seed": cfg.seed,
            "data": {**cfg.data.model_dump(exclude_defaults=True), **SPLIT},
            "tokenizer": dict(RECIPE["tokenizer"]), "model": _model(width, layers),
            "train": {**RECIPE["train"], "threads": cfg.train.threads or torch.get_num_threads(), **train}}


@functools.cache
def _size(width: int, layers: int, vocab: int) -> tuple[int, float]:
    """Parameters and training FLOPs per token of the recipe's model at this shape (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(ModelConfig.model_validate({**_model(width, layers), "vocab_size": vocab}))
    return model.num_params(), float(model.flops_per_token())


def _machine(cfg: RunConfig) -> dict:
    return {"cpu": cpu_model(), "threads": cfg.train.threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _probe(cfg: RunConfig, folder: Path, data: dict, width: int, layers: int, seconds: float) -> dict | None:
    """One probe: ``seconds`` of training of the recipe at this shape, cached per machine and config; None
    when the shape is too slow here to train in that time (not cached: a busy machine may be quieter later)."""
    pc = cfg.plan
    train = {"steps": "auto", "max_seconds": seconds, "warmup_steps": pc.probe_warmup, "eval_every": 0,
             "eval_batches": pc.eval_batches, "log_every": 10, "resume": False, "progress": False,
             "tensorboard": False}
    pcfg = load_config(None, base=_tree(cfg, "probe", width, layers, train))
    key = artifacts.digest({"machine": _machine(cfg), "data": data["fingerprint"],
                            "config": pcfg.model_dump(include={"seed", "model", "train"})})
    cached = cache_dir() / "plan" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="lmforge-plan-") as tmp:
        scratch = Path(tmp)
        for part in ("tokenizer", "pack"):
            (scratch / part).symlink_to((folder / part).resolve(), target_is_directory=True)
        try:
            s = loop.main(pcfg, scratch, bytes_per_token=data["bytes_per_token"])
        except budget.BudgetTooSmall as e:
            print(f"probe {width}x{layers}, {seconds:g} s: skipped, too slow here ({e})")
            return None
    # Steady-state speed: the step time steps: auto measured (first steps left out), as the recipe's run will.
    tokens_per_s = s["tokens_seen"] / s["steps"] / s["budget"]["seconds_per_step"]
    result = {"d_model": width, "n_layers": layers, "seconds": seconds, "params": s["params"],
              "flops_per_token": s["flops_per_token"], "tokens": s["tokens_seen"], "steps": s["steps"],
              "train_seconds": s["train_seconds"], "tokens_per_s": tokens_per_s, "bpb": s["last_val"]["bpb"]}
    with contextlib.suppress(OSError):  # a read-only home: the plan still works, it only probes again next time
        artifacts.write_json(cached, result)
    return result


def _prepare(cfg: RunConfig, folder: Path) -> dict:
    """The corpus prepared with the recipe's rules and tokenizer in ``folder``; what the fit needs of it."""
    from lmforge.pipeline import run

    tree = _tree(cfg, folder.name, 128, 4, {})
    tree["runs_dir"] = str(folder.parent)
    outputs = run(load_config(None, base=tree), until="pack")
    pack = outputs["pack"]
    return {"fingerprint": outputs["_fp"]["pack"], "train_tokens": pack["train"]["tokens"],
            "bytes_per_token": pack["val"]["bytes"] / max(1, pack["val"]["tokens"]),
            "vocab_size": outputs["tokenizer"].get("vocab_size", RECIPE["tokenizer"]["vocab_size"])}


class Throughput:
    """Training tokens/s of a model from its FLOPs per token: a power law fitted to the probes, or a GPU's."""

    def __init__(self, probes: list[dict], gpu_flops: float | None = None) -> None:
        self.gpu_flops = gpu_flops
        f = np.log([p["flops_per_token"] for p in probes])
        t = np.log([p["tokens_per_s"] for p in probes])
        self.slope, self.intercept = (np.polyfit(f, t, 1) if len(set(f)) > 1 else (-1.0, float(t.mean() + f.mean())))

    def tokens_per_s(self, flops_per_token: float) -> float:
        if self.gpu_flops:
            return self.gpu_flops / flops_per_token
        return float(math.exp(self.intercept + self.slope * math.log(flops_per_token)))

    def as_dict(self) -> dict:
        return ({"gpu_flops": self.gpu_flops} if self.gpu_flops else
                {"log_tokens_per_s": f"{self.intercept:.4f} + {self.slope:.4f} * log(flops_per_token)"})


def _candidates(vocab: int, max_params: float | None) -> list[dict]:
    out = []
    for width in WIDTHS:
        for layers in DEPTHS:
            if not 16 <= width / layers <= 128:  # neither a needle nor a pancake: the shapes people train
                continue
            if max_params is not None and 12 * layers * width**2 + 2 * vocab * width > 2 * max_params:
                continue  # far too big by the usual count (12 L d^2 + untied embeddings): not worth building
            params, flops = _size(width, layers, vocab)
            if max_params is None or params <= max_params:
                out.append({"d_model": width, "n_layers": layers, "params": params, "flops_per_token": flops})
    return out


def score(fit: LossFit, speed: Throughput, cands: list[dict], seconds: float, unique: float) -> list[dict]:
    """Each candidate at a budget of ``seconds``: tokens seen, effective tokens, predicted bits per byte; best first."""
    rows = []
    for c in cands:
        tps = speed.tokens_per_s(c["flops_per_token"])
        tokens = tps * seconds * (1 - budget.MARGIN)
        eff = effective_tokens(tokens, unique)
        rows.append({**c, "tokens_per_s": tps, "tokens": tokens, "effective_tokens": eff,
                     "predicted_bpb": fit.predict(c["params"], eff)})
    return sorted(rows, key=lambda r: r["predicted_bpb"])


def choose(ranked: list[dict]) -> dict:
    """The smallest candidate whose prediction is within TIE of the best."""
    return min((r for r in ranked if r["predicted_bpb"] <= ranked[0]["predicted_bpb"] + TIE), key=lambda r: r["params"])


def _batch(chosen: dict, gpu: bool) -> tuple[int, float]:
    """Batch size (sequences) and peak rate: the speedrun's, or on a GPU grown so the schedule stays under
    MAX_STEPS, the rate by the square-root rule (capped at 3x)."""
    base = RECIPE["train"]
    k = 1
    if gpu:
        while chosen["tokens"] / (base["batch_size"] * k * RECIPE["model"]["context"]) > MAX_STEPS and k < 256:
            k *= 2
    return base["batch_size"] * k, base["lr"] * min(3.0, math.sqrt(k))


def _run_probes(cfg: RunConfig, folder: Path, data: dict) -> list[dict]:
    """Every probe size for every probe length (cached ones read back); too few to fit stop the plan."""
    pc, probes = cfg.plan, []
    for width, layers in pc.probe_sizes:
        for probe_seconds in pc.probe_seconds:
            if (p := _probe(cfg, folder, data, width, layers, probe_seconds)) is None:
                continue
            probes.append(p)
            _say("probe", p)
    if len(probes) < 5 or len({p["params"] for p in probes}) < 2:
        raise ConfigError(f"plan.probe_seconds: only {len(probes)} probes could train in their time on this machine "
                          f"(5 or more, of 2 or more sizes, are needed for the fit); give longer plan.probe_seconds "
                          f"or smaller plan.probe_sizes (a busy machine is slower: see docs/speedrun.md, threads)")
    return probes


def _say(kind: str, p: dict) -> None:
    print(f"{kind} {p['d_model']}x{p['n_layers']}, {p['seconds']:g} s: {p['params']:,} parameters, "
          f"{p['tokens_per_s']:,.0f} tokens/s, {p['tokens']:,} tokens, {p['bpb']:.4f} bits per byte")


def _points(runs: list[dict], unique: float) -> list[tuple[float, float, float]]:
    return [(p["params"], effective_tokens(p["tokens"], unique), p["bpb"]) for p in runs]


def _confirm(cfg: RunConfig, folder: Path, data: dict, ranked: list[dict], seconds: float,
             probes: list[dict]) -> tuple[list[dict], list[dict]]:
    """Confirmation probes: the first choice and the hand-tuned speedrun's shape (or, when they are one, the
    runner-up), each trained for ``plan.confirm_fraction`` of the budget, far closer to its tokens than the probes.
    A shape no probe measured is first probed at ``plan.probe_seconds`` too, so each has its own curve.
    Returns (those extra probes, the confirmations)."""
    first = choose(ranked)
    shapes = [(first["d_model"], first["n_layers"])]
    known = [(r["d_model"], r["n_layers"]) for r in ranked]
    for shape in [SPEEDRUN_SHAPE, *known]:
        if len(shapes) < 2 and shape not in shapes and shape in known:
            shapes.append(shape)
    extra, out = [], []
    for width, layers in shapes:
        if not any((p["d_model"], p["n_layers"]) == (width, layers) for p in probes):
            for probe_seconds in cfg.plan.probe_seconds:
                if (p := _probe(cfg, folder, data, width, layers, probe_seconds)) is not None:
                    extra.append(p)
                    _say("probe", p)
        if (p := _probe(cfg, folder, data, width, layers, cfg.plan.confirm_fraction * seconds)) is not None:
            out.append(p)
            _say("confirmation", p)
    return extra, out


def _weights(runs: list[dict], unique: float, target: float) -> list[float]:
    """Each point's weight in the fit: 1 / (1 + |ln(D / D_target)|), so the points nearest the budget's
    (effective) tokens shape the extrapolation most and a probe 20x shorter counts a quarter."""
    return [1.0 / (1.0 + abs(math.log(max(1.0, effective_tokens(p["tokens"], unique)) / max(1.0, target))))
            for p in runs]


def main(cfg: RunConfig) -> dict:
    """Probe, fit, choose, confirm, refit and write the plan; returns plan.json's content."""
    from lmforge.report.plan_plot import achieved_points, write_plan_plot

    pc = cfg.plan
    seconds = parse_budget(pc.budget)
    gpu_flops = _gpu_flops(pc)
    label = pc.budget.strip() + (f"-{pc.gpu.lower().replace(' ', '')}" if pc.gpu else "")
    folder = Path(pc.out) if pc.out else Path(cfg.runs_dir) / f"plan-{label}"
    data = _prepare(cfg, folder)
    unique = data["train_tokens"]
    probes = _run_probes(cfg, folder, data)
    fit = fit_loss(_points(probes, unique), min_e=BPB_FLOOR)
    speed = Throughput(probes, gpu_flops)
    cands = _candidates(data["vocab_size"], None if gpu_flops else EXTRAPOLATE * max(p["params"] for p in probes))
    confirmations: list[dict] = []
    # Not for a GPU's budget (nothing here measures it), nor when a confirmation would be no longer than the probes.
    if not gpu_flops and pc.confirm_fraction * seconds > max(pc.probe_seconds):
        first = score(fit, speed, cands, seconds, unique)
        extra, confirmations = _confirm(cfg, folder, data, first, seconds, probes)
        probes = probes + extra
        runs = probes + confirmations
        fit = fit_loss(_points(runs, unique), _weights(runs, unique, choose(first)["effective_tokens"]), BPB_FLOOR)
        speed = Throughput(runs)
    plan = _plan_record(cfg, seconds, label, data, probes, fit, speed, cands, gpu_flops, confirmations)
    yaml_text = _recipe_yaml(cfg, folder, plan["chosen"], seconds, plan, gpu=gpu_flops is not None)
    plan["achieved"] = achieved_points(Path(cfg.runs_dir), plan["target"])
    plan["notes"] = [f"the budget would read the corpus {plan['epochs']:.0f} times; past about {MANY_EPOCHS} passes "
                     f"more training buys little: a larger corpus would help more than a larger budget"
                     ] if plan["epochs"] > MANY_EPOCHS else []
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(folder / "plan.yaml", yaml_text)
    plan["files"] = {"config": str(folder / "plan.yaml"), "json": str(folder / "plan.json"),
                     "png": str(folder / "plan.png")}
    write_plan_plot(folder / "plan.png", plan)
    artifacts.write_json(folder / "plan.json", plan)
    return plan


def shape_speed(runs: list[dict], width: int, layers: int) -> float:
    """Tokens/s of a shape: the median over every probe and confirmation of it, so one run slowed by a busy
    machine does not set the budget's tokens (a 20-minute plan here once took half the speed from one)."""
    return float(np.median([r["tokens_per_s"] for r in runs if (r["d_model"], r["n_layers"]) == (width, layers)]))


def corrected(ranked: list[dict], confirmations: list[dict], fit: LossFit, unique: float, seconds: float,
              runs: list[dict]) -> list[dict]:
    """The confirmed shapes among ``ranked``, best first, each at its median measured speed (:func:`shape_speed`
    over ``runs``) and the budget's effective tokens, predicted by its own curve through its runs
    (:func:`lmforge.tune.scaling.fit_shape_curve`, 3 or more lengths), else by the refitted curve moved by its
    miss at the confirmation: ``fit(N, D_budget) + (observed - fit(N, D_confirmation))``."""
    out = []
    for c in confirmations:
        shape = (c["d_model"], c["n_layers"])
        row = next((r for r in ranked if (r["d_model"], r["n_layers"]) == shape), None)
        if row is None:
            continue
        own = [r for r in runs if (r["d_model"], r["n_layers"]) == shape]
        speed = shape_speed(runs, *shape)
        tokens = speed * seconds * (1 - budget.MARGIN)
        eff = effective_tokens(tokens, unique)
        miss = c["bpb"] - fit.predict(c["params"], effective_tokens(c["tokens"], unique))
        fit_bpb = fit.predict(row["params"], eff) + miss
        curve = None
        if len({r["tokens"] for r in own}) >= 3:
            curve = fit_shape_curve([(effective_tokens(r["tokens"], unique), r["bpb"]) for r in own], BPB_FLOOR)
        out.append({**row, "tokens_per_s": speed, "tokens": tokens, "effective_tokens": eff,
                    "fit_bpb": fit_bpb, "confirmation_miss": miss,
                    "shape_curve": curve.as_dict() if curve else None,
                    "predicted_bpb": curve.predict(eff) if curve else fit_bpb, "confirmed": True})
    return sorted(out, key=lambda r: r["predicted_bpb"])


def _gpu_flops(pc) -> float | None:
    if pc.gpu is None:
        return None
    peak = gpu_peak_flops(pc.gpu)
    if pc.gpu_flops:
        return pc.gpu_flops
    if peak is None:
        raise ConfigError(f"--gpu: no datasheet figure for '{pc.gpu}' (known: h100, h200, a100, l40s, l4, a10, v100, "
                          f"t4, rtx 4090, rtx 3090, mi300x, ...); give the FLOP/s it reaches with --plan.gpu_flops")
    return peak * pc.mfu


def _plan_record(cfg: RunConfig, seconds: float, label: str, data: dict, probes: list[dict], fit: LossFit,
                 speed: Throughput, cands: list[dict], gpu_flops: float | None, confirmations: list[dict]) -> dict:
    pc, unit = cfg.plan, "gpu" if gpu_flops else "cpu"
    ranked = score(fit, speed, cands, seconds, data["train_tokens"])
    confirmed = corrected(ranked, confirmations, fit, data["train_tokens"], seconds, probes + confirmations)
    curve = []
    for minutes in sorted({*CURVE[unit], seconds / 60.0}):  # the chosen budget is a point of the curve too
        best = choose(score(fit, speed, cands, minutes * 60.0, data["train_tokens"]))
        curve.append({"minutes": minutes, "predicted_bpb": best["predicted_bpb"], "d_model": best["d_model"],
                      "n_layers": best["n_layers"], "params": best["params"]})
    target = f"gpu:{pc.gpu.lower()}" if pc.gpu else f"cpu:{cpu_model()}|{_machine(cfg)['threads']} threads"
    return {"budget": {"text": pc.budget, "seconds": seconds}, "label": label, "target": target,
            "machine": _machine(cfg), "gpu": pc.gpu, "gpu_flops": gpu_flops, "mfu": pc.mfu if pc.gpu else None,
            "data": data, "probes": probes, "confirmations": confirmations, "fit": fit.as_dict(),
            "throughput": speed.as_dict(), "chosen": (chosen := choose(confirmed or ranked)),
            "confirmed": confirmed, "candidates": ranked[:10], "curve": curve,
            "epochs": chosen["tokens"] / data["train_tokens"],
            "assumptions": [
                "bits per byte are the probes' in-training validation estimates (plan.eval_batches batches); "
                "the eval stage scores every held-out byte",
                "vocabulary, batch, learning rate and schedule are the speedrun's, not re-tuned per size",
                f"tokens seen more than once count as Muennighoff et al. 2023's effective data, with R* = "
                f"{REPEAT_HALF_LIFE:g} as measured on the embedded corpus (theirs, for larger models on C4: 15.4)",
                f"the irreducible loss E is at least {BPB_FLOOR} bits per byte; the exponents a and b lie in "
                f"[{EXPONENT_BOUNDS[0]:g}, {EXPONENT_BOUNDS[1]:g}]",
                f"the smallest shape within {TIE} bits per byte of the best prediction is chosen",
                *([f"the choice is among the shapes confirmed by training {pc.confirm_fraction:.0%} of the budget "
                   f"(the fit's first choice and the speedrun's {SPEEDRUN_SHAPE[0]}x{SPEEDRUN_SHAPE[1]}); each "
                   f"prediction is the refitted curve moved by its miss at the confirmation"] if confirmed else []),
                *(["tokens/s on the GPU = datasheet dense bf16 FLOP/s x plan.mfu / FLOPs per token; the loss fit "
                   "comes from this machine's small probes and is extrapolated far beyond them"] if gpu_flops else
                  [f"candidates within {EXTRAPOLATE:g}x the largest probe's parameters"])]}


def _recipe_yaml(cfg: RunConfig, folder: Path, chosen: dict, seconds: float, plan: dict, gpu: bool) -> str:
    """The chosen recipe as a config ``lmforge run --config`` trains; validated before anything is written."""
    batch, lr = _batch(chosen, gpu)
    steps = chosen["tokens"] / (batch * RECIPE["model"]["context"])
    warmup = RECIPE["train"]["warmup_steps"]
    if steps < warmup + budget.MIN_STEPS:
        raise ConfigError(f"--budget: {plan['budget']['text']} buys about {steps:.0f} steps of the best model for it "
                          f"here, fewer than the recipe's {warmup} warmup steps + {budget.MIN_STEPS}; give a longer "
                          f"budget")
    tree = _tree(cfg, folder.name, chosen["d_model"], chosen["n_layers"],
                 {"steps": "auto", "max_seconds": seconds, "batch_size": batch, "lr": lr})
    tree["runs_dir"] = str(folder.parent)
    load_config(None, base=tree)  # a plan that would not load is a bug here, not a file for the user
    fit = plan["fit"]
    head = [f"# lmforge plan --budget {plan['budget']['text']}" + (f" --gpu {plan['gpu']}" if plan["gpu"] else ""),
            f"# target: {plan['target']}",
            f"# predicted held-out bits per byte: {chosen['predicted_bpb']:.3f} "
            f"(fit over {fit['points']} probes, rms error {fit['rms_error']:.3f})",
            f"# {chosen['params']:,} parameters, about {chosen['tokens_per_s']:,.0f} tokens/s, "
            f"{chosen['tokens']:,.0f} tokens in the budget (train.steps: auto measures the real speed)",
            f"# train it: lmforge run --config {folder / 'plan.yaml'}"]
    return "\n".join(head) + "\n" + yaml.safe_dump(tree, sort_keys=False)
