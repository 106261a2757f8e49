"""The collect stage (``lmforge collect``): every source into JSONL document shards, with provenance.

Sources come from ``collect.sources`` (files and folders, fsspec URLs, Hugging Face
datasets on disk or streamed by name, SQL queries, web pages) and the paths of
``data.train``; when both are empty, from the embedded corpus. A source's
``max_documents`` / ``max_bytes`` stop its reading early; each source shows its
progress (documents, MB, MB/s) on stderr. Output, under ``runs/<name>/collect/``::

    shards/00000.jsonl ...   documents {id, text, source, meta}, about collect.shard_mb each
    rejects.jsonl            one line per skipped entry: {source, reason, where}

Every document's ``meta`` holds where it came from (path and line or row, URL,
database), ``sha1`` (of the text) and ``collected_at`` (pages also ``fetched_at``).
Bad input never stops the run unless ``collect.strict`` is set (``lmforge collect
--strict``): an unreadable file, a malformed line, a failing query or a page that
times out is skipped, counted under its reason and reported, and the other sources
go on. Bytes that are not UTF-8 are read as cp1252 and counted (``repaired_bytes``, per
source and in total, and ``meta.repaired_bytes`` of each document that had some).
Accounting: entries in = documents kept + entries skipped, per source. ::

    from lmforge.data import collect
    result = collect.main(cfg, Path("runs/demo/collect"))
    result["documents"], result["skipped"]     # e.g. 42, {}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import RunConfig, SourceConfig
from lmforge.data.progress import Meter
from lmforge.data.readers.files import read_documents
from lmforge.data.shards import ShardWriter
from lmforge.data.sources import DataError, Document, FileOptions, ReadStats, embedded_corpus


def sources_of(cfg: RunConfig) -> list[SourceConfig]:
    """``collect.sources``, then the paths of ``data.train``; an empty list means the embedded corpus."""
    return [*cfg.collect.sources, *(SourceConfig(path=p) for p in cfg.data.train)]


def describe(src: SourceConfig | None) -> str:
    """A short name for a source, for messages and the data card (never a password)."""
    if src is None:
        return "embedded corpus"
    if src.kind == "path":
        return str(src.path)
    if src.kind == "url":
        return str(src.url)
    if src.kind == "dataset":
        return f"dataset {src.dataset}" + (f" ({src.subset})" if src.subset else "") + f" [{src.split}]"
    if src.kind == "sql":
        from lmforge.data.readers.sql import safe_url

        return f"sql {safe_url(src.sql or '')}"
    first = src.sitemap or src.urls_file or (src.urls[0] if src.urls else "")
    more = f" and {len(src.urls) - 1} more" if len(src.urls) > 1 and not (src.sitemap or src.urls_file) else ""
    return f"web {first}{more}"


def read_source(src: SourceConfig | None, cfg: RunConfig, stats: ReadStats) -> Iterator[Document]:
    """The documents of one source, read the way its kind needs."""
    strict = cfg.collect.strict
    if src is None:
        for doc in embedded_corpus():
            stats.documents += 1
            yield doc
    elif src.kind in ("path", "url"):
        opts = FileOptions(include=src.include, exclude=src.exclude, format=src.format, text_field=src.text_field,
                           id_field=src.id_field, strict=strict)
        if src.kind == "path":
            yield from read_documents([str(src.path)], stats, opts)
        else:
            from lmforge.data.readers.remote import read_url

            yield from read_url(str(src.url), src.storage_options, stats, opts)
    elif src.kind == "dataset" and not src.data_files and Path(str(src.dataset)).expanduser().is_dir():
        from lmforge.data.readers.records import read_dataset

        yield from read_dataset(str(src.dataset), src.split, src.text_field, src.id_field, stats, strict)
    elif src.kind == "dataset":  # not a folder here: a name on the Hub, or a builder reading data_files
        from lmforge.data.readers.remote import read_hub

        yield from read_hub(str(src.dataset), src.subset, src.data_files, src.split, src.text_field, src.id_field,
                            stats, strict)
    elif src.kind == "sql":
        from lmforge.data.readers.sql import read_sql

        yield from read_sql(str(src.sql), str(src.query), src.text_field, src.id_field, stats, strict)
    else:
        from lmforge.data.readers.web import read_web

        yield from read_web(src, cfg.collect.web, stats, strict)


def _read_into(writer: ShardWriter, docs: Iterator[Document], src: SourceConfig | None, collected_at: str,
               meter: Meter) -> bool:
    """Write a source's documents; True when its max_documents / max_bytes stopped the reading early."""
    max_docs, max_bytes = (src.max_documents, src.max_bytes) if src else (0, 0)
    n = size = 0
    for doc in docs:
        data = doc.text.encode("utf-8", errors="surrogatepass")
        doc.meta.setdefault("sha1", hashlib.sha1(data).hexdigest())
        doc.meta.setdefault("collected_at", collected_at)
        writer.write(doc)
        n, size = n + 1, size + len(data)
        meter.update(n, size)
        if (max_docs and n >= max_docs) or (max_bytes and size >= max_bytes):
            return True  # leaving the loop closes the reader, and with it the file or stream
    return False


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(cfg: RunConfig, out_dir: Path) -> dict:
    """Collect every source into ``out_dir/shards``; return the counts (the stage's manifest outputs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir / "shards", int(cfg.collect.shard_mb * 1_000_000))
    collected_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    srcs: list[SourceConfig | None] = list(sources_of(cfg)) or [None]
    per_source, totals = [], ReadStats()
    with open(out_dir / "rejects.jsonl", "w", encoding="utf-8") as rejects:
        for src in srcs:
            label = describe(src)

            def reject(reason: str, where: str, label: str = label) -> None:
                rejects.write(json.dumps({"source": label, "reason": reason, "where": where},
                                         ensure_ascii=False) + "\n")

            stats = ReadStats(sink=reject)
            meter, limited = Meter(f"[collect] {label}"), False
            try:
                limited = _read_into(writer, read_source(src, cfg, stats), src, collected_at, meter)
            except DataError as e:
                if cfg.collect.strict:
                    writer.abort()
                    raise
                stats.skip("source_failed", str(e))
                _warn(f"{e} (skipped; the other sources go on)")
            except BaseException:
                writer.abort()
                raise
            finally:
                meter.close()
            if stats.documents == 0 and "source_failed" not in stats.skipped:
                stats.skip("empty_source", f"{label}: no documents")
                _warn(f"{label}: no documents")
            for reason, n in sorted(stats.skipped.items()):
                if reason not in ("hidden", "empty_source", "source_failed"):
                    _warn(f"{label}: skipped {n} ({reason}), e.g. {stats.examples[reason][0]}")
            if stats.repaired_bytes:
                _warn(f"{label}: {stats.repaired_bytes:,} byte(s) were not UTF-8 and were read as cp1252 "
                      "(meta.repaired_bytes says which documents)")
            per_source.append({"source": label, "kind": src.kind if src else "embedded",
                               "documents": stats.documents, "files": stats.files, "limited": limited,
                               "repaired_bytes": stats.repaired_bytes,
                               "skipped": dict(stats.skipped), "examples": dict(stats.examples)})
            totals.merge(stats)
    shards = writer.close()
    if writer.docs == 0:
        raise DataError(f"no documents collected from {', '.join(describe(s) for s in srcs)}; "
                        f"skipped: {json.dumps(totals.skipped)} (see {out_dir / 'rejects.jsonl'})")
    skipped = sum(totals.skipped.values())
    print(f"collected {writer.docs:,} documents ({writer.text_bytes / 1e6:.1f} MB of text) into {len(shards)} "
          f"shard(s); skipped {skipped:,}")
    return {
        "documents": writer.docs, "bytes": writer.text_bytes, "shards": len(shards), "shard_files": shards,
        "repaired_bytes": totals.repaired_bytes,
        "skipped": dict(sorted(totals.skipped.items())), "sources": per_source,
        "accounting": {"in": writer.docs + skipped, "kept": writer.docs, "dropped": dict(totals.skipped)},
        "collected_at": collected_at,
    }
