"""``lmforge run``: the whole way from text to a reported model, stage by stage.

    collect -> clean -> docs -> tokenizer -> pack -> train -> eval -> finetune -> sample -> report

Each stage reads folders and writes its own folder under ``runs/<name>/`` with a
``manifest.json``: the config that shaped it, the fingerprints of its inputs,
its output statistics and its timing. A stage whose manifest matches the
current config and inputs is skipped, so a rerun (or a run that was killed)
picks up where it stopped; training itself resumes from its newest checkpoint.

    from lmforge.pipeline import run
    summary = run(load_config("configs/demo.yaml"))
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import RunConfig, save_config

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Stage:
    name: str
    keys: Callable[[RunConfig], dict]  # the config that shapes this stage's output
    upstream: tuple[str, ...]
    fn: Callable[[RunConfig, Path, dict], dict]  # (cfg, run_dir, upstream outputs) -> outputs
    clean: bool = True  # remove the previous outputs before running (train keeps its checkpoints)


# ------------------------------------------------------------------ stage bodies
def _collect(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import collect

    return collect.main(cfg, run_dir / "collect")


def _clean(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import curate

    return curate.main(cfg, run_dir / "collect", run_dir / "clean", up["collect"], up["_fp"]["collect"])


def _clean_keys(cfg: RunConfig) -> dict:
    from lmforge.data.curate import eval_files, file_signature

    return {"clean": cfg.clean.model_dump(), "eval": file_signature(eval_files(cfg))}


def _docs(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import split

    return split.main(cfg, run_dir / "docs", inputs=[str(run_dir / "clean" / "docs")])


def _tokenizer(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import tokenizer

    return tokenizer.main(cfg, run_dir / "docs", run_dir / "tokenizer")


def _pack(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import pack

    return pack.main(cfg, run_dir / "docs", run_dir / "tokenizer", run_dir / "pack",
                     shard_tokens=cfg.data.shard_tokens)


def _train(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.eval.tasks import TaskProbe
    from lmforge.train import loop

    pack = up["pack"]
    bpt = pack["val"]["bytes"] / max(1, pack["val"]["tokens"])
    # Built here, so train imports no eval; its tasks are loaded (and checked) before training starts.
    probe = TaskProbe(cfg.eval.tasks, cfg.train.tasks_every, Tokenizer.load(run_dir / "tokenizer"), cfg.model.context)
    return loop.main(cfg, run_dir, bytes_per_token=bpt, data_fingerprint=up["_fp"]["pack"],
                     on_eval=up.get("_on_eval"), probe=probe)


def _eval(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.eval import heldout

    return heldout.main(cfg, run_dir, up["pack"])


def _sample(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.serve import sample

    return sample.main(cfg, run_dir)


def _report(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.report import run_card

    return run_card.main(cfg, run_dir, up)


def _finetune(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    if not cfg.finetune.enabled:
        return {"skipped": "finetune.enabled is false"}
    from lmforge.finetune import run as finetune

    # The eval stage scored this run's own model the same way: it is the base unless finetune.init names another.
    return finetune.main(cfg, run_dir, base_val=None if cfg.finetune.init else up["eval"]["val"])


def _finetune_keys(cfg: RunConfig) -> dict:
    from lmforge.finetune.setup import data_files, file_digest

    if not cfg.finetune.enabled:
        return {"enabled": False}
    ft = cfg.finetune
    return {"finetune": ft.model_dump(), "data": file_digest([*data_files(ft)[0], *data_files(ft)[1]]),
            "train": cfg.train.model_dump(include={"device", "weight_decay", "grad_clip", "beta1", "beta2", "eps"}),
            "eval": cfg.eval.model_dump(include={"stride", "max_tokens", "batch_size"}), "seed": cfg.seed}


def _train_keys(cfg: RunConfig) -> dict:
    from lmforge.train.loop import RESUMABLE_CHANGES

    train = {k: v for k, v in cfg.train.model_dump().items()
             if k not in RESUMABLE_CHANGES or k in ("steps", "max_seconds")}
    return {"model": cfg.model.model_dump(), "train": train, "seed": cfg.seed}


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("collect", lambda c: {"collect": c.collect.model_dump(), "train": c.data.train,
                                "inputs": _input_signature(c, collect=True)}, (), _collect),
    # clean=False: the clean stage keeps finished shards of an interrupted run and wipes its folder itself.
    Stage("clean", _clean_keys, ("collect",), _clean, clean=False),
    Stage("docs", lambda c: {"data": c.data.model_dump(), "seed": c.seed, "inputs": _input_signature(c)}, ("clean",),
          _docs),
    Stage("tokenizer", lambda c: {"tokenizer": c.tokenizer.model_dump()}, ("docs",), _tokenizer),
    Stage("pack", lambda c: {"context": c.model.context, "shard_tokens": c.data.shard_tokens}, ("docs", "tokenizer"), _pack),
    Stage("train", _train_keys, ("pack",), _train, clean=False),
    Stage("eval", lambda c: {"eval": c.eval.model_dump(exclude={"text"})}, ("pack", "train"), _eval),
    # clean=False: an interrupted fine-tuning run resumes from its checkpoints, like train.
    Stage("finetune", _finetune_keys, ("pack", "train", "eval"), _finetune, clean=False),
    Stage("sample", lambda c: {"sample": c.sample.model_dump()}, ("train",), _sample),
    Stage("report", lambda c: {"always": time.time()}, ("docs", "tokenizer", "pack", "train", "eval", "finetune", "sample"),
          _report),
]}
ORDER = list(STAGES)


def _input_signature(cfg: RunConfig, collect: bool = False) -> list:
    """Name, size and mtime of every input file: a changed file re-runs the pipeline from the start.

    ``collect=True``: the files the collect stage reads (data.train and the local collect.sources).
    """
    names = [*cfg.data.train, *cfg.data.val]
    if collect:
        names = [*cfg.data.train, *(p for s in cfg.collect.sources for p in (s.path, s.dataset, s.urls_file) if p)]
    sig = []
    for p in names:
        for path in [Path(g) for g in sorted(glob.glob(p))] if glob.has_magic(p) else [Path(p)]:
            files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
            sig += _file_stats(files)
    return sig


def _file_stats(files: list[Path]) -> list:
    sig = []
    for f in files:
        st = f.stat() if f.exists() else None
        sig.append([str(f), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sig


def _fingerprint(stage: Stage, cfg: RunConfig, fps: dict[str, str]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "stage": stage.name, "keys": stage.keys(cfg),
                       "up": [fps[u] for u in stage.upstream]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".manifest.json.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, folder / "manifest.json")  # atomic: a reader never sees half a manifest


def run(cfg: RunConfig, until: str = "report", force: tuple[str, ...] = (),
        on_eval: Callable[[int, dict], bool] | None = None) -> dict:
    """Run every stage up to ``until``; returns the outputs of each stage by name.

    ``on_eval(step, val_metrics)`` is called at each validation estimate during training; returning
    True stops training there, unfinished (``lmforge sweep`` prunes trials this way).
    """
    from lmforge.runtime import barrier, join  # torch: imported only when a pipeline runs

    run_dir = cfg.run_dir
    rank, world = join(cfg.train)  # under torchrun, rank 0 alone prepares the data, evaluates and reports
    if world > 1 and ORDER.index(until) >= ORDER.index("train"):
        from lmforge.train.distributed import plan_batches

        plan_batches(cfg.train, world)  # a global batch the ranks cannot share fails before any work
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    outputs: dict = {"_fp": {}, "_seconds": {}, "_on_eval": on_eval}
    for name in ORDER[: ORDER.index(until) + 1]:
        stage = STAGES[name]
        folder = run_dir / name
        if world > 1 and name == "train":
            barrier()  # rank 0's data is ready; the other ranks take its stages' outputs from their manifests
            for done in ORDER[: ORDER.index(name)] if rank else ():
                manifest = read_manifest(run_dir / done) or {}
                outputs[done], outputs["_fp"][done] = manifest.get("outputs"), manifest.get("fingerprint")
        elif rank > 0:
            if "train" in outputs:  # the other ranks only train
                break
            continue
        fp = _fingerprint(stage, cfg, outputs["_fp"])
        manifest = read_manifest(folder)
        if manifest and manifest.get("fingerprint") == fp and name not in force:
            print(f"[{name}] up to date, skipped (runs/{cfg.name}/{name}/manifest.json)")
            outputs[name], outputs["_seconds"][name] = manifest["outputs"], manifest["seconds"]
            outputs["_fp"][name] = fp
            continue
        for tmp in folder.glob(".manifest.json.*"):  # a manifest cut short by a kill: never read, only removed
            tmp.unlink()
        if stage.clean and folder.exists():
            why = "the partial output of an interrupted run" if manifest is None else "its outdated output"
            print(f"[{name}] removing {why} ({folder})")
            shutil.rmtree(folder)
        print(f"[{name}] running")
        t0 = time.time()
        result = stage.fn(cfg, run_dir, outputs)
        seconds = round(time.time() - t0, 2)
        if result.get("complete") is False:  # interrupted on purpose: not done, resume next time
            print(f"[{name}] stopped early after {seconds:.1f}s; run the same command again to resume")
            outputs["_stopped"] = name
            return outputs
        if rank == 0:
            write_manifest(folder, {
                "stage": name, "format": FORMAT_VERSION, "fingerprint": fp, "config": stage.keys(cfg),
                "inputs": {u: outputs["_fp"][u] for u in stage.upstream}, "outputs": result,
                "seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        outputs[name], outputs["_fp"][name], outputs["_seconds"][name] = result, fp, seconds
        print(f"[{name}] done in {seconds:.1f}s")
    return outputs
