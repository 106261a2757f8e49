"""The run card's drop table and chart: why documents were left out, stage by stage.

Reads the ``drops`` rows of ``data_card.json`` (:func:`lmforge.data.data_card.drop_table`:
``{stage, step, reason, documents, bytes}``) and returns the card's blocks: a table of documents
and MB per reason (collect skips, cleaning steps, duplicates) and ``drops.png``, two panels of
horizontal bars (documents, MB) with one bar per reason, coloured by stage. ::

    blocks = drop_blocks(data_card["drops"])     # [] when nothing was dropped
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lmforge.report.render import Image, Para, Table

CHART = "drops.png"
STAGE_COLORS = {"collect": "tab:gray", "clean": "tab:orange"}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.3f}"


def drop_chart(rows: list[dict]) -> bytes:
    """PNG: documents and MB dropped per reason, one bar each, most documents at the top."""
    labels = [f"{r['step']}: {r['reason']}" for r in rows][::-1]
    colors = [STAGE_COLORS.get(r["stage"], "tab:blue") for r in rows][::-1]
    fig = Figure(figsize=(9, 1.2 + 0.32 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    docs_ax, mb_ax = fig.subplots(1, 2, sharey=True)
    docs_ax.barh(labels, [r["documents"] for r in rows][::-1], color=colors)
    mb_ax.barh(labels, [(r["bytes"] or 0) / 1e6 for r in rows][::-1], color=colors)
    docs_ax.set(xlabel="documents", title="documents dropped, per reason")
    mb_ax.set(xlabel="MB (collect skips: not read)", title="MB dropped, per reason")
    stages = dict.fromkeys(r["stage"] for r in rows)
    docs_ax.legend(handles=[Patch(color=STAGE_COLORS.get(s, "tab:blue"), label=s) for s in stages], fontsize=8)
    for ax in (docs_ax, mb_ax):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def drop_blocks(rows: list[dict]) -> list:
    """The table and chart of the drops; nothing when no document was dropped or skipped."""
    if not rows:
        return []
    table = Table(
        ["stage", "step", "reason", "documents", "MB"],
        [[r["stage"], r["step"], r["reason"], f"{r['documents']:,}", _mb(r["bytes"])] for r in rows],
    )
    total = sum(r["documents"] for r in rows)
    return [
        Para(
            f"Documents left out: {total:,}, by reason (collect skips count entries: files, lines, rows, "
            "pages; their bytes were never read as text)."
        ),
        table,
        Image(CHART, "documents and MB dropped per reason", drop_chart(rows)),
    ]
