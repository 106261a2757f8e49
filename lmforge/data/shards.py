"""Document shards: numbered JSONL files of about a fixed size, written atomically, read streaming.

The collect and clean stages store documents as ``00000.jsonl``, ``00001.jsonl``,
... (one :class:`~lmforge.data.sources.Document` per line). A shard is written
under a temporary name and renamed when complete, so a reader (or a resumed run)
never sees half a shard. Shards are the unit of parallel and resumable work::

    writer = ShardWriter(Path("runs/demo/collect/shards"), shard_bytes=32_000_000)
    for doc in docs:
        writer.write(doc)
    infos = writer.close()     # [{'file': '00000.jsonl', 'docs': 42, 'bytes': 5101234}, ...]
    for doc in read_shard(Path("runs/demo/collect/shards/00000.jsonl")):
        ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.artifacts import AtomicFile
from lmforge.data.sources import DataError, Document

_SURROGATE = re.compile("[\ud800-\udfff]")

class ShardWriter:
    """Writes documents to numbered shards, starting a new one past ``shard_bytes`` of JSON."""

    def __init__(self, folder: Path, shard_bytes: int, first: int = 0, lossless: bool = True) -> None:
        """``lossless=False`` replaces lone surrogates (from JSON escapes) with U+FFFD, for strict UTF-8 output."""
        self.folder = Path(folder)
        self.lossless = lossless
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.index = first
        self.file: AtomicFile | None = None
        self.current = {"docs": 0, "bytes": 0}
        self.shards: list[dict] = []
        self.docs = 0
        self.text_bytes = 0

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.jsonl"

    def write(self, doc: Document) -> None:
        if not self.lossless and _SURROGATE.search(doc.text):
            doc = Document(doc.id, _SURROGATE.sub("\ufffd", doc.text), doc.source, doc.meta)
        # surrogatepass: a lone surrogate from a JSON escape survives the round trip instead of crashing it.
        self.write_line((doc.to_json() + "\n").encode("utf-8", errors="surrogatepass"))
        self.text_bytes += len(doc.text.encode("utf-8", errors="surrogatepass"))

    def write_line(self, line: bytes) -> None:
        """One document's JSON line as :meth:`write` encodes it (``text_bytes`` is left to the caller)."""
        if self.file is None:
            self.file = AtomicFile(self._path(self.index), "wb")
        self.file.write(line)
        self.current["docs"] += 1
        self.current["bytes"] += len(line)
        self.docs += 1
        if self.current["bytes"] >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        if self.file is None:
            return
        self.file.commit()
        self.file = None
        final = self._path(self.index)
        self.shards.append({"file": final.name, **self.current})
        self.index += 1
        self.current = {"docs": 0, "bytes": 0}

    def close(self) -> list[dict]:
        """Finish the last shard; returns ``[{'file', 'docs', 'bytes'}]`` for every shard written."""
        self._finish()
        return self.shards

    def abort(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None


def shard_paths(folder: Path) -> list[Path]:
    """The complete shards of a folder, in order."""
    return sorted(Path(folder).glob("[0-9][0-9][0-9][0-9][0-9].jsonl"))


def read_shard(path: Path) -> Iterator[Document]:
    """The documents of a shard written by :class:`ShardWriter`."""
    with open(path, encoding="utf-8", errors="surrogatepass") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                yield Document.from_json(line)
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e} (a damaged shard: delete the stage folder and rerun)") from None
