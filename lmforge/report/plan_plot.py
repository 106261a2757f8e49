"""The plot of ``lmforge plan``: predicted held-out bits per byte against the training budget.

One line, the best candidate's prediction at each budget of the plan's curve (1-60 minutes on this
machine, 15 minutes to a day with ``--gpu``), the chosen budget marked, and the bits per byte that
plans already trained reached (:func:`achieved_points`: every ``runs_dir/*/plan.json`` of the same
target whose run folder holds a ``summary.json``). Drawn with matplotlib's Agg renderer::

    write_plan_plot(Path("runs/plan-5m/plan.png"), plan)   # plan: plan.json's content
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmforge import artifacts


def achieved_points(runs_dir: Path, target: str) -> list[dict]:
    """``{minutes, val_bpb, predicted_bpb, run}`` of every plan for ``target`` under ``runs_dir`` that was trained."""
    found = []
    for plan_file in sorted(runs_dir.glob("*/plan.json")):
        summary_file = plan_file.parent / "summary.json"
        try:
            plan, summary = (json.loads(f.read_text(encoding="utf-8")) for f in (plan_file, summary_file))
        except (OSError, ValueError):
            continue  # planned, not trained yet (or a damaged file): nothing achieved to show
        if plan.get("target") == target and isinstance(summary.get("val_bpb"), (int, float)):
            found.append({"minutes": plan["budget"]["seconds"] / 60.0, "val_bpb": summary["val_bpb"],
                          "predicted_bpb": plan["chosen"]["predicted_bpb"], "run": str(plan_file.parent)})
    return found


def plot(plan: dict) -> bytes:
    curve, chosen = plan["curve"], plan["chosen"]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    ax.plot([c["minutes"] for c in curve], [c["predicted_bpb"] for c in curve], "-o", color="tab:blue", ms=3,
            label="shared fit (best shape at each budget)")
    minutes = plan["budget"]["seconds"] / 60.0
    ax.plot([minutes], [chosen["predicted_bpb"]], "*", color="tab:red", ms=14,
            label=f"chosen: width {chosen['d_model']}, {chosen['n_layers']} layers, "
                  f"{chosen['predicted_bpb']:.3f} predicted")
    for c in plan.get("confirmations", []):  # measured, at a share of the budget: where the prediction is anchored
        ax.plot([c["seconds"] / 60.0], [c["bpb"]], "^", color="tab:green", ms=7)
        ax.annotate(f"{c['d_model']}x{c['n_layers']}", (c["seconds"] / 60.0, c["bpb"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    if plan.get("confirmations"):
        ax.plot([], [], "^", color="tab:green", ms=7, label="confirmations (measured; width x layers)")
    if plan.get("achieved"):
        ax.plot([a["minutes"] for a in plan["achieved"]], [a["val_bpb"] for a in plan["achieved"]], "s",
                color="black", ms=6, label="achieved (plans trained)")
    ax.set_xscale("log")
    ax.set_xticks([c["minutes"] for c in curve], [f"{c['minutes']:.3g}" for c in curve])
    ax.minorticks_off()
    ax.set_xlabel("training budget (minutes" + (f" on {plan['gpu']})" if plan.get("gpu") else " on this machine)"))
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"lmforge plan: {plan['target']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def write_plan_plot(path: Path, plan: dict) -> Path:
    artifacts.write_bytes(path, plot(plan))
    return path
