"""Benchmark: the clean stage (cleaning, decontamination, exact and near dedup) on a generated messy corpus.

Generates (once, streamed to disk, the same bytes for the same --mb and seed; cached in
--dir) --mb megabytes of JSONL records: English prose, raw HTML pages with navigation and
cookie banners, mojibake, exact copies, near-copies with a few words changed, German /
French / Spanish documents, junk (symbol soup, repeated lines, lorem ipsum, spam) and
personal data. Then it runs lmforge's collect and clean stages with every web-grade filter
switched on, each side in its own process: this checkout ("now") and, with --before, a
checkout of an earlier lmforge ("before"), alternating the sides --repeats times. For each
run it reports the clean stage's wall time and MB/s, its CPU seconds summed over every
process (the main one and its workers: RUSAGE_SELF + RUSAGE_CHILDREN), MB per CPU second
(throughput per core), the peak RSS of the main process and of the largest worker, the
CPU seconds of each cleaning step, the load average, and a digest of the documents kept
(ids and bytes), then the ratios now / before. ::

    git archive b8cae13 | (mkdir -p /tmp/lmforge-before && tar -x -C /tmp/lmforge-before)   # the process pool
    python benchmarks/data_pipeline.py --mb 5                                  # now only, about 20 s on 2 shared cores
    python benchmarks/data_pipeline.py --mb 200 --before /tmp/lmforge-before   # the figures in docs/benchmarks.md
    python benchmarks/data_pipeline.py --mb 20 --resume-check                  # kill a run midway, rerun it
    python benchmarks/data_pipeline.py --mb 5 --steps --before DIR --repeats 2  # CPU-s per step (datatrove checkouts)
    python benchmarks/data_pipeline.py --mb 1000 --html-metadata --before DIR  # pages' metadata on, as before

With --resume-check it then starts the clean stage again in a child process, kills it
(SIGKILL, the whole process group) once --kill-after tasks are done, reruns it and
reports how many tasks the rerun had to clean. Output (200 MB, 2 shared vCPUs; docs/benchmarks.md)::

    before  clean 200.0 MB: wall 935.5 s = 0.21 MB/s | CPU 295.2 s = 0.68 MB per CPU-s | RSS main 834, worker 736 MB | ...
    now     clean 200.0 MB: wall 526.6 s = 0.38 MB/s | CPU 273.5 s = 0.73 MB per CPU-s | RSS main 376, worker 312 MB | ...
    now / before: 1.08x MB per CPU-second, 1.78x MB/s wall
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The side being measured imports lmforge from LMFORGE_BENCH_SRC (set for the "before" child), else this checkout.
sys.path.insert(0, os.environ.get("LMFORGE_BENCH_SRC") or str(Path(__file__).resolve().parents[1]))

OTHER_LANGUAGES = {
    "de": ["Der Zug nach Hamburg hatte heute wieder eine halbe Stunde Verspätung.",
           "Im Sommer fahren viele Familien an die Ostsee, um am Strand zu liegen.",
           "Die Bibliothek der Stadt ist montags geschlossen und sonst bis acht Uhr geöffnet.",
           "Nach dem Regen wuchsen im Wald überall Pilze, die wir am Abend gebraten haben.",
           "Unsere Nachbarin arbeitet als Ärztin im Krankenhaus und kommt oft spät nach Hause."],
    "fr": ["Le marché du samedi matin attire les habitants de tout le quartier.",
           "Pendant les vacances, nous avons visité plusieurs villages de la côte bretonne.",
           "La boulangerie au coin de la rue vend le meilleur pain de la ville.",
           "Il faut réserver une table, car le restaurant est toujours plein le soir.",
           "Les enfants ont appris à nager cet été dans le lac près de la maison."],
    "es": ["El tren de la mañana sale a las siete y llega a Madrid antes del mediodía.",
           "Mi abuela prepara la mejor tortilla de patatas de toda la familia.",
           "En primavera los campos se llenan de flores amarillas y rojas.",
           "La biblioteca del barrio organiza talleres de lectura para los niños.",
           "Después de la cena salimos a pasear por la plaza mayor del pueblo."],
}
NAV = "<nav><a href='/'>Home</a> | <a href='/news'>News</a> | <a href='/shop'>Shop</a> | <a href='/c'>Contact</a></nav>"
COOKIE = "<div class='banner'>This site uses cookies. By continuing you accept our cookie policy.</div>"
FOOTER = "<footer>Copyright 2025 Example Media | Privacy policy | Terms of use</footer>"


def _paragraphs() -> list[str]:
    from lmforge.data.sources import embedded_corpus

    paras = []
    for doc in embedded_corpus():
        paras += [p.strip() for p in doc.text.split("\n\n") if len(p.split()) >= 12]
    return paras


def _document(rng: random.Random, paras: list[str]) -> str:
    return "\n\n".join(rng.sample(paras, rng.randint(4, 24)))


def _messy(rng: random.Random, paras: list[str], kind: str, previous: list[str]) -> str:
    text = _document(rng, paras)
    if kind == "html":
        body = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
        return f"<html><head><title>Page</title></head><body>{NAV}{COOKIE}<article>{body}</article>{FOOTER}</body></html>"
    if kind == "mojibake":
        return text.replace("'", "\u2019").replace(" the ", " thé ").encode("utf-8").decode("cp1252", errors="replace")
    if kind == "exact" and previous:
        return rng.choice(previous)
    if kind == "near" and previous:
        words = rng.choice(previous).split(" ")
        for _ in range(3):
            words[rng.randrange(len(words))] = rng.choice(["anew", "perhaps", "indeed"])
        return " ".join(words)
    if kind == "foreign":
        lang = rng.choice(sorted(OTHER_LANGUAGES))
        return " ".join(rng.choice(OTHER_LANGUAGES[lang]) for _ in range(rng.randint(20, 80)))
    if kind == "junk":
        return rng.choice([
            " ".join("".join(rng.choice("#$%&*+=<>~^|0123456789") for _ in range(6)) for _ in range(300)),
            "\n".join(["BUY NOW - limited offer - click here!"] * 60),
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40,
            "Cheap watches, call now.",
        ])
    if kind == "pii":
        return text + (f"\n\nContact: {rng.choice(['ann', 'bo', 'cy'])}.{rng.randint(1, 999)}@mail.example.com, "
                       f"+1 (555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}, host 10.{rng.randint(0, 255)}.0.7")
    return text


KINDS = [("plain", 0.55), ("html", 0.12), ("mojibake", 0.05), ("exact", 0.06), ("near", 0.06), ("foreign", 0.06),
         ("junk", 0.05), ("pii", 0.05)]


def generate(folder: Path, mb: float, seed: int = 0) -> None:
    """Write ``mb`` megabytes of messy JSONL records into ``folder`` (skipped if already there)."""
    marker = folder.with_name(folder.name + ".done.json")  # beside the corpus, not in it
    if marker.is_file() and json.loads(marker.read_text())["mb"] == mb:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng, paras = random.Random(seed), _paragraphs()
    kinds, weights = zip(*KINDS, strict=True)
    total, n, part, out = 0, 0, 0, None
    previous: list[str] = []
    t0 = time.time()
    while total < mb * 1_000_000:
        if out is None or out.tell() > 20_000_000:
            if out:
                out.close()
            out = open(folder / f"part-{part:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            part += 1
        kind = rng.choices(kinds, weights)[0]
        text = _messy(rng, paras, kind, previous)
        if kind == "plain" and len(previous) < 2000:
            previous.append(text)
        out.write(json.dumps({"id": f"g{n}", "text": text, "meta": {"kind": kind}}, ensure_ascii=False) + "\n")
        total += len(text.encode("utf-8"))
        n += 1
    out.close()
    marker.write_text(json.dumps({"mb": mb, "documents": n}))
    print(f"generated {n:,} documents, {total / 1e6:.1f} MB in {time.time() - t0:.0f}s -> {folder}")


def config(args: argparse.Namespace):
    """The run's config: every web-grade filter on; the settings of parallelism the side's lmforge has."""
    from lmforge.config import RunConfig
    from lmforge.config.sections import DataConfig

    parallel = {"data": {"workers": args.workers, "tasks": args.tasks}}
    if "tasks" not in DataConfig.model_fields:  # before the datatrove tasks: a process pool over shards
        parallel = {"clean": {"workers": args.workers}}
    cfg = {"name": f"bench{args.mb:g}", "runs_dir": str(Path(args.dir) / f"runs-{args.side}"),
           "collect": {"sources": [str(Path(args.dir) / f"corpus{args.mb:g}")], "shard_mb": args.shard_mb},
           "clean": {"rejects_max_chars": 500, "quality": {"gopher_repetition": True, "c4": True, "fineweb": True}}}
    for section, values in parallel.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    from lmforge.config.cleaning import NormalizeConfig

    if args.html_metadata and "html_metadata" in NormalizeConfig.model_fields:  # always on before it was a switch
        cfg["clean"]["normalize"] = {"html_metadata": True}
    return RunConfig.model_validate(cfg)


def clean_only(args: argparse.Namespace) -> dict:
    from lmforge.pipeline import run

    return run(config(args), until="clean", force=("clean",))


def kept_digest(clean_dir: Path) -> tuple[int, str]:
    """(documents kept, sha256 of their ids and bytes in shard order): equal digests, equal documents."""
    digest, n = hashlib.sha256(), 0
    for path in sorted((clean_dir / "docs").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                digest.update(doc["id"].encode() + b"\0" + doc["text"].encode("utf-8", "surrogatepass") + b"\0")
                n += 1
    return n, digest.hexdigest()[:16]


def measure_side(args: argparse.Namespace) -> dict:
    """In the side's own process: collect (not timed), then the clean stage, timed in wall and CPU seconds."""
    from lmforge.pipeline import run

    cfg = config(args)
    run(cfg, until="collect")
    self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    out = run(cfg, until="clean", force=("clean",))["clean"]
    wall = time.perf_counter() - t0
    self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((self0, self1), (kids0, kids1)) for f in ("ru_utime", "ru_stime"))
    card = json.loads(Path(out["data_card"]).read_text())["clean"]
    kept, digest = kept_digest(Path(out["data_card"]).parent)
    return {"mb": out["bytes"]["in"] / 1e6, "docs_in": out["documents"]["in"], "kept": kept, "digest": digest,
            "wall": wall, "cpu": cpu, "rss_main": self1.ru_maxrss / 1024, "rss_worker": kids1.ru_maxrss / 1024,
            "steps": card["seconds"], "dropped": card["dropped"], "stages": out.get("stage_seconds"),
            "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}


def step_times(args: argparse.Namespace) -> dict:
    """Stage a in this process, one task: CPU seconds of each cleaning step, of the word hashes, shingles and
    MinHash signatures, of loading the language model, and in all. Needs a checkout with the datatrove stages."""
    import functools

    time.perf_counter = time.process_time  # older checkouts time their steps with perf_counter: CPU time here
    from lmforge.data import curate
    from lmforge.data import tasks as t
    from lmforge.data.clean import identify_language
    from lmforge.data.shards import shard_paths
    from lmforge.pipeline import run

    extra = {"language model": 0.0, "word hashes": 0.0, "shingles": 0.0, "signatures": 0.0}

    def timed(key: str, f):
        @functools.wraps(f)
        def call(*a, **k):
            t0 = time.process_time()
            try:
                return f(*a, **k)
            finally:
                extra[key] += time.process_time() - t0
        return call

    t.word_hashes = timed("word hashes", t.word_hashes)  # the name stage a calls
    t.Signatures.get_shingles = timed("shingles", t.Signatures.get_shingles)
    t.Signatures.get_signature = timed("signatures", t.Signatures.get_signature)
    timed("language model", identify_language)("")
    cfg = config(args)
    run(cfg, until="collect")
    shards, out = shard_paths(cfg.run_dir / "collect" / "shards"), cfg.run_dir / "steps"
    shutil.rmtree(out, ignore_errors=True)
    read, clean, signatures = curate._stages(cfg, shards, np.zeros(0, np.uint64), out)[0][1]
    t0 = time.process_time()
    signatures.run(clean.run(read.run(None, 0, 1), 0, 1), 0, 1)
    total = time.process_time() - t0 + extra["language model"]
    steps = json.loads((out / "work" / "ledger" / "a" / "00000.json").read_text())["seconds"]
    rest = total - sum(steps.values()) - sum(extra.values())
    ledger = json.loads((out / "work" / "ledger" / "a" / "00000.json").read_text())
    return {"total": total, **steps, **extra, "reading, JSON, exact keys, writing": rest,
            "mb": ledger["bytes"]["in"] / 1e6}


def run_side(args: argparse.Namespace, side: str, src: str | None) -> dict:
    """One measured run in a fresh process (its own imports, its own peak RSS)."""
    env = {**os.environ, "LMFORGE_BENCH_SRC": src or ""}
    argv = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--measure"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {side} side failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if args.steps:
        return result
    r = result
    print(f"{side:<7} clean {r['mb']:.1f} MB: wall {r['wall']:.1f} s = {r['mb'] / r['wall']:.2f} MB/s | CPU "
          f"{r['cpu']:.1f} s = {r['mb'] / r['cpu']:.2f} MB per CPU-s | RSS main {r['rss_main']:.0f}, worker "
          f"{r['rss_worker']:.0f} MB | kept {r['kept']:,} of {r['docs_in']:,} ({r['digest']}) | load {r['load']}",
          flush=True)
    return result


def report_steps(runs: dict[str, list[dict]]) -> None:
    """A table of the mean CPU seconds per step, one column per side."""
    names = list(dict.fromkeys(k for results in runs.values() for k in results[0] if k != "mb"))
    print(f"{'CPU seconds':<36}" + "".join(f"{side:>10}" for side in runs))
    for name in names:
        means = [sum(r.get(name, 0.0) for r in results) / len(results) for results in runs.values()]
        print(f"{name:<36}" + "".join(f"{m:>10.2f}" for m in means))
    mb = next(iter(runs.values()))[0]["mb"]
    print(f"{'MB per CPU-second':<36}" + "".join(
        f"{mb * len(rs) / sum(r['total'] for r in rs):>10.2f}" for rs in runs.values()))


def report(runs: dict[str, list[dict]]) -> None:
    """The steps' CPU seconds (the median run of each side) and the ratios of the medians."""
    def median(side: str, key: str) -> float:
        values = sorted(r["mb"] / r[key] for r in runs[side])
        return values[len(values) // 2]

    for side, results in runs.items():
        r = results[len(results) // 2]
        print(f"{side}: seconds per step {json.dumps(r['steps'])}; stages {json.dumps(r['stages'])}")
        print(f"{side}: dropped {json.dumps(r['dropped'])}")
    if "before" in runs and "now" in runs:
        print(f"now / before: {median('now', 'cpu') / median('before', 'cpu'):.2f}x MB per CPU-second, "
              f"{median('now', 'wall') / median('before', 'wall'):.2f}x MB/s wall")


def resume_check(args: argparse.Namespace) -> None:
    cfg = config(args)
    markers = cfg.run_dir / "clean" / "work" / "logs" / "a" / "completions"  # datatrove's finished tasks
    child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--child"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None and len(list(markers.glob("*"))) < args.kill_after:
        time.sleep(0.2)
    if child.poll() is not None:
        print("resume: the child finished before it could be killed; use a larger --mb or a smaller --kill-after")
        return
    os.killpg(child.pid, signal.SIGKILL)  # the child and its workers, as a crash or `kill -9` would
    child.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in markers.glob("*")}
    total = cfg.data.tasks
    from lmforge.pipeline import run

    t0 = time.time()
    out = run(cfg, until="clean")["clean"]
    print(f"resume: killed after {len(done_before)} of {total} tasks were cleaned; the rerun cleaned "
          f"{total - out['resumed_tasks']} ({out['resumed_tasks']} kept from before) in {time.time() - t0:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=5.0, help="corpus size in MB of text (200 for the full benchmark)")
    ap.add_argument("--dir", default="/tmp/lmforge-bench", help="where the corpus and the runs go")
    ap.add_argument("--workers", type=int, default=2, help="processes at once (data.workers; clean.workers before)")
    ap.add_argument("--tasks", type=int, default=8, help="data.tasks: datatrove tasks the corpus is split into")
    ap.add_argument("--shard-mb", type=float, default=8.0, help="collect.shard_mb: size of a collected shard")
    ap.add_argument("--before", help="a checkout of the lmforge to compare with (e.g. git archive b8cae13)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating which goes first")
    ap.add_argument("--resume-check", action="store_true", help="kill a clean run midway and resume it")
    ap.add_argument("--kill-after", type=int, default=3, help="resume check: kill once this many tasks are done")
    ap.add_argument("--steps", action="store_true", help="CPU seconds per step of stage a, one process, one task")
    ap.add_argument("--html-metadata", action="store_true",
                    help="clean.normalize.html_metadata=true: pages' metadata searched too, as before it was a switch")
    ap.add_argument("--side", default="now", help=argparse.SUPPRESS)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        clean_only(args)
        return
    if args.measure:
        print(json.dumps(step_times(args) if args.steps else measure_side(args)))
        return
    generate(Path(args.dir) / f"corpus{args.mb:g}", args.mb)
    sides = [("before", str(Path(args.before).resolve()))] if args.before else []
    sides.append(("now", None))
    runs: dict[str, list[dict]] = {side: [] for side, _ in sides}
    for r in range(args.repeats):
        for side, src in sides if r % 2 == 0 else sides[::-1]:
            runs[side].append(run_side(args, side, src))
    if args.steps:
        report_steps(runs)
        return
    report(runs)
    if args.resume_check:
        resume_check(args)


if __name__ == "__main__":
    main()
