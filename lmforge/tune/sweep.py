"""``lmforge sweep``: hyperparameter search with Optuna over any config field.

Each trial is a pipeline run (up to the eval stage) of the base config with the trial's values, under
``runs/<name>/trials/trial_NNN``; the data stages run once into ``runs/<name>/data`` and are shared
with every trial (a trial whose values change the data, e.g. ``tokenizer.vocab_size``, redoes them).
The objective is the eval stage's validation bits per byte (``sweep.metric``). At each in-training
validation estimate the trial reports the same quantity to Optuna, whose pruner (median rule or
successive halving) may stop it there. The study lives in SQLite, so rerunning the same command
resumes the sweep: finished trials count towards ``sweep.trials``, and a trial left running by a
crash is failed by its missed heartbeats and retried once, resuming from its last checkpoint::

    lmforge sweep --config configs/demo.yaml --space configs/sweep-space.yaml --name demo-sweep \\
        --sweep.trials=20 --train.steps=2000

Writes ``sweep.db``, ``results.md``/``results.csv``, ``plots/``, ``best.yaml`` (run it with
``lmforge run --config runs/demo-sweep/best.yaml``) and ``summary.json``; see docs/tuning.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from lmforge.config import ConfigError, RunConfig, SweepConfig
from lmforge.data.sources import DataError
from lmforge.tune.space import Param, baseline_values, load_space, with_values

HEARTBEAT_S, GRACE_S = 30, 120  # a RUNNING trial silent for GRACE_S is taken as crashed


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("lmforge sweep needs Optuna: pip install 'lmforge[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna, sc: SweepConfig, seed: int):
    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, sc.startup_trials))


def _pruner(optuna, sc: SweepConfig):
    if sc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sc.startup_trials, n_warmup_steps=sc.warmup_steps)
    if sc.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(cfg: RunConfig, space_text: str):
    """Create the study, or load it from ``sweep.storage`` and check it was started with the same space."""
    optuna = _optuna()
    sc = cfg.sweep
    url = sc.storage or f"sqlite:///{(cfg.run_dir / 'sweep.db').resolve()}"
    with warnings.catch_warnings():  # Optuna marks heartbeats experimental; they are what makes resuming safe
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    study = optuna.create_study(study_name=cfg.name, storage=storage, load_if_exists=True, direction="minimize",
                                pruner=_pruner(optuna, sc))
    for key, value in (("space", space_text), ("metric", sc.metric)):
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise ConfigError(f"sweep '{cfg.name}' in {url} was started with another {key}; resume it with the "
                              f"same one, or start a new sweep with another --name")
    # Seeded by the number of trials so far, so a resumed session does not replay the first one's draws.
    study.sampler = _sampler(optuna, sc, cfg.seed + len(study.trials))
    return study, url


def share_data(data_run: Path, trial_run: Path) -> None:
    """Give a trial the finished data stages (everything before train) of the sweep's data run.

    A stage the pipeline wipes before it reruns (``Stage.clean``) is hard-linked: no extra disk, and a
    trial that must redo it replaces the links instead of writing through them. A stage that manages
    its own folder is copied, so nothing a trial does can reach the shared files.
    """
    from lmforge.pipeline import ORDER, STAGES

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(s, d)

    for name in ORDER[:ORDER.index("train")]:
        src, dst = data_run / name, trial_run / name
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst, copy_function=link if STAGES[name].clean else shutil.copy2)


class Objective:
    """One call = one trial: a pipeline run of the trial's config, pruned through ``on_eval``."""

    def __init__(self, cfg: RunConfig, params: list[Param], optuna) -> None:
        self.cfg, self.params, self.optuna = cfg, params, optuna
        self.key = "bpb" if cfg.sweep.metric == "val_bpb" else "loss"

    def __call__(self, trial) -> float:
        from lmforge.pipeline import run

        values = {p.key: p.suggest(trial) for p in self.params}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            retried = self.optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        number = trial.number if retried is None else retried  # a retry resumes the crashed trial's run
        trial_cfg = with_values(self.cfg, values, name=f"trial_{number:03d}",
                                runs_dir=str(self.cfg.run_dir / "trials"), sweep=SweepConfig().model_dump())
        share_data(self.cfg.run_dir / "data", trial_cfg.run_dir)
        trial.set_user_attr("run_dir", str(trial_cfg.run_dir))
        last = {"step": 0}

        def on_eval(step: int, metrics: dict) -> bool:
            last["step"] = step
            trial.report(float(metrics.get(self.key, metrics["loss"])), step)
            return trial.should_prune()

        print(f"\n=== trial {trial.number}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()), flush=True)
        outputs = run(trial_cfg, until="eval", on_eval=on_eval)
        if "_stopped" in outputs:
            trial.set_user_attr("steps", last["step"])
            raise self.optuna.TrialPruned(f"pruned at step {last['step']}")
        trial.set_user_attr("steps", outputs["train"]["steps"])
        return float(outputs["eval"]["val"][self.key])


def _report(study, trial) -> None:
    state = trial.state.name.lower()
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    steps = trial.user_attrs.get("steps")
    where = f" at step {steps}" if state == "pruned" and steps is not None else ""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    top = min(done, key=lambda t: t.value) if done else None
    best = f" | best so far: trial {top.number}, {top.value:.4f}" if top else ""
    print(f"=== trial {trial.number} {state}{value}{where}{best}", flush=True)


def main(cfg: RunConfig, args: list[str]) -> dict:
    """Run (or resume) the sweep described by ``cfg.sweep`` over the base config ``cfg``."""
    from lmforge.pipeline import ORDER, run
    from lmforge.tune.results import write_results

    if not cfg.sweep.space:
        raise ConfigError("lmforge sweep needs a search space: --space FILE (see docs/tuning.md)")
    optuna = _optuna()
    params = load_space(cfg.sweep.space, cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    study, url = open_study(cfg, Path(cfg.sweep.space).read_text(encoding="utf-8"))
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    remaining = max(0, cfg.sweep.trials - finished)
    print(f"sweep '{cfg.name}': {finished} trial(s) finished, {remaining} to run ({url})")
    if remaining:
        # The data stages (everything before train), once; every trial shares them (see share_data).
        run(with_values(cfg, {}, name="data", runs_dir=str(cfg.run_dir)), until=ORDER[ORDER.index("train") - 1])
        if cfg.sweep.baseline and not study.trials:
            study.enqueue_trial(baseline_values(cfg, params), user_attrs={"baseline": True})
        t0 = time.time()
        study.optimize(Objective(cfg, params, optuna), n_trials=remaining, timeout=cfg.sweep.timeout,
                       catch=(ConfigError, DataError, FloatingPointError), callbacks=[_report], gc_after_trial=True)
        print(f"\nsweep session: {time.time() - t0:.0f}s")
    command = "lmforge " + " ".join(["sweep", *sys.argv[2:]]) if sys.argv[1:2] == ["sweep"] else ""
    summary = write_results(study, cfg, params, cfg.run_dir, command=command)
    summary["storage"] = url
    best = summary["best"]
    states = ", ".join(f"{v} {k}" for k, v in summary["trials"].items())
    print(f"trials: {states}")
    if best is None:
        print("no trial completed yet; nothing to recommend")
    else:
        print(f"best: trial {best['trial']}, {cfg.sweep.metric} {best['value']:.4f} with {best['params']}")
        print(f"recipe: {summary['best_config']}\ntable:  {cfg.run_dir / 'results.md'}")
    return summary

