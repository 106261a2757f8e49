"""The CPU speedrun: train configs/speedrun-cpu.yaml for its 5-minute budget and plot held-out bits per byte.

Runs ``lmforge run`` up to the ``eval`` stage for the recipe (and, with
``--against demo``, for the demo recipe on the same split and the same time
budget, one after the other so neither slows the other), then:

- prints the final figure: bits per byte on the whole held-out tail (the ``eval``
  stage scores every validation token), the steps and tokens/s reached;
- plots the in-training validation estimate (``train.eval_batches`` fixed batches,
  every ``train.eval_every`` steps) against training seconds into
  ``docs/img/speedrun.png``.

The split is nanoGPT's: the 42 embedded works concatenated in the order sorted()
gives their file names, the first 90% of the characters train, the last 10% are
held out (``data.split: tail``). Wall time on a shared machine is noisy: for the
figure that counts, run it on idle cores. Run::

    .venv/bin/python benchmarks/speedrun.py                        # ~6 minutes
    .venv/bin/python benchmarks/speedrun.py --against demo          # ~12 minutes, both curves
    .venv/bin/python benchmarks/speedrun.py --seconds 20 --runs-dir /tmp/sr   # quick check
    .venv/bin/python benchmarks/speedrun.py --threads 1                      # a busy machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.config import RunConfig, load_config  # noqa: E402
from lmforge.pipeline import run  # noqa: E402


def recipe(name: str, args: argparse.Namespace) -> RunConfig:
    """The named recipe with the speedrun's split, time budget, folder and any thread / step override."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    data = cfg.model_dump()
    data["name"], data["runs_dir"] = f"speedrun-{name}", args.runs_dir
    data["data"].update(split="tail", val_fraction=0.1)
    data["train"].update(max_seconds=args.seconds, resume=False, progress=False, ckpt_every=0)
    if args.threads:
        data["train"]["threads"] = args.threads
    if args.steps and name == "speedrun-cpu":
        data["train"]["steps"] = args.steps
    return RunConfig.model_validate(data)


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds, validation bpb) at each in-training evaluation."""
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["seconds"], r["bpb"]) for r in rows if r["kind"] == "val" and "bpb" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget per recipe (train.max_seconds)")
    ap.add_argument("--against", default="", help="also run this recipe from configs/ (e.g. demo) at the same budget")
    ap.add_argument("--runs-dir", default="runs", help="where the runs are written")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the recipes' own train.threads)")
    ap.add_argument("--steps", type=int, default=0, help=(
        "the speedrun's schedule length (0 = the recipe's: auto, measured for --seconds on this machine)"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "speedrun.png"), help="PNG of bpb against time")
    args = ap.parse_args()

    results = {}
    for name in ["speedrun-cpu", *([args.against] if args.against else [])]:
        cfg = recipe(name, args)
        out = run(cfg, until="eval", force=("train", "eval"))
        train, ev = out["train"], out["eval"]
        results[name] = curve(cfg.run_dir)
        print(f"{name}: held-out {ev['val']['bpb']:.4f} bits per byte after {train['train_seconds']:.0f} s of "
              f"training ({train['steps']} steps, {train['tokens_per_s']:,.0f} tokens/s, MFU {train['mfu']:.1%})")
        if budget := train.get("budget"):
            print(f"  steps: auto chose {budget['calibrated_steps']} steps ({budget['seconds_per_step']:.3f} s each); "
                  f"training used {budget['used_fraction']:.1%} of the {budget['max_seconds']:g} s budget")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in results.items():
        ax.plot([s for s, _ in points], [b for _, b in points], marker="o", markersize=3, label=name)
    ax.axhline(2.1, color="grey", linestyle="--", linewidth=0.8, label="target 2.1")
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("CPU speedrun: validation estimate during training")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
