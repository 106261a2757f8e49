"""Progress across datatrove tasks: each task's counts reach the launching process, whose line adds them up."""

from __future__ import annotations

import io
import json
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from lmforge.config import DataConfig
from lmforge.data.executor import run_tasks
from lmforge.data.progress import Meter, read_counts
from lmforge.data.sources import Document

TEXTS = ["één", "two words", "three small words"]  # 6, 9 and 17 bytes in UTF-8


class Docs(PipelineStep):
    """Three documents per task."""

    name = "docs"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for i, text in enumerate(TEXTS):
            yield Document(id=f"{rank}-{i}", text=text, source="test")


class Sink(PipelineStep):
    """Writes the ids it receives, so the test sees the documents went through the counting step."""

    name = "sink"

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def run(self, data, rank: int = 0, world_size: int = 1):
        ids = [doc.id for doc in data]
        Path(self.out, f"{rank}.json").write_text(json.dumps(ids))
        return
        yield


def test_a_four_task_run_shows_documents_bytes_and_tasks(tmp_path: Path, capsys) -> None:
    per_task = sum(len(t.encode()) for t in TEXTS)
    done = run_tasks(
        DataConfig(tasks=4, workers=2),
        "a",
        [Docs(), Sink(str(tmp_path))],
        4,
        tmp_path / "logs",
        total=(12, 4 * per_task),
    )
    assert done == 0
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)] == [
        [f"{r}-{i}" for i in range(3)] for r in range(4)
    ]
    progress = sorted((tmp_path / "logs" / "a" / "progress").glob("*.json"))
    assert [json.loads(p.read_text()) for p in progress] == [{"docs": 3, "bytes": per_task}] * 4
    assert read_counts(tmp_path / "logs" / "a") == (12, 4 * per_task, 4)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[clean] stage a: 100%") and f"{4 * per_task}/{4 * per_task}" in last
    assert "12/12 docs, 4/4 tasks" in last


def test_the_line_has_throughput_and_eta_and_logs_at_most_every_interval() -> None:
    out = io.StringIO()
    meter = Meter("[clean] stage a", total_bytes=4_000_000, total_docs=40, tasks=8, every=3600, file=out)
    meter.start -= 2.0  # two seconds in
    meter.shown -= 3600  # due: the next update prints
    meter.update(10, 1_000_000, 2)
    meter.update(20, 2_000_000, 4)  # within the interval: not printed
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "25%" in lines[0] and "1.00M/4.00M" in lines[0] and "<00:06" in lines[0]  # 0.5 MB/s, 3 MB left
    assert "500kB/s" in lines[0] and "10/40 docs, 2/8 tasks" in lines[0]
    meter.close()
    assert "2.00M/4.00M" in out.getvalue().splitlines()[-1] and len(out.getvalue().splitlines()) == 2


def test_the_clean_stage_shows_each_stage_across_its_tasks(tmp_path: Path, capsys) -> None:
    from lmforge.config import RunConfig
    from lmforge.data import collect, curate
    from lmforge.data.sources import embedded_corpus

    corpus = tmp_path / "c.jsonl"
    works = list(embedded_corpus())[:6]
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text[:3000]}) + "\n" for d in works))
    cfg = RunConfig.model_validate(
        {"name": "p", "runs_dir": str(tmp_path), "data": {"train": [str(corpus)], "tasks": 3, "workers": 2}}
    )
    collected = collect.main(cfg, tmp_path / "collect")
    result = curate.main(cfg, tmp_path / "collect", tmp_path / "clean", collected, "fp")
    lines = {line.split(":")[0]: line for line in capsys.readouterr().err.splitlines() if line.startswith("[clean]")}
    size = collected["bytes"]
    assert f"{size / 1000:.1f}k/{size / 1000:.1f}k" in lines["[clean] stage a"]
    assert "6/6 docs, 3/3 tasks" in lines["[clean] stage a"]
    assert "| 25/25 [" in lines["[clean] stage b"]  # no documents read: the 25 MinHash band tasks are counted
    kept = result["documents"]["kept"]
    assert f"{kept}/{kept} docs, 3/3 tasks" in lines["[clean] stage d"]
