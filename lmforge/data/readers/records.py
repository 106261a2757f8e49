"""Record readers: JSONL, CSV / TSV, Parquet and Hugging Face datasets, one document per row.

The text comes from a chosen field (``text`` unless told otherwise), the id from an
optional id field, else ``<file>:<line>`` or ``<file>:<row>``; ``meta`` records the
path and line or row. Files are streamed (Parquet in record batches), never loaded
whole. The file readers are called by :func:`lmforge.data.readers.files.read_documents`;
:func:`read_dataset` is the collect stage's reader for ``dataset:`` sources::

    for doc in read_dataset("my_dataset/", split="train", text_field="content", id_field=None,
                            stats=ReadStats(), strict=False):
        ...

Bytes that are not UTF-8 are read as cp1252 and counted (``ReadStats.repaired_bytes``,
``meta.repaired_bytes``; see :func:`lmforge.data.sources.decode_text`). A line that is not
valid JSON, or whose record is not an object or has a text or meta field of the wrong
type, is ``malformed_line``; a record or row without text (the field missing, null, or
empty in CSV / Parquet / datasets) is ``no_text``. Either is skipped and counted or, with
``strict``, raises :class:`DataError` with the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.data.sources import (
    REASON_TEXT,
    SNIFF_BYTES,
    DataError,
    Document,
    FileOptions,
    ReadStats,
    binary_reason,
    decode_text,
    open_binary,
    problem,
    record_to_document,
    repair_escapes,
)

PARQUET_BATCH = 1024  # rows per Parquet record batch: small enough to keep memory flat


def _sniff(path: Path, compression: str, explicit: bool, stats: ReadStats, opts: FileOptions, what: str) -> bool:
    """True if the start of the file looks like text; otherwise counts or reports it."""
    with open_binary(path, compression) as f:
        head = f.read(SNIFF_BYTES)
    reason = binary_reason(head, decode_text(head)[1])
    if reason is None:
        return True
    if explicit:
        problem(stats, opts, reason, f"{path} {REASON_TEXT[reason]}; pass UTF-8 {what}")
    else:
        stats.skip(reason, path)
    return False


def read_jsonl_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                    opts: FileOptions) -> Iterator[Document]:
    """One document per JSON line ``{text, id?, source?, meta?}``; blank lines are ignored."""
    if not _sniff(path, compression, explicit, stats, opts, "JSON lines"):
        return
    stats.files += 1
    with open_binary(path, compression) as f:
        for lineno, raw in enumerate(f, start=1):
            line, repaired = decode_text(raw)
            if not line.strip():
                continue  # blank lines (often a trailing one) carry no document
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # Some messages end in "at" ("Unterminated string starting at"): one "at column" reads right.
                msg = e.msg.removesuffix(" at")
                problem(stats, opts, "malformed_line", f"{path}:{lineno}: not valid JSON ({msg} at column {e.colno})")
                continue
            if isinstance(obj, dict) and obj.get(opts.text_field) is None:
                problem(stats, opts, "no_text", f"{path}:{lineno}: no text: the '{opts.text_field}' field is "
                        f"{'null' if opts.text_field in obj else 'missing'}")
                continue
            try:
                doc = record_to_document(obj, f"{base}:{lineno}", str(path), opts.text_field, opts.id_field)
            except DataError as e:
                problem(stats, opts, "malformed_line", f"{path}:{lineno}: {e}")
                continue
            # Provenance: where the line came from, unless the record says so itself.
            doc.meta.setdefault("path", str(path))
            doc.meta.setdefault("line", lineno)
            if repaired:
                doc.meta["repaired_bytes"] = repaired
                stats.repaired_bytes += repaired
            stats.documents += 1
            yield doc


def row_document(text: Any, row_id: Any, base: str, path: Path, row: int, stats: ReadStats,
                  opts: FileOptions, where: str) -> Document | None:
    if not isinstance(text, str) or not text:
        problem(stats, opts, "no_text", f"{where}: no text in '{opts.text_field}'")
        return None
    stats.documents += 1
    doc_id = f"{base}:{row}" if row_id is None or row_id == "" else str(row_id)
    return Document(id=doc_id, text=text, source=str(path), meta={"path": str(path), "row": row})


def _missing_column(path: Path, column: str, columns: Iterable[str], explicit: bool, stats: ReadStats,
                    opts: FileOptions) -> None:
    message = f"{path}: no column '{column}' (columns: {', '.join(map(str, columns))}); set text_field / id_field"
    if explicit:
        problem(stats, opts, "no_text_field", message)
    else:
        stats.skip("no_text_field", message)


def read_csv_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                  opts: FileOptions) -> Iterator[Document]:
    """One document per CSV (or TSV) row with a header line; rows are numbered from 1."""
    if not _sniff(path, compression, explicit, stats, opts, "CSV"):
        return
    # Long documents in one cell exceed csv's default 128 KB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if path.name.lower().removesuffix(compression).endswith(".tsv") else ","
    with open_binary(path, compression) as f:
        # surrogateescape keeps bytes that are not UTF-8 (as U+DC80..U+DCFF) for repair_escapes below.
        text_stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text_stream, delimiter=delimiter)
        try:
            columns = reader.fieldnames or []
        except csv.Error as e:
            problem(stats, opts, "malformed_line", f"{path}:1: unreadable header ({e})")
            return
        for column in (opts.text_field, opts.id_field):
            if column is not None and column not in columns:
                _missing_column(path, column, columns, explicit, stats, opts)
                return
        stats.files += 1
        row = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                problem(stats, opts, "malformed_line", f"{path}:{reader.line_num}: {e}")
                continue
            row += 1
            text, repaired = repair_escapes(record.get(opts.text_field) or "")
            row_id = repair_escapes(record.get(opts.id_field) or "")[0] if opts.id_field else None
            doc = row_document(text, row_id, base, path, row, stats, opts, f"{path}:{reader.line_num}")
            if doc is not None:
                if repaired:
                    doc.meta["repaired_bytes"] = repaired
                    stats.repaired_bytes += repaired
                yield doc


def read_parquet_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                      opts: FileOptions) -> Iterator[Document]:
    """One document per Parquet row, read in record batches of the text (and id) columns only."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'lmforge[data]')") from None

    if compression:
        problem(stats, opts, "unsupported_type", f"{path}: Parquet compresses internally; "
                "pass the .parquet file uncompressed")
        return
    try:
        # A URL (a UPath) is read through its fsspec filesystem; either way the file is closed with ``pf``.
        pf = pq.ParquetFile(path) if isinstance(path, Path) else pq.ParquetFile(path.path, filesystem=path.fs)
    except (pa.ArrowException, OSError) as e:
        if explicit:
            problem(stats, opts, "unreadable", f"{path}: not a readable Parquet file ({e})")
        else:
            stats.skip("unreadable", f"{path}: not a readable Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    columns = [c for c in (opts.text_field, opts.id_field) if c is not None]
    for column in columns:
        if column not in names:
            _missing_column(path, column, names, explicit, stats, opts)
            return
    stats.files += 1
    row = 0
    with pf:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            texts = batch.column(opts.text_field).to_pylist()
            ids = batch.column(opts.id_field).to_pylist() if opts.id_field else [None] * len(texts)
            for text, row_id in zip(texts, ids, strict=True):
                row += 1
                doc = row_document(text, row_id, base, path, row, stats, opts, f"{path}: row {row}")
                if doc is not None:
                    yield doc


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def read_dataset(path: str, split: str, text_field: str, id_field: str | None, stats: ReadStats,
                 strict: bool) -> Iterator[Document]:
    """A Hugging Face dataset on disk: ``save_to_disk`` output, or a folder of data files (streamed)."""
    # Offline by design: a dataset folder must never send the library to a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError("dataset sources need the datasets package (pip install 'lmforge[data]')") from None

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {path}")
    opts = FileOptions(text_field=text_field, id_field=id_field, strict=strict)
    try:
        if _is_saved_dataset(folder):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
            names = ds.column_names
            rows: Iterable[dict] = ds.select_columns([c for c in (text_field, id_field) if c])
        else:
            ds = datasets.load_dataset(str(folder), split=split, streaming=True)
            names = list(ds.features) if ds.features else []  # unknown until read for some builders
            rows = ds
    except (ValueError, FileNotFoundError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot load the dataset ({e})") from None
    for column in (text_field, id_field):
        if column is not None and names and column not in names:
            raise DataError(f"{path}: no column '{column}' (columns: {', '.join(names)})")
    stats.files += 1
    base = folder.name
    for row, record in enumerate(rows, start=1):
        doc = row_document(record.get(text_field), record.get(id_field) if id_field else None,
                            base, folder, row, stats, opts, f"{path}: row {row}")
        if doc is not None:
            doc.meta["split"] = split
            yield doc
