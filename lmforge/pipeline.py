"""``lmforge run``: the whole way from text to a reported model, stage by stage.

    collect -> clean -> docs -> tokenizer -> pack -> train -> eval -> finetune -> dpo -> sample -> report

Each stage reads folders and writes its own folder under ``runs/<name>/`` with a
``manifest.json`` (:mod:`lmforge.artifacts`): the config that shaped it, the
fingerprints of its inputs, its output statistics and its timing. A stage whose
manifest matches the current config and inputs is skipped, so a rerun (or a run
that was killed) picks up where it stopped; training itself resumes from its
newest checkpoint. Which config fields count for which stage is declared on the
fields themselves (``reuse`` marks in :mod:`lmforge.config`), not here.

    from lmforge.pipeline import run
    summary = run(load_config("configs/demo.yaml"))
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge import artifacts
from lmforge.config import RunConfig, save_config


def _no_inputs(cfg: RunConfig) -> dict:
    return {}


def _always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    fn: Callable[[RunConfig, Path, dict], dict]  # (cfg, run_dir, upstream outputs) -> outputs
    clean: bool = True  # remove the previous outputs before running (train keeps its checkpoints)
    inputs: Callable[[RunConfig], dict] = _no_inputs  # signatures of the files it reads besides its upstream
    enabled: Callable[[RunConfig], bool] = _always  # a stage switched off by its config only records that

    def keys(self, cfg: RunConfig) -> dict:
        """What shapes this stage's output: the config fields marked for it, and its input files."""
        if not self.enabled(cfg):
            return {"enabled": False}
        return {**artifacts.reuse_key(cfg, self.name), **self.inputs(cfg)}


# ------------------------------------------------------------------ stage bodies
def _collect(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import collect

    return collect.main(cfg, run_dir / "collect")


def _clean(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    from lmforge.data import curate

    return curate.main(cfg, run_dir / "collect", run_dir / "clean", up["collect"], up["_fp"]["collect"])


def _eval_texts(cfg: RunConfig) -> dict:
    from lmforge.data.curate import eval_files

    return {"eval": artifacts.file_signature(eval_files(cfg))}  # decontamination reads them


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


def _dpo(cfg: RunConfig, run_dir: Path, up: dict) -> dict:
    if cfg.finetune.preference.stage == "off":
        return {"skipped": "finetune.preference.stage is off"}
    from lmforge.finetune import run as finetune

    return finetune.preference_stage(cfg, run_dir)


def _dpo_data(cfg: RunConfig) -> dict:
    from lmforge.finetune.setup import EMBEDDED_DIR, PAIRS_TRAIN, PAIRS_VAL

    files = cfg.finetune.preference.data or [str(EMBEDDED_DIR / PAIRS_TRAIN), str(EMBEDDED_DIR / PAIRS_VAL)]
    return {"data": artifacts.content_digest(files)}


def _finetune_data(cfg: RunConfig) -> dict:
    """The fine-tuning sets, by content: the embedded ones may be reinstalled with a new mtime."""
    from lmforge.finetune.setup import data_files

    train, val = data_files(cfg.finetune)
    return {"data": artifacts.content_digest([*train, *val])}


def _collect_inputs(cfg: RunConfig) -> dict:
    from lmforge.data.collect import input_files

    return {"inputs": artifacts.file_signature(input_files(cfg))}


def _docs_inputs(cfg: RunConfig) -> dict:
    """data.train and data.val: a changed file re-runs the stage (data.val is read here, not collected)."""
    return {"inputs": artifacts.file_signature([*cfg.data.train, *cfg.data.val])}


STAGES: dict[str, Stage] = {s.name: s for s in [
    # clean=False: the collect stage keeps the finished tasks of an interrupted run and wipes its folder itself.
    Stage("collect", (), _collect, clean=False, inputs=_collect_inputs),
    # clean=False: the clean stage keeps finished shards of an interrupted run and wipes its folder itself.
    Stage("clean", ("collect",), _clean, clean=False, inputs=_eval_texts),
    Stage("docs", ("clean",), _docs, inputs=_docs_inputs),
    Stage("tokenizer", ("docs",), _tokenizer),
    Stage("pack", ("docs", "tokenizer"), _pack),
    Stage("train", ("pack",), _train, clean=False),
    Stage("eval", ("pack", "train"), _eval),
    # clean=False: an interrupted fine-tuning run resumes from its checkpoints, like train.
    Stage("finetune", ("pack", "train", "eval"), _finetune, clean=False, inputs=_finetune_data,
          enabled=lambda c: c.finetune.enabled),
    Stage("dpo", ("pack", "train", "eval", "finetune"), _dpo, clean=False, inputs=_dpo_data,
          enabled=lambda c: c.finetune.preference.stage != "off"),
    Stage("sample", ("train",), _sample),
    Stage("report", ("docs", "tokenizer", "pack", "train", "eval", "finetune", "dpo", "sample"), _report,
          inputs=lambda c: {"always": time.time()}),
]}
ORDER = list(STAGES)


def _fingerprint(stage: Stage, cfg: RunConfig, fps: dict[str, str]) -> str:
    return artifacts.digest({"v": artifacts.FORMAT_VERSION, "stage": stage.name, "keys": stage.keys(cfg),
                             "up": [fps[u] for u in stage.upstream]})


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
                manifest = artifacts.read_manifest(run_dir / done) or {}
                outputs[done], outputs["_fp"][done] = manifest.get("outputs"), manifest.get("fingerprint")
        elif rank > 0:
            if "train" in outputs:  # the other ranks only train
                break
            continue
        fp = _fingerprint(stage, cfg, outputs["_fp"])
        manifest = artifacts.read_manifest(folder)
        if manifest and manifest.get("fingerprint") == fp and name not in force:
            print(f"[{name}] up to date, skipped (runs/{cfg.name}/{name}/manifest.json)")
            outputs[name], outputs["_seconds"][name] = manifest["outputs"], manifest["seconds"]
            outputs["_fp"][name] = fp
            continue
        artifacts.remove_temp(folder)  # a manifest cut short by a kill: never read, only removed
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
            upstream = {u: outputs["_fp"][u] for u in stage.upstream}
            artifacts.write_manifest(folder, name, fp, stage.keys(cfg), upstream, result, seconds)
        outputs[name], outputs["_fp"][name], outputs["_seconds"][name] = result, fp, seconds
        print(f"[{name}] done in {seconds:.1f}s")
    return outputs
