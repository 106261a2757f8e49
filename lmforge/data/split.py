"""The "docs" stage: read the training text and hold out validation text.

Writes ``out_dir/train.jsonl`` and ``out_dir/val.jsonl`` (one :class:`Document` JSON
per line) and returns counts. The corpus is streamed twice and never held in
memory: a first pass notes only each document's id and length, a second pass
decides and writes. Rules, in order:

1. ``data.val`` given: validation is that text; all of ``data.train`` trains.
2. ``data.split == "docs"``: whole documents are held out, either the ids in
   ``data.val_docs`` or ``round(val_fraction * n_docs)`` documents chosen with
   ``cfg.seed`` (at least one each side; a one-document corpus falls back to 3.).
3. ``data.split == "tail"``: the documents are concatenated in read order and the
   last ``val_fraction`` of the characters is validation, as nanoGPT's prepare.py
   does; the document that straddles the cut becomes ``X`` (train) and ``X#tail`` (val).

Empty documents are skipped and counted. Usage::

    from lmforge.config import load_config
    stats = main(load_config("configs/demo.yaml"), Path("runs/demo/docs"))
    # embedded corpus, defaults: {'train_docs': 38, 'val_docs': 4, 'split': 'docs', ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.artifacts import AtomicFile
from lmforge.config import RunConfig
from lmforge.data.readers.files import iter_sources, read_documents
from lmforge.data.sources import DataError, Document, ReadStats

MAX_VAL_IDS = 50  # val ids listed in the stats (the manifest stays readable for big corpora)


class _JsonlSink:
    """Writes documents to ``path`` through a temporary file and counts what it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = AtomicFile(path, "w")
        self.docs = 0
        self.chars = 0
        self.bytes = 0
        self.ids: list[str] = []

    def write(self, doc: Document) -> None:
        self.file.write(doc.to_json() + "\n")
        self.docs += 1
        self.chars += len(doc.text)
        self.bytes += len(doc.text.encode("utf-8"))
        if len(self.ids) < MAX_VAL_IDS:
            self.ids.append(doc.id)

    def close(self) -> None:
        self.file.commit()  # renamed only once complete: a crash never leaves half a file under the final name

    def abort(self) -> None:
        self.file.discard()


def _nonempty(docs: Iterable[Document], stats: ReadStats) -> Iterator[Document]:
    for doc in docs:
        if doc.text.strip():  # whitespace alone is no text to train on or to validate with
            yield doc
        else:
            stats.skip("empty", doc.source or doc.id)


def _survey(paths: list[str], stats: ReadStats) -> tuple[list[str], list[int]]:
    """First pass: ids and character counts of the non-empty documents."""
    ids: list[str] = []
    chars: list[int] = []
    for doc in _nonempty(iter_sources(paths, stats), stats):
        ids.append(doc.id)
        chars.append(len(doc.text))
    return ids, chars


def _describe(paths: list[str]) -> str:
    return ", ".join(paths) if paths else "the embedded corpus"


def _choose_val_docs(ids: list[str], cfg: RunConfig) -> set[int]:
    """Indices of the documents held out by split=docs."""
    n = len(ids)
    if cfg.data.val_docs:
        known = set(ids)
        unknown = [v for v in cfg.data.val_docs if v not in known]
        if unknown:
            shown = ", ".join(ids[:20]) + (f", ... ({n} in all)" if n > 20 else "")
            raise DataError(f"data.val_docs: unknown document id(s) {', '.join(unknown)}; available: {shown}")
        wanted = set(cfg.data.val_docs)
        chosen = {i for i, doc_id in enumerate(ids) if doc_id in wanted}
        if len(chosen) == n:
            raise DataError(f"data.val_docs holds out all {n} documents of {_describe(cfg.data.train)}; "
                            "leave at least one for training")
        return chosen
    k = min(max(1, round(cfg.data.val_fraction * n)), n - 1)
    rng = np.random.default_rng(cfg.seed)
    return {int(i) for i in rng.choice(n, size=k, replace=False)}


