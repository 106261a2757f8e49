"""Plots of the training metrics: the run card's curves and the overlaid curves of ``lmforge compare``.

Both read the rows of ``train/metrics.jsonl`` (:func:`lmforge.train.metrics.read_metrics`): ``train``
rows (loss, lr, grad_norm, tokens_per_s, tokens), ``val`` rows (loss, bpb) and ``tasks`` rows
(``task.metric`` scores). Figures are drawn with matplotlib's Agg renderer (no display, no global
pyplot state) and returned as PNG bytes::

    png = training_curves(rows, "demo")                  # one multi-panel figure for the run card
    png = overlaid_curves({"lr-1e-3": rows_a, "lr-3e-3": rows_b}, {"lr-1e-3": 2.1, "lr-3e-3": 2.0})
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from functools import partial

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLUMNS = 3  # panels per row of the run card's figure (4 when that fills two rows)


def points(metrics: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of every row of ``kind`` that has a finite number under ``key``."""
    return [(float(m["step"]), float(m[key])) for m in metrics
            if m.get("kind") == kind and isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]


def smooth(values: Sequence[float]) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it); longer runs smooth more."""
    beta = min(0.98, max(0.0, 1.0 - 10.0 / max(1, len(values))))
    out, avg = [], 0.0
    for t, x in enumerate(values, 1):
        avg = beta * avg + (1.0 - beta) * x
        out.append(avg / (1.0 - beta**t))
    return out


def gap_points(metrics: list[dict]) -> list[tuple[float, float, float]]:
    """``(step, train loss, val loss)`` at every validation estimate.

    The training loss is the last one logged at or before the estimate's step (itself the mean over
    the ``train.log_every`` steps before it, measured with dropout on).
    """
    train = points(metrics, "train", "loss")
    out, i = [], -1
    for step, val in points(metrics, "val", "loss"):
        while i + 1 < len(train) and train[i + 1][0] <= step:
            i += 1
        if i >= 0:
            out.append((step, train[i][1], val))
    return out


def tokens_per_step(metrics: list[dict]) -> float | None:
    """Training tokens per optimizer step, from the last ``train`` row that logged ``tokens``."""
    rows = [m for m in metrics if m.get("kind") == "train" and m.get("tokens") and m.get("step")]
    return float(rows[-1]["tokens"]) / float(rows[-1]["step"]) if rows else None


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _line(ax, pts: list[tuple[float, float]], *args, **kwargs) -> None:
    if pts:
        ax.plot(*zip(*pts, strict=True), *args, **kwargs)


# ------------------------------------------------------------------ run card
def _loss_panel(ax, metrics: list[dict]) -> None:
    train, val = points(metrics, "train", "loss"), points(metrics, "val", "loss")
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (raw)")
        ax.plot(steps, smooth(losses), color="tab:blue", lw=2, label="train (smoothed)")
    _line(ax, val, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    if train or val:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss measurements", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="nats/token", title="loss: train and validation")


def _gap_panel(ax, metrics: list[dict]) -> None:
    gaps = [(s, v - t) for s, t, v in gap_points(metrics)]
    _line(ax, gaps, "o-", color="tab:red", lw=1.5, ms=4)
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set(xlabel="step", ylabel="val - train (nats/token)", title="generalization gap")


def _series(ax, metrics: list[dict], *, kind: str, key: str, title: str, color: str, style: str = "-") -> None:
    _line(ax, points(metrics, kind, key), style, color=color, lw=1.5, ms=4)
    ax.set(xlabel="step", title=title)


def _tasks_panel(ax, metrics: list[dict]) -> None:
    keys = list(dict.fromkeys(k for m in metrics if m.get("kind") == "tasks" for k in m
                              if k not in ("step", "kind", "time")))
    for key in keys:
        _line(ax, [(s, 100 * v) for s, v in points(metrics, "tasks", key)], "o-", lw=1.5, ms=3, label=key)
    ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="%", title="evaluation tasks during training")


def training_curves(metrics: list[dict], title: str) -> bytes:
    """The run card's figure: loss, bits per byte, generalization gap, learning rate, gradient norm,
    tokens/s and task scores, each panel drawn only when its measurements exist (loss always)."""
    panels = [_loss_panel]
    if points(metrics, "val", "bpb"):
        panels.append(partial(_series, kind="val", key="bpb", title="validation bits per byte", color="tab:green",
                              style="s-"))
    if gap_points(metrics):
        panels.append(_gap_panel)
    for key, label, color in (("lr", "learning rate", "tab:purple"), ("grad_norm", "gradient norm", "tab:brown"),
                              ("tokens_per_s", "throughput (tokens/s)", "tab:cyan")):
        if points(metrics, "train", key):
            panels.append(partial(_series, kind="train", key=key, title=label, color=color))
    if any(m.get("kind") == "tasks" for m in metrics):
        panels.append(_tasks_panel)
    cols = min(4 if len(panels) in (7, 8) else COLUMNS, len(panels))  # 7 or 8 panels: two full rows
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, draw in zip(axes, panels, strict=False):
        draw(ax, metrics)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _png(fig)


# ------------------------------------------------------------------ compare
def overlaid_curves(runs: Mapping[str, list[dict]], final_bpb: Mapping[str, float | None], title: str) -> bytes:
    """Four panels, one colour per run: training loss (smoothed) and validation loss against step,
    validation bits per byte against step and against training tokens (a star: the final full-text
    score of the eval stage). Without any bits per byte, the last two show validation loss."""
    use_bpb = any(points(m, "val", "bpb") for m in runs.values())
    key, label = ("bpb", "validation bits/byte") if use_bpb else ("loss", "validation loss (nats/token)")
    fig = Figure(figsize=(11, 7.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_train, ax_val), (ax_step, ax_tok) = fig.subplots(2, 2)
    for i, (name, metrics) in enumerate(runs.items()):
        c = f"C{i % 10}"
        train = points(metrics, "train", "loss")
        if train:
            steps, losses = zip(*train, strict=True)
            ax_train.plot(steps, smooth(losses), color=c, lw=1.8, label=name)
        _line(ax_val, points(metrics, "val", "loss"), "o-", color=c, lw=1.5, ms=3, label=name)
        curve = points(metrics, "val", key)
        _line(ax_step, curve, "o-", color=c, lw=1.5, ms=3, label=name)
        per_step = tokens_per_step(metrics)
        if per_step:
            _line(ax_tok, [(s * per_step, v) for s, v in curve], "o-", color=c, lw=1.5, ms=3, label=name)
        final = final_bpb.get(name) if use_bpb else None
        if final is not None and curve:
            ax_step.plot([curve[-1][0]], [final], "*", color=c, ms=12)
            if per_step:
                ax_tok.plot([curve[-1][0] * per_step], [final], "*", color=c, ms=12)
    ax_train.set(xlabel="step", ylabel="nats/token", title="training loss (smoothed)")
    ax_val.set(xlabel="step", ylabel="nats/token", title="validation loss")
    ax_step.set(xlabel="step", ylabel=label, title=f"{label} (star: final, whole validation text)")
    ax_tok.set(xlabel="training tokens", ylabel=label, title=f"{label} against tokens seen")
    for ax in (ax_train, ax_val, ax_step, ax_tok):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _png(fig)
