"""The collect stage (``lmforge collect``): every source into JSONL document shards, with provenance.

Sources come from ``collect.sources`` (files and folders, fsspec URLs, Hugging Face
datasets on disk or streamed by name, SQL queries, web pages) and the paths of
``data.train``; when both are empty, from the embedded corpus. Output, under
``runs/<name>/collect/``::

    shards/00000.jsonl ...   documents {id, text, source, meta}, about collect.shard_mb each
    rejects.jsonl            one line per skipped entry: {source, reason, where}

The work runs as datatrove tasks (``data.tasks``, ``data.workers``; local processes or a
Slurm job array by ``data.executor``, through :func:`lmforge.data.executor.run_tasks`). The
sources are split into units read independently: each file of a path or url source (a
folder or glob gives many), and each other source whole (a SQL query, a web source, a
Hugging Face dataset, the embedded corpus, and any source with ``max_documents`` /
``max_bytes``, so that its limit holds exactly). Task ``r`` of ``n`` reads a contiguous
range of units and writes ``work/docs/<r>.jsonl``, ``work/rejects/<r>.jsonl`` and
``work/stats/<r>.json`` (counts per unit); the launching process then joins them, in unit
order, into the shards and the rejects file. The units do not depend on the task count,
so ``data.tasks=1`` and ``data.tasks=8`` write the same bytes. datatrove marks finished tasks
in ``work/logs/read/completions/``: a killed run, run again, reads only the unfinished ones.
Progress (documents, MB, MB/s, tasks) is one line on stderr.

Every document's ``meta`` holds where it came from (path and line or row, URL,
database), ``sha1`` (of the text) and ``collected_at`` (pages also ``fetched_at``).
Bad input never stops the run unless ``collect.strict`` is set (``lmforge collect
--strict``): an unreadable file, a malformed line, a failing query or a page that
times out is skipped, counted under its reason and reported, and the other sources
(and files) go on. Bytes that are not UTF-8 are read as cp1252 and counted (``repaired_bytes``, per
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
import shutil
import sys
from collections import defaultdict
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from datatrove.pipeline.base import PipelineStep

from lmforge import artifacts
from lmforge.config import RunConfig, SourceConfig
from lmforge.data.readers.files import list_files, read_documents, read_file
from lmforge.data.shards import ShardWriter
from lmforge.data.sources import DataError, Document, FileOptions, ReadStats, embedded_corpus

WORK_VERSION = 1  # the layout of work/: a change starts an interrupted run over


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


def input_files(cfg: RunConfig) -> list[str]:
    """The local files the stage reads: data.train and the local collect.sources (a change re-runs it all);
    remote ones (url sources, datasets on the Hub) are not checked again."""
    local = (p for s in cfg.collect.sources for p in (s.path, s.dataset, s.urls_file, *s.data_files) if p)
    return [*cfg.data.train, *local]


def file_options(src: SourceConfig, strict: bool) -> FileOptions:
    return FileOptions(include=src.include, exclude=src.exclude, format=src.format, text_field=src.text_field,
                       id_field=src.id_field, strict=strict)


def read_source(src: SourceConfig | None, cfg: RunConfig, stats: ReadStats) -> Iterator[Document]:
    """The documents of one source, read the way its kind needs."""
    strict = cfg.collect.strict
    if src is None:
        for doc in embedded_corpus():
            stats.documents += 1
            yield doc
    elif src.kind in ("path", "url"):
        opts = file_options(src, strict)
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


# ------------------------------------------------------------------ units: what a task reads
@dataclass(frozen=True)
class Unit:
    """One file of a path or url source, or (``file`` None) a whole source: what a task reads at a time."""

    source: int  # its index in the sources
    file: str | None = None
    base: str = ""  # the file's document id (of its lines: the prefix)
    explicit: bool = True  # named by the source itself, not found in a folder
    before: tuple[tuple[str, str], ...] = ()  # (reason, where) skipped while listing, just before this file


@dataclass
class Plan:
    """The units of a run, and what listing the sources skipped or failed on (counted by the launching process)."""

    units: list[Unit]
    tails: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # skipped after a source's last file
    failed: dict[int, str] = field(default_factory=dict)  # sources whose listing failed


def _whole(src: SourceConfig | None) -> bool:
    """Read in one unit: every kind but files, and a limited source (its limit counts across its files)."""
    return src is None or src.kind not in ("path", "url") or bool(src.max_documents or src.max_bytes)


def _list_source(index: int, src: SourceConfig, strict: bool, plan: Plan) -> None:
    """Add the files of a path or url source to ``plan``, with what listing them skipped."""
    pending: list[tuple[str, str]] = []
    stats = ReadStats(sink=lambda reason, where: pending.append((reason, where)))
    opts = file_options(src, strict)
    if src.kind == "path":
        files: Iterator[tuple[Any, str, bool]] = list_files(str(src.path), stats, opts)
    else:
        from lmforge.data.readers.remote import url_files

        files = ((path, base, True) for path, base in url_files(str(src.url), src.storage_options, stats, opts))
    try:
        for path, base, explicit in files:
            plan.units.append(Unit(index, str(path), base, explicit, tuple(pending)))
            pending.clear()
    except DataError as e:
        plan.failed[index] = str(e)  # under collect.strict, the error of the run unless a unit before fails
    plan.tails[index] = pending


def plan_units(cfg: RunConfig, srcs: list[SourceConfig | None]) -> Plan:
    """The units of every source, in reading order (the same whatever ``data.tasks`` is)."""
    plan = Plan([])
    for index, src in enumerate(srcs):
        if _whole(src):
            plan.units.append(Unit(index))
        else:
            assert src is not None
            _list_source(index, src, cfg.collect.strict, plan)
            if plan.failed and cfg.collect.strict:
                break  # read up to here, as one process would before it stopped
    return plan


def _read_unit(unit: Unit, src: SourceConfig | None, cfg: RunConfig, stats: ReadStats) -> Iterator[Document]:
    if unit.file is None:
        return read_source(src, cfg, stats)
    assert src is not None
    opts = file_options(src, cfg.collect.strict)
    if src.kind == "path":
        return read_file(Path(unit.file), unit.base, unit.explicit, stats, opts)
    from upath import UPath

    from lmforge.data.readers.remote import read_url_file

    return read_url_file(str(src.url), UPath(unit.file, **src.storage_options), unit.base, stats, opts)


def _write(out: IO[bytes], docs: Iterator[Document], src: SourceConfig | None,
           collected_at: str) -> Generator[Document, None, tuple[bool, int]]:
    """Write documents as JSON lines, passing each on; ``(stopped by max_documents / max_bytes, text bytes)``."""
    max_docs, max_bytes = (src.max_documents, src.max_bytes) if src else (0, 0)
    n = size = 0
    for doc in docs:
        data = doc.text.encode("utf-8", errors="surrogatepass")
        doc.meta.setdefault("sha1", hashlib.sha1(data).hexdigest())
        doc.meta.setdefault("collected_at", collected_at)
        # The line ShardWriter.write would write: the shards are these lines, joined.
        out.write((doc.to_json() + "\n").encode("utf-8", errors="surrogatepass"))
        n, size = n + 1, size + len(data)
        yield doc
        if (max_docs and n >= max_docs) or (max_bytes and size >= max_bytes):
            return True, size  # returning drops the reader, which closes its file or stream
    return False, size


class CollectTask(PipelineStep):
    """Task ``r`` of ``n``: its contiguous range of units into ``work/docs/<r>.jsonl`` (documents),
    ``work/rejects/<r>.jsonl`` and ``work/stats/<r>.json`` (counts per unit); passes the documents on
    (to the progress count). Under collect.strict a bad unit writes ``work/failed/<unit>.json`` and raises,
    so the launching process can name the first failure in reading order whichever task met it."""

    name = "collect"

    def __init__(self, cfg: RunConfig, units: list[Unit], work: str, collected_at: str) -> None:
        super().__init__()
        self.cfg, self.units, self.work, self.collected_at = cfg, units, Path(work), collected_at

    def run(self, data, rank: int = 0, world_size: int = 1):
        from lmforge.data.tasks import task_range

        srcs = sources_of(self.cfg) or [None]
        docs = artifacts.AtomicFile(self.work / "docs" / f"{rank:05d}.jsonl", "wb")
        rejects = artifacts.AtomicFile(self.work / "rejects" / f"{rank:05d}.jsonl", "w")
        counts = []
        try:
            for index in range(*task_range(len(self.units), rank, world_size)):
                unit = self.units[index]
                counts.append((yield from self._unit(index, unit, srcs[unit.source], docs.file, rejects.file)))
        except BaseException:
            docs.discard()
            rejects.discard()
            raise
        docs.commit()
        rejects.commit()
        artifacts.write_json(self.work / "stats" / f"{rank:05d}.json", counts, indent=None)

    def _unit(self, index: int, unit: Unit, src: SourceConfig | None, docs: IO[bytes],
              rejects: IO[str]) -> Generator[Document, None, dict]:
        label, lines = describe(src), 0

        def reject(reason: str, where: str) -> None:
            nonlocal lines
            rejects.write(_reject_line(label, reason, where))
            lines += 1

        stats, limited, size, failed = ReadStats(sink=reject), False, 0, None
        try:
            limited, size = yield from _write(docs, _read_unit(unit, src, self.cfg, stats), src, self.collected_at)
        except DataError as e:
            if self.cfg.collect.strict:
                artifacts.write_json(self.work / "failed" / f"{index:07d}.json", {"message": str(e)})
                raise
            stats.skip("source_failed", str(e))
            failed = str(e)
        return {"files": stats.files, "documents": stats.documents, "bytes": size, "limited": limited,
                "repaired_bytes": stats.repaired_bytes, "skipped": stats.skipped, "examples": stats.examples,
                "rejects": lines, "failed": failed}


def _reject_line(label: str, reason: str, where: str) -> str:
    """One line of ``rejects.jsonl``: what a task writes and what the join writes for what listing skipped."""
    return json.dumps({"source": label, "reason": reason, "where": where}, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ the stage: plan, run the tasks, join
def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _prepare(cfg: RunConfig, out: Path, plan: Plan, tasks: int) -> tuple[Path, str]:
    """Keep the finished tasks of an interrupted run with the same key, else start over; drop what a kill
    left half-written. Returns the work folder and the run's ``collected_at`` (kept across a resume)."""
    work = out / "work"
    key = artifacts.fingerprint(cfg, "collect", resume=True, v=WORK_VERSION, tasks=tasks,
                                units=artifacts.digest([vars(u) for u in plan.units]),
                                inputs=artifacts.file_signature(input_files(cfg)))
    if not (work / "key").is_file() or (work / "key").read_text() != key:
        shutil.rmtree(out, ignore_errors=True)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        artifacts.write_json(work / "started.json", {"collected_at": now})
        artifacts.write_text(work / "key", key)
    for stale in (work / "failed", out / "shards"):  # a strict run's last failure; shards of a join cut short
        shutil.rmtree(stale, ignore_errors=True)
    partial = [p for d in [out, *(d for d in out.rglob("*") if d.is_dir())] for p in artifacts.remove_temp(d)]
    if partial:
        print(f"[collect] removed {len(partial)} half-written file(s) of an interrupted run")
    return work, json.loads((work / "started.json").read_text(encoding="utf-8"))["collected_at"]


