"""The run card's judgement sections: the overfitting check and the evaluation tables.

- :func:`overfitting`: final training vs validation loss and a verdict, then the gap over time
  (training and validation loss at every in-training validation estimate) with its trend, and a
  note when validation loss turned up after its best.
- :func:`evaluation`: the held-out scores of the eval stage side by side (validation text and an
  equally long slice of the training text), every task with its counts (``acc 34% (34/100)``),
  the early-stopping outcome, and whatever else the eval stage returned.

Both are sections of :data:`lmforge.report.card.SECTIONS`: functions of
:class:`~lmforge.report.card_inputs.CardInputs` returning blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmforge.report.card_inputs import CardInputs
from lmforge.report.plots import gap_points, points
from lmforge.report.render import Heading, Para, Table, fmt, kv_table

_GAP_SMALL, _GAP_LARGE = 0.05, 0.25  # overfitting verdict thresholds on (val - train) loss, nats/token
MAX_GAP_ROWS = 12  # rows of the gap-over-time table; longer runs show evenly spaced estimates
_HELDOUT_ROWS = [("tokens", "tokens scored"), ("loss", "loss (nats/token)"), ("ppl", "perplexity"),
                 ("bpb", "bits per byte"), ("acc", "next-token accuracy")]
_TASK_METRICS = ("acc", "acc_norm", "acc_bytes", "chance", "exact_match", "f1")
_COUNTED = ("acc", "acc_norm", "acc_bytes", "exact_match")  # per-item 0/1 scores: shown with their counts


# ------------------------------------------------------------------ overfitting
def _final(summary: dict, metrics: list[dict], kind: str) -> float | None:
    """The final loss of ``kind`` ('train' or 'val'): the summary's value, else the last logged point."""
    value = summary.get(f"{kind}_loss")
    if isinstance(value, (int, float)):
        return float(value)
    pts = points(metrics, kind, "loss")
    return pts[-1][1] if pts else None


def _spread(rows: list, n: int) -> list:
    """At most ``n`` rows, evenly spaced, always with the first and the last."""
    if len(rows) <= n:
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]


