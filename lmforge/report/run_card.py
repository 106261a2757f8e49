"""The report stage: ``summary.json`` for scripts and the run card for people.

Gathers what the earlier stages wrote (manifests, metrics.jsonl, samples) into
``runs/<name>/summary.json`` (final metrics, flat keys) and hands the rest to
:mod:`lmforge.report.card`, which draws the training curves and writes
``report/card.md``, ``report/card.html`` and ``report/loss.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import RunConfig, to_yaml
from lmforge.report.card import write_card
from lmforge.report.card_finetune import summary_keys
from lmforge.train.metrics import read_metrics


def build_summary(cfg: RunConfig, outputs: dict) -> dict:
    ev, tr = outputs["eval"], outputs["train"]
    return {
        "name": cfg.name,
        "arch": cfg.model.arch,
        "params": tr["params"],
        "val_loss": ev["val"]["loss"],
        "val_ppl": ev["val"]["ppl"],
        "val_bpb": ev["val"]["bpb"],
        "val_acc": ev["val"]["acc"],
        "val_tokens": ev["val"]["tokens"],
        "train_loss": ev["train"]["loss"],
        "train_bpb": ev["train"]["bpb"],
        "generalization_gap": ev["gap"],
        "steps": tr["steps"],
        "stopped_by": tr["stopped_by"],
        "tokens_seen": tr["tokens_seen"],
        "train_seconds": tr["train_seconds"],
        "tokens_per_s": tr["tokens_per_s"],
        "mfu": tr["mfu"],
        "device": tr["device"],
        "total_seconds": round(sum(outputs["_seconds"].values()), 2),
        "stage_seconds": dict(outputs["_seconds"]),
        # d_model from training: with model.param_budget the width is chosen there.
        **({"budget": tr["budget"]} if "budget" in tr else {}),  # train.steps: auto: budget, length, share used
        "model": {"arch": cfg.model.arch, "params": tr["params"], "d_model": tr.get("d_model", cfg.model.d_model),
                  "n_layers": cfg.model.n_layers, "context": cfg.model.context,
                  "vocab_size": outputs["tokenizer"].get("vocab_size"),
                  "flops_per_token": tr["flops_per_token"]},
    }


def _planned_steps(train: dict, steps: int | str) -> int | str:
    """The schedule's length: ``train.steps``, or the one ``steps: auto`` chose."""
    return (train.get("budget") or {}).get("calibrated_steps") or steps


def _data_stats(outputs: dict) -> dict:
    """The docs stage's split counts, plus the data card's summary (collected, kept, dropped by reason)."""
    stats = dict(outputs["docs"])
    card = Path(outputs.get("clean", {}).get("data_card", ""))
    if card.is_file():
        from lmforge.data.data_card import card_summary

        data_card = json.loads(card.read_text(encoding="utf-8"))
        stats["cleaning"] = card_summary(data_card)
        stats["drops"] = data_card.get("drops", [])  # the card's drop table and chart (report/card.py)
    return stats


def main(cfg: RunConfig, run_dir: Path, outputs: dict) -> dict:
    summary = build_summary(cfg, outputs)
    if finetuned := summary_keys(outputs.get("finetune")):
        summary["finetune"] = finetuned
    if preferred := summary_keys(outputs.get("dpo")):  # the dpo stage: its base is the finetune stage's model
        summary["dpo"] = preferred
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    paths = write_card(
        run_dir,
        config_yaml=to_yaml(cfg),
        summary=summary,
        metrics=read_metrics(run_dir / "train" / "metrics.jsonl"),
        data_stats=_data_stats(outputs),
        tokenizer_stats=outputs["tokenizer"],
        eval_stats=outputs["eval"],
        samples=outputs["sample"]["samples"],
        title=f"lmforge run card: {cfg.name}",
        training={**outputs["train"], "planned_steps": _planned_steps(outputs["train"], cfg.train.steps),
                  "early_stop_patience": cfg.train.early_stop_patience,
                  "early_stop_min_delta": cfg.train.early_stop_min_delta},
        extra={"finetune": outputs.get("finetune") or {},  # base vs fine-tuned, when the run fine-tuned
               "dpo": outputs.get("dpo") or {}},
    )
    return {"summary": summary, "files": {k: str(v) for k, v in paths.items()}}
