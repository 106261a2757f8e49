"""The run card: one page that says what a run did and how well it went.

:func:`write_card` writes three files under ``<run_dir>/report/``:

- ``card.md``: the card in Markdown (renders on GitHub; links the plot ``loss.png``);
- ``card.html``: the same card as one self-contained file (inline CSS, plot embedded
  as a base64 PNG), to open in a browser or attach to a message;
- ``loss.png``: training loss (raw and smoothed) and validation loss against step,
  with a second panel for validation bits per byte when it was measured.

Sections: final metrics, the loss plot, an overfitting check, data, tokenizer,
model, evaluation, samples and the resolved config. Both documents are rendered
from one list of blocks, so they always say the same thing. Usage::

    from lmforge.report.card import write_card
    paths = write_card(run_dir, config_yaml=to_yaml(cfg), summary=summary, metrics=rows,
                       data_stats=docs_stats, tokenizer_stats=tok_stats, eval_stats=eval_result,
                       samples=[{"prompt": "ROMEO:", "completion": " What light..."}])
    paths["html"]   # runs/demo/report/card.html

Inputs are the dicts the stages return; unknown keys are shown as they come. Known
keys: summary ``HEADLINE`` keys and ``model`` (a dict); metrics rows ``{"step",
"kind": "train"|"val", "loss", "bpb", ...}``; data ``train_X``/``val_X`` pairs and
``val_ids``; tokenizer ``kind vocab_size bytes_per_token``; samples ``{"prompt", "completion", ...}``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Headline metrics, in display order: summary key -> label.
HEADLINE = {
    "val_loss": "validation loss (nats/token)",
    "val_ppl": "validation perplexity",
    "val_bpb": "validation bits per byte",
    "val_acc": "validation next-token accuracy",
    "train_loss": "final training loss",
    "tokens_seen": "training tokens seen",
    "params": "parameters",
    "train_seconds": "training time",
    "total_seconds": "total time",
    "tokens_per_s": "training throughput (tokens/s)",
    "mfu": "model flops utilization (MFU)",
}
_DATA_ROWS = {"docs": "documents", "bytes": "bytes", "chars": "characters", "tokens": "tokens"}
_TOKENIZER_LABELS = {"vocab_size": "vocabulary size", "bytes_per_token": "bytes per token"}
_GAP_SMALL, _GAP_LARGE = 0.05, 0.25  # overfitting verdict thresholds on (val - train) loss, nats/token


def write_card(run_dir: Path, *, config_yaml: str, summary: dict, metrics: list[dict], data_stats: dict,
               tokenizer_stats: dict, eval_stats: dict, samples: list[dict],
               title: str | None = None) -> dict[str, Path]:
    """Write ``report/card.md``, ``report/card.html`` and ``report/loss.png``; return them by kind (md, html, png)."""
    run_dir = Path(run_dir)
    name = str(summary.get("name") or run_dir.name)
    title = title or f"Run card: {name}"
    _check_inputs(metrics, samples)
    out = run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the report folder {out}: {e.strerror}") from None
    paths = {"md": out / "card.md", "html": out / "card.html", "png": out / "loss.png"}

    png = _plot_losses(metrics, f"{name}: loss")
    paths["png"].write_bytes(png)
    blocks = _blocks(title, config_yaml, summary, metrics, data_stats, tokenizer_stats, eval_stats, samples)
    paths["md"].write_text(_to_markdown(blocks, image_src="loss.png"), encoding="utf-8")
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    paths["html"].write_text(_to_html(blocks, title=title, image_src=data_uri), encoding="utf-8")
    return paths


def _check_inputs(metrics: list[dict], samples: list[dict]) -> None:
    for i, row in enumerate(metrics):
        if not isinstance(row, Mapping) or "step" not in row:
            raise ValueError(f"metrics[{i}] must be a dict with a 'step' (got {row!r:.80})")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or "prompt" not in s or "completion" not in s:
            raise ValueError(f"samples[{i}] must be a dict with 'prompt' and 'completion' (got {s!r:.80})")


def _blocks(title: str, config_yaml: str, summary: dict, metrics: list[dict], data_stats: dict,
            tokenizer_stats: dict, eval_stats: dict, samples: list[dict]) -> list:
    blocks: list = [Heading(1, title)]

    blocks.append(Heading(2, "Final metrics"))
    rows = [[label, fmt(summary[k], k)] for k, label in HEADLINE.items() if summary.get(k) is not None]
    rows += [[k, fmt(v, k)] for k, v in _flatten({k: v for k, v in summary.items()
                                                    if k not in HEADLINE and k not in ("model", "name")})]
    blocks.append(Table(["metric", "value"], rows) if rows else Para("No final metrics were recorded."))

    blocks += [Heading(2, "Loss curves"), Image("training and validation loss against step")]
    blocks += [Heading(2, "Overfitting check"), *_overfitting(summary, metrics)]

    blocks.append(Heading(2, "Data"))
    blocks += _data(data_stats)

    blocks += [Heading(2, "Tokenizer"), *_kv_table(tokenizer_stats, "No tokenizer statistics.", _TOKENIZER_LABELS)]
    model = summary.get("model")
    blocks += [Heading(2, "Model"), *_kv_table(model if isinstance(model, Mapping) else {}, "No model description.")]

    blocks.append(Heading(2, "Evaluation"))
    blocks += _evaluation(eval_stats)

    blocks.append(Heading(2, "Samples"))
    if not samples:
        blocks.append(Para("No samples were generated."))
    for i, s in enumerate(samples, 1):
        extra = ", ".join(f"{k}: {fmt(v, k)}" for k, v in s.items() if k not in ("prompt", "completion"))
        blocks.append(Sample(f"Sample {i}" + (f" ({extra})" if extra else ""), str(s["prompt"]),
                             str(s["completion"])))

    blocks += [Heading(2, "Resolved config"), Code(config_yaml.rstrip("\n"), "yaml")]
    return blocks


def _final(summary: dict, metrics: list[dict], kind: str) -> float | None:
    """The final loss of ``kind`` ('train' or 'val'): the summary's value, else the last logged point."""
    value = summary.get(f"{kind}_loss")
    if isinstance(value, (int, float)):
        return float(value)
    points = _points(metrics, kind, "loss")
    return points[-1][1] if points else None