def _run(cfg: RunConfig, plan: Plan, work: Path, tasks: int, collected_at: str) -> None:
    from lmforge.data.executor import run_tasks

    step = CollectTask(cfg, plan.units, str(work), collected_at)
    try:
        done = run_tasks(cfg.data, "read", [step], tasks, work / "logs", label="collect", count=True)
    except DataError:
        failed = sorted((work / "failed").glob("*.json"))  # collect.strict: the first bad unit, in reading order
        if failed:
            raise DataError(json.loads(failed[0].read_text(encoding="utf-8"))["message"]) from None
        raise
    if done:
        print(f"[collect] {done} of {tasks} task(s) were done by an earlier run")


def _lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from f


def _source_stats(label: str, units: list[tuple[Unit, dict]], tail: list[tuple[str, str]], failed: str | None,
                  rejects: IO[str], lines: Iterator[str]) -> tuple[ReadStats, bool, list[str]]:
    """One source's counts and rejects, its units taken in order, as one process reading it would have them."""
    stats = ReadStats(sink=lambda reason, where: rejects.write(_reject_line(label, reason, where)))
    limited, failures = False, []
    for unit, c in units:
        for reason, where in unit.before:
            stats.skip(reason, where)
        for _ in range(c["rejects"]):
            rejects.write(next(lines))
        stats.merge(ReadStats(files=c["files"], documents=c["documents"], repaired_bytes=c["repaired_bytes"],
                              skipped=c["skipped"], examples=c["examples"]))
        limited = limited or c["limited"]
        failures += [c["failed"]] if c["failed"] else []
    for reason, where in tail:
        stats.skip(reason, where)
    if failed:
        stats.skip("source_failed", failed)
        failures.append(failed)
    return stats, limited, failures


