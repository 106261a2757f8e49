"""Benchmark: the collect -> clean -> dedup chain on a generated messy corpus.

Generates (once; cached in --dir) a corpus of --mb megabytes of JSONL records: English
prose, raw HTML pages with navigation and cookie banners, mojibake, exact copies,
near-copies with a few words changed, German / French / Spanish documents, junk
(symbol soup, repeated lines, lorem ipsum, spam) and personal data. Then it runs
the collect and clean stages of lmforge with every web-grade filter switched on and
prints the throughput (input MB per wall second of the clean stage), the peak memory
of the main process and of the workers, the time per step and the drop table.

With --resume-check it then starts the clean stage again in a child process, kills it
(SIGKILL, the whole process group) once --kill-after tasks are done, reruns it and
reports how many tasks the rerun had to clean. ::

    python benchmarks/data_pipeline.py --mb 5                     # a quick check (about a minute on 2 cores)
    python benchmarks/data_pipeline.py --mb 200 --workers 2 --resume-check     # the figure in docs/benchmarks.md

Expected output ends with lines like::

    clean: 5.2 MB in 9.8 s = 0.53 MB/s (2 workers) | peak RSS main 310 MB, workers 280 MB
    resume: killed after 3 of 8 tasks were cleaned; the rerun cleaned 5 (3 kept from before)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.config import RunConfig  # noqa: E402
from lmforge.data.sources import embedded_corpus  # noqa: E402

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


def config(args: argparse.Namespace) -> RunConfig:
    return RunConfig.model_validate({
        "name": f"bench{args.mb:g}", "runs_dir": str(Path(args.dir) / "runs"),
        "collect": {"sources": [str(Path(args.dir) / f"corpus{args.mb:g}")], "shard_mb": args.shard_mb},
        "data": {"workers": args.workers, "tasks": args.tasks}, "clean": {"rejects_max_chars": 500,
                  "quality": {"gopher_repetition": True, "c4": True, "fineweb": True}},
    })


def clean_only(args: argparse.Namespace) -> dict:
    from lmforge.pipeline import run

    return run(config(args), until="clean", force=("clean",))


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
    ap.add_argument("--dir", default="/tmp/lmforge-bench", help="where the corpus and the run go")
    ap.add_argument("--workers", type=int, default=2, help="data.workers: tasks running at once")
    ap.add_argument("--tasks", type=int, default=8, help="data.tasks: datatrove tasks the corpus is split into")
    ap.add_argument("--shard-mb", type=float, default=8.0, help="collect.shard_mb: size of a shard of work")
    ap.add_argument("--resume-check", action="store_true", help="kill a clean run midway and resume it")
    ap.add_argument("--kill-after", type=int, default=3, help="resume check: kill once this many tasks are done")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        clean_only(args)
        return
    generate(Path(args.dir) / f"corpus{args.mb:g}", args.mb)
    out = clean_only(args)
    col, cl, secs = out["collect"], out["clean"], out["_seconds"]
    rss_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    mb_in = cl["bytes"]["in"] / 1e6
    card = json.loads(Path(cl["data_card"]).read_text())
    print(f"\ncollect: {col['bytes'] / 1e6:.1f} MB, {col['documents']:,} documents, {col['shards']} shards in "
          f"{secs['collect']:.1f}s = {col['bytes'] / 1e6 / max(secs['collect'], 1e-9):.2f} MB/s")
    print("stages (wall s):", json.dumps(cl["stage_seconds"]))
    print("CPU seconds per step:", json.dumps(card["clean"]["seconds"]))
    print(f"kept {cl['documents']['kept']:,} of {cl['documents']['in']:,} documents "
          f"({cl['bytes']['kept'] / 1e6:.1f} of {mb_in:.1f} MB)")
    print(f"{'reason':<28}{'documents':>10}{'MB':>9}")
    for reason, n in cl["dropped"].items():
        print(f"{reason:<28}{n:>10,}{card['clean']['dropped_bytes'][reason] / 1e6:>9.2f}")
    print(f"clean: {mb_in:.1f} MB in {secs['clean']:.1f} s = {mb_in / secs['clean']:.2f} MB/s ({args.workers} "
          f"workers) | peak RSS main {rss_main:.0f} MB, workers {rss_workers:.0f} MB")
    if args.resume_check:
        resume_check(args)


if __name__ == "__main__":
    main()
