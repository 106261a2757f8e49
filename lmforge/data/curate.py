"""The clean stage (``lmforge clean``): collected shards -> cleaned, deduplicated shards and a data card.

Reads ``runs/<name>/collect/shards/*.jsonl`` and works in three passes:

A. per shard, in parallel (``clean.workers`` processes): the cleaning steps of
   ``lmforge/data/clean.py``, then decontamination against the evaluation sets;
   the kept documents and their fingerprints (exact key, MinHash) go to ``work/``;
B. once, over all shards in order: exact and near-duplicate detection (the first
   copy is kept; ``lmforge/data/dedup.py``);
C. per shard, in parallel: the duplicates are dropped and the final shard written.

Output under ``runs/<name>/clean/``::

    docs/00000.jsonl ...      the cleaned documents (the docs stage reads these)
    rejects/00000.jsonl       documents dropped while cleaning, with step, reason and detail
    rejects/00000.dedup.jsonl documents dropped as duplicates, with the id of the copy kept
    data_card.json, lengths.png

Each shard's pass A and C end with a done-marker (its ledger, written atomically), so
a run that is killed resumes without redoing finished shards; a changed config or
input starts over. Every document is accounted for: in = kept + dropped[reason]. ::

    from lmforge.data import curate
    result = curate.main(cfg, Path("runs/demo/collect"), Path("runs/demo/clean"), collect_outputs, "fp")
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from lmforge import artifacts
from lmforge.config import CleanConfig, RunConfig
from lmforge.data.clean import Drop, build_steps
from lmforge.data.dedup import DuplicateFinder, contaminated, eval_ngrams, fingerprint
from lmforge.data.ledger import Ledger, RejectWriter
from lmforge.data.shards import ShardWriter, read_shard, shard_paths
from lmforge.data.sources import DataError

WORK_VERSION = 1
NO_LIMIT = 1 << 62  # shard size for the writers here: one output shard per input shard
_STATE: dict = {}  # per-process: the steps and settings, set once by _init


def _init(cfg: CleanConfig, ngrams: np.ndarray, out: str) -> None:
    _STATE.update(cfg=cfg, steps=[] if not cfg.enabled else build_steps(cfg), ngrams=ngrams, out=Path(out))


def _warm(cfg: CleanConfig) -> None:
    """Import the heavy libraries and load the language model before workers are forked."""
    if cfg.enabled and cfg.language.enabled:
        from lmforge.data.clean import identify_language

        identify_language("warm up")
    if _dedup_on(cfg):
        import datasketch  # noqa: F401 - imported for its side effect: loaded once, shared by forks


def _dedup_on(cfg: CleanConfig) -> bool:
    return cfg.enabled and (cfg.dedup.exact or cfg.dedup.near)


def step_order(cfg: CleanConfig, decontaminate: bool) -> list[str]:
    """Names of the steps a document passes through, in order (the ledger's chain)."""
    names = [name for name, _ in build_steps(cfg)] if cfg.enabled else []
    return names + (["decontaminate"] if decontaminate else []) + (["dedup"] if _dedup_on(cfg) else [])


def _rejects(path: Path) -> RejectWriter:
    cfg: CleanConfig = _STATE["cfg"]
    return RejectWriter(path if cfg.rejects else None, cfg.rejects_max_chars)


# ------------------------------------------------------------------ pass A
def clean_shard(shard: Path) -> dict:
    """Pass A for one shard: clean, filter, decontaminate, fingerprint; returns the shard's ledger."""
    cfg: CleanConfig = _STATE["cfg"]
    out: Path = _STATE["out"]
    ngrams: np.ndarray = _STATE["ngrams"]
    stem, work = shard.stem, out / "work"
    ledger, rejects = Ledger(), _rejects(out / "rejects" / f"{stem}.jsonl")
    kept = ShardWriter(work / "a", NO_LIMIT, first=int(stem))
    keys, sigs, ids = [], [], []
    need_fp = _dedup_on(cfg) or len(ngrams) > 0
    for doc in read_shard(shard):
        size = ledger.take(doc)
        for name, step in _STATE["steps"]:
            t0 = time.perf_counter()
            result = step(doc)
            ledger.timed(name, time.perf_counter() - t0)
            if isinstance(result, Drop):
                ledger.drop(doc, name, result.reason, result.detail, size)
                rejects.write(doc, name, result.reason, result.detail)
                break
            ledger.passed(name, doc, result)
            doc = result
        else:
            t0 = time.perf_counter()
            fp = fingerprint(doc.text, cfg.dedup) if need_fp else None
            ledger.timed("fingerprint", time.perf_counter() - t0)
            if len(ngrams):
                shared = contaminated(fp, ngrams, cfg.dedup.ngram)
                if shared:
                    detail = f"{shared} {cfg.dedup.ngram}-grams shared with the evaluation sets"
                    ledger.drop(doc, "decontaminate", "contaminated", detail, size)
                    rejects.write(doc, "decontaminate", "contaminated", detail)
                    continue
                ledger.passed("decontaminate", doc, doc)
            ledger.keep(doc, size)
            kept.write(doc)
            if _dedup_on(cfg):
                keys.append(np.frombuffer(fp.key, dtype=np.uint8))
                sigs.append(fp.signature if fp.signature is not None else np.zeros(0, np.uint32))
                ids.append(doc.id)
    kept.close()
    rejects.close()
    if _dedup_on(cfg):
        arrays = {"keys": np.stack(keys) if keys else np.zeros((0, 16), np.uint8),
                  "sigs": np.stack(sigs) if sigs else np.zeros((0, 0), np.uint32)}
        with artifacts.AtomicFile(work / "a" / f"{stem}.npz") as f:
            np.savez(f, **arrays)
    summary = {"ledger": ledger.to_dict(), "ids": ids}
    artifacts.write_json(work / "a" / f"{stem}.json", summary, indent=None)  # the done-marker, written last
    return summary


# ------------------------------------------------------------------ pass B
def find_duplicates(stems: list[str], work: Path, cfg: CleanConfig) -> dict[str, dict[int, tuple[str, str]]]:
    """For each shard, ``{index in the shard's kept documents: (reason, id of the copy kept)}``."""
    finder = DuplicateFinder(cfg.dedup)
    found: dict[str, dict[int, tuple[str, str]]] = {}
    for stem in stems:
        ids = json.loads((work / "a" / f"{stem}.json").read_text(encoding="utf-8"))["ids"]
        with np.load(work / "a" / f"{stem}.npz") as arrays:
            keys, sigs = arrays["keys"], arrays["sigs"]
        found[stem] = {}
        for i, doc_id in enumerate(ids):
            verdict = finder.check(doc_id, keys[i].tobytes(), sigs[i] if cfg.dedup.near else None)
            if verdict is not None:
                found[stem][i] = verdict
    return found


# ------------------------------------------------------------------ pass C
def finish_shard(stem: str, duplicates: dict[int, tuple[str, str]]) -> dict:
    """Pass C for one shard: drop its duplicates, write the final shard; returns the dedup ledger."""
    cfg: CleanConfig = _STATE["cfg"]
    out: Path = _STATE["out"]
    work = out / "work"
    ledger, rejects = Ledger(), _rejects(out / "rejects" / f"{stem}.dedup.jsonl")
    writer = ShardWriter(out / "docs", NO_LIMIT, first=int(stem), lossless=False)
    kept = work / "a" / f"{stem}.jsonl"
    for i, doc in enumerate(read_shard(kept) if kept.exists() else []):
        if i in duplicates:
            reason, first = duplicates[i]
            size = ledger.unkeep(doc)
            ledger.drop(doc, "dedup", reason, f"copy of {first}", size)
            rejects.write(doc, "dedup", reason, f"copy of {first}")
            continue
        if _dedup_on(cfg):
            ledger.passed("dedup", doc, doc)
        writer.write(doc)
    writer.close()
    rejects.close()
    summary = {"ledger": ledger.to_dict()}
    artifacts.write_json(work / "c" / f"{stem}.json", summary, indent=None)
    return summary


# --------------------------------------------------------------- the stage
def _parallel(fn: Callable, jobs: list[tuple], workers: int, initargs: tuple, label: str) -> None:
    """Run ``fn(*job)`` for every job: in this process, or in a pool whose workers run ``_init`` first."""
    if not jobs:
        return
    if workers <= 1 or len(jobs) == 1:
        _init(*initargs)
        for job in jobs:
            fn(*job)
            print(f"[clean] {label} {job[0] if isinstance(job[0], str) else job[0].stem}")
        return
    # fork starts workers at once and re-imports nothing; spawn is the fallback where fork is missing.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        _warm(initargs[0])  # load models and libraries once here; forked workers share them
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init,
                             initargs=initargs) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for future in as_completed(futures):
            future.result()  # re-raises a worker's error here
            job = futures[future]
            print(f"[clean] {label} {job[0] if isinstance(job[0], str) else job[0].stem}")


