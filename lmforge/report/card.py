"""The run card: one page that says what a run did and how well it went.

:func:`write_card` writes three files under ``<run_dir>/report/``:

- ``card.md``: the card in Markdown (renders on GitHub; links the figure ``loss.png``);
- ``card.html``: the same card as one self-contained file (inline CSS, figure embedded
  as a base64 PNG), to open in a browser or attach to a message;
- ``loss.png``: the training curves, one panel each (drawn when measured): training and
  validation loss, validation bits per byte, the generalization gap over time, learning
  rate, gradient norm, tokens/s and the evaluation tasks run during training.

The card is a list of sections (:data:`SECTIONS`): final metrics, training curves, the
overfitting check (training vs validation, and the gap over time), data, tokenizer, model,
evaluation (held-out text side by side, every task with its counts, the early-stopping
outcome), samples and the resolved config. A section is a function of :class:`CardInputs`
returning blocks (:mod:`lmforge.report.render`); to add one, insert it into
``SECTIONS`` (or pass ``sections=``) and hand its data in ``extra=``. Usage::

    from lmforge.report.card import write_card
    paths = write_card(run_dir, config_yaml=to_yaml(cfg), summary=summary, metrics=rows,
                       data_stats=docs_stats, tokenizer_stats=tok_stats, eval_stats=eval_result,
                       samples=[{"prompt": "ROMEO:", "completion": " What light..."}],
                       training=train_outputs)
    paths["html"]   # runs/demo/report/card.html

Inputs are the dicts the stages return; unknown keys are shown as they come. Known
keys: summary ``HEADLINE`` keys and ``model`` (a dict); metrics rows ``{"step",
"kind": "train"|"val"|"tasks", "loss", "bpb", "lr", "grad_norm", "tokens_per_s", ...}``; data
``train_X``/``val_X`` pairs, ``val_ids`` and ``drops`` (the data card's drop table, drawn as
``drops.png``); tokenizer ``kind vocab_size bytes_per_token``; eval
``val``/``train`` (held-out scores) and ``tasks`` (one record per task); training ``stopped_by
steps planned_steps best_val_loss best_step early_stop_patience early_stop_min_delta``; samples
``{"prompt", "completion", ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.report.card_data import drop_blocks
from lmforge.report.card_eval import evaluation, overfitting
from lmforge.report.card_finetune import finetuning
from lmforge.report.card_inputs import CardInputs
from lmforge.report.plots import training_curves
from lmforge.report.render import (
    Code,
    Heading,
    Image,
    Para,
    Sample,
    Table,
    flatten,
    fmt,
    kv_table,
    to_html,
    to_markdown,
    write_images,
)

__all__ = ["HEADLINE", "SECTIONS", "CardInputs", "fmt", "write_card"]

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
# The other summary figures (nested keys dotted): key -> label. A key not listed here gets a label made
# from its name, so a new figure still reads as words; stage times are labelled by their stage.
SUMMARY_LABELS = {
    "val_tokens": "validation tokens scored",
    "train_bpb": "training-slice bits per byte",
    "generalization_gap": "generalization gap (validation - training loss)",
    "steps": "optimizer steps",
    "stopped_by": "training stopped by",
    "device": "device",
    "finetune.task_acc_base": "fine-tuning task accuracy: base model",
    "finetune.task_acc": "fine-tuning task accuracy: fine-tuned model",
    "finetune.val_bpb_base": "pre-training validation bits per byte: base model",
    "finetune.val_bpb": "pre-training validation bits per byte: fine-tuned model",
    "finetune.pref_acc_base": "held-out preference accuracy (chosen more likely): base model",
    "finetune.pref_acc": "held-out preference accuracy (chosen more likely): fine-tuned model",
    "finetune.pref_margin_base": "held-out log-probability margin, chosen - rejected (nats): base model",
    "finetune.pref_margin": "held-out log-probability margin, chosen - rejected (nats): fine-tuned model",
    "finetune.reward_acc": "held-out DPO reward accuracy (against the base)",
    "finetune.reward_margin": "held-out DPO reward margin (against the base)",
    "finetune.chosen_logp_drift": "log-probability drift of chosen answers, per token",
    "dpo.pref_acc_base": "dpo stage: held-out preference accuracy, chat model",
    "dpo.pref_acc": "dpo stage: held-out preference accuracy, tuned model",
    "dpo.reward_acc": "dpo stage: held-out DPO reward accuracy (against the chat model)",
    "dpo.val_bpb_base": "dpo stage: pre-training validation bits per byte, chat model",
    "dpo.val_bpb": "dpo stage: pre-training validation bits per byte, tuned model",
}
_DATA_ROWS = {"docs": "documents", "bytes": "bytes", "chars": "characters", "tokens": "tokens"}
_TOKENIZER_LABELS = {"vocab_size": "vocabulary size", "bytes_per_token": "bytes per token"}
FIGURE = "loss.png"  # the training-curves figure (the name predates its extra panels)


Section = Callable[[CardInputs], list]  # the blocks of one section, its heading first


def write_card(run_dir: Path, *, config_yaml: str, summary: dict, metrics: list[dict], data_stats: dict,
               tokenizer_stats: dict, eval_stats: dict, samples: list[dict], title: str | None = None,
               training: dict | None = None, extra: dict | None = None,
               sections: Sequence[Section] | None = None) -> dict[str, Path]:
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
    inputs = CardInputs(name, config_yaml, summary, metrics, data_stats, tokenizer_stats, eval_stats, samples,
                        training or {}, extra or {})
    blocks: list = [Heading(1, title)]
    for section in SECTIONS if sections is None else sections:
        blocks += section(inputs)
    images = write_images(blocks, out)
    paths = {"md": out / "card.md", "html": out / "card.html", "png": out / FIGURE}
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(to_html(blocks, title=title), encoding="utf-8")
    return paths | {src: p for src, p in images.items() if src != FIGURE}


def _check_inputs(metrics: list[dict], samples: list[dict]) -> None:
    for i, row in enumerate(metrics):
        if not isinstance(row, Mapping) or "step" not in row:
            raise ValueError(f"metrics[{i}] must be a dict with a 'step' (got {row!r:.80})")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or "prompt" not in s or "completion" not in s:
            raise ValueError(f"samples[{i}] must be a dict with 'prompt' and 'completion' (got {s!r:.80})")


# ------------------------------------------------------------------ sections
def summary_label(key: str) -> str:
    """The card's words for a summary key (``stage_seconds.train`` -> ``time in the train stage``)."""
    if key in SUMMARY_LABELS:
        return SUMMARY_LABELS[key]
    group, _, name = key.rpartition(".")
    if group == "stage_seconds":
        return f"time in the {name} stage"
    return key.replace(".", ": ").replace("_", " ")


