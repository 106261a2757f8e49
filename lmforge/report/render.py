"""Report blocks and their rendering: one list of blocks becomes Markdown and a self-contained HTML page.

The run card (:mod:`lmforge.report.card`) and the run comparison (:mod:`lmforge.report.compare_runs`)
build their documents as lists of :class:`Heading`, :class:`Para`, :class:`Table`, :class:`Image`,
:class:`Sample` and :class:`Code` blocks, so the Markdown and the HTML always say the same thing.
An :class:`Image` carries its PNG bytes: Markdown links the file ``src`` (written beside it by
:func:`write_images`), HTML embeds the bytes as a data URI, so the page needs no other file::

    blocks = [Heading(1, "Title"), Table(["metric", "value"], [["loss", fmt(2.3456)]]),
              Image("curves.png", "loss against step", png_bytes)]
    write_images(blocks, out_dir)
    (out_dir / "page.md").write_text(to_markdown(blocks))
    (out_dir / "page.html").write_text(to_html(blocks, title="Title"))

:func:`fmt` turns numbers into card text (4 significant digits, thousands separators, units
taken from the key's name: seconds as durations, accuracies as percentages).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    # Fractions shown as percentages: accuracies (acc, acc_norm, task_acc_base, ...) and the scores of evaluation tasks.
    if name in ("mfu", "exact_match", "f1", "chance") or "acc" in name.split("_"):
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
    src: str  # file name beside the Markdown document
    alt: str
    png: bytes = field(repr=False)


@dataclass
class Sample:
    caption: str
    prompt: str
    completion: str


@dataclass
class Code:
    text: str
    lang: str


def write_images(blocks: list, folder: Path) -> dict[str, Path]:
    """Write every :class:`Image`'s PNG to ``folder/src``; returns the paths by ``src``."""
    paths = {}
    for b in blocks:
        if isinstance(b, Image):
            paths[b.src] = Path(folder) / b.src
            paths[b.src].write_bytes(b.png)
    return paths


def kv_table(tree: Mapping, empty: str, labels: Mapping[str, str] | None = None, header: str = "property") -> list:
    """A two-column table of a (nested) dict, or the ``empty`` note (nothing if that is empty too)."""
    rows = [[(labels or {}).get(k, k), fmt(v, k)] for k, v in flatten(tree)]
    return [Table([header, "value"], rows)] if rows else [Para(empty)] if empty else []


def flatten(tree: Mapping | None, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted key, value)`` pairs, in insertion order."""
    items: list[tuple[str, Any]] = []
    for key, value in (tree or {}).items():
        if isinstance(value, Mapping):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


# ------------------------------------------------------------------ Markdown
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def to_markdown(blocks: list) -> str:
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
            out.append(f"![{b.alt}]({b.src})")
        elif isinstance(b, Sample):
            # An HTML <pre> keeps the text verbatim in Markdown too and lets the prompt be bold.
            out.append(f"**{b.caption}**\n\n<pre><strong>{html.escape(b.prompt)}</strong>"
                       f"{html.escape(b.completion)}</pre>")
        elif isinstance(b, Code):
            longest = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
            fence = "`" * max(3, longest + 1)  # longer than any backtick run inside, so the block cannot end early
            out.append(f"{fence}{b.lang}\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------- HTML
_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1f2328; } main { max-width: 1180px; margin: 2rem auto; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; } h2 { margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } th { background: #f6f8fa; }
th, td { border: 1px solid #d0d7de; padding: .25rem .7rem; text-align: left; vertical-align: top; }
img { max-width: 100%; border: 1px solid #d0d7de; } figcaption { font-weight: 600; }
pre { background: #f6f8fa; padding: .7rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
"""


def to_html(blocks: list, title: str) -> str:
    """One self-contained page: inline CSS, images embedded as base64 PNG."""
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
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f'<img alt="{esc(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Sample):
            parts.append(f"<figure><figcaption>{esc(b.caption)}</figcaption><pre><strong>{esc(b.prompt)}</strong>"
                         f"{esc(b.completion)}</pre></figure>")
        elif isinstance(b, Code):
            parts.append(f'<pre><code class="language-{esc(b.lang)}">{esc(b.text)}</code></pre>')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")
