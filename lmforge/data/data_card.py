"""The data card: what the collect and clean stages read, kept and dropped, and why.

:func:`write_data_card` writes, next to the cleaned shards (``runs/<name>/clean/``):

- ``data_card.json``: documents and bytes in / kept / dropped, dropped per reason
  (documents and bytes), the drop table (``drops``: documents and bytes per stage, step and
  reason; the run card draws it as a bar chart), per step (in, dropped, changed, characters removed), a few
  examples of every reason, the language mix, length histograms, the collect
  stage's per-source counts (with ``repaired_bytes``: bytes that were not UTF-8 and
  were read as cp1252) and the cleaning config;
- ``lengths.png``: document lengths before and after cleaning (log-2 bins).

:func:`card_summary` condenses it to the flat counts the run card shows in its
Data section. ::

    card = write_data_card(Path("runs/demo/clean"), collect_outputs, ledger.to_dict(), steps, cfg.clean)
    card_summary(card)   # {'collected documents': 42, 'kept documents': 42, 'dropped: ...': ...}
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmforge import artifacts
from lmforge.config import CleanConfig


def _bin_label(edge: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if edge >= size:
            return f"{edge // size}{unit}"
    return str(edge)


def plot_lengths(histogram: dict, path: Path) -> None:
    """Bars of document counts per length bin, before and after cleaning."""
    edges, before, after = histogram["edges_chars"], histogram["in"], histogram["kept"]
    used = [i for i in range(len(edges)) if before[i] or after[i]] or [0]
    lo, hi = used[0], used[-1] + 1
    xs = list(range(lo, hi))
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar([x - 0.2 for x in xs], before[lo:hi], width=0.4, label="collected", color="tab:gray")
    ax.bar([x + 0.2 for x in xs], after[lo:hi], width=0.4, label="kept", color="tab:blue")
    ax.set_xticks(xs, [f">={_bin_label(edges[x])}" for x in xs], rotation=45, ha="right", fontsize=8)
    ax.set(xlabel="document length (characters)", ylabel="documents", title="document lengths")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png")


def write_data_card(folder: Path, collect: dict, ledger: dict, steps: list[str], cfg: CleanConfig) -> dict:
    """Write ``data_card.json`` and ``lengths.png`` under ``folder``; return the card."""
    folder = Path(folder)
    card = {
        "collect": {k: collect.get(k) for k in ("documents", "bytes", "shards", "skipped", "collected_at")}
        | {"repaired_bytes": collect.get("repaired_bytes", 0),
           "sources": [{k: s.get(k, 0) for k in ("source", "kind", "documents", "repaired_bytes", "skipped")}
                       for s in collect.get("sources", [])]},
        "clean": ledger,
        "drops": drop_table(collect, ledger),
        "steps": steps,
        "config": cfg.model_dump(),
        "files": {"docs": "docs/", "rejects": "rejects/", "lengths_plot": "lengths.png"},
    }
    artifacts.write_text(folder / "data_card.json", json.dumps(card, indent=2, ensure_ascii=False, default=str))
    plot_lengths(ledger["length_histogram"], folder / "lengths.png")
    return card


def drop_table(collect: dict, ledger: dict) -> list[dict]:
    """Every reason a document was left out, by stage and step: ``{stage, step, reason, documents, bytes}``.

    The collect stage's skips are entries (files, lines, rows, pages) whose bytes were never read as text,
    so their bytes are None; the clean stage's rows come from the ledger, duplicates included.
    """
    rows = [{"stage": "collect", "step": "read", "reason": reason, "documents": n, "bytes": None}
            for reason, n in sorted((collect.get("skipped") or {}).items(), key=lambda kv: (-kv[1], kv[0]))]
    return rows + [{"stage": "clean", **row} for row in ledger.get("drops", [])]


def card_summary(card: dict, top: int = 8) -> dict:
    """Flat counts for the run card: collected, skipped, kept, the main drop reasons, the main languages."""
    clean = card["clean"]
    out = {
        "collected documents": card["collect"]["documents"],
        "collect skipped entries": sum((card["collect"].get("skipped") or {}).values()),
        "collect repaired bytes (not UTF-8)": card["collect"].get("repaired_bytes", 0),
        "cleaned documents in": clean["documents"]["in"],
        "kept documents": clean["documents"]["kept"],
        "kept bytes": clean["bytes"]["kept"],
        "dropped documents": clean["documents"]["dropped"],
    }
    for reason, n in list(clean["dropped"].items())[:top]:
        out[f"dropped: {reason}"] = n
    langs = clean.get("languages") or {}
    if langs:
        out["languages"] = ", ".join(f"{lang} {n}" for lang, n in list(langs.items())[:top])
    return out
