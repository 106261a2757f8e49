"""Benchmark: near-duplicate detection, recall and precision against edit rate, for dedup settings side by side.

The embedded corpus (42 works of Shakespeare) is cut into distinct passages: each work
is split into consecutive 1,000-word blocks and a passage is the start of a block,
100, 200, 400 or 800 words long (drawn at random). Distinct passages of the same play
are the hard negatives: same names, same style, same vocabulary. For every passage
and every edit rate (1, 2, 3, 5, 8, 10, 20% of its words) a near-copy is made: that
many edits at random places, each a substitution (a word drawn from the same work),
a deletion or an insertion, with equal odds. Seeds are fixed: the corpus of
passages and copies is the same on every run.

For each setting (words per shingle, permutations, threshold) the duplicate finder of
the clean stage (``lmforge/data/dedup.py``, datasketch MinHash LSH, candidates
confirmed on the full signatures) sees the passages in order, then, per edit rate
and with a fresh finder, the passages followed by their copies:

- recall at an edit rate: copies found to be near-duplicates of their own passage;
- distinct dropped: passages found to be a near-duplicate of another passage (false positives);
- precision: correct finds over all finds, with every edit rate's copies in the pool;
- ms/doc: the time to fingerprint one passage (words, exact key, MinHash), mean over all.

It also prints the true Jaccard similarity of the copies' shingle sets per edit rate.
With ``--stage`` it measures the clean stage itself instead, at the default settings:
the datatrove tasks of ``lmforge/data/curate.py`` (every cleaning step off but
dedup), ``--tasks`` tasks, on the passages followed by one rate's copies. ::

    python benchmarks/dedup_curve.py                      # every setting (about 2 minutes on 2 cores)
    python benchmarks/dedup_curve.py --shingles 5 --perms 128 --thresholds 0.5 0.8
    python benchmarks/dedup_curve.py --stage --tasks 4    # the clean stage's datatrove MinHash (about 2 minutes)

Expected output ends with a table like::

    | shingle | perm | threshold | bands x rows | 1% | 2% | 3% | 5% | 8% | 10% | 20% | distinct dropped | precision |
    | 5 | 128 | 0.80 | 9 x 13 | 0.98 | 0.62 | 0.27 | ... | 0 of 872 | 1.000 |
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.config import DedupConfig  # noqa: E402
from lmforge.data.dedup import DuplicateFinder, Fingerprint, fingerprint, word_hashes  # noqa: E402
from lmforge.data.quality import ngram_hashes  # noqa: E402
from lmforge.data.sources import embedded_corpus  # noqa: E402

RATES = (0.01, 0.02, 0.03, 0.05, 0.08, 0.10, 0.20)
LENGTHS = (100, 200, 400, 800)
BLOCK = 1000  # words per block: passages start a block apart, so no two overlap


def passages(seed: int, limit: int) -> list[tuple[str, list[str], list[str]]]:
    """``(work id, passage words, the work's words)`` for distinct passages of every work."""
    rng = random.Random(seed)
    out = []
    for doc in embedded_corpus():
        words = doc.text.split()
        for start in range(0, len(words) - BLOCK + 1, BLOCK):
            out.append((doc.id, words[start: start + rng.choice(LENGTHS)], words))
    rng.shuffle(out)  # plays interleaved, as documents of a real corpus would be
    return out[:limit] if limit else out


def near_copy(words: list[str], vocabulary: list[str], rate: float, rng: random.Random) -> list[str]:
    """``words`` with ``round(rate * len(words))`` (at least one) substitutions, deletions or insertions."""
    out = list(words)
    for pos in sorted(rng.sample(range(len(words)), max(1, round(rate * len(words)))), reverse=True):
        op = rng.randrange(3)
        if op == 0:
            out[pos] = rng.choice(vocabulary)
        elif op == 1:
            del out[pos]
        else:
            out.insert(pos, rng.choice(vocabulary))
    return out


def true_jaccard(a: str, b: str, k: int) -> float:
    sa, sb = (set(ngram_hashes(word_hashes(t)[1], k).tolist()) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def measure(originals: list[Fingerprint], copies: dict[float, list[Fingerprint]], cfg: DedupConfig) -> dict:
    """Recall per edit rate, distinct passages dropped and precision for one setting."""
    ids = [str(i) for i in range(len(originals))]

    def fresh() -> tuple[DuplicateFinder, int]:
        finder = DuplicateFinder(cfg)
        return finder, sum(finder.check(ids[i], fp.key, fp.signature) is not None for i, fp in enumerate(originals))

    finder, false = fresh()
    recall, wrong, found = {}, 0, 0
    for rate, fps in copies.items():
        finder, _ = fresh()  # copies of one rate at a time: a missed copy must not catch the next rate's
        hits = 0
        for i, fp in enumerate(fps):
            verdict = finder.check(f"copy-{i}", fp.key, fp.signature)
            if verdict is not None:
                found += 1
                hits += verdict[1] == ids[i]
                wrong += verdict[1] != ids[i]
        recall[rate] = hits / len(fps)
    correct = found - wrong
    return {"recall": recall, "distinct_dropped": false, "precision": correct / max(1, correct + wrong + false),
            "bands": finder.lsh.b, "rows": finder.lsh.r}


def measure_stage(originals: list[str], copies: dict[float, list[str]], tasks: int, folder: Path) -> dict:
    """The same figures from the clean stage run as datatrove tasks (only its dedup on), one rate at a time."""
    import json

    from lmforge.config import RunConfig
    from lmforge.pipeline import run

    off = {"normalize": {"html": False, "fix_unicode": False, "form": "none", "whitespace": False,
                         "control_chars": False},
           "lines": {"navigation": False, "boilerplate": False, "lorem_ipsum": False},
           "quality": {"gopher_quality": False}, "language": {"enabled": False},
           "pii": {"emails": False, "phones": False, "ips": False}}
    recall, false, wrong, found = {}, 0, 0, 0
    for rate, texts in copies.items():
        corpus = folder / f"corpus{rate}.jsonl"
        rows = [{"id": f"p{i}", "text": t} for i, t in enumerate(originals)]
        rows += [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cfg = RunConfig.model_validate({"name": f"r{rate}", "runs_dir": str(folder), "clean": off,
                                        "data": {"train": [str(corpus)], "tasks": tasks}})
        run(cfg, until="clean")
        hits = 0
        for path in (cfg.run_dir / "clean" / "rejects").glob("*.dedup.jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                kept = row["detail"].removeprefix("copy of ")
                if row["id"].startswith("p"):
                    false += 1
                    continue
                found += 1
                hits += kept == "p" + row["id"][1:]
                wrong += kept != "p" + row["id"][1:]
        recall[rate] = hits / len(texts)
    correct = found - wrong
    return {"recall": recall, "distinct_dropped": false // len(copies),
            "precision": correct / max(1, correct + wrong + false // len(copies))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shingles", type=int, nargs="+", default=[3, 4, 5], help="words per shingle to compare")
    ap.add_argument("--perms", type=int, nargs="+", default=[128, 256], help="MinHash permutations to compare")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                    help="estimated Jaccard similarities that make a near-copy")
    ap.add_argument("--passages", type=int, default=0, help="use only this many passages (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the passages and of the edits")
    ap.add_argument("--stage", action="store_true", help="measure the clean stage's datatrove tasks instead")
    ap.add_argument("--tasks", type=int, default=4, help="data.tasks for --stage")
    args = ap.parse_args()

    items = passages(args.seed, args.passages)
    originals = [" ".join(words) for _, words, _ in items]
    rng = random.Random(args.seed + 1)
    copies = {rate: [" ".join(near_copy(words, vocab, rate, rng)) for _, words, vocab in items] for rate in RATES}
    print(f"{len(originals)} passages of {len({w for w, _, _ in items})} works; {len(RATES)} edit rates; "
          f"CPU: {cpu_name()}\n")

    if args.stage:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            m = measure_stage(originals, copies, args.tasks, Path(folder))
        print("\n| clean stage, tasks | " + " | ".join(f"{r:.0%}" for r in RATES) + " | distinct dropped | precision |")
        print("|---" * (len(RATES) + 3) + "|")
        print(f"| defaults, {args.tasks} | " + " | ".join(f"{m['recall'][r]:.2f}" for r in RATES)
              + f" | {m['distinct_dropped']} of {len(originals)} | {m['precision']:.3f} |")
        return
    print("true Jaccard similarity of a copy and its passage (mean, 5th percentile), by words per shingle:\n")
    print("| edit rate | " + " | ".join(f"{k}-word shingles" for k in args.shingles) + " |")
    print("|---" * (len(args.shingles) + 1) + "|")
    for rate, texts in copies.items():
        cells = []
        for k in args.shingles:
            j = np.array([true_jaccard(a, b, k) for a, b in zip(originals, texts, strict=True)])
            cells.append(f"{j.mean():.2f} ({np.percentile(j, 5):.2f})")
        print(f"| {rate:.0%} | " + " | ".join(cells) + " |")

    print("\n| shingle | perm | threshold | bands x rows | " + " | ".join(f"{r:.0%}" for r in RATES)
          + " | distinct dropped | precision | ms/doc |")
    print("|---" * (len(RATES) + 7) + "|")
    for k in args.shingles:
        for perm in args.perms:
            cfg = DedupConfig(shingle_words=k, num_perm=perm)
            t0 = time.perf_counter()
            fps = [fingerprint(t, cfg) for t in originals]
            copy_fps = {rate: [fingerprint(t, cfg) for t in texts] for rate, texts in copies.items()}
            per_doc = (time.perf_counter() - t0) / (len(originals) * (1 + len(RATES)))
            for t in args.thresholds:
                m = measure(fps, copy_fps, cfg.model_copy(update={"threshold": t}))
                print(f"| {k} | {perm} | {t:.2f} | {m['bands']} x {m['rows']} | "
                      + " | ".join(f"{m['recall'][r]:.2f}" for r in RATES)
                      + f" | {m['distinct_dropped']} of {len(originals)} | {m['precision']:.3f} "
                      f"| {per_doc * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
