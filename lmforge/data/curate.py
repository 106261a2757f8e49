"""The clean stage (``lmforge clean``): collected shards -> cleaned, deduplicated shards and a data card.

Reads ``runs/<name>/collect/shards/*.jsonl`` and runs four datatrove stages
(``lmforge/data/tasks.py``) with the executor of ``data.executor``: local processes
(``data.tasks`` tasks, ``data.workers`` at once) or a Slurm job array (``data.slurm``):

A. per task (a contiguous range of documents): the cleaning steps of
   ``lmforge/data/clean.py``, decontamination against the evaluation sets, exact keys
   and datatrove's MinHash signatures;
B. per band / key bucket: candidate near-copies (datatrove's MinHash buckets) and exact copies;
C. once: which copy goes (a pair sharing a band is confirmed on the whole MinHash signature; the
   first in corpus order stays, whatever the number of tasks);
D. per task: the copies are dropped and the final shard written.

Output under ``runs/<name>/clean/``::

    docs/00000.jsonl ...      the cleaned documents, one file per task (the docs stage reads these)
    rejects/00000.jsonl       documents dropped while cleaning, with step, reason and detail
    rejects/00000.dedup.jsonl documents dropped as duplicates, with the id of the copy kept
    data_card.json, lengths.png

datatrove marks each finished task in ``work/logs/<stage>/completions/``, so a run that is
killed resumes without redoing finished tasks; a changed config, input or task count starts
over. Every document is accounted for across tasks: in = kept + dropped[reason]. ::

    from lmforge.data import curate
    result = curate.main(cfg, Path("runs/demo/collect"), Path("runs/demo/clean"), collect_outputs, "fp")
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from lmforge import artifacts
from lmforge.config import CleanConfig, RunConfig
from lmforge.data.clean import build_steps, identify_language
from lmforge.data.dedup import eval_ngrams
from lmforge.data.ledger import Ledger
from lmforge.data.shards import shard_paths
from lmforge.data.sources import DataError

WORK_VERSION = 3  # 3: the ledgers carry drops per step and reason


def _dedup_on(cfg: CleanConfig) -> bool:
    return cfg.enabled and (cfg.dedup.exact or cfg.dedup.near)


def step_order(cfg: CleanConfig, decontaminate: bool) -> list[str]:
    """Names of the steps a document passes through, in order (the ledger's chain)."""
    names = [name for name, _ in build_steps(cfg)] if cfg.enabled else []
    return names + (["decontaminate"] if decontaminate else []) + (["dedup"] if _dedup_on(cfg) else [])


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands x rows (b * r <= num_perm) that minimise the mean of the false-positive and false-negative areas
    under the candidate curve 1 - (1 - s^r)^b around ``threshold``: the rule datasketch's MinHashLSH follows."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], float)
    b, r = pairs[:, :1], pairs[:, 1:]
    grid = (np.arange(1000) + 0.5) / 1000  # midpoints: the areas as means times widths
    below, above = grid * threshold, threshold + grid * (1 - threshold)
    false_pos = np.mean(1 - (1 - below**r) ** b, axis=1) * threshold
    false_neg = np.mean((1 - above**r) ** b, axis=1) * (1 - threshold)
    best = int(np.argmin(0.5 * false_pos + 0.5 * false_neg))
    return int(pairs[best, 0]), int(pairs[best, 1])


def minhash_config(cfg: CleanConfig):
    """datatrove's MinHash settings for ``clean.dedup``: ``shingle_words``-word shingles of lowercase words, and
    the bands x rows of :func:`lsh_bands` for (threshold, num_perm), e.g. 25 x 5 for (0.5, 128)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    bands, rows = lsh_bands(cfg.dedup.threshold, cfg.dedup.num_perm)
    return MinhashConfig(n_grams=cfg.dedup.shingle_words, num_buckets=bands, hashes_per_bucket=rows, seed=1)


def _stages(cfg: RunConfig, shards: list[Path], ngrams: np.ndarray, out: Path) -> list[tuple[str, list, int]]:
    """The datatrove stages as ``(name, pipeline, tasks)``."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    from lmforge.data import tasks as t

    clean, n, work = cfg.clean, cfg.data.tasks, out / "work"
    counts = [t.count_lines(s) for s in shards]
    exact, near = _dedup_on(clean) and clean.dedup.exact, _dedup_on(clean) and clean.dedup.near
    mh = minhash_config(clean) if near else None
    buckets = mh.num_buckets if mh else 4  # exact-key buckets: as many tasks as there are bands
    stage_a = [t.ReadRange([str(s) for s in shards], counts), t.CleanTask(clean, ngrams, str(out), buckets)]
    if near:
        stage_a.append(t.Signatures(str(work / "minhash" / "sigs"), str(work / "minhash" / "full"), config=mh,
                                    language=t.Words()))
    stages = [("a", stage_a, n)]
    if exact or near:
        stage_b = [MinhashDedupBuckets(str(work / "minhash" / "sigs"), str(work / "minhash" / "buckets"), config=mh)
                   ] if near else []
        stages += [("b", stage_b + ([t.ExactBuckets(str(work), n)] if exact else []), buckets),
                   ("c", [t.PickCopies(str(work), n, clean.dedup.threshold,
                                       mh.num_buckets * mh.hashes_per_bucket if mh else 0)], 1)]
    stages.append(("d", [t.ReadKept(str(work)), t.DropCopies(clean, str(out), exact or near)], n))
    return stages


def _prepare(cfg: RunConfig, out: Path, key: str) -> None:
    """Start over when the key changed; drop the temporaries of writes a kill interrupted."""
    work = out / "work"
    if not (work / "key").is_file() or (work / "key").read_text() != key:
        shutil.rmtree(out, ignore_errors=True)  # a different config, input or task count: start over
    for sub in (work, out / "rejects", out / "docs"):
        sub.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(work / "key", key)
    partial = [p for folder in [out, *(d for d in out.rglob("*") if d.is_dir())] for p in artifacts.remove_temp(folder)]
    if partial:
        print(f"[clean] removed {len(partial)} half-written file(s) of an interrupted run")


def _reads(stage: str, collect: dict, work: Path, tasks: int) -> tuple[int, int] | None:
    """What a stage's reader hands on, (documents, bytes), for its progress: stage A reads what was
    collected, stage D what stage A kept; stages B and C read no documents."""
    if stage == "a":
        return (collect["documents"], collect["bytes"]) if "documents" in collect and "bytes" in collect else None
    if stage != "d":
        return None
    kept = [json.loads((work / "ledger" / "a" / f"{t:05d}.json").read_text(encoding="utf-8")) for t in range(tasks)]
    return sum(k["documents"]["kept"] for k in kept), sum(k["bytes"]["kept"] for k in kept)


def _merge_ledgers(work: Path, tasks: int) -> Ledger:
    ledger = Ledger()
    for part in ("a", "d"):
        for task in range(tasks):
            path = work / "ledger" / part / f"{task:05d}.json"
            ledger.merge(Ledger.from_dict(json.loads(path.read_text(encoding="utf-8"))))
    return ledger


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
    from lmforge.data.executor import run_tasks

    shards = shard_paths(Path(in_dir) / "shards")
    if not shards:
        raise DataError(f"no collected shards in {Path(in_dir) / 'shards'}; run the collect stage first")
    out, clean, tasks = Path(out_dir), cfg.clean, cfg.data.tasks
    files = eval_files(cfg) if clean.enabled else []
    key = artifacts.fingerprint(cfg, "clean", resume=True, v=WORK_VERSION, collected=collect_fp,
                                eval=artifacts.file_signature(files), tasks=tasks)
    _prepare(cfg, out, key)
    work = out / "work"
    ngrams = eval_ngrams(files, clean.dedup.ngram) if files else np.zeros(0, np.uint64)
    if clean.enabled and clean.language.enabled and cfg.data.executor == "local" and (cfg.data.workers or 2) > 1:
        # loaded once here and inherited by the forked workers (the first run on a machine unpacks the model
        # into $LMFORGE_CACHE, about 1 CPU-second; later runs map it in about 0.01)
        identify_language("")
    seconds, resumed = {}, 0
    for name, pipeline, n in _stages(cfg, shards, ngrams, out):
        t0 = time.perf_counter()
        done = run_tasks(cfg.data, name, pipeline, n, work / "logs", total=_reads(name, collect, work, tasks))
        resumed += done if name == "a" else 0
        seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"[clean] stage {name}: {n} task(s) finished" + (f" ({done} already done)" if done else "")
              + f" in {seconds[name]:.1f} s")

    ledger = _merge_ledgers(work, tasks)
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
            "languages": dict(list(c["languages"].items())[:20]), "shards": len(shards), "tasks": tasks,
            "executor": cfg.data.executor, "stage_seconds": seconds, "resumed_tasks": resumed,
            "data_card": str(out / "data_card.json")}