def _report(label: str, stats: ReadStats, failures: list[str]) -> None:
    for message in failures:
        _warn(f"{message} (skipped; the rest goes on)")
    if stats.documents == 0 and "source_failed" not in stats.skipped:
        stats.skip("empty_source", f"{label}: no documents")
        _warn(f"{label}: no documents")
    for reason, n in sorted(stats.skipped.items()):
        if reason not in ("hidden", "empty_source", "source_failed"):
            _warn(f"{label}: skipped {n} ({reason}), e.g. {stats.examples[reason][0]}")
    if stats.repaired_bytes:
        _warn(f"{label}: {stats.repaired_bytes:,} byte(s) were not UTF-8 and were read as cp1252 "
              "(meta.repaired_bytes says which documents)")


def _join_sources(srcs: list[SourceConfig | None], plan: Plan, counts: list[dict], work: Path, out: Path,
                  tasks: int) -> tuple[list[dict], ReadStats]:
    """``rejects.jsonl`` and the per-source counts, from the tasks' files and what listing the sources skipped."""
    units_of: dict[int, list[tuple[Unit, dict]]] = defaultdict(list)
    for unit, c in zip(plan.units, counts, strict=True):
        units_of[unit.source].append((unit, c))
    lines = _lines([work / "rejects" / f"{t:05d}.jsonl" for t in range(tasks)])
    per_source, totals = [], ReadStats()
    with artifacts.AtomicFile(out / "rejects.jsonl", "w") as rejects:
        for index, src in enumerate(srcs):
            label = describe(src)
            stats, limited, failures = _source_stats(label, units_of[index], plan.tails.get(index, []),
                                                     plan.failed.get(index), rejects, lines)
            _report(label, stats, failures)
            # _report may count the source as empty, and that line goes to the rejects too
            per_source.append({"source": label, "kind": src.kind if src else "embedded",
                               "documents": stats.documents, "files": stats.files, "limited": limited,
                               "repaired_bytes": stats.repaired_bytes,
                               "skipped": dict(stats.skipped), "examples": dict(stats.examples)})
            totals.merge(stats)
    return per_source, totals


