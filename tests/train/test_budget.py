"""``train.steps: auto``: the schedule sized to ``train.max_seconds`` from the measured step time.

Step times are made by the test, not measured: the loop's clock (``lmforge.train.loop.time``) is
replaced by a fake one that only the model's training forward advances (``Transformer.forward`` patched
from here), so each step "takes" exactly what the test says and the schedule the loop chooses is
known in advance. Runs use one torch thread.

    .venv/bin/pytest -q tests/train/test_budget.py
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ConfigError, TrainConfig, load_config
from lmforge.models.transformer import Transformer
from lmforge.train import budget, loop
from lmforge.train.budget import StepBudget
from lmforge.train.checkpoint import Checkpointer
from tests.conftest import ROOT, TINY
from tests.in_process import call_cli
from tests.train import test_faults

BUDGET, LR, MIN_RATIO, STEP = 10.0, 3e-3, 0.1, 0.0625


class FakeClock:
    """``perf_counter`` for the loop; a training forward advances it by ``cost(n)`` seconds (n: 1-based call)."""

    def __init__(self, cost) -> None:
        self.now, self.calls, self.cost = 0.0, 0, cost

    def perf_counter(self) -> float:
        return self.now


def _install(monkeypatch, clock: FakeClock) -> None:
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, time=time.time))
    real = Transformer.forward

    def forward(self, idx, targets=None):
        if self.training:
            clock.calls += 1
            clock.now += clock.cost(clock.calls)
        return real(self, idx, targets)

    monkeypatch.setattr(Transformer, "forward", forward)


def _args(runs: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{corpus}]", f"--name={name}",
            "--train.steps=auto", f"--train.max_seconds={BUDGET}", "--train.schedule=wsd", f"--train.lr={LR}",
            f"--train.min_lr_ratio={MIN_RATIO}", "--train.ckpt_every=0", "--train.log_every=1",
            "--train.eval_every=0", "--train.threads=1", *extra]


def _manifest(run: Path) -> dict:
    return json.loads((run / "train" / "manifest.json").read_text())["outputs"]


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


# ------------------------------------------------------------------ the measurement alone
def test_the_length_is_fixed_from_the_steps_after_the_skipped_ones():
    b = StepBudget(TrainConfig(steps="auto", max_seconds=100.0, warmup_steps=5))
    spent = 0.0
    times = [9.0, 1.0, 1.0] + [0.5] * 10  # a slow first step (compile), then 0.5 s steps
    for step, dt in enumerate(times, 1):
        spent += dt
        b.measure(step, spent, dt)
    assert budget.SKIP_STEPS == 3 and b.seconds_per_step == pytest.approx(0.5)  # the first 3 left out
    assert b.steps == 13 + int((100.0 * (1 - budget.MARGIN) - spent) / 0.5)
    again = StepBudget(TrainConfig(steps="auto", max_seconds=100.0))
    again.load_state_dict(b.state_dict())
    assert again.steps == b.steps and again.done(b.steps) and not again.done(b.steps - 1)


def test_a_whole_number_of_steps_is_kept_and_saves_nothing_new():
    b = StepBudget(TrainConfig(steps=120, max_seconds=1.0))
    b.measure(1, 5.0, 5.0)  # past the budget: nothing is measured for a fixed length
    b.load_state_dict({"steps": 7})
    assert b.steps == 120 and not b.auto


def test_whole_number_steps_keep_the_fingerprints_of_runs_on_disk():
    """The speedrun recipe as it was (steps: 1050): the values lmforge computed before steps could be auto."""
    from lmforge import artifacts

    cfg = load_config(ROOT / "configs" / "speedrun-cpu.yaml", ["train.steps=1050"])
    assert artifacts.fingerprint(cfg, "train") == "15e4f17c792f0356"
    assert artifacts.fingerprint(cfg, "train", resume=True) == "72a78ecde289d49c"
    auto = load_config(ROOT / "configs" / "speedrun-cpu.yaml")
    assert auto.train.steps == "auto" and artifacts.fingerprint(auto, "train") != "15e4f17c792f0356"
    assert artifacts.fingerprint(auto, "train", resume=True) == "72a78ecde289d49c"  # how long: resumable


# ------------------------------------------------------------------ through the loop
def test_calibrated_schedule_ends_inside_the_budget_with_its_decay_complete(tmp_path, small_corpus, monkeypatch):
    # A 2 s first step (as torch.compile costs), then 1/16 s steps (exact in binary: no rounding at the window's edge).
    _install(monkeypatch, FakeClock(lambda n: 2.0 if n == 1 else STEP))
    assert call_cli("run", *_args(tmp_path, small_corpus, "auto")[1:]) == 0  # the whole way: summary and card
    out = _manifest(tmp_path / "auto")
    total = out["budget"]["calibrated_steps"]
    assert out["stopped_by"] == "steps" and out["steps"] == total
    at = budget.SKIP_STEPS + 8  # 8 steps measured = 0.5 s = 5% of the budget
    assert total == at + int((BUDGET * (1 - budget.MARGIN) - (2.0 + (at - 1) * STEP)) / STEP)
    assert out["budget"]["seconds_per_step"] == STEP
    assert out["train_seconds"] == pytest.approx(2.0 + (total - 1) * STEP, abs=0.005)  # rounded to 0.01 s
    assert 2.0 + (total - 1) * STEP <= BUDGET * (1 - budget.MARGIN)
    assert out["budget"]["used_fraction"] == round((2.0 + (total - 1) * STEP) / BUDGET, 4)
    rows = _train_rows(tmp_path / "auto")
    assert rows[-1]["step"] == total and rows[-1]["lr"] == pytest.approx(LR * MIN_RATIO)  # the decay completed
    assert rows[-2]["lr"] > rows[-1]["lr"]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["budget"] == out["budget"] and summary["budget"]["max_seconds"] == BUDGET
    card = (tmp_path / "auto" / "report" / "card.md").read_text()
    assert "Time budget" in card and f"{total:,}" in card and f"{out['budget']['used_fraction']:.1%}" in card


def test_a_resumed_run_keeps_its_length_and_ends_with_the_same_weights(tmp_path, small_corpus, monkeypatch):
    """Interrupted at train.stop_at, resumed in a new invocation. Bitwise equality is promised on the same machine
    and thread count (one thread here), as for every resume."""
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "ref")) == 0
    shutil.copytree(tmp_path / "ref", tmp_path / "cut", ignore=shutil.ignore_patterns("train"))
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "cut", "--train.stop_at=40")) == 0
    # The second process's steps are 2% slower: measuring again would choose another length.
    _install(monkeypatch, FakeClock(lambda n: STEP * 1.02))
    assert call_cli(*_args(tmp_path, small_corpus, "cut")) == 0
    ref, cut = _manifest(tmp_path / "ref"), _manifest(tmp_path / "cut")
    assert cut["budget"]["calibrated_steps"] == ref["budget"]["calibrated_steps"] == ref["steps"] == cut["steps"]
    final = f"step_{ref['steps']:06d}/model.safetensors"
    a, b = (load_file(tmp_path / r / "train" / "ckpt" / final) for r in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _killed_child(args: list[str], log: str, kill_at: int) -> None:
    """In a fresh child: the fake clock, then ``lmforge ARGS``, SIGKILLed while it seals checkpoint ``kill_at``."""
    _install(pytest.MonkeyPatch(), FakeClock(lambda n: STEP))
    test_faults._cli_child(args, log, kill_at)


def test_a_run_killed_mid_way_resumes_to_the_same_weights(tmp_path, small_corpus, monkeypatch):
    """A real SIGKILL (test_faults' fork server) while checkpoint 40 is sealed: the run resumes from 30, keeps
    the length chosen before the kill and ends bitwise where the unbroken run ends (same machine, one thread)."""
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "ref")) == 0
    shutil.copytree(tmp_path / "ref", tmp_path / "killed", ignore=shutil.ignore_patterns("train"))
    args = _args(tmp_path, small_corpus, "killed", "--train.ckpt_every=10")
    proc = test_faults._CTX.Process(target=_killed_child, args=(args, str(tmp_path / "killed.log"), 40))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert Checkpointer(tmp_path / "killed" / "train" / "ckpt").latest_valid().name == "step_000030"
    _install(monkeypatch, FakeClock(lambda n: STEP * 1.02))  # measuring again would choose another length
    assert call_cli(*args) == 0
    ref, killed = _manifest(tmp_path / "ref"), _manifest(tmp_path / "killed")
    assert killed["budget"]["calibrated_steps"] == ref["budget"]["calibrated_steps"] == killed["steps"]
    final = f"step_{ref['steps']:06d}/model.safetensors"
    a, b = (load_file(tmp_path / r / "train" / "ckpt" / final) for r in ("ref", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ bad input
def test_steps_auto_without_a_budget_is_a_one_line_error(tmp_path, small_corpus, capsys):
    args = [a for a in _args(tmp_path, small_corpus, "nobudget") if "max_seconds" not in a]
    assert call_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.steps" in err and "train.max_seconds" in err and "Traceback" not in err
    assert not (tmp_path / "nobudget").exists()
    with pytest.raises(ConfigError, match="train.steps must be a whole number"):
        load_config(None, ["train.steps=0"])


def test_a_budget_too_small_to_train_is_a_one_line_error(tmp_path, small_corpus, monkeypatch, capsys):
    _install(monkeypatch, FakeClock(lambda n: 0.5))  # 2 s buy 4 steps; warmup alone is 5
    assert call_cli(*_args(tmp_path, small_corpus, "small", "--train.max_seconds=2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.max_seconds (2 s) buys about") and "\n" not in err
    assert "train.warmup_steps (5)" in err
    assert not (tmp_path / "small" / "train" / "manifest.json").exists()
    assert not (tmp_path / "small" / "train" / "ckpt").exists() or not any((tmp_path / "small" / "train" / "ckpt").iterdir())
