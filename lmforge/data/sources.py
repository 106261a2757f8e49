"""Documents and what every reader shares: the record, read statistics, options and byte decoding.

A :class:`Document` is ``{id, text, source, meta}``; readers yield them one at a time, so a corpus
larger than memory still works. This module holds what every reader uses (:class:`ReadStats`,
:class:`FileOptions`, :class:`DataError`, opening compressed files, decoding bytes as text, telling
binary from text) and the embedded corpus; the readers themselves are in ``lmforge/data/readers/``
(files and folders: :mod:`lmforge.data.readers.files`)::

    for doc in embedded_corpus():          # the 42 works of Shakespeare
        print(doc.id, len(doc.text))

Text is read as UTF-8; a byte that is not valid UTF-8 (a file saved as latin-1 or
cp1252, or a mix) is read as cp1252 (``0x92`` -> ``’``; U+FFFD for the five bytes
cp1252 leaves undefined), so one bad byte never costs the rest of the text, and the
repaired bytes are counted in ``ReadStats.repaired_bytes`` (and ``meta.repaired_bytes``).
"""
from __future__ import annotations

import bz2
import contextlib
import fnmatch
import gzip
import io
import json
import lzma
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EMBEDDED_CORPUS: Path = Path(__file__).parent / "corpus" / "shakespeare.jsonl.xz"

FORMATS: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text", ".md", ".markdown", ".rst"),
    "html": (".html", ".htm", ".xhtml"),
    "epub": (".epub",),
    "jsonl": (".jsonl", ".ndjson"),
    "csv": (".csv", ".tsv"),
    "parquet": (".parquet",),
}
TEXT_SUFFIXES = FORMATS["text"]
JSONL_SUFFIXES = FORMATS["jsonl"]
COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2", ".zst")
# Bytes inspected to tell text from binary before a line-based file is streamed (git uses the same idea).
SNIFF_BYTES = 8192
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


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
                          ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, line: str) -> Document:
        """Parse a line written by :meth:`to_json`; raises :class:`DataError` when it is not one."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not a JSON document line: {e}") from None
        return record_to_document(obj, default_id="", default_source="")


@dataclass
class ReadStats:
    """What a read saw: files opened, documents yielded, and entries skipped by reason."""

    files: int = 0
    documents: int = 0
    repaired_bytes: int = 0  # bytes of the documents yielded that were not UTF-8, read as cp1252 (see decode_text)
    skipped: dict[str, int] = field(default_factory=dict)
    # A few skipped paths per reason, so a user can find them without a listing of thousands.
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Called with (reason, where) for every skip: the collect stage writes them all to its rejects file.
    sink: Callable[[str, str], None] | None = field(default=None, repr=False, compare=False)

    def skip(self, reason: str, where: Path | str) -> None:
        """Count one skipped entry; ``where`` is a path, ``path:line`` or a message naming it."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(str(where))
        if self.sink is not None:
            self.sink(reason, str(where))

    def merge(self, other: ReadStats) -> None:
        self.files += other.files
        self.documents += other.documents
        self.repaired_bytes += other.repaired_bytes
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: max(0, 5 - len(shown))])


@dataclass
class FileOptions:
    """How files are chosen and read (the file-related fields of a collect source)."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    strict: bool = True

    def wanted(self, rel: str) -> bool:
        """Whether a file at ``rel`` (posix path inside its folder) passes the include / exclude globs."""
        def hit(patterns: list[str]) -> bool:
            # A pattern without '/' names files at any depth, like .gitignore; one with '/' names a path.
            return any(fnmatch.fnmatch(rel if "/" in p else rel.rsplit("/", 1)[-1], p) for p in patterns)
        return (not self.include or hit(self.include)) and not hit(self.exclude)


def record_to_document(obj: Any, default_id: str, default_source: str, text_field: str = "text",
                       id_field: str | None = None) -> Document:
    """Validate one parsed JSON record; messages are completed with file:line by the caller."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get(text_field)
    if text is None:
        raise DataError(f"missing '{text_field}' field")
    if not isinstance(text, str):
        raise DataError(f"'{text_field}' must be a string, got {type(text).__name__}")
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DataError(f"'meta' must be an object, got {type(meta).__name__}")
    doc_id = obj.get(id_field or "id", default_id)
    source = obj.get("source", default_source)
    return Document(id=str(doc_id), text=text, source=str(source), meta=meta)


