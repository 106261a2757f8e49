"""What a sweep leaves behind: the result table, the plots, the best config and a summary.

:func:`write_results` reads an Optuna study and writes, under the sweep's folder:

- ``results.md`` and ``results.csv``: one row per trial (best first): state, value, parameters,
  steps trained (a pruned trial stops early), seconds;
- ``plots/``: optimization history, parameter importance, parallel coordinates, slice and
  intermediate values (the validation curves that pruning judged), drawn by
  ``optuna.visualization.matplotlib`` on the Agg backend;
- ``best.yaml``: the base config with the best trial's values, a recipe for ``lmforge run --config``;
- ``summary.json``: counts by state, the best trial, the baseline trial.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig, SweepConfig, to_yaml
from lmforge.report.card import fmt
from lmforge.tune.space import Param, with_values

PLOTS = {"history": "plot_optimization_history", "importance": "plot_param_importances",
         "parallel": "plot_parallel_coordinate", "slice": "plot_slice", "intermediate": "plot_intermediate_values"}


def trial_rows(study, params: list[Param]) -> list[dict[str, Any]]:
    """One dict per trial: completed trials by value (best first), then pruned, then the rest."""
    order = {"COMPLETE": 0, "PRUNED": 1}
    trials = sorted(study.trials, key=lambda t: (order.get(t.state.name, 2),
                                                 t.value if t.value is not None else math.inf, t.number))
    rows = []
    for t in trials:
        seconds = t.duration.total_seconds() if t.duration is not None else None
        row = {"trial": t.number, "state": t.state.name.lower(), "value": t.value,
               "steps": t.user_attrs.get("steps"), "seconds": round(seconds, 1) if seconds is not None else None}
        row.update({p.key: t.params.get(p.key) for p in params})
        if t.user_attrs.get("baseline"):
            row["state"] += " (baseline)"
        rows.append(row)
    return rows


def _table(rows: list[dict], metric: str) -> str:
    if not rows:
        return "No trials yet.\n"
    header = [metric if k == "value" else k for k in rows[0]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v, k) if k != "trial" else str(v) for k, v in r.items()) + " |")
    return "\n".join(lines) + "\n"


def _plots(study, out: Path) -> dict[str, str]:
    """Draw each plot Optuna can make from the trials so far; return name -> file (or the reason it is missing)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna.visualization.matplotlib as vis

    out.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    made = {}
    for name, fn in PLOTS.items():
        if name != "intermediate" and len(done) < (3 if name == "importance" else 1):
            made[name] = "skipped: too few completed trials"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks these plots experimental and warns on tiny studies
            ax = getattr(vis, fn)(study)
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        made[name] = str(out / f"{name}.png")
    return made


def write_results(study, base: RunConfig, params: list[Param], out: Path, command: str = "") -> dict:
    """Write the files listed in the module docstring under ``out``; return the summary."""
    metric = base.sweep.metric
    rows = trial_rows(study, params)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = min(done, key=lambda t: t.value) if done else None
    baseline = next((t for t in done if t.user_attrs.get("baseline")), None)
    summary: dict[str, Any] = {
        "study": study.study_name, "metric": metric, "trials": states,
        "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params},
        "baseline": None if baseline is None else {"trial": baseline.number, "value": baseline.value,
                                                   "params": baseline.params},
    }
    if best is not None:
        recipe = with_values(base, best.params, name=f"{base.name}-best", sweep=SweepConfig().model_dump())
        header = (f"# Best config of sweep '{base.name}': trial {best.number}, {metric} {best.value:.4f}"
                  + (f" (baseline {baseline.value:.4f})" if baseline is not None else "") + "\n"
                  + "".join(f"#   {k} = {v!r}\n" for k, v in best.params.items())
                  + f"# Run it: lmforge run --config {out / 'best.yaml'}\n")
        (out / "best.yaml").write_text(header + to_yaml(recipe) + "\n", encoding="utf-8")
        summary["best_config"] = str(out / "best.yaml")
    summary["plots"] = _plots(study, out / "plots")
    lines = [f"# Sweep {base.name}", "",
             f"Minimizing {metric}; trials by state: " + ", ".join(f"{k} {v}" for k, v in states.items()) + ".", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["Search space:", "", *[f"- {p.describe()}" for p in params], "", _table(rows, metric)]
    if best is not None:
        lines.append(f"Best: trial {best.number}, {metric} {best.value:.4f}; recipe `best.yaml`.")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary
