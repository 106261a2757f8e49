"""Read files and folders, plain or compressed, as documents, streamed: the file-type dispatch.

Every reader yields :class:`Document` records ``{id, text, source, meta}``, one at
a time, so a corpus larger than memory still works. File formats, chosen by name
(or forced with ``FileOptions.format``):

- ``.txt .text .md .markdown .rst``: one document per file;
- ``.html .htm .xhtml``: one document per page, main text extracted with trafilatura;
- ``.epub``: one document per book, chapters in reading order (see ``markup.py``);
- ``.jsonl .ndjson``, ``.csv .tsv``, ``.parquet``: one document per line or row, text
  from ``FileOptions.text_field`` (see ``records.py``);
- any of them compressed with ``.gz``, ``.xz``, ``.bz2`` or ``.zst``;
- folders: every supported file below them, recursively, in sorted path order,
  optionally filtered by ``include`` / ``exclude`` globs; a path may also be a glob.

Usage::

    stats = ReadStats()
    for doc in read_documents(["notes/", "extra.jsonl.gz"], stats, FileOptions(strict=False)):
        ...
    print(stats.documents, stats.skipped)   # e.g. 12 {'binary': 1, 'hidden': 2}

``iter_sources([])`` streams the embedded Shakespeare corpus (42 works). Databases,
Hugging Face datasets and web pages have their own readers beside this one; the collect
stage (``lmforge/data/collect.py``) drives them all. What every reader shares (the
:class:`~lmforge.data.sources.Document` record, statistics, decoding) is in
:mod:`lmforge.data.sources`.

Text is read as UTF-8; a byte that is not valid UTF-8 (a file saved as latin-1 or
cp1252, or a mix) is read as cp1252 (``0x92`` -> ``’``; U+FFFD for the five bytes
cp1252 leaves undefined), so one bad byte never costs the rest of the text, and the
repaired bytes are counted in ``ReadStats.repaired_bytes`` (and ``meta.repaired_bytes``).

Files inside a folder that are hidden, binary (NUL bytes), mostly not text (``not_text``:
more than half the bytes are control bytes or not UTF-8) or of an unsupported type are
skipped and counted in ``ReadStats.skipped`` by reason. With ``strict=True`` (the
default for direct calls) the same problems in a file named explicitly, an unreadable
file or a malformed line raise :class:`DataError` naming the file and line; with
``strict=False`` they are skipped and counted as well.
"""


from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator
from pathlib import Path

import orjson

from lmforge.data.readers import markup, records
from lmforge.data.sources import (
    COMPRESSION_SUFFIXES,
    FORMATS,
    READ_ERRORS,
    REASON_TEXT,
    DataError,
    Document,
    FileOptions,
    ReadStats,
    binary_reason,
    decode_text,
    embedded_corpus,
    open_binary,
    problem,
    split_suffix,
)


def _read_text_file(path: Path, base: str, compression: str, explicit: bool, stats: ReadStats,
                    opts: FileOptions) -> Iterator[Document]:
    with open_binary(path, compression) as f:
        data = f.read()
    text, repaired = decode_text(data)
    reason = binary_reason(data, repaired)
    if reason is not None:
        if explicit:
            problem(stats, opts, reason, f"{path} {REASON_TEXT[reason]}; pass UTF-8 text files")
        else:
            stats.skip(reason, path)
        return
    stats.files += 1
    stats.documents += 1
    stats.repaired_bytes += repaired
    meta = {"path": str(path), "bytes": len(data)} | ({"repaired_bytes": repaired} if repaired else {})
    yield Document(id=base, text=text, source=str(path), meta=meta)


def read_file(path: Path, base: str, explicit: bool, stats: ReadStats, opts: FileOptions) -> Iterator[Document]:
    """The documents of one file (a local Path, or a UPath for a URL), read by the reader of its format."""
    _, fmt, compression = split_suffix(path.name)
    fmt = fmt if opts.format == "auto" else opts.format
    readers = {"text": _read_text_file, "html": markup.read_html_file, "epub": markup.read_epub_file,
               "jsonl": records.read_jsonl_file, "csv": records.read_csv_file, "parquet": records.read_parquet_file}
    if fmt not in readers:
        if explicit:
            supported = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
            problem(stats, opts, "unsupported_type", f"{path}: unsupported file type; expected one of "
                    f"{supported} (optionally compressed with {', '.join(COMPRESSION_SUFFIXES)})")
        else:
            stats.skip("unsupported_type", path)
        return
    try:
        yield from readers[fmt](path, base, compression, explicit, stats, opts)
    except READ_ERRORS as e:
        problem(stats, opts, "unreadable", f"{path}: cannot read ({e})")


