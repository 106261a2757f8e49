"""Streamed sources: any fsspec URL, and Hugging Face datasets by name, read as they arrive.

A ``url:`` source (``s3://``, ``gs://``, ``hf://``, ``https://``, ``file://``, ``memory://``, or a
glob such as ``s3://bucket/crawl/*.jsonl.zst``) is opened with fsspec through ``UPath``
(universal_pathlib) and handed to the same file readers as a local path, so every format and
compression of ``lmforge/data/readers/files.py`` works and a file is streamed, never copied
whole. A ``dataset:`` name that is not a folder on disk is streamed with
``datasets.load_dataset(name, subset, split=..., streaming=True)``; a builder name (``json``,
``parquet``) with ``data_files`` reads those files the same way. ::

    stats = ReadStats()
    for doc in read_url("https://example.org/corpus/*.jsonl.gz", {}, stats, FileOptions(strict=False)):
        ...
    for doc in read_hub("allenai/c4", "en", [], "train", "text", None, stats, strict=False):
        ...

Document ids are stable: ``<path below the glob's folder, without suffix>:<line>`` for files,
``<dataset>:<split>:<row>`` for datasets (``<first data file's stem>:<split>:<row>`` for a builder
with data_files; the stream's order is the dataset's). A URL or dataset
that does not exist, a missing text field or a network failure raises one
:class:`~lmforge.data.sources.DataError` naming the source and the reason.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
from collections.abc import Iterator
from typing import Any

from lmforge.data.readers.files import read_file
from lmforge.data.sources import DataError, Document, FileOptions, ReadStats, split_suffix


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a remote read raises when the network or the server fails: aiohttp's errors (fsspec's http) and
    httpx's (the Hub client's) are not all OSError."""
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    for module, name in (("aiohttp", "ClientError"), ("httpx", "HTTPError")):
        with contextlib.suppress(ImportError):
            errors += (getattr(importlib.import_module(module), name),)
    return errors


def _files(url: str, storage_options: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(path below the glob's folder, UPath)`` of every file ``url`` names: itself, or its glob's sorted matches."""
    try:
        from upath import UPath
    except ImportError:
        raise DataError(f"{url}: url sources need universal_pathlib and fsspec (pip install 'lmforge[data]')") from None
    try:
        root = UPath(url, **storage_options)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its filesystem package is missing
        raise DataError(f"{url}: cannot open this URL ({e})") from None
    if not glob.has_magic(url):
        if not root.fs.exists(root.path):
            raise DataError(f"{url}: not found (or the server cannot be reached)")
        return [(root.name, root)]
    found = root.fs.glob(root.path, detail=True)
    matches = sorted(m for m, info in found.items() if info.get("type") != "directory")
    if not matches:
        raise DataError(f"{url}: no file matches the pattern")
    prefix = root.path[: min(root.path.find(c) for c in "*?[" if c in root.path)].rsplit("/", 1)[0] + "/"
    return [(m.removeprefix(prefix), UPath(root.fs.unstrip_protocol(m), **storage_options)) for m in matches]


def read_url(url: str, storage_options: dict[str, Any], stats: ReadStats, opts: FileOptions) -> Iterator[Document]:
    """The documents of the file(s) at ``url``, streamed through fsspec, in sorted path order."""
    for path, base in url_files(url, storage_options, stats, opts):
        yield from read_url_file(url, path, base, stats, opts)


def url_files(url: str, storage_options: dict[str, Any], stats: ReadStats, opts: FileOptions) -> Iterator[tuple[Any, str]]:
    """``(UPath, id base)`` of the files ``url`` names that pass include / exclude, in sorted path order."""
    try:
        for rel, path in _files(url, storage_options):
            if not opts.wanted(rel):
                stats.skip("excluded", str(path))
                continue
            yield path, split_suffix(rel)[0]
    except _network_errors() as e:
        raise DataError(f"{url}: read failed ({type(e).__name__}: {e})") from None


def read_url_file(url: str, path: Any, base: str, stats: ReadStats, opts: FileOptions) -> Iterator[Document]:
    """The documents of one file of the ``url`` source; a network failure is a :class:`DataError` naming ``url``."""
    try:
        yield from read_file(path, base, explicit=True, stats=stats, opts=opts)
    except _network_errors() as e:
        raise DataError(f"{url}: read failed ({type(e).__name__}: {e})") from None


def read_hub(
    name: str,
    subset: str | None,
    data_files: list[str],
    split: str,
    text_field: str,
    id_field: str | None,
    stats: ReadStats,
    strict: bool,
) -> Iterator[Document]:
    """A Hugging Face dataset streamed by name (``load_dataset(..., streaming=True)``), one document per row."""
    try:
        import datasets
    except ImportError:
        raise DataError("dataset sources need the datasets package (pip install 'lmforge[data]')") from None
    from lmforge.data.readers.records import row_document

    label = f"dataset {name}" + (f" ({subset})" if subset else "")
    # A builder (json, parquet) is named by its first file, so two such sources keep distinct ids.
    base = split_suffix(data_files[0].rstrip("/").rsplit("/", 1)[-1])[0] if data_files else name
    opts = FileOptions(text_field=text_field, id_field=id_field, strict=strict)
    try:
        rows = datasets.load_dataset(name, subset, data_files=data_files or None, split=split, streaming=True)
        stats.files += 1
        for row, record in enumerate(rows, start=1):
            if row == 1:
                _check_columns(label, record, (text_field, id_field))
            doc = row_document(
                record.get(text_field),
                record.get(id_field) if id_field else None,
                f"{base}:{split}",
                name,
                row,
                stats,
                opts,
                f"{label}: row {row}",
            )
            if doc is not None:
                doc.meta["split"] = split
                yield doc
    except (ValueError, *_network_errors()) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{label} [{split}]: cannot stream it ({type(e).__name__}: {_first_line(e)})") from None


def _check_columns(label: str, record: dict, columns: tuple[str | None, ...]) -> None:
    for column in columns:
        if column is not None and column not in record:
            raise DataError(f"{label}: no column '{column}' (columns: {', '.join(record)}); set text_field / id_field")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