def split_suffix(name: str) -> tuple[str, str, str]:
    """``'a.b.jsonl.gz'`` -> ``('a.b', 'jsonl', '.gz')``; an unsupported type gives an empty format."""
    lower = name.lower()
    compression = ""
    for c in COMPRESSION_SUFFIXES:
        if lower.endswith(c):
            compression = c
            name, lower = name[: -len(c)], lower[: -len(c)]
            break
    for fmt, suffixes in FORMATS.items():
        for suffix in suffixes:
            if lower.endswith(suffix) and len(lower) > len(suffix):
                return name[: -len(suffix)], fmt, compression
    return name, "", compression


@contextlib.contextmanager
def open_binary(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """``with open_binary(path, ".gz") as f``: ``path`` read as bytes, decompressed on the fly.

    ``path`` is a local :class:`~pathlib.Path` or a ``UPath`` (an fsspec URL such as ``s3://``,
    ``https://`` or ``memory://``); both are opened with ``.open``, so a remote file is streamed,
    never copied whole, and both the file and its decompressor are closed on leaving.
    """
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        if compression == ".gz":
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif compression == ".xz":
            yield stack.enter_context(lzma.LZMAFile(raw, "rb"))
        elif compression == ".bz2":
            yield stack.enter_context(bz2.BZ2File(raw, "rb"))
        elif compression == ".zst":
            try:
                import zstandard
            except ImportError:
                raise DataError(f"{path}: reading .zst needs the zstandard package "
                                "(pip install 'lmforge[data]')") from None
            # The buffered wrapper gives line iteration, which the bare zstd stream lacks.
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield stack.enter_context(io.BufferedReader(reader))
        else:
            yield raw


# The bytes of C0 control characters other than tab, newline, vertical tab, form feed and carriage return,
# and DEL: text has (almost) none of them, binary data many.
_CONTROL_BYTES = bytes([*range(1, 9), *range(14, 32), 127])
# Bytes that were not UTF-8, as ``surrogateescape`` decoding leaves them: U+DC80..U+DCFF.
_ESCAPED = re.compile("[\udc80-\udcff]+")


def repair_escapes(text: str) -> tuple[str, int]:
    """Replace the bytes a ``surrogateescape`` decoding kept as U+DC80..U+DCFF with their cp1252 characters.

    Returns the text and the number of bytes repaired. cp1252 is a superset of latin-1's
    printable characters and the usual encoding of "smart quotes" in non-UTF-8 text; its five
    undefined bytes (0x81 0x8D 0x8F 0x90 0x9D) become U+FFFD.
    """
    repaired = 0

    def cp1252(match: re.Match[str]) -> str:
        nonlocal repaired
        raw = bytes(ord(c) - 0xDC00 for c in match.group())
        repaired += len(raw)
        return raw.decode("cp1252", errors="replace")

    return _ESCAPED.sub(cp1252, text), repaired


def decode_text(data: bytes) -> tuple[str, int]:
    """``data`` as text: UTF-8 where it is valid, every other byte read as cp1252; ``(text, bytes repaired)``.

    Byte by byte rather than line by line, so a line that mixes UTF-8 and cp1252 keeps both.
    """
    return repair_escapes(data.decode("utf-8", errors="surrogateescape"))


def binary_reason(data: bytes, repaired: int = 0) -> str | None:
    """'binary' for NUL bytes, 'not_text' when most bytes are control bytes or not UTF-8, None for text.

    ``repaired`` is what :func:`decode_text` counted for ``data``. A file in another 8-bit
    encoding (cp1251, say) is mostly non-UTF-8 bytes too: reading it as cp1252 would give
    nonsense, so it is not text here either.
    """
    if b"\x00" in data:
        return "binary"
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    return "not_text" if 2 * (repaired + controls) > len(data) else None


REASON_TEXT = {
    "binary": "looks binary (contains NUL bytes)",
    "not_text": "is mostly not text (more than half its bytes are control bytes or not UTF-8)",
}


def problem(stats: ReadStats, opts: FileOptions, reason: str, message: str) -> None:
    """A bad entry: raise it under ``strict``, else skip it with a count (the message is the example)."""
    if opts.strict:
        raise DataError(message)
    stats.skip(reason, message)


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