def _join_shards(cfg: RunConfig, work: Path, out: Path, tasks: int, counts: list[dict]) -> ShardWriter:
    """The tasks' documents, in task order (= unit order), into shards of about ``collect.shard_mb``."""
    writer = ShardWriter(out / "shards", int(cfg.collect.shard_mb * 1_000_000))
    try:
        for t in range(tasks):
            with open(work / "docs" / f"{t:05d}.jsonl", "rb") as f:
                for line in f:
                    writer.write_line(line)
    except BaseException:
        writer.abort()
        raise
    writer.text_bytes = sum(c["bytes"] for c in counts)
    return writer


def main(cfg: RunConfig, out_dir: Path) -> dict:
    """Collect every source into ``out_dir/shards``; return the counts (the stage's manifest outputs)."""
    out = Path(out_dir)
    srcs: list[SourceConfig | None] = list(sources_of(cfg)) or [None]
    plan = plan_units(cfg, srcs)
    tasks = max(1, min(cfg.data.tasks, len(plan.units)))
    work, collected_at = _prepare(cfg, out, plan, tasks)
    _run(cfg, plan, work, tasks, collected_at)
    if cfg.collect.strict and plan.failed:
        raise DataError(next(iter(plan.failed.values())))
    counts = [c for t in range(tasks)
              for c in json.loads((work / "stats" / f"{t:05d}.json").read_text(encoding="utf-8"))]
    writer = _join_shards(cfg, work, out, tasks, counts)
    shards = writer.close()
    per_source, totals = _join_sources(srcs, plan, counts, work, out, tasks)
    if writer.docs == 0:
        raise DataError(f"no documents collected from {', '.join(describe(s) for s in srcs)}; "
                        f"skipped: {json.dumps(totals.skipped)} (see {out / 'rejects.jsonl'})")
    shutil.rmtree(work)  # the tasks' copies; the manifest now marks the stage done
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