def _points(metrics: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    return [(float(m["step"]), float(m[key])) for m in metrics
            if m.get("kind") == kind and isinstance(m.get(key), (int, float))]


def _overfitting(summary: dict, metrics: list[dict]) -> list:
    train, val = _final(summary, metrics, "train"), _final(summary, metrics, "val")
    if train is None or val is None:
        return [Para("Not enough measurements: the check needs a final training and a final validation loss.")]
    gap = val - train
    rows = [["final training loss", fmt(train)], ["final validation loss", fmt(val)],
            ["gap (validation - training)", fmt(gap)]]
    if gap < -_GAP_SMALL:
        verdict = ("Validation loss is below training loss (dropout during training, or a noisy training "
                   "estimate): no sign of overfitting.")
    elif gap <= _GAP_SMALL:
        verdict = "Training and validation loss agree: no sign of overfitting."
    elif gap <= _GAP_LARGE:
        verdict = "A small generalization gap: the model fits the training text a little better than new text."
    else:
        verdict = ("Validation loss is well above training loss: the model is overfitting (memorizing the "
                   "training text). More data, fewer steps, a smaller model or dropout would help.")
    blocks: list = [Table(["measure", "value"], rows), Para(verdict)]
    val_points = _points(metrics, "val", "loss")
    if len(val_points) >= 3:
        best_step, best = min(val_points, key=lambda p: p[1])
        last_step, last = val_points[-1]
        if last > best * 1.01:  # more than 1% above the best: the curve turned up
            blocks.append(Para(f"Validation loss rose from its best {fmt(best)} at step {fmt(best_step, 'step')} "
                               f"to {fmt(last)} at step {fmt(last_step, 'step')}: training went on past the "
                               f"point of best generalization."))
    return blocks


def _data(data_stats: dict) -> list:
    splits: dict[str, dict[str, Any]] = {}  # row name -> {"train": value, "val": value}
    rest = {}
    for key, value in data_stats.items():
        prefix, _, suffix = key.partition("_")
        if prefix in ("train", "val") and suffix and suffix != "ids" and isinstance(value, (int, float)):
            splits.setdefault(suffix, {})[prefix] = value
        elif key != "val_ids":
            rest[key] = value
    blocks: list = []
    if splits:
        rows = [[_DATA_ROWS.get(s, s), fmt(v.get("train"), s), fmt(v.get("val"), s)] for s, v in splits.items()]
        blocks.append(Table(["", "train", "validation"], rows))
    ids = data_stats.get("val_ids")
    if ids:
        shown = ", ".join(str(i) for i in list(ids)[:50]) + (f", ... ({len(ids):,} in all)" if len(ids) > 50 else "")
        blocks.append(Para(f"Held-out document ids: {shown}"))
    blocks += _kv_table(rest, "")
    return blocks or [Para("No data statistics.")]


def _evaluation(eval_stats: dict) -> list:
    """Scalars as one table; each list of records (e.g. per-document scores) as a table of its own."""
    blocks = _kv_table({k: v for k, v in eval_stats.items() if not _is_records(v)}, "", header="measure")
    for key, records in eval_stats.items():
        if _is_records(records):
            columns = list(dict.fromkeys(c for r in records for c in r))
            blocks.append(Para(f"{key}:"))
            blocks.append(Table(columns, [[fmt(r.get(c), c) for c in columns] for r in records]))
    return blocks or [Para("No evaluation results.")]


def _kv_table(tree: Mapping, empty: str, labels: Mapping[str, str] | None = None,
              header: str = "property") -> list:
    """A two-column table of a (nested) dict, or the ``empty`` note (nothing if that is empty too)."""
    rows = [[(labels or {}).get(k, k), fmt(v, k)] for k, v in _flatten(tree)]
    return [Table([header, "value"], rows)] if rows else [Para(empty)] if empty else []


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, Mapping) for r in value)


