"""The run card's fine-tuning section, and the lines ``lmforge finetune`` prints when it ends.

Both read the result of :func:`lmforge.finetune.run.main` (the finetune stage's output): the held-out
task accuracy and the validation bits per byte of the base model and of the fine-tuned model side by
side, so a reader sees what fine-tuning bought and what it cost, then the data counts (kept, truncated,
dropped and skipped conversations by reason) and the training summary. The card passes the result as
``extra={"finetune": result}``.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.report.render import Heading, Para, Table, fmt

_VAL_LABELS = {"pretrain_val": "validation bits per byte (pre-training text)",
               "finetune_val": "validation bits per byte (fine-tuning text)"}


def comparison_rows(compare: dict) -> list[list[str]]:
    """``[measure, base, fine-tuned, change]`` rows."""
    rows = []
    task = compare.get("task")
    if task:
        for key, label in (("acc", "accuracy"), ("acc_norm", "accuracy (length-normalised)")):
            b, f = task["base"][key], task["finetuned"][key]
            rows.append([f"held-out task {task['name']}: {label} ({task['base']['items']} items, chance "
                         f"{task['base']['chance']:.2f})", f"{b:.3f}", f"{f:.3f}", f"{f - b:+.3f}"])
    pref = compare.get("preference")
    if pref:
        n = pref["pairs"]
        for key, label, f in (("accuracy", "preference accuracy (chosen more likely)", ".3f"),
                              ("margin", "log-probability margin chosen - rejected (nats)", ".3f"),
                              ("chosen_logp_per_token", "chosen answers: log-probability per token", ".4f")):
            b, t = pref["base"][key], pref["finetuned"][key]
            rows.append([f"held-out pairs ({n}): {label}", format(b, f), format(t, f), format(t - b, "+" + f)])
        for kind, k in (pref.get("by_kind") or {}).items():
            rows.append([f"held-out pairs, {kind} ({k['pairs']}): preference accuracy", f"{k['base']:.3f}",
                         f"{k['finetuned']:.3f}", f"{k['finetuned'] - k['base']:+.3f}"])
        r = pref["reward"]
        rows.append([f"held-out pairs ({n}): DPO reward accuracy / margin (beta {r['beta']}, against the base)",
                     "0 / 0", f"{r['accuracy']:.3f} / {r['margin']:+.3f}", "-"])
    for key, label in _VAL_LABELS.items():
        pair = compare.get(key)
        if pair and pair.get("base") and pair.get("finetuned"):
            b, f = pair["base"]["bpb"], pair["finetuned"]["bpb"]
            rows.append([label, f"{b:.4f}", f"{f:.4f}", f"{f - b:+.4f}"])
    return rows


def finetuning(c) -> list:
    """Card sections (see :mod:`lmforge.report.card`): the finetune stage, then the dpo stage; empty when
    the run did neither."""
    return [*_stage(c.extra.get("finetune") or {}, "Fine-tuning"),
            *_stage(c.extra.get("dpo") or {}, "Preference tuning (dpo stage)")]


def _stage(result: dict, title: str) -> list:
    if not result or "skipped" in result:
        return []
    blocks: list = [Heading(2, title),
                    Para(f"Started from {result['init']} (step {result['base_step']}); "
                         f"{result['data']['mode']} fine-tuning for {result['train']['steps']} steps "
                         f"({fmt(result['train']['train_seconds'], 'train_seconds')})"
                         f"{', examples packed' if result.get('packed') else ''}.")]
    rows = comparison_rows(result.get("compare", {}))
    if rows:
        blocks.append(Table(["measure", "base model", "fine-tuned", "change"], rows))
    data = result["data"]
    if data["mode"] in ("dpo", "simpo"):
        counts = [[split, str(data[split]["kept"]), str(data[split]["truncated"]), f"{data[split]['tokens']:,}"]
                  for split in ("train", "val")]
        blocks.append(Table(["split", "preference pairs", "answers cut to fit", "tokens"], counts))
        skipped = data["read"]["skipped"]
        if skipped:
            blocks.append(Para("Skipped input lines: " + ", ".join(f"{k}: {v}" for k, v in skipped.items())))
    if data["mode"] == "chat":
        counts = []
        for split in ("train", "val"):
            s = data[split]
            dropped = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "none"
            counts.append([split, str(s["kept"]), str(s["truncated"]), dropped, f"{s['target_tokens']:,}"])
        blocks.append(Table(["split", "conversations", "truncated by whole turns", "dropped (reason: count)",
                             "assistant tokens trained on"], counts))
        skipped = data["read"]["skipped"]
        if skipped:
            blocks.append(Para("Skipped input lines: " + ", ".join(f"{k}: {v}" for k, v in skipped.items())))
    if result.get("adapter"):
        blocks.append(Para(f"LoRA adapter saved alone: {', '.join(result['adapter'])}"))
    return blocks


def summary_lines(result: dict, out: Path) -> list[str]:
    """What ``lmforge finetune`` prints: the before/after table and where things are."""
    if not result["train"].get("complete", True):
        return [f"fine-tuning stopped at step {result['train']['steps']}; run the same command again to resume"]
    lines = [f"fine-tuned {result['init']} for {result['train']['steps']} steps "
             f"({result['train']['train_seconds']:.0f}s); val loss {result['train']['last_val'].get('loss', 0):.4f}"]
    for measure, b, f, change in comparison_rows(result.get("compare", {})):
        lines.append(f"  {measure}: {b} -> {f} ({change})")
    lines.append(f"checkpoints: {out / 'ckpt'}\nresults:     {out / 'results.json'}")
    return lines


def summary_keys(result: dict | None) -> dict:
    """Flat figures for ``summary.json``: held-out task accuracy and bits per byte, base and fine-tuned."""
    compare = (result or {}).get("compare") or {}
    out = {}
    if compare.get("task"):
        out["task_acc_base"] = compare["task"]["base"]["acc"]
        out["task_acc"] = compare["task"]["finetuned"]["acc"]
    pair = compare.get("pretrain_val") or {}
    if pair.get("base") and pair.get("finetuned"):
        out["val_bpb_base"], out["val_bpb"] = pair["base"]["bpb"], pair["finetuned"]["bpb"]
    if pref := compare.get("preference"):
        out["pref_acc_base"], out["pref_acc"] = pref["base"]["accuracy"], pref["finetuned"]["accuracy"]
        out["pref_margin_base"], out["pref_margin"] = pref["base"]["margin"], pref["finetuned"]["margin"]
        out["reward_acc"], out["reward_margin"] = pref["reward"]["accuracy"], pref["reward"]["margin"]
        out["chosen_logp_drift"] = pref["chosen_logp_drift"]
        for kind, k in (pref.get("by_kind") or {}).items():
            out[f"pref_acc_{kind}_base"], out[f"pref_acc_{kind}"] = k["base"], k["finetuned"]
    return out
