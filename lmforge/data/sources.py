"""Document readers: text files, folders and JSONL, plain or compressed, streamed.

Every reader yields :class:`Document` records ``{id, text, source, meta}``, one
at a time, so a corpus larger than memory still works. Supported inputs:

- ``.txt``, ``.md``, ``.text`` (optionally ``.gz`` / ``.xz``): one document per file;
- ``.jsonl`` (optionally ``.gz`` / ``.xz``): one document per line, with a ``text``
  field and optional ``id``, ``source`` and ``meta``;
- folders: every supported file below them, recursively, in sorted path order.

Usage::

    stats = ReadStats()
    for doc in iter_sources(["notes/", "extra.jsonl.gz"], stats):
        ...
    print(stats.documents, stats.skipped)   # e.g. 12 {'binary': 1, 'hidden': 2}

``iter_sources([])`` streams the embedded Shakespeare corpus (42 works).

Files inside a folder that are hidden, binary (NUL bytes), not UTF-8 or of an
unsupported type are skipped and counted in ``ReadStats.skipped`` by reason; the
same problems in a file named explicitly raise :class:`DataError` naming it.
"""

from __future__ import annotations

import codecs
import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EMBEDDED_CORPUS: Path = Path(__file__).parent / "corpus" / "shakespeare.jsonl.xz"

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSION_SUFFIXES = (".gz", ".xz")
# Bytes inspected to tell text from binary before a JSONL file is streamed (git uses the same idea).
SNIFF_BYTES = 8192


class DataError(ValueError):
    """A user error about input data; the message names the file (and line where relevant)."""