def _flatten(tree: Mapping | None, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted key, value)`` pairs, in insertion order."""
    items: list[tuple[str, Any]] = []
    for key, value in (tree or {}).items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items



# ------------------------------------------------------------------- numbers
def fmt(value: Any, key: str = "") -> str:
    """A value as card text: 4 significant digits, thousands separators for counts, units from the key's name."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, key) for v in value)
    if not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    name = key.rsplit(".", 1)[-1]
    if any(part.endswith("seconds") for part in key.split(".")):  # also stage_seconds.train
        return _duration(v)
    # Fractions shown as percentages: accuracies (acc, acc_norm, ...) and the scores of evaluation tasks.
    if name in ("mfu", "exact_match", "f1", "chance") or name.endswith("acc") or name.startswith("acc_"):
        return f"{v * 100:.4g}%"
    if isinstance(value, int) or (v.is_integer() and abs(v) >= 1000):
        scale, suffix = next(p for p in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (0.0, "")) if abs(v) >= p[0])
        return f"{int(v):,}" + (f" ({v / scale:.4g}{suffix})" if suffix else "")  # 2,500,000 (2.5M)
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.4g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
    return f"{seconds:,.4g} s ({clock})" if seconds < 1e4 else f"{seconds:,.0f} s ({clock})"


# ---------------------------------------------------------------------- plot
def _smooth(values: Sequence[float]) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it); longer runs smooth more."""
    beta = min(0.98, max(0.0, 1.0 - 10.0 / len(values)))
    out, avg = [], 0.0
    for t, x in enumerate(values, 1):
        avg = beta * avg + (1.0 - beta) * x
        out.append(avg / (1.0 - beta**t))
    return out


def _plot_losses(metrics: list[dict], title: str) -> bytes:
    """The loss plot as PNG bytes, drawn by the Agg renderer (no display needed, global pyplot state untouched)."""
    train, val, bpb = _points(metrics, "train", "loss"), _points(metrics, "val", "loss"), _points(metrics, "val", "bpb")
    fig = Figure(figsize=(11, 4.2) if bpb else (7, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if bpb else 1, squeeze=False)[0]
    ax = axes[0]
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (raw)")
        ax.plot(steps, _smooth(losses), color="tab:blue", lw=2, label="train (smoothed)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    if train or val:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss measurements", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    if bpb:
        axes[1].plot(*zip(*bpb, strict=True), "s-", color="tab:green", lw=1.5, ms=4, label="validation")
        axes[1].set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -------------------------------------------------------------------- blocks
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    alt: str


@dataclass
class Sample:
    caption: str
    prompt: str
    completion: str


@dataclass
class Code:
    text: str
    lang: str


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _to_markdown(blocks: list, image_src: str) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({image_src})")
        elif isinstance(b, Sample):
            # An HTML <pre> keeps the text verbatim in Markdown too and lets the prompt be bold.
            out.append(f"**{b.caption}**\n\n<pre><strong>{html.escape(b.prompt)}</strong>"
                       f"{html.escape(b.completion)}</pre>")
        elif isinstance(b, Code):
            longest = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
            fence = "`" * max(3, longest + 1)  # longer than any backtick run inside, so the block cannot end early
            out.append(f"{fence}{b.lang}\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1f2328; } main { max-width: 980px; margin: 2rem auto; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; } h2 { margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } th { background: #f6f8fa; }
th, td { border: 1px solid #d0d7de; padding: .25rem .7rem; text-align: left; vertical-align: top; }
img { max-width: 100%; border: 1px solid #d0d7de; } figcaption { font-weight: 600; }
pre { background: #f6f8fa; padding: .7rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
"""


def _to_html(blocks: list, title: str, image_src: str) -> str:
    esc = html.escape
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            parts.append(f'<img alt="{esc(b.alt)}" src="{image_src}">')
        elif isinstance(b, Sample):
            parts.append(f"<figure><figcaption>{esc(b.caption)}</figcaption><pre><strong>{esc(b.prompt)}</strong>"
                         f"{esc(b.completion)}</pre></figure>")
        elif isinstance(b, Code):
            parts.append(f'<pre><code class="language-{esc(b.lang)}">{esc(b.text)}</code></pre>')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")
