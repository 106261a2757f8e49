"""The collect stage as datatrove tasks: the same shards and counts whatever the task count, kill + rerun, strict."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.cli import main as cli_main
from lmforge.config import RunConfig
from lmforge.data import collect
from lmforge.data.shards import shard_paths
from lmforge.data.sources import DataError
from tests.conftest import kill_when

ROOT = Path(__file__).resolve().parents[2]


def _corpus(root: Path) -> dict:
    """A folder of 16 JSONL files (3 documents each; one with a bad line, one with a line without text), a
    truncated gzip file, a binary file, a hidden file; a limited JSONL source; a missing path."""
    folder = root / "folder"
    (folder / "deep").mkdir(parents=True)
    for i in range(16):
        rows = [json.dumps({"id": f"f{i}-{k}", "text": f"file {i} document {k} " * (20 + 7 * k)}) for k in range(3)]
        rows += ["{broken"] if i == 5 else [json.dumps({"body": "no text field"})] if i == 9 else []
        (folder / ("deep" if i % 4 == 0 else "") / f"part{i:02d}.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "never read whole"}\n' * 50)[:40])
    (folder / "blob.txt").write_bytes(b"\x00\x01binary")
    (folder / ".hidden.txt").write_text("hidden")
    limited = root / "limited.jsonl"
    limited.write_text("".join(json.dumps({"text": f"limited row {i} " * 30}) + "\n" for i in range(40)))
    return {"sources": [str(folder), {"path": str(limited), "max_documents": 11}, str(root / "missing")],
            "shard_mb": 0.004}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("collect")
    return root, _corpus(root)


def _cfg(corpus: tuple[Path, dict], name: str, strict: bool = False, **data: object) -> RunConfig:
    root, section = corpus
    return RunConfig.model_validate({"name": name, "runs_dir": str(root / "runs"),
                                     "collect": {**section, "strict": strict}, "data": data})


def _shards(out: Path) -> dict[str, bytes]:
    """The shards' bytes, each document's collected_at (the time of the run) left out."""
    found = {}
    for path in shard_paths(out / "shards"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            row["meta"].pop("collected_at")
        found[path.name] = json.dumps(rows).encode()
    return found


def _counts(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "collected_at"}


def test_eight_tasks_collect_exactly_what_one_task_collects(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    one = collect.main(_cfg(corpus, "one", tasks=1, workers=1), tmp_path / "one")
    eight = collect.main(_cfg(corpus, "eight", tasks=8, workers=2), tmp_path / "eight")
    assert _counts(one) == _counts(eight)
    assert _shards(tmp_path / "one") == _shards(tmp_path / "eight") and one["shards"] > 5
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "eight" / "rejects.jsonl").read_bytes()
    assert not (tmp_path / "eight" / "work").exists()
    # Every kind of mess was counted, per source, and the limit held across the folder's files and tasks.
    folder, limited, missing = eight["sources"]
    assert folder["documents"] == 48 and folder["limited"] is False
    assert folder["skipped"] == {"binary": 1, "hidden": 1, "malformed_line": 1, "no_text": 1, "unreadable": 1}
    assert limited["documents"] == 11 and limited["limited"] is True
    assert missing["skipped"] == {"source_failed": 1} and "data path not found" in missing["examples"]["source_failed"][0]
    assert eight["documents"] == 59 and eight["accounting"]["in"] == 59 + 6
    rejects = [json.loads(line) for line in (tmp_path / "eight" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["hidden", "binary", "unreadable", "malformed_line", "no_text",
                                              "source_failed"]
    # The documents come in the order one process reads them: the folder's files by path, then the limited source.
    ids = [json.loads(line)["id"] for p in shard_paths(tmp_path / "eight" / "shards") for line in p.open()]
    assert ids[:6] == ["f0-0", "f0-1", "f0-2", "f4-0", "f4-1", "f4-2"] and ids[-1] == "limited:11"


CHILD = """
import signal, sys
from pathlib import Path
from lmforge.config import RunConfig
from lmforge.data import collect

real = collect.CollectTask.run
def run(self, data, rank=0, world_size=1):
    for i, doc in enumerate(real(self, data, rank, world_size)):
        yield doc
        if rank == 3 and i == 1:  # two documents of task 3 are written, then the process waits to be killed
            Path(sys.argv[3]).write_text("in task 3")
            signal.pause()
collect.CollectTask.run = run
collect.main(RunConfig.model_validate_json(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
"""


def test_a_killed_collect_redoes_only_its_unfinished_tasks(corpus: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg(corpus, "killed", tasks=8, workers=1)  # one worker: tasks run in order, so 0-2 are done when 3 hangs
    out, marker = tmp_path / "out", tmp_path / "in_task_3"
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "child.py").write_text(CHILD)
    kill_when(marker, str(tmp_path / "child.py"), str(tmp_path / "cfg.json"), str(out), str(marker))  # in task 3
    work = out / "work"
    assert sorted(p.name for p in (work / "logs" / "read" / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert list((work / "docs").glob(".*")) and not (work / "docs" / "00003.jsonl").exists()  # half-written
    assert not (out / "shards").exists()

    ran: list[int] = []
    real = collect.CollectTask.run
    monkeypatch.setattr(collect.CollectTask, "run", lambda self, data, rank=0, world_size=1:
                        ran.append(rank) or real(self, data, rank, world_size))
    again = collect.main(cfg, out)
    assert ran == [3, 4, 5, 6, 7]
    reference = collect.main(_cfg(corpus, "reference", tasks=1), tmp_path / "reference")
    assert _shards(out) == _shards(tmp_path / "reference") and _counts(again) == _counts(reference)
    assert (out / "rejects.jsonl").read_bytes() == (tmp_path / "reference" / "rejects.jsonl").read_bytes()
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries left behind


def test_strict_stops_at_the_first_bad_input_in_reading_order(corpus: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    # An unreadable file named no error in a lenient run; here, the first one in reading order stops the run,
    # though the listing found the missing path (a later source) first and other tasks fail too.
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot read"):
        collect.main(_cfg(corpus, "strict", strict=True, tasks=8, workers=2), tmp_path / "strict")
    assert not shard_paths(tmp_path / "strict" / "shards")
    args = ["collect", f"--runs_dir={tmp_path}", "--name=cli", f"--collect.sources=[{corpus[0] / 'missing'}]",
            "--data.tasks=4", "--strict"]
    with pytest.raises(SystemExit) as stop:
        cli_main(args)
    assert stop.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "data path not found" in err[0] and str(corpus[0] / "missing") in err[0]
    assert not (tmp_path / "cli" / "collect" / "manifest.json").exists()