def final_metrics(c: CardInputs) -> list:
    s = c.summary
    rows = [[label, fmt(s[k], k)] for k, label in HEADLINE.items() if s.get(k) is not None]
    rows += [[summary_label(k), fmt(v, k)] for k, v in flatten({k: v for k, v in s.items()
                                                                if k not in HEADLINE and k not in ("model", "name")})]
    return [Heading(2, "Final metrics"), Table(["metric", "value"], rows) if rows
            else Para("No final metrics were recorded.")]


def curves(c: CardInputs) -> list:
    return [Heading(2, "Training curves"),
            Image(FIGURE, "training curves: loss, bits per byte, generalization gap, learning rate, gradient norm, "
                          "tokens/s", training_curves(c.metrics, f"{c.name}: training")),
            Para("Training loss is logged every train.log_every steps (the mean over those steps, dropout on); "
                 "validation points are the in-training estimates on fixed validation batches. The final "
                 "figures of the eval stage (whole validation text) are in the Evaluation section.")]


def data(c: CardInputs) -> list:
    splits: dict[str, dict[str, Any]] = {}  # row name -> {"train": value, "val": value}
    rest = {}
    for key, value in c.data_stats.items():
        prefix, _, suffix = key.partition("_")
        if prefix in ("train", "val") and suffix and suffix != "ids" and isinstance(value, (int, float)):
            splits.setdefault(suffix, {})[prefix] = value
        elif key not in ("val_ids", "drops"):
            rest[key] = value
    blocks: list = []
    if splits:
        rows = [[_DATA_ROWS.get(s, s), fmt(v.get("train"), s), fmt(v.get("val"), s)] for s, v in splits.items()]
        blocks.append(Table(["", "train", "validation"], rows))
    ids = c.data_stats.get("val_ids")
    if ids:
        shown = ", ".join(str(i) for i in list(ids)[:50]) + (f", ... ({len(ids):,} in all)" if len(ids) > 50 else "")
        blocks.append(Para(f"Held-out document ids: {shown}"))
    blocks += kv_table(rest, "")
    blocks += drop_blocks(c.data_stats.get("drops") or [])
    return [Heading(2, "Data"), *(blocks or [Para("No data statistics.")])]


def tokenizer(c: CardInputs) -> list:
    return [Heading(2, "Tokenizer"), *kv_table(c.tokenizer_stats, "No tokenizer statistics.", _TOKENIZER_LABELS)]


def model(c: CardInputs) -> list:
    m = c.summary.get("model")
    return [Heading(2, "Model"), *kv_table(m if isinstance(m, Mapping) else {}, "No model description.")]


def samples(c: CardInputs) -> list:
    blocks: list = [Heading(2, "Samples")]
    if not c.samples:
        blocks.append(Para("No samples were generated."))
    for i, s in enumerate(c.samples, 1):
        extra = ", ".join(f"{k}: {fmt(v, k)}" for k, v in s.items() if k not in ("prompt", "completion"))
        blocks.append(Sample(f"Sample {i}" + (f" ({extra})" if extra else ""), str(s["prompt"]),
                             str(s["completion"])))
    return blocks


def resolved_config(c: CardInputs) -> list:
    return [Heading(2, "Resolved config"), Code(c.config_yaml.rstrip("\n"), "yaml")]


# The card, top to bottom. A new section (e.g. fine-tuning: base vs fine-tuned) goes in here.
SECTIONS: list[Section] = [final_metrics, curves, overfitting, data, tokenizer, model, evaluation, finetuning,
                           samples, resolved_config]