def _val_trend(metrics: list[dict]) -> str | None:
    """How validation loss moved at its last estimates: 'rising', 'stalled', 'improving' or None (too few).

    'rising': the last estimate is more than 1% above the best one. 'stalled': over the last third of
    the estimates (at least the last three) validation loss improved by under 0.5% while training loss
    fell by over 2%: the model gains on its training text only. Both are overfitting; a gap that grows
    while validation loss still falls is not (the model still gets better on new text).
    """
    vals = points(metrics, "val", "loss")
    if len(vals) < 3:
        return None
    if vals[-1][1] > min(v for _, v in vals) * 1.01:
        return "rising"
    pairs = gap_points(metrics)
    tail = pairs[-max(3, len(pairs) // 3):] if len(pairs) >= 3 else []
    if tail:
        (_, t0, v0), (_, t1, v1) = tail[0], tail[-1]
        if v0 - v1 < 0.005 * v0 and t0 - t1 > 0.02 * t0:
            return "stalled"
    return "improving"


def _verdict(gap: float, trend: str | None) -> str:
    if gap < -_GAP_SMALL:
        return ("Validation loss is below training loss (dropout during training, or a noisy training "
                "estimate): no sign of overfitting.")
    if trend in ("rising", "stalled"):
        how = "rose after its best" if trend == "rising" else "stopped improving while training loss fell"
        return (f"Validation loss {how}: the model is overfitting (memorizing the training text). "
                "More data, fewer steps, a smaller model or dropout would help.")
    if gap <= _GAP_SMALL:
        return "Training and validation loss agree: no sign of overfitting."
    if gap <= _GAP_LARGE:
        return "A small generalization gap: the model fits the training text a little better than new text."
    if trend == "improving":
        return ("A large generalization gap, but validation loss was still falling at the last estimates: "
                "not overfitting. The model fits its training text much better than new text, yet what it "
                "learns still carries over, so more training still helps; overfitting starts when "
                "validation loss stops falling.")
    return ("A large generalization gap (too few validation estimates to tell whether validation loss "
            "still falls): the model fits its training text much better than new text.")


def overfitting(c: CardInputs) -> list:
    blocks: list = [Heading(2, "Overfitting check: training vs validation")]
    train, val = _final(c.summary, c.metrics, "train"), _final(c.summary, c.metrics, "val")
    if train is None or val is None:
        blocks.append(Para("Not enough measurements: the check needs a final training and a final validation loss."))
    else:
        gap = val - train
        blocks += [Table(["measure", "value"], [["final training loss", fmt(train)], ["final validation loss", fmt(val)],
                                                ["gap (validation - training)", fmt(gap)]]),
                   Para(_verdict(gap, _val_trend(c.metrics)))]
    over_time = gap_points(c.metrics)
    if len(over_time) >= 2:
        bpb = dict(points(c.metrics, "val", "bpb"))
        rows = [[fmt(s, "step"), fmt(t), fmt(v), fmt(v - t), fmt(bpb.get(s))] for s, t, v in _spread(over_time,
                                                                                                      MAX_GAP_ROWS)]
        blocks += [Para("The gap over time, at each validation estimate (training loss: the last logged mean, "
                        "dropout on):"),
                   Table(["step", "training loss", "validation loss", "gap", "validation bits/byte"], rows)]
        (s0, t0, v0), (s1, t1, v1) = over_time[0], over_time[-1]
        change = (v1 - t1) - (v0 - t0)
        trend = "grew" if change > _GAP_SMALL else "shrank" if change < -_GAP_SMALL else "stayed about the same"
        blocks.append(Para(f"The gap (validation - training) {trend}: {fmt(v0 - t0)} at step {fmt(s0, 'step')}, "
                           f"{fmt(v1 - t1)} at step {fmt(s1, 'step')}."))
    val_points = points(c.metrics, "val", "loss")
    if len(val_points) >= 3:
        best_step, best = min(val_points, key=lambda p: p[1])
        last_step, last = val_points[-1]
        if last > best * 1.01:  # more than 1% above the best: the curve turned up
            blocks.append(Para(f"Validation loss rose from its best {fmt(best)} at step {fmt(best_step, 'step')} "
                               f"to {fmt(last)} at step {fmt(last_step, 'step')}: training went on past the "
                               f"point of best generalization."))
    return blocks


# ------------------------------------------------------------------ evaluation
def _heldout(ev: dict) -> list:
    val, train = ev.get("val"), ev.get("train")
    if not isinstance(val, Mapping):
        return []
    train = train if isinstance(train, Mapping) else {}
    rows = []
    for key, label in _HELDOUT_ROWS:
        v, t = val.get(key), train.get(key)
        if v is None and t is None:
            continue
        diff = v - t if isinstance(v, (int, float)) and isinstance(t, (int, float)) and key != "tokens" else None
        rows.append([label, fmt(v, key), fmt(t, key), fmt(diff, key)])
    at = f" at step {fmt(ev['step'], 'step')}" if isinstance(ev.get("step"), int) else ""
    return [Heading(3, "Held-out text"),
            Para(f"Scored by the eval stage{at}: every token of the validation text (sliding window) and an "
                 "equally long slice of the training text."),
            Table(["measure", "validation", "training slice", "validation - training"], rows)]


def _task_cell(record: Mapping, metric: str) -> str:
    value, n = record.get(metric), record.get("items")
    if not isinstance(value, (int, float)):
        return "-"
    if metric in _COUNTED and isinstance(n, int) and n > 0:
        return f"{fmt(value, metric)} ({round(value * n)}/{n})"
    return fmt(value, metric)


def _tasks(records: Any) -> list:
    if not (isinstance(records, list) and records and all(isinstance(r, Mapping) for r in records)):
        return []
    metrics = [m for m in _TASK_METRICS if any(m in r for r in records)]
    rows = [[str(r.get("task", "?")), str(r.get("kind", "")), fmt(r.get("items"), "items"),
             *(_task_cell(r, m) for m in metrics)] for r in records]
    return [Heading(3, "Tasks"), Table(["task", "kind", "items", *metrics], rows),
            Para("acc: the most likely choice is right; acc_norm / acc_bytes: log-likelihood per character / "
                 "byte; chance: a random guess; exact_match and f1: greedy answers after SQuAD normalisation. "
                 "Per-item answers are in eval/tasks/TASK.jsonl.")]


def _early_stopping(training: dict, summary: dict) -> list:
    reason = training.get("stopped_by") or summary.get("stopped_by")
    steps = training.get("steps", summary.get("steps"))
    if reason is None or steps is None:
        return []
    planned, patience = training.get("planned_steps"), training.get("early_stop_patience")
    min_delta, best, best_step = (training.get("early_stop_min_delta"), training.get("best_val_loss"),
                                  training.get("best_step"))
    of = f" of {fmt(planned, 'steps')}" if planned else ""
    rows = [["stopped by", str(reason)], ["steps trained", fmt(steps, "steps") + of],
            ["patience (estimates)", fmt(patience)], ["minimum improvement (nats/token)", fmt(min_delta)],
            ["best validation estimate", fmt(best)], ["at step", fmt(best_step, "step")]]
    best_text = f"; the best validation estimate was {fmt(best)} at step {fmt(best_step, 'step')}" if best else ""
    if reason == "early_stop":
        text = (f"Early stopping ended training at step {fmt(steps, 'steps')}{of}: the validation estimate did not "
                f"improve on its best by more than {fmt(min_delta)} for {fmt(patience)} estimate(s) in a row"
                f"{best_text}.")
    elif reason == "steps":
        text = ("Early stopping was off (train.early_stop_patience = 0)" if not patience else
                f"Early stopping (patience {fmt(patience)}) did not trigger")
        text += f": training ran all {fmt(steps, 'steps')} steps{best_text}."
    elif reason == "time":
        text = f"The time budget (train.max_seconds) ended training at step {fmt(steps, 'steps')}{of}{best_text}."
    elif reason == "pruned":
        text = f"A sweep pruned this trial at step {fmt(steps, 'steps')}{best_text}."
    else:
        text = f"Training was interrupted ({reason}) at step {fmt(steps, 'steps')}{of}{best_text}."
    return [Heading(3, "Early stopping"), Para(text), Table(["", "value"], rows), *_budget(training)]


def _budget(training: dict) -> list:
    """``train.steps: auto``: the time budget, the schedule length measured for it, how much of it was used."""
    b = training.get("budget")
    if not isinstance(b, Mapping) or not b.get("max_seconds"):
        return []
    rows = [["time budget (train.max_seconds)", f"{b['max_seconds']:g} s"],
            ["schedule length chosen (train.steps: auto)", fmt(b.get("calibrated_steps"), "steps")],
            ["decay started at step", fmt(b.get("decay_start"), "steps")],
            ["measured seconds per step (recent window)", fmt(b.get("seconds_per_step"))],
            ["budget used by training", f"{b['used_fraction']:.1%}" if b.get("used_fraction") is not None else "-"]]
    return [Heading(3, "Time budget"),
            Para("The schedule's length was measured for the budget: the recent step time re-estimated how many "
                 "steps fit through warmup and the stable phase, and the total was frozen when the decay started "
                 "(docs/speedrun.md)."),
            Table(["", "value"], rows)]


def evaluation(c: CardInputs) -> list:
    ev = c.eval_stats
    heldout, tasks = _heldout(ev), _tasks(ev.get("tasks"))
    blocks: list = [*heldout, *tasks, *_early_stopping(c.training, c.summary)]
    shown = ({"val", "train", "step", "gap"} if heldout else set()) | ({"tasks"} if tasks else set())
    rest = {k: v for k, v in ev.items() if k not in shown}
    is_records = [k for k, v in rest.items()
                  if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v)]
    blocks += kv_table({k: v for k, v in rest.items() if k not in is_records}, "", header="measure")
    for key in is_records:
        columns = list(dict.fromkeys(col for r in rest[key] for col in r))
        blocks += [Para(f"{key}:"), Table(columns, [[fmt(r.get(col), col) for col in columns] for r in rest[key]])]
    return [Heading(2, "Evaluation"), *(blocks or [Para("No evaluation results.")])]
