"""The data path's bad input, through the command line: one error line naming the cause, a non-zero
exit, and no stage marked done. A failing SQL query, and a Slurm cluster that is absent or refuses the
job (an ``sbatch`` of our own on PATH plays the cluster; the real single-node cluster is in
test_data_slurm.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from lmforge.cli import main as cli_main

TEXT = "The miller counted the sacks of grain by the river, and the river ran on past the mill. " * 20


def _fails(args: list[str], capsys) -> str:
    """Run the command line, expect a non-zero exit; return its one error line."""
    with pytest.raises(SystemExit) as stop:
        cli_main(args)
    assert stop.value.code not in (0, None)
    err = capsys.readouterr().err.splitlines()
    errors = [e for e in err if e.startswith("error")]
    assert len(errors) == 1 and not any("Traceback" in e for e in err)
    return errors[0]


def _recipe(tmp_path: Path, sources: str, strict: bool = False) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: b\nruns_dir: {tmp_path / 'runs'}\ncollect:\n  strict: {str(strict).lower()}\n  sources:\n{sources}",
        encoding="utf-8",
    )
    return path


def test_a_failing_query_stops_collect_in_one_line(tmp_path: Path, capsys) -> None:
    db = tmp_path / "notes.db"
    sqlite3.connect(db).close()
    source = f"    - sql: sqlite:///{db}\n      query: SELECT body AS text FROM missing\n"
    strict = _fails(["collect", "--config", str(_recipe(tmp_path, source, strict=True))], capsys)
    assert "notes.db: query failed" in strict and "no such table: missing" in strict
    lenient = _fails(["collect", "--config", str(_recipe(tmp_path, source))], capsys)
    assert "no documents collected from sql sqlite:///" in lenient and "source_failed" in lenient
    assert not (tmp_path / "runs" / "b" / "collect" / "manifest.json").exists()


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"{i} {TEXT}"}) + "\n" for i in range(4)), encoding="utf-8"
    )
    return path


def _slurm_args(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "clean",
        f"--runs_dir={tmp_path / 'runs'}",
        "--name=s",
        f"--data.train=[{corpus}]",
        "--data.executor=slurm",
        *extra,
    ]


def test_no_sbatch_on_path_is_one_line(tmp_path: Path, corpus: Path, capsys, monkeypatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    line = _fails(_slurm_args(tmp_path, corpus, "--data.slurm.partition=cpu"), capsys)
    assert "sbatch is not on PATH" in line
    assert not (tmp_path / "runs" / "s" / "clean" / "manifest.json").exists()


def test_a_cluster_that_refuses_the_job_is_one_line(tmp_path: Path, corpus: Path, capsys, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    line = _fails(_slurm_args(tmp_path, corpus, "--data.slurm.partition=nope"), capsys)
    # collect, the first stage of `lmforge clean`, runs its tasks on Slurm too, and is refused first
    assert "Slurm refused the collect stage's job read (sbatch exit 1" in line and "partition 'nope'" in line
    collect = tmp_path / "runs" / "s" / "collect"
    assert not (collect / "manifest.json").exists() and not list((collect / "shards").glob("*.jsonl"))
    assert not list((collect / "work" / "logs" / "read").glob("completions/*"))  # no task marked done
    assert not (tmp_path / "runs" / "s" / "clean").exists()