@dataclass
class Document:
    """One unit of text with its provenance; serialized as one JSON line."""

    id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """One JSON line (no trailing newline); non-ASCII text is kept as is."""
        return json.dumps({"id": self.id, "text": self.text, "source": self.source, "meta": self.meta},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Document:
        """Parse a line written by :meth:`to_json`; raises :class:`DataError` when it is not one."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not a JSON document line: {e}") from None
        return _record_to_document(obj, default_id="", default_source="")


@dataclass
class ReadStats:
    """What a read saw: files opened, documents yielded, and entries skipped by reason."""

    files: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # A few skipped paths per reason, so a user can find them without a listing of thousands.
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: Path | str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(str(path))

    def merge(self, other: ReadStats) -> None:
        self.files += other.files
        self.documents += other.documents
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            self.examples.setdefault(reason, []).extend(other.examples.get(reason, [])[:5])


def _record_to_document(obj: Any, default_id: str, default_source: str) -> Document:
    """Validate one parsed JSON record; messages are completed with file:line by the caller."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if text is None:
        raise DataError("missing 'text' field")
    if not isinstance(text, str):
        raise DataError(f"'text' must be a string, got {type(text).__name__}")
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DataError(f"'meta' must be an object, got {type(meta).__name__}")
    doc_id = obj.get("id", default_id)
    source = obj.get("source", default_source)
    return Document(id=str(doc_id), text=text, source=str(source), meta=meta)


def _split_suffix(name: str) -> tuple[str, str, str]:
    """``'a.b.jsonl.gz'`` -> ``('a.b', '.jsonl', '.gz')``; unsupported types give an empty kind."""
    lower = name.lower()
    compression = ""
    for c in COMPRESSION_SUFFIXES:
        if lower.endswith(c):
            compression = c
            name, lower = name[: -len(c)], lower[: -len(c)]
            break
    for kind in TEXT_SUFFIXES + JSONL_SUFFIXES:
        if lower.endswith(kind) and len(lower) > len(kind):
            return name[: -len(kind)], kind, compression
    return name, "", compression


def _open_binary(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def _binary_reason(data: bytes, final: bool) -> str | None:
    """'binary' for NUL bytes, 'not_utf8' for invalid UTF-8, None for text."""
    if b"\x00" in data:
        return "binary"
    try:
        # final=False tolerates a multi-byte character cut at the end of a sniffed prefix.
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError:
        return "not_utf8"
    return None


_REASON_TEXT = {
    "binary": "looks binary (contains NUL bytes)",
    "not_utf8": "is not valid UTF-8 text",
}


def _read_text_file(path: Path, base: str, compression: str, explicit: bool,
                    stats: ReadStats) -> Iterator[Document]:
    try:
        with _open_binary(path, compression) as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    reason = _binary_reason(data, final=True)
    if reason is not None:
        if explicit:
            raise DataError(f"{path} {_REASON_TEXT[reason]}; pass UTF-8 text files")
        stats.skip(reason, path)
        return
    stats.files += 1
    stats.documents += 1
    yield Document(id=base, text=data.decode("utf-8"), source=str(path),
                   meta={"path": str(path), "bytes": len(data)})


def _read_jsonl_file(path: Path, base: str, compression: str, explicit: bool,
                     stats: ReadStats) -> Iterator[Document]:
    try:
        with _open_binary(path, compression) as f:
            reason = _binary_reason(f.read(SNIFF_BYTES), final=False)
            if reason is not None:
                if explicit:
                    raise DataError(f"{path} {_REASON_TEXT[reason]}; pass UTF-8 JSON lines")
                stats.skip(reason, path)
                return
            f.seek(0)
            stats.files += 1
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
                if not line.strip():
                    continue  # blank lines (often a trailing one) carry no document
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                try:
                    doc = _record_to_document(obj, default_id=f"{base}:{lineno}", default_source=str(path))
                except DataError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                if "meta" not in obj:
                    doc.meta = {"path": str(path), "line": lineno}
                stats.documents += 1
                yield doc
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_file(path: Path, base: str, explicit: bool, stats: ReadStats) -> Iterator[Document]:
    _, kind, compression = _split_suffix(path.name)
    if kind in TEXT_SUFFIXES:
        yield from _read_text_file(path, base, compression, explicit, stats)
    elif kind in JSONL_SUFFIXES:
        yield from _read_jsonl_file(path, base, compression, explicit, stats)
    elif explicit:
        supported = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
        raise DataError(f"{path}: unsupported file type; expected one of {supported} "
                        f"(optionally compressed with {', '.join(COMPRESSION_SUFFIXES)})")
    else:
        stats.skip("unsupported_type", path)


def _walk(folder: Path, stats: ReadStats) -> list[tuple[str, Path]]:
    """All non-hidden files below ``folder`` as ``(relative posix path, path)``, sorted by that path."""
    found: list[tuple[str, Path]] = []
    pending = [folder]
    # Symlinked folders are followed; remembering resolved folders keeps a link cycle from looping forever.
    seen = {folder.resolve()}
    while pending:
        current = pending.pop()
        try:
            entries = list(current.iterdir())
        except OSError as e:
            raise DataError(f"{current}: cannot list folder ({e})") from None
        for entry in entries:
            if entry.name.startswith("."):
                stats.skip("hidden", entry)
            elif entry.is_dir():
                real = entry.resolve()
                if real not in seen:
                    seen.add(real)
                    pending.append(entry)
            elif entry.is_file():
                found.append((entry.relative_to(folder).as_posix(), entry))
    found.sort(key=lambda item: item[0])
    return found


def read_documents(paths: list[str], stats: ReadStats | None = None) -> Iterator[Document]:
    """Stream the documents of files and folders, in the order given (folders in sorted path order).

    Pass a :class:`ReadStats` to learn what was read and skipped; it is filled while the
    generator runs and is complete once it is exhausted.
    """
    stats = stats if stats is not None else ReadStats()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"data path not found: {raw}")
        if path.is_dir():
            for rel, file in _walk(path, stats):
                base, _, _ = _split_suffix(rel)
                yield from _read_file(file, base, explicit=False, stats=stats)
        else:
            base, _, _ = _split_suffix(path.name)
            yield from _read_file(path, base, explicit=True, stats=stats)


def embedded_corpus() -> Iterator[Document]:
    """Stream the embedded corpus: the 42 works of Shakespeare, sorted by file name."""
    if not EMBEDDED_CORPUS.is_file():
        raise DataError(f"embedded corpus missing: {EMBEDDED_CORPUS} (reinstall lmforge)")
    with lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                yield Document.from_json(line)
            except DataError as e:
                raise DataError(f"{EMBEDDED_CORPUS}:{lineno}: {e}") from None


def stage_texts(path: Path) -> Iterator[str]:
    """The texts of a ``train.jsonl`` / ``val.jsonl`` written by the docs stage, streamed."""
    if not Path(path).is_file():
        raise DataError(f"{path} not found; run the docs stage first (lmforge docs)")
    for doc in read_documents([str(path)]):
        yield doc.text


def iter_sources(paths: list[str], stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of ``paths``; an empty list means the embedded corpus."""
    if not paths:
        for doc in embedded_corpus():
            if stats is not None:
                stats.documents += 1
            yield doc
        return
    yield from read_documents(paths, stats)
