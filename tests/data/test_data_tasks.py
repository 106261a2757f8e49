"""The clean stage as datatrove tasks: the same documents whatever the task count, exact accounting, kill + rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import RunConfig
from lmforge.data import curate, tasks
from lmforge.data.shards import read_shard, shard_paths
from lmforge.data.sources import DataError, embedded_corpus
from lmforge.pipeline import run
from tests.conftest import kill_when

ROOT = Path(__file__).resolve().parents[2]
GERMAN = ("Der Fluss fließt an der alten Mühle vorbei und hinunter ins Tal, wo die Bauern seit jeher Weizen und "
          "Gerste anbauen. Im Frühling steigt das Wasser, und die Kinder des Dorfes gehen am Ufer entlang, um zu "
          "sehen, wie hoch es gekommen ist.")


def _messy(folder: Path) -> Path:
    """The embedded corpus, sampled (2,500 characters of each work), plus generated mess: exact copies (one in
    another case), near copies with a few words changed, German, junk, markup, PII and a text in the eval set.
    The copies sit far from their originals, so that with 8 tasks they land in other tasks."""
    works = list(embedded_corpus())
    rows = [{"id": d.id, "text": d.text[3000:5500]} for d in works]
    unused = max(works, key=lambda d: len(d.text)).text[20000:24000]  # text no other row holds
    originals = rows[:12]
    rows.append({"id": "german", "text": GERMAN})
    rows.append({"id": "junk", "text": "Buy cheap watches now! Click here."})
    rows.append({"id": "page", "text": "<html><body><nav>Home | Plays | Poems</nav><article><p>" + unused[:2000]
                 + "</p></article><footer>Privacy policy</footer></body></html>"})
    rows.append({"id": "pii", "text": unused[2000:] + "\nWrite to someone@example.org or call 555 123 4567."})
    for i, row in enumerate(originals):
        text = row["text"]
        if i % 3 == 0:
            rows.append({"id": f"copy-{row['id']}", "text": text.upper() if i % 2 else text})
        elif i % 3 == 1:
            words = text.split(" ")
            for k in (20, 90, 160):
                words[k] = "changed"
            rows.append({"id": f"near-{row['id']}", "text": " ".join(words)})
    rows.append({"id": "leaked", "text": rows[20]["text"][:1200] + " And a closing line of our own making here."})
    (folder / "eval.jsonl").write_text(json.dumps({"text": rows[20]["text"][200:1000]}) + "\n", encoding="utf-8")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> tuple[RunConfig, dict]:
    root = tmp_path_factory.mktemp("tasks")
    corpus = _messy(root)
    cfg = RunConfig.model_validate({"name": "t", "runs_dir": str(root / "runs"),
                                    "data": {"train": [str(corpus)]}, "collect": {"shard_mb": 0.02},
                                    "clean": {"dedup": {"decontaminate": [str(root / "eval.jsonl")]}}})
    return cfg, run(cfg, until="collect")


def _with(cfg: RunConfig, **data: object) -> RunConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})


def _clean(cfg: RunConfig, up: dict, out: Path) -> dict:
    return curate.main(cfg, cfg.run_dir / "collect", out, up["collect"], up["_fp"]["collect"])


def _kept(out: Path) -> list[tuple[str, bytes]]:
    return [(d.id, d.text.encode("utf-8")) for p in shard_paths(out / "docs") for d in read_shard(p)]


def _rejected(out: Path) -> dict[str, str]:
    found = {}
    for path in sorted((out / "rejects").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            found[row["id"]] = f"{row['reason']} {row['detail']}"
    return found


def _card(out: Path) -> dict:
    clean = json.loads((out / "data_card.json").read_text())["clean"]
    return {k: clean[k] for k in ("documents", "bytes", "dropped", "dropped_bytes", "steps", "languages")}


def test_eight_tasks_keep_exactly_what_one_task_keeps(collected, tmp_path: Path) -> None:
    cfg, up = collected
    assert up["collect"]["shards"] >= 3  # documents of one shard end up in several tasks and the other way round
    one = _clean(_with(cfg, tasks=1, workers=1), up, tmp_path / "one")
    eight = _clean(_with(cfg, tasks=8, workers=2), up, tmp_path / "eight")
    assert _kept(tmp_path / "one") == _kept(tmp_path / "eight")
    assert _card(tmp_path / "one") == _card(tmp_path / "eight")
    assert _rejected(tmp_path / "one") == _rejected(tmp_path / "eight")
    assert len(shard_paths(tmp_path / "eight" / "docs")) > 1  # one file per task that kept something
    # The mess was found, every kind of it, and the copies across tasks too.
    rejected = _rejected(tmp_path / "eight")
    copies = {k: v for k, v in rejected.items() if k.startswith(("copy-", "near-"))}
    assert len(copies) == 8 and all(v.endswith(f"copy of {k.split('-', 1)[1]}") for k, v in copies.items())
    assert {v.split()[0] for k, v in copies.items()} == {"exact_duplicate", "near_duplicate"}
    assert rejected["german"].startswith("wrong_language") and rejected["leaked"].startswith("contaminated")
    kept = dict(_kept(tmp_path / "eight"))
    assert b"example.org" not in kept["pii"] and b"<nav>" not in kept["page"]
    # Accounting: every document and byte, merged over the tasks.
    d, b = eight["documents"], eight["bytes"]
    assert d["in"] == up["collect"]["documents"] == d["kept"] + d["dropped"] == len(kept) + len(rejected)
    assert b["in"] == b["kept"] + b["dropped"] + b["edited"]
    assert b["kept"] == sum(len(t) for t in kept.values())
    assert one["stage_seconds"].keys() == {"a", "b", "c", "d"}


CHILD = """
import signal, sys
from pathlib import Path
from lmforge.config import RunConfig
from lmforge.data import curate, tasks