def _walk(folder: Path, stats: ReadStats, opts: FileOptions) -> list[tuple[str, Path]]:
    """The non-hidden files below ``folder`` that pass the globs, as ``(relative posix path, path)``, sorted."""
    found: list[tuple[str, Path]] = []
    pending = [folder]
    # Symlinked folders are followed; remembering resolved folders keeps a link cycle from looping forever.
    seen = {folder.resolve()}
    while pending:
        current = pending.pop()
        try:
            entries = list(current.iterdir())
        except OSError as e:
            problem(stats, opts, "unreadable", f"{current}: cannot list folder ({e})")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                stats.skip("hidden", entry)
            elif entry.is_dir():
                real = entry.resolve()
                if real not in seen:
                    seen.add(real)
                    pending.append(entry)
            elif entry.is_file():
                rel = entry.relative_to(folder).as_posix()
                if opts.wanted(rel):
                    found.append((rel, entry))
                else:
                    stats.skip("excluded", entry)
    found.sort(key=lambda item: item[0])
    return found


def _expand(raw: str) -> list[Path]:
    """A path as given, or the sorted matches of a glob pattern when no such path exists."""
    path = Path(raw).expanduser()
    if path.exists() or not glob.has_magic(raw):
        if not path.exists():
            raise DataError(f"data path not found: {raw}")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not matches:
        raise DataError(f"no file matches the pattern {raw}")
    return matches


def read_documents(paths: list[str], stats: ReadStats | None = None,
                   options: FileOptions | None = None) -> Iterator[Document]:
    """Stream the documents of files, folders and globs, in the order given (folders in sorted path order).

    Pass a :class:`ReadStats` to learn what was read and skipped; it is filled while the
    generator runs and is complete once it is exhausted.
    """
    stats = stats if stats is not None else ReadStats()
    opts = options or FileOptions()
    for raw in paths:
        for path, base, explicit in list_files(raw, stats, opts):
            yield from read_file(path, base, explicit=explicit, stats=stats, opts=opts)


def list_files(raw: str, stats: ReadStats, opts: FileOptions) -> Iterator[tuple[Path, str, bool]]:
    """The files a path, folder or glob names, in reading order, as ``(path, id base, named explicitly)``.

    Hidden and excluded entries of folders are counted in ``stats`` as they are passed; the collect
    stage lists a source this way and hands each file to a task of its own choosing.
    """
    for path in _expand(raw):
        if path.is_dir():
            for rel, file in _walk(path, stats, opts):
                yield file, split_suffix(rel)[0], False
        else:
            yield path, split_suffix(path.name)[0], True


def stage_texts(path: Path) -> Iterator[str]:
    """The texts of a ``train.jsonl`` / ``val.jsonl`` written by the docs stage, streamed."""
    if not Path(path).is_file():
        raise DataError(f"{path} not found; run the docs stage first (lmforge docs)")
    for doc in read_documents([str(path)]):
        yield doc.text


def docs_texts(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The texts of a docs-stage file (``train.jsonl``), streamed; of its documents ``start`` to ``end``
    (0-based, end excluded) only, when given: a pack task's share, the lines before it left unparsed.

    A lean reader for the lines the pack stage reads: the general reader (:func:`stage_texts`) takes
    about six times as long as the JSON parsing itself, a tenth of that stage's time.
    """
    if not path.is_file():
        raise DataError(f"{path} not found; run the docs stage first (lmforge docs)")
    with open(path, "rb") as f:
        for number, line in enumerate(itertools.islice(f, start, end), start=start + 1):
            try:
                text = orjson.loads(line)["text"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{number}: not a document of the docs stage ({e}); re-run lmforge docs") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field 'text' is {type(text).__name__}, not a string; "
                                "re-run lmforge docs")
            yield text


def iter_sources(paths: list[str], stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of ``paths``; an empty list means the embedded corpus."""
    if not paths:
        for doc in embedded_corpus():
            if stats is not None:
                stats.documents += 1
            yield doc
        return
    yield from read_documents(paths, stats)
