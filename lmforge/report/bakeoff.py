"""The bake-off report: the table and plot of ``lmforge compare-archs``.

Takes the comparison that :func:`lmforge.tune.bakeoff.main` measured and writes,
under ``runs_dir/NAME/``:

- ``compare.json``: every figure, per architecture, with the curves;
- ``compare.md``: the table (parameters, size, learning rate, steps, training
  tokens/s, final validation bits per byte and the gap to the best, decoding
  tokens/s) and a sentence saying which family leads and by how much;
- ``compare.png``: validation bits per byte against training time, every
  family on one axis (the in-training estimates as lines, the final full
  validation score as a star).

Usage::

    paths = write_bakeoff(Path("runs/compare-archs"), result)   # {"json": ..., "md": ..., "png": ...}
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLUMNS = [  # (heading, how to show a row)
    ("arch", lambda r: r["arch"]),
    ("params", lambda r: f"{r['params']:,}"),
    ("non-embedding", lambda r: f"{r['params_non_embedding']:,}" if r.get("params_non_embedding") else "-"),
    ("width x layers", lambda r: f"{r['d_model']} x {r['n_layers']}"),
    ("lr", lambda r: f"{r['lr']:g}"),
    ("steps", lambda r: f"{r['steps']:,}" + ("" if r["stopped_by"] == "steps" else f" ({r['stopped_by']})")),
    ("train s", lambda r: f"{r['train_seconds']:.1f}"),
    ("train tok/s", lambda r: f"{r['train_tokens_per_s']:,.0f}"),
    ("val bits/byte", lambda r: f"{r['val_bpb']:.4f}"),
    ("vs best", lambda r: r["vs_best"]),
    ("decode tok/s", lambda r: f"{r['decode_tokens_per_s']:,.0f}"),
]


def rank(rows: list[dict]) -> list[dict]:
    """Rows best first by final validation bits per byte, each with a ``vs_best`` gap in words."""
    ordered = sorted(rows, key=lambda r: r["val_bpb"])
    best = ordered[0]["val_bpb"]
    for r in ordered:
        gap = r["val_bpb"] - best
        r["vs_best"] = "best" if r is ordered[0] else f"+{gap:.4f} (+{100 * gap / best:.1f}%)"
    return ordered


def verdict(rows: list[dict]) -> str:
    """One sentence: who leads at equal time, and by how much over the runner-up (or behind the leader)."""
    ordered = sorted(rows, key=lambda r: r["val_bpb"])
    lead = ordered[0]
    if len(ordered) == 1:
        return f"Only {lead['arch']} was trained: {lead['val_bpb']:.4f} bits per byte."
    second = ordered[1]
    gap = second["val_bpb"] - lead["val_bpb"]
    text = (f"At equal training time, {lead['arch']} leads with {lead['val_bpb']:.4f} bits per byte, "
            f"{gap:.4f} ({100 * gap / second['val_bpb']:.1f}%) below the runner-up, {second['arch']}.")
    trans = next((r for r in ordered if r["arch"] == "transformer"), None)
    if trans is not None and trans not in (lead, second):
        behind = trans["val_bpb"] - lead["val_bpb"]
        text += f" The transformer trails it by {behind:.4f} bits per byte ({100 * behind / lead['val_bpb']:.1f}%)."
    return text


def to_markdown(result: dict, out_dir: Path, image: str) -> str:
    rows = rank([dict(r) for r in result["archs"]])
    lines = [
        f"# Architecture bake-off: {result['name']}",
        "",
        f"Each architecture trained for {result['budget_seconds']:g} s (training time only; evaluation and "
        f"checkpoints not counted) on the same documents with the same tokenizer "
        f"({'identical' if result['same_tokenizer'] else 'NOT identical'} tokenizer.json in every run). "
        f"Device {result['device']} with {result['threads']} torch thread(s), torch {result['torch']}; "
        f"finished {result['finished_at']}.",
        "",
        verdict(rows),
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(show(r) for _, show in COLUMNS) + " |" for r in rows]
    lines += [
        "",
        "- *params*: all distinct parameters (a tied output head counted once); *non-embedding*: without the "
        "token embedding table.",
        "- *val bits/byte*: the eval stage over the whole validation text; lower is better. *vs best*: the gap to "
        "the best row.",
        f"- *decode tok/s*: greedy decoding at batch 1, {result['decode_tokens']} new tokens after the first sample "
        "prompt, median of 3 timed runs, through the serving engine.",
        "- *steps*: as many as the step-time probe fitted in the budget; *(time)* marks a run the budget "
        "stopped first.",
        "",
        f"![validation bits per byte against training time]({image})",
        "",
        f"Reproduce: `lmforge compare-archs --config {out_dir / 'config.yaml'}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    """PNG: validation bits per byte against training seconds, one line per architecture."""
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(result["archs"]):
        color = f"C{i}"
        if r["curve"]:
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"{r['arch']} (estimates)")
        ax.plot([r["train_seconds"]], [r["val_bpb"]], marker="*", markersize=12, color=color, linestyle="none",
                label=f"{r['arch']} final: {r['val_bpb']:.3f}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"{result['name']}: {result['budget_seconds']:g} s of training per architecture")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_bakeoff(out_dir: Path, result: dict) -> dict[str, Path]:
    """Write compare.json, compare.md and compare.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "md": out_dir / "compare.md", "png": out_dir / "compare.png"}
    paths["png"].write_bytes(plot(result))
    paths["md"].write_text(to_markdown(result, out_dir, paths["png"].name), encoding="utf-8")
    ranked = [r["arch"] for r in rank([dict(r) for r in result["archs"]])]
    paths["json"].write_text(json.dumps({**result, "ranked": ranked}, indent=2), encoding="utf-8")
    return paths