real = tasks.CleanTask.run
def run(self, data, rank=0, world_size=1):
    if rank == 3:  # half of task 3 is written, then the process waits to be killed
        for i, doc in enumerate(real(self, data, rank, world_size)):
            yield doc
            if i == 1:
                Path(sys.argv[3]).write_text("in task 3")
                signal.pause()
    else:
        yield from real(self, data, rank, world_size)
tasks.CleanTask.run = run
cfg = RunConfig.model_validate_json(Path(sys.argv[1]).read_text())
up = {"collect": {}, "_fp": {"collect": sys.argv[4]}}
curate.main(cfg, cfg.run_dir / "collect", Path(sys.argv[2]), up["collect"], up["_fp"]["collect"])
"""


def test_a_killed_run_redoes_only_its_unfinished_tasks(collected, tmp_path: Path, monkeypatch) -> None:
    cfg, up = collected
    cfg8 = _with(cfg, tasks=8, workers=1)  # one worker: tasks run in order, so 0-2 are done when 3 hangs
    out, marker = tmp_path / "out", tmp_path / "in_task_3"
    (tmp_path / "cfg.json").write_text(cfg8.model_dump_json())
    (tmp_path / "child.py").write_text(CHILD)
    kill_when(marker, str(tmp_path / "child.py"), str(tmp_path / "cfg.json"), str(out), str(marker),
              up["_fp"]["collect"])  # in the middle of task 3
    assert sorted(p.name for p in (out / "work" / "logs" / "a" / "completions").iterdir()) == ["00000", "00001",
                                                                                               "00002"]
    assert list((out / "work" / "a").glob(".*"))  # task 3's kept documents, half-written under a temporary name

    ran: list[int] = []
    real = tasks.CleanTask.run
    monkeypatch.setattr(tasks.CleanTask, "run", lambda self, data, rank=0, world_size=1:
                        ran.append(rank) or real(self, data, rank, world_size))
    again = _clean(cfg8, up, out)
    assert ran == [3, 4, 5, 6, 7] and again["resumed_tasks"] == 3
    reference = _clean(_with(cfg, tasks=1, workers=1), up, tmp_path / "reference")
    assert _kept(out) == _kept(tmp_path / "reference") and _card(out) == _card(tmp_path / "reference")
    assert again["documents"] == reference["documents"]
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries left behind


def test_minhash_settings_follow_threshold_and_permutations() -> None:
    from lmforge.config import CleanConfig

    mh = curate.minhash_config(CleanConfig())
    assert (mh.n_grams, mh.num_buckets, mh.hashes_per_bucket) == (3, 25, 5)  # datasketch's choice for (0.5, 128)
    strict = curate.minhash_config(CleanConfig.model_validate({"dedup": {"threshold": 0.8}}))
    assert strict.hashes_per_bucket > mh.hashes_per_bucket
    from datasketch.lsh import _optimal_param  # the LSH the in-memory finder uses picks the same bands

    for threshold in (0.3, 0.5, 0.7, 0.9):
        for num_perm in (64, 128, 256):
            assert curate.lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_a_shared_band_is_confirmed_on_the_whole_signature(tmp_path: Path) -> None:
    """Stage C on hand-made files: candidates from the band files, the decision from the full signatures."""
    import struct

    import numpy as np

    work, width = tmp_path / "work", 10
    base = np.arange(10, dtype=np.uint32)
    rows = [base, np.where(np.arange(10) < 4, base, 99),  # 1: 40% of doc 0 -> kept
            np.where(np.arange(10) < 6, base, 98),        # 2: 60% of doc 0 -> copy of 0
            np.where(np.arange(10) < 2, base, 99)]        # 3: 20% of doc 0, 80% of doc 1 -> copy of 1
    rows[3][2:4] = 7
    (work / "minhash" / "full").mkdir(parents=True)
    np.stack(rows).astype(np.uint32).tofile(work / "minhash" / "full" / "00000.u32")
    (work / "minhash" / "buckets").mkdir(parents=True)
    pairs = {"000_00.dups": [(0, 0, 0, 1), (0, 1, 0, 3)], "001_00.dups": [(0, 0, 0, 2)]}
    for name, chain in pairs.items():
        (work / "minhash" / "buckets" / name).write_bytes(b"".join(struct.pack("<4I", *p) for p in chain))
    (work / "ids").mkdir()
    (work / "ids" / "00000.json").write_text(json.dumps(["d0", "d1", "d2", "d3"]))
    list(tasks.PickCopies(str(work), 1, threshold=0.5, width=width).run(None))
    removed = json.loads((work / "remove" / "00000.json").read_text())
    assert removed == [[2, "near_duplicate", "d0"], [3, "near_duplicate", "d1"]]
    assert float(np.mean(rows[3] == rows[1])) == 0.8 and float(np.mean(rows[3] == rows[0])) == 0.2


def test_near_copies_agree_with_the_in_memory_finder(tmp_path: Path) -> None:
    """Edited copies at every similarity: the stages drop the copies the in-memory finder (which checks every
    candidate on its full signature) drops. Both estimate Jaccard similarity from 125 / 128 hashes with
    different hash functions, so pairs near the threshold may go either way on either side."""
    import random

    from lmforge.config import CleanConfig
    from lmforge.data.dedup import DuplicateFinder, fingerprint

    rng = random.Random(3)
    words = " ".join(d.text for d in embedded_corpus()).split()
    rows, similar = [], []
    for i, start in enumerate(rng.sample(range(0, len(words) - 300, 300), 60)):  # 60 passages, none overlapping
        original = words[start: start + 300]
        rows.append({"id": f"o{i}", "text": " ".join(original)})
        edited = list(original)
        share = rng.choice([0.02, 0.05, 0.1, 0.2, 0.3, 0.5])  # words replaced
        for j in rng.sample(range(len(edited)), int(share * len(edited))):
            edited[j] = rng.choice(words)
        rows.append({"id": f"e{i}", "text": " ".join(edited)})
        similar.append(share)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    clean = {"dedup": {"exact": False}, "language": {"enabled": False}, "quality": {"gopher_quality": False},
             "lines": {"navigation": False, "boilerplate": False, "lorem_ipsum": False}}
    cfg = RunConfig.model_validate({"name": "t", "runs_dir": str(tmp_path / "runs"), "data": {"train": [str(corpus)],
                                    "tasks": 3, "workers": 1}, "clean": clean})
    out = run(cfg, until="clean")["clean"]
    stages = {d["id"] for p in (Path(out["data_card"]).parent / "rejects").glob("*.dedup.jsonl")
              for d in map(json.loads, p.read_text().splitlines())}
    finder = DuplicateFinder(CleanConfig.model_validate(clean).dedup)
    reference = {r["id"] for r in rows if finder.check(r["id"], b"", fingerprint(r["text"], finder.cfg).signature)}
    # Jaccard similarity of the 3-word shingles: 0.75 at 5% of the words replaced, 0.57 at 10%, 0.34 at 20%
    assert {f"e{i}" for i, s in enumerate(similar) if s <= 0.05} <= stages
    assert not {f"e{i}" for i, s in enumerate(similar) if s >= 0.2} & stages  # a band shared: 11% at 0.34
    # Near the threshold (10% replaced) each side's decision is a coin toss: the pair becomes a candidate
    # with probability 1 - (1 - 0.57^5)^25 = 0.79, and 125 hashes estimate 0.57 within about 0.045.
    assert {d for d in stages ^ reference if similar[int(d[1:])] != 0.1} == set()
    assert len(stages) >= 15
    assert out["documents"]["kept"] + len(stages) == len(rows)  # nothing else dropped


def test_task_ranges_cover_the_corpus_in_order() -> None:
    for total, n in ((0, 3), (5, 8), (100, 7)):
        ranges = [tasks.task_range(total, r, n) for r in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_slurm_without_a_partition_is_a_clear_error(collected, tmp_path: Path) -> None:
    cfg, up = collected
    with pytest.raises(DataError, match=r"data\.slurm\.partition"):
        _clean(_with(cfg, executor="slurm"), up, tmp_path / "out")


def test_bad_input_is_one_line_and_a_non_zero_exit(collected, tmp_path: Path, capsys) -> None:
    from lmforge.cli import main as cli_main

    cfg, _ = collected
    # A run folder of its own: the collect stage (now datatrove tasks on Slurm too) is what stops here.
    common = ["clean", f"--runs_dir={tmp_path / 'runs'}", "--name=t", f"--data.train=[{cfg.data.train[0]}]"]
    for args, expected in (([*common, "--data.executor=slurm"], "data.slurm.partition"),
                           (["clean", f"--runs_dir={tmp_path}", f"--data.train=[{tmp_path / 'nowhere.txt'}]"],
                            "nowhere.txt")):
        with pytest.raises(SystemExit) as stop:
            cli_main(args)
        assert stop.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        # One error line (a missing source is warned about first, then the stage stops with a line of its own).
        assert len([e for e in err if e.startswith("error")]) == 1 and expected in err[-1]
        assert not any("Traceback" in e for e in err)
    assert not (tmp_path / "runs" / "t" / "clean" / "manifest.json").exists()


def test_a_failing_task_names_the_damage_and_marks_nothing_done(collected, tmp_path: Path) -> None:
    import shutil

    cfg, up = collected
    damaged = _with(cfg.model_copy(update={"runs_dir": str(tmp_path)}), tasks=4, workers=2)
    shutil.copytree(cfg.run_dir / "collect", damaged.run_dir / "collect")
    shard = shard_paths(damaged.run_dir / "collect" / "shards")[-1]
    shard.write_text(shard.read_text(encoding="utf-8") + "{damaged\n", encoding="utf-8")
    out = damaged.run_dir / "clean"
    with pytest.raises(DataError, match=rf"{shard.name}:\d+: .*damaged shard"):
        curate.main(damaged, damaged.run_dir / "collect", out, up["collect"], up["_fp"]["collect"])
    assert not (out / "data_card.json").exists() and not list((out / "docs").glob("*.jsonl"))
    assert "00003" not in {p.name for p in (out / "work" / "logs" / "a" / "completions").glob("*")}


def test_packing_in_tasks_writes_the_shards_one_process_writes(collected, tmp_path: Path) -> None:
    from lmforge.data import pack

    cfg, _ = collected
    small = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shard_tokens": 4096})})
    run(small, until="pack")
    up = small.run_dir
    many = pack.main(_with(small, tasks=5, workers=2), up / "docs", up / "tokenizer", tmp_path / "pack", 4096)
    one = pack.main(small, up / "docs", up / "tokenizer", tmp_path / "one", 4096)
    assert many == one and one["train"]["shards"] > 3  # shards close at the same document boundaries
    for split in ("train", "val"):
        names = [p.name for p in pack.list_shards(tmp_path / "one", split)]
        assert names == [p.name for p in pack.list_shards(tmp_path / "pack", split)]
        for name in names:
            assert (tmp_path / "pack" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
            index = pack.index_path(Path(name)).name
            assert (tmp_path / "pack" / index).read_bytes() == (tmp_path / "one" / index).read_bytes()
    assert not (tmp_path / "pack" / "work").exists()
    # The loader reads the tasks' shards, all of them, as it reads one process's.
    import numpy as np
    import torch

    from lmforge.data.loader import TokenLoader

    loaders = [TokenLoader(tmp_path / d, "train", batch_size=8, context=64, seed=3) for d in ("pack", "one")]
    batches = [[loader.next_batch() for _ in range(40)] for loader in loaders]
    for (x, y), (x1, y1) in zip(*batches, strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)
    every = np.concatenate([pack.read_shard(p) for p in pack.list_shards(tmp_path / "pack", "train")])
    assert len(every) == one["train"]["tokens"]
    assert set(np.unique(torch.cat([x for x, _ in batches[0]]).numpy())) <= set(np.unique(every))