# The option behind each Gopher quality reason, for the hint; the reasons without one have only the switch.
GOPHER_OPTIONS = {
    "too_few_words": "--clean.quality.min_words=N", "too_many_words": "--clean.quality.max_words=N",
    "mean_word_length": "--clean.quality.min_mean_word_len=X / --clean.quality.max_mean_word_len=X",
    "symbols": "--clean.quality.max_symbol_ratio=X", "few_stop_words": "--clean.quality.min_stop_words=N",
    "bullet_lines": "", "ellipsis_lines": "", "few_alphabetic_words": "",
}


def _hint(dropped: dict[str, int]) -> str:
    """What to change when cleaning dropped everything, from the most frequent reason."""
    reason = max(dropped, key=dropped.get) if dropped else ""
    if reason in ("wrong_language", "unsure_language"):
        return "to keep other languages set --clean.language.keep=[fr,de] (or [] for all)"
    if reason in GOPHER_OPTIONS:
        option = f"{GOPHER_OPTIONS[reason]} or " if GOPHER_OPTIONS[reason] else ""
        return f"the texts fail Gopher's quality rules ({reason}): set {option}--clean.quality.gopher_quality=false"
    if reason == "empty":
        return "the documents are empty"
    return "to keep the text as it is set --clean.enabled=false"


