"""Early stopping and outside pruning decisions; a run that stops early and reports its tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.train.early_stop import EarlyStopper
from lmforge.train.metrics import read_metrics
from tests.conftest import TINY
from tests.in_process import call_cli


def feed(stopper: EarlyStopper, losses: list[float]) -> int | None:
    """The 1-based index of the estimate after which the stopper says stop (None = never)."""
    for i, loss in enumerate(losses, 1):
        if stopper.update(i * 10, {"loss": loss}):
            return i
    return None


def test_patience_counts_estimates_without_improvement():
    assert feed(EarlyStopper(patience=2), [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 1.0]) == 6
    stopper = EarlyStopper(patience=2)
    feed(stopper, [3.0, 2.5, 2.6, 2.4, 2.45, 2.5])
    assert (stopper.reason, stopper.summary()) == ("early_stop", {"best_val_loss": 2.4, "best_step": 40})
    assert feed(EarlyStopper(patience=0), [1.0, 2.0, 3.0, 4.0]) is None  # 0 = off


def test_min_delta_demands_a_real_improvement():
    # Each estimate improves by 0.05: progress without min_delta, a plateau with min_delta 0.1.
    losses = [3.0, 2.95, 2.9, 2.85, 2.8]
    assert feed(EarlyStopper(patience=2, min_delta=0.0), losses) is None
    assert feed(EarlyStopper(patience=2, min_delta=0.1), losses) == 3


def test_state_round_trip_resumes_the_count():
    first = EarlyStopper(patience=3)
    feed(first, [2.0, 2.1, 2.2])  # two estimates without improvement so far
    resumed = EarlyStopper(patience=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as stored in a checkpoint
    assert resumed.update(40, {"loss": 2.05}) is True and resumed.reason == "early_stop"
    fresh = EarlyStopper(patience=3)
    fresh.load_state_dict({})
    assert fresh.summary() == {"best_val_loss": None, "best_step": 0}


def test_on_eval_can_prune_and_sees_every_estimate():
    seen = []

    def judge(step: int, metrics: dict) -> bool:
        seen.append((step, metrics["loss"]))
        return metrics["loss"] > 5

    stopper = EarlyStopper(on_eval=judge)
    assert feed(stopper, [4.0, 4.5, 6.0, 3.0]) == 3
    assert stopper.reason == "pruned" and seen == [(10, 4.0), (20, 4.5), (30, 6.0)]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopper(patience=-1)


def test_run_stops_early_and_reports_tasks(tmp_path: Path, small_corpus: Path, capsys):
    # min_delta 10 nats: no estimate can improve on the first, so patience 1 stops at the second (step 20 of 30).
    code = call_cli("run", "--config", str(TINY), "--runs_dir", str(tmp_path), f"--data.train={small_corpus}",
                    "--train.threads=1", "--train.early_stop_patience=1", "--train.early_stop_min_delta=10",
                    "--eval.tasks=[speaker,minimal_pairs,cloze]", "--train.tasks_every=10")
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "tiny"
    train = json.loads((run / "train" / "manifest.json").read_text())["outputs"]
    assert (train["steps"], train["stopped_by"], train["complete"], train["best_step"]) == (20, "early_stop", True, 10)
    assert sorted(p.name for p in (run / "train" / "ckpt").iterdir() if p.name.startswith("step_"))[-1] == "step_000020"

    rows = read_metrics(run / "train" / "metrics.jsonl")
    probes = [row for row in rows if row["kind"] == "tasks"]
    assert [row["step"] for row in probes] == [10, 20]
    assert 0.0 <= probes[-1]["speaker.acc"] <= 1.0 and "cloze.exact_match" in probes[-1]

    tasks = json.loads((run / "eval" / "manifest.json").read_text())["outputs"]["tasks"]
    assert [(t["task"], t["kind"], t["items"]) for t in tasks] == [
        ("speaker", "multiple_choice", 100), ("minimal_pairs", "multiple_choice", 100), ("cloze", "generate", 60)]
    assert tasks[0]["chance"] == 0.25 and 0 <= tasks[0]["acc_norm"] <= 1 and 0 <= tasks[2]["f1"] <= 1
    assert len((run / "eval" / "tasks" / "speaker.jsonl").read_text().splitlines()) == 100
    card = (run / "report" / "card.md").read_text()
    assert "| task | kind | items | acc | acc_norm | acc_bytes | chance | exact_match | f1 |" in card
    assert "| speaker | multiple_choice | 100 |" in card and "| 25% |" in card