def _tail_boundary(chars: list[int], cfg: RunConfig) -> int:
    """Character position where validation begins in the concatenated text."""
    total = sum(chars)
    if total < 2:
        raise DataError(f"{_describe(cfg.data.train)} has {total} character(s): too little text to hold out "
                        "validation; add text or set data.val")
    boundary = int(total * (1.0 - cfg.data.val_fraction))
    return min(max(boundary, 1), total - 1)


def _write_docs_split(cfg: RunConfig, held: set[int], train: _JsonlSink, val: _JsonlSink) -> None:
    scratch = ReadStats()  # the second pass sees the same skips as the first; count them once
    for i, doc in enumerate(_nonempty(iter_sources(cfg.data.train, scratch), scratch)):
        (val if i in held else train).write(doc)


def _write_tail_split(cfg: RunConfig, boundary: int, train: _JsonlSink, val: _JsonlSink) -> None:
    scratch = ReadStats()
    pos = 0  # characters of the concatenated text before this document
    for doc in _nonempty(iter_sources(cfg.data.train, scratch), scratch):
        end = pos + len(doc.text)
        if end <= boundary:
            train.write(doc)
        elif pos >= boundary:
            val.write(doc)
        else:
            cut = boundary - pos
            train.write(Document(id=doc.id, text=doc.text[:cut], source=doc.source, meta=doc.meta))
            tail_meta = {**doc.meta, "tail_of": doc.id, "char_offset": cut}
            val.write(Document(id=f"{doc.id}#tail", text=doc.text[cut:], source=doc.source, meta=tail_meta))
        pos = end


def _write_explicit(cfg: RunConfig, train: _JsonlSink, val: _JsonlSink, stats: ReadStats) -> None:
    for doc in _nonempty(iter_sources(cfg.data.train, stats), stats):
        train.write(doc)
    for doc in _nonempty(read_documents(cfg.data.val, stats), stats):
        val.write(doc)
    if train.docs == 0:
        raise DataError(f"no training text in {_describe(cfg.data.train)}")
    if val.docs == 0:
        raise DataError(f"no validation text in {', '.join(cfg.data.val)}")


def main(cfg: RunConfig, out_dir: Path, inputs: list[str] | None = None) -> dict:
    """Write ``train.jsonl`` and ``val.jsonl`` under ``out_dir``; return the counts.

    ``inputs`` (in ``lmforge run``: the clean stage's ``docs/`` folder) replaces ``data.train``.
    """
    if inputs is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": list(inputs)})})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    method = "explicit" if cfg.data.val else cfg.data.split
    note = ""
    held: set[int] = set()
    boundary = 0
    if method != "explicit":
        ids, chars = _survey(cfg.data.train, stats)
        if not ids:
            raise DataError(f"no training text in {_describe(cfg.data.train)}")
        if method == "docs" and len(ids) == 1 and not cfg.data.val_docs:
            method = "tail"
            note = "one document only: held out the tail of its text instead of whole documents"
        if method == "docs":
            held = _choose_val_docs(ids, cfg)
        else:
            boundary = _tail_boundary(chars, cfg)

    train = _JsonlSink(out_dir / "train.jsonl")
    val = _JsonlSink(out_dir / "val.jsonl")
    try:
        if method == "explicit":
            _write_explicit(cfg, train, val, stats)
        elif method == "docs":
            _write_docs_split(cfg, held, train, val)
        else:
            _write_tail_split(cfg, boundary, train, val)
    except BaseException:
        train.abort()
        val.abort()
        raise
    train.close()
    val.close()

    result = {
        "train_docs": train.docs, "val_docs": val.docs,
        "train_bytes": train.bytes, "val_bytes": val.bytes,
        "train_chars": train.chars, "val_chars": val.chars,
        "val_ids": val.ids, "split": method, "skipped": dict(stats.skipped),
    }
    if note:
        result["note"] = note
    return result