def eval_files(cfg: RunConfig) -> list[str]:
    """The evaluation texts training documents are checked against: dedup.decontaminate, data.val, eval.text."""
    return list(dict.fromkeys([*cfg.clean.dedup.decontaminate, *cfg.data.val, *cfg.eval.text]))


def main(cfg: RunConfig, in_dir: Path, out_dir: Path, collect: dict, collect_fp: str) -> dict:
    """Clean the shards of ``in_dir`` (the collect stage's folder) into ``out_dir``; return the counts."""
    from lmforge.data.data_card import write_data_card

    shards = shard_paths(Path(in_dir) / "shards")
    if not shards:
        raise DataError(f"no collected shards in {Path(in_dir) / 'shards'}; run the collect stage first")
    out, clean = Path(out_dir), cfg.clean
    files = eval_files(cfg) if clean.enabled else []
    key = artifacts.fingerprint(cfg, "clean", resume=True, v=WORK_VERSION, collected=collect_fp,
                                eval=artifacts.file_signature(files))
    work = out / "work"
    if not (work / "key").is_file() or (work / "key").read_text() != key:
        shutil.rmtree(out, ignore_errors=True)  # a different config or input: start over
    for sub in (work / "a", work / "c", out / "rejects", out / "docs"):
        sub.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(work / "key", key)
    # Files of a shard whose pass a kill interrupted; the pass runs again from its start.
    partial = [p for sub in (work / "a", work / "c", out / "rejects", out / "docs") for p in artifacts.remove_temp(sub)]
    if partial:
        print(f"[clean] removed {len(partial)} half-written file(s) of an interrupted run: "
              f"{', '.join(p.name for p in partial)}")

    ngrams = eval_ngrams(files, clean.dedup.ngram) if files else np.zeros(0, np.uint64)
    workers = clean.workers or os.cpu_count() or 1
    initargs = (clean, ngrams, str(out))
    todo = todo_a = [(s,) for s in shards if not (work / "a" / f"{s.stem}.json").is_file()]
    if len(todo) < len(shards):
        print(f"[clean] resuming: {len(shards) - len(todo)} of {len(shards)} shards already cleaned")
    clock = {"start": time.perf_counter()}
    _parallel(clean_shard, todo, min(workers, len(todo)), initargs, "cleaned shard")
    clock["clean"] = time.perf_counter()

    stems = [s.stem for s in shards]
    duplicates = find_duplicates(stems, work, clean) if _dedup_on(clean) else {s: {} for s in stems}
    clock["find_duplicates"] = time.perf_counter()
    todo = [(s, duplicates[s]) for s in stems if not (work / "c" / f"{s}.json").is_file()]
    _parallel(finish_shard, todo, min(workers, len(todo)), initargs, "deduplicated shard")
    clock["write"] = time.perf_counter()
    passes = {k: round(clock[k] - clock[prev], 2)
              for prev, k in (("start", "clean"), ("clean", "find_duplicates"), ("find_duplicates", "write"))}

    ledger = Ledger()
    for stem in stems:
        for part in ("a", "c"):
            ledger.merge(Ledger.from_dict(json.loads((work / part / f"{stem}.json").read_text())["ledger"]))
    order = step_order(clean, decontaminate=len(ngrams) > 0)
    ledger.check(order)
    card = write_data_card(out, collect, ledger.to_dict(), order, clean)
    shutil.rmtree(work)  # intermediate copies; the manifest now marks the stage done
    if ledger.docs_kept == 0:
        raise DataError(f"no training text left: cleaning kept none of the {ledger.docs_in:,} documents (dropped: "
                        f"{json.dumps(ledger.dropped)}); {_hint(ledger.dropped)}; see {out / 'data_card.json'} "
                        f"and {out / 'rejects'}")
    c = card["clean"]
    print(f"[clean] kept {c['documents']['kept']:,} of {c['documents']['in']:,} documents "
          f"({c['bytes']['kept'] / 1e6:.1f} of {c['bytes']['in'] / 1e6:.1f} MB); dropped {json.dumps(c['dropped'])}")
    return {"documents": c["documents"], "bytes": c["bytes"], "dropped": c["dropped"], "steps": order,
            "languages": dict(list(c["languages"].items())[:20]), "shards": len(stems),
            "pass_seconds": passes, "resumed_shards": len(shards) - len(todo_a),
            "data_card": str(out / "data_card.json")}
