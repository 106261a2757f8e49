"""Accounting for the data stages: every document is kept or dropped for a named reason.

A :class:`Ledger` counts documents and bytes in, kept and dropped per reason, and
per cleaning step (documents in, dropped, changed, characters removed); it keeps a
few examples of each reason, the language mix and length histograms. Ledgers of
different shards merge, and :meth:`Ledger.check` proves the identities

    documents in = kept + sum(dropped)
    bytes in     = kept + sum(dropped) + edited      (edited: what steps cut from documents kept)
    step[i].in   = step[i-1].in - step[i-1].dropped

so nothing disappears unexplained. :class:`RejectWriter` writes the dropped
documents, with step, reason and detail, as JSONL for inspection. ::

    ledger = Ledger()
    size = ledger.take(doc)                               # one more document in
    ledger.drop(doc, "language", "wrong_language", "de 0.99", size)    # or:
    ledger.keep(cleaned_doc, size)
    ledger.check(step_names); ledger.to_dict()            # the counts that go into data_card.json
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.artifacts import AtomicFile
from lmforge.data.sources import Document

EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 300
# Length histogram bins in characters: [0, 64), [64, 128), ... [2**24, inf): powers of two.
LENGTH_EDGES = [0] + [2**k for k in range(6, 25)]


def length_bin(chars: int) -> int:
    return 0 if chars < LENGTH_EDGES[1] else min(int(math.log2(chars)) - 5, len(LENGTH_EDGES) - 1)


def _nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8", errors="surrogatepass"))


@dataclass
class Ledger:
    docs_in: int = 0
    docs_kept: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    bytes_edited: int = 0  # bytes the steps removed from documents that went on (negative if they added)
    steps: dict[str, dict] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    lengths_in: list[int] = field(default_factory=lambda: [0] * len(LENGTH_EDGES))
    lengths_kept: list[int] = field(default_factory=lambda: [0] * len(LENGTH_EDGES))
    seconds: dict[str, float] = field(default_factory=dict)  # CPU time spent per step (summed over processes)
    # (step, reason) -> [documents, bytes]: every drop, reason by reason within each step (the data card's table)
    drops: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def _per_reason(self, column: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, reason), row in self.drops.items():
            out[reason] = out.get(reason, 0) + row[column]
        return out

    @property
    def dropped(self) -> dict[str, int]:
        """Documents dropped per reason, over all steps."""
        return self._per_reason(0)

    @property
    def dropped_bytes(self) -> dict[str, int]:
        """Bytes dropped per reason (as the documents entered), over all steps."""
        return self._per_reason(1)

    def timed(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self, doc: Document) -> int:
        """Count a document entering the stage (before any step changes it); returns its bytes."""
        size = _nbytes(doc)
        self.docs_in += 1
        self.bytes_in += size
        self.lengths_in[length_bin(len(doc.text))] += 1
        return size

    def _step(self, name: str) -> dict:
        return self.steps.setdefault(name, {"in": 0, "dropped": 0, "changed": 0, "chars_removed": 0})

    def passed(self, name: str, before: Document, after: Document) -> None:
        """A step let the document through, perhaps changed."""
        s = self._step(name)
        s["in"] += 1
        if after.text != before.text:
            s["changed"] += 1
            s["chars_removed"] += len(before.text) - len(after.text)

    def drop(self, doc: Document, step: str, reason: str, detail: str, size: int) -> None:
        """The document stops at ``step``; ``size`` is its bytes when it entered the stage (or this pass)."""
        s = self._step(step)
        s["in"] += 1
        s["dropped"] += 1
        row = self.drops.setdefault((step, reason), [0, 0])
        row[0], row[1] = row[0] + 1, row[1] + size
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({"id": doc.id, "source": doc.source, "step": step, "detail": detail,
                          "text": doc.text[:SNIPPET_CHARS]})

    def keep(self, doc: Document, size_in: int) -> None:
        """The document went through every step; ``size_in`` is its bytes when it entered."""
        size = _nbytes(doc)
        self.docs_kept += 1
        self.bytes_kept += size
        self.bytes_edited += size_in - size
        self.lengths_kept[length_bin(len(doc.text))] += 1
        lang = doc.meta.get("lang")
        if lang:
            self.languages[lang] = self.languages.get(lang, 0) + 1

    def unkeep(self, doc: Document) -> int:
        """Take back :meth:`keep` for a document a later pass drops (deduplication runs after cleaning)."""
        size = _nbytes(doc)
        self.docs_kept -= 1
        self.bytes_kept -= size
        self.lengths_kept[length_bin(len(doc.text))] -= 1
        lang = doc.meta.get("lang")
        if lang:
            self.languages[lang] = self.languages.get(lang, 0) - 1  # this ledger may be a fresh one (pass C)
        return size

    def merge(self, other: Ledger) -> None:
        for name in ("docs_in", "docs_kept", "bytes_in", "bytes_kept", "bytes_edited"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.languages, other.languages), (self.seconds, other.seconds)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for key, (docs, size) in other.drops.items():
            row = self.drops.setdefault(key, [0, 0])
            row[0], row[1] = row[0] + docs, row[1] + size
        for name, s in other.steps.items():
            mine = self._step(name)
            for k, v in s.items():
                mine[k] += v
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, EXAMPLES_PER_REASON - len(mine))])
        self.lengths_in = [a + b for a, b in zip(self.lengths_in, other.lengths_in, strict=True)]
        self.lengths_kept = [a + b for a, b in zip(self.lengths_kept, other.lengths_kept, strict=True)]

    def check(self, order: list[str]) -> None:
        """Raise if a document or byte is unaccounted for (a bug, never a user error)."""
        dropped = sum(self.dropped.values())
        if self.docs_in != self.docs_kept + dropped:
            raise RuntimeError(f"accounting: {self.docs_in} documents in != {self.docs_kept} kept + {dropped} dropped")
        if self.bytes_in != self.bytes_kept + sum(self.dropped_bytes.values()) + self.bytes_edited:
            raise RuntimeError("accounting: bytes in != bytes kept + bytes dropped + bytes edited")
        previous = self.docs_in
        for name in (n for n in order if n in self.steps):
            s = self.steps[name]
            if s["in"] != previous:
                raise RuntimeError(f"accounting: step {name} saw {s['in']} documents, {previous} reached it")
            previous = s["in"] - s["dropped"]
        if self.steps and previous != self.docs_kept:
            raise RuntimeError(f"accounting: the last step passed {previous} documents, {self.docs_kept} kept")

    def to_dict(self) -> dict:
        languages = {k: v for k, v in self.languages.items() if v}
        return {
            "documents": {"in": self.docs_in, "kept": self.docs_kept, "dropped": sum(self.dropped.values())},
            "bytes": {"in": self.bytes_in, "kept": self.bytes_kept, "dropped": sum(self.dropped_bytes.values()),
                      "edited": self.bytes_edited},
            "dropped": dict(sorted(self.dropped.items(), key=lambda kv: -kv[1])),
            "dropped_bytes": dict(sorted(self.dropped_bytes.items(), key=lambda kv: -kv[1])),
            "steps": self.steps, "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
            "length_histogram": {"edges_chars": LENGTH_EDGES, "in": self.lengths_in, "kept": self.lengths_kept},
            "examples": self.examples, "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "drops": [{"step": step, "reason": reason, "documents": docs, "bytes": size}
                      for (step, reason), (docs, size) in sorted(self.drops.items(), key=lambda kv: (-kv[1][0], kv[0]))],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        return cls(docs_in=d["documents"]["in"], docs_kept=d["documents"]["kept"], bytes_in=d["bytes"]["in"],
                   bytes_kept=d["bytes"]["kept"], bytes_edited=d["bytes"]["edited"],
                   steps={k: dict(v) for k, v in d["steps"].items()},
                   examples=d["examples"], languages=dict(d["languages"]),
                   lengths_in=list(d["length_histogram"]["in"]), lengths_kept=list(d["length_histogram"]["kept"]),
                   seconds=dict(d.get("seconds", {})),
                   drops={(r["step"], r["reason"]): [r["documents"], r["bytes"]] for r in d["drops"]})


class RejectWriter:
    """Dropped documents as JSONL ``{id, source, step, reason, detail, meta, text}``, written atomically."""

    def __init__(self, path: Path | None, max_chars: int = 0) -> None:
        self.path, self.max_chars = path, max_chars
        self.file = AtomicFile(path, "w") if path else None

    def write(self, doc: Document, step: str, reason: str, detail: str) -> None:
        if self.file is None:
            return
        text = doc.text[: self.max_chars] if self.max_chars else doc.text
        self.file.write(json.dumps({"id": doc.id, "source": doc.source, "step": step, "reason": reason,
                                    "detail": detail, "meta": doc.meta, "text": text},
                                   ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.commit()
