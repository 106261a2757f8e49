"""Sweeps: the search space is checked, bad trials are pruned, the study resumes, the best config runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_config
from lmforge.tune.space import baseline_values, load_space, with_values
from lmforge.tune.sweep import main as sweep_main
from tests.conftest import TINY
from tests.in_process import call_cli


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_space_is_parsed_and_checked_against_the_config(tmp_path: Path):
    base = load_config(TINY)
    params = load_space(space_file(tmp_path, """
train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
train.warmup_steps: {type: int, low: 0, high: 20, step: 5}
train.schedule: {type: categorical, choices: [cosine, wsd]}
model.n_layers: {type: int, low: 1, high: 3}
"""), base)
    assert [(p.key, p.type) for p in params] == [("train.lr", "float"), ("train.warmup_steps", "int"),
                                                 ("train.schedule", "categorical"), ("model.n_layers", "int")]
    # Tiny's own values (lr 3e-3, warmup 5, cosine, 2 layers) all lie inside: the baseline trial uses them.
    assert baseline_values(base, params) == {"train.lr": 3e-3, "train.warmup_steps": 5, "train.schedule": "cosine",
                                             "model.n_layers": 2}
    assert not params[1].contains(7) and params[1].contains(15) and not params[0].contains(0.5)
    cfg = with_values(base, {"train.lr": 1e-3, "model.n_layers": 3}, name="t1")
    assert (cfg.train.lr, cfg.model.n_layers, cfg.name, cfg.model.d_model) == (1e-3, 3, "t1", 32)


@pytest.mark.parametrize("text, needle", [
    ("train.lrr: {type: float, low: 0.001, high: 0.01}", "unknown config field 'train.lrr' in the search space "
                                                         "(did you mean 'train.lr'?)"),
    ("train.lr: {type: float, low: 0.01, high: 0.001}", "train.lr: 'low' (0.01) must be below 'high' (0.001)"),
    ("train.lr: {type: float, low: 0.0, high: 0.01, log: true}", "a log scale needs 'low' > 0"),
    ("train.lr: {type: float, low: 0.0, high: 0.01}", "train.lr: the value 0.0 is not accepted"),
    ("train.steps: {type: int, low: 1, high: 9.5}", "'high' must be an integer"),
    ("train.schedule: {type: categorical, choices: [cosine, zigzag]}", "the value 'zigzag' is not accepted"),
    ("train.lr: {type: uniform, low: 0.001, high: 0.01}", "'type' one of float, int, categorical"),
    ("train.lr: {type: float, lo: 0.001, high: 0.01}", "unknown option 'lo' for type float"),
    ("name: {type: categorical, choices: [a, b]}", "'name' is set by the sweep itself"),
])
def test_bad_search_spaces_name_the_field(tmp_path: Path, text: str, needle: str):
    with pytest.raises(ConfigError) as err:
        load_space(space_file(tmp_path, text), load_config(TINY))
    assert needle in str(err.value) and "space.yaml" in str(err.value)


def test_sweep_prunes_resumes_and_writes_a_runnable_best_config(tmp_path: Path, small_corpus: Path, capsys):
    # Every learning rate below tiny's own 3e-3 learns less in 10 steps than the baseline trial,
    # so the median rule prunes those trials at their first validation estimate.
    space = space_file(tmp_path, "train.lr: {type: float, low: 1.0e-7, high: 3.0e-3, log: true}\n")
    args = ["sweep", "--config", str(TINY), "--space", str(space), "--runs_dir", str(tmp_path), "--name", "sw",
            f"--data.train={small_corpus}", "--train.threads=1", "--train.steps=20", "--sweep.startup_trials=1",
            "--sweep.sampler=random"]
    assert call_cli(*args, "--sweep.trials=2") == 0, capsys.readouterr().err
    sweep = tmp_path / "sw"
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["trials"] == {"complete": 1, "pruned": 1}
    assert summary["best"]["trial"] == 0 and summary["baseline"]["params"] == {"train.lr": 0.003}
    assert sorted(p.name for p in (sweep / "trials").iterdir()) == ["trial_000", "trial_001"]

    # Same command with a larger budget: the study in sweep.db resumes; only the new trial runs.
    assert call_cli(*args, "--sweep.trials=3") == 0, capsys.readouterr().err
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["trials"] == {"complete": 1, "pruned": 2}
    rows = list(csv.DictReader((sweep / "results.csv").read_text().splitlines()))
    assert [(r["trial"], r["state"], r["steps"]) for r in rows] == [
        ("0", "complete (baseline)", "20"), ("1", "pruned", "10"), ("2", "pruned", "10")]
    assert float(rows[0]["value"]) == pytest.approx(summary["best"]["value"])
    for plot in ("history", "parallel", "slice", "intermediate"):
        assert (sweep / "plots" / f"{plot}.png").stat().st_size > 1000
    assert "| trial | state | val_bpb | steps | seconds | train.lr |" in (sweep / "results.md").read_text()

    best = load_config(sweep / "best.yaml")
    assert (best.name, best.train.lr, best.train.steps, best.sweep.space) == ("sw-best", 0.003, 20, None)
    assert call_cli("run", "--config", str(sweep / "best.yaml")) == 0, capsys.readouterr().err
    ran = json.loads((tmp_path / "sw-best" / "summary.json").read_text())
    assert ran["val_bpb"] == pytest.approx(summary["best"]["value"], rel=1e-6)  # same config, same result


def test_unknown_field_exits_2_before_any_work(tmp_path: Path, capsys):
    space = space_file(tmp_path, "model.width: {type: int, low: 32, high: 64}\n")
    assert call_cli("sweep", "--config", str(TINY), "--space", str(space), "--runs_dir", str(tmp_path)) == 2
    assert "unknown config field 'model.width'" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(ConfigError, match="needs a search space"):
        sweep_main(load_config(TINY), [])
