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
from lmforge.train.optim import lr_at
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


def test_a_slowdown_past_the_decay_start_starts_a_shorter_decay_at_once():
    """0.5 s steps, then 1 s ones from step 121: the estimate falls below the step the decay should have started
    at; the decay starts at the step reached, shorter than decay_fraction, rather than jumping into its middle."""
    tc = TrainConfig(steps="auto", max_seconds=100.0, warmup_steps=5, schedule="wsd", decay_fraction=0.3,
                     lr=1e-2, min_lr_ratio=0.1)
    b, spent, step = StepBudget(tc), 0.0, 0
    while not b.frozen:
        step += 1
        dt = 0.5 if step <= 120 else 1.0
        spent += dt
        b.measure(step, spent, dt)
        assert step < 200
    assert b.steps is not None and b.decay_start == step == 122
    assert b._wsd_start(b.steps) < step and b.steps - step < round(0.3 * b.steps)
    rates = [lr_at(i, tc, b.steps, b.decay_start) for i in range(b.steps)]
    assert rates[step - 1] == 1e-2 and rates[step] == pytest.approx(1e-2 - 9e-3 / (b.steps - step))
    assert rates[-1] == pytest.approx(1e-3) and all(x > y for x, y in zip(rates[step - 1 : -1], rates[step:], strict=True))
    again = StepBudget(tc)
    again.load_state_dict(json.loads(json.dumps(b.state_dict())))  # through JSON, as state.json holds it
    assert (again.steps, again.decay_start, again.frozen, again.window) == (b.steps, b.decay_start, True, b.window)
    again.measure(step + 1, spent + 50.0, 50.0)  # frozen: nothing moves it
    assert again.steps == b.steps


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


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in _train_rows(run)}


def _assert_one_decay(run: Path, total: int, start: int) -> None:
    """Every logged rate past warmup: LR up to the decay's start, then one straight line to LR x MIN_RATIO at the
    total."""
    warmup = load_config(TINY).train.warmup_steps
    for step, lr in _lrs(run).items():  # step: 1-based, the update made at index step - 1
        if step <= warmup:
            continue
        want = LR if step - 1 < start else LR + (LR * MIN_RATIO - LR) * (step - start) / (total - start)
        assert lr == pytest.approx(want, rel=1e-9), step


@pytest.mark.parametrize("cut, slower", [(40, 1.0), (130, 1.02)])
def test_a_resumed_run_keeps_its_schedule_and_ends_with_the_same_weights(tmp_path, small_corpus, monkeypatch,
                                                                          cut, slower):
    """Interrupted at train.stop_at, resumed in a new invocation. At step 40 the total is still an estimate (the
    window of step times is in the checkpoint) and the resumed process's steps take as long as before; at 130 the
    decay has started, the total is frozen, and 2% slower steps after the resume change nothing. Bitwise equality
    is promised on the same machine and thread count (one thread here), as for every resume."""
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "ref")) == 0
    shutil.copytree(tmp_path / "ref", tmp_path / "cut", ignore=shutil.ignore_patterns("train"))
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "cut", f"--train.stop_at={cut}")) == 0
    saved = json.loads((tmp_path / "cut" / "train" / "ckpt" / f"step_{cut:06d}" / "state.json").read_text())
    ref = _manifest(tmp_path / "ref")
    decay = ref["budget"]["decay_start"]
    assert saved["schedule"]["frozen"] == (cut > decay) and len(saved["schedule"]["window"]) >= budget.MIN_WINDOW_STEPS
    _install(monkeypatch, FakeClock(lambda n: STEP * slower))
    assert call_cli(*_args(tmp_path, small_corpus, "cut")) == 0
    got = _manifest(tmp_path / "cut")
    assert got["budget"]["calibrated_steps"] == ref["budget"]["calibrated_steps"] == ref["steps"] == got["steps"]
    assert got["budget"]["decay_start"] == decay
    final = f"step_{ref['steps']:06d}/model.safetensors"
    a, b = (load_file(tmp_path / r / "train" / "ckpt" / final) for r in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_on_a_slower_machine_resizes_its_stable_phase(tmp_path, small_corpus, monkeypatch):
    """Resumed at step 40 (before the decay) with steps 1.5x as long: the total is re-estimated for the budget
    left, and the schedule still ends inside it with its decay complete."""
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "ref")) == 0
    shutil.copytree(tmp_path / "ref", tmp_path / "cut", ignore=shutil.ignore_patterns("train"))
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "cut", "--train.stop_at=40")) == 0
    _install(monkeypatch, FakeClock(lambda n: STEP * 1.5))
    assert call_cli(*_args(tmp_path, small_corpus, "cut")) == 0
    ref, got = _manifest(tmp_path / "ref"), _manifest(tmp_path / "cut")
    assert got["stopped_by"] == "steps" and got["steps"] < ref["steps"]
    assert 0.9 * BUDGET <= got["train_seconds"] <= BUDGET * (1 - budget.MARGIN) + 1e-9
    _assert_one_decay(tmp_path / "cut", got["steps"], got["budget"]["decay_start"])


@pytest.mark.parametrize("first, then", [(2 * STEP, STEP), (STEP, 2 * STEP)])
def test_a_machine_that_changes_speed_mid_run_still_ends_inside_the_budget(tmp_path, small_corpus, monkeypatch,
                                                                            first, then):
    """Steps of ``first`` seconds for 40 steps, then of ``then``: the total follows the new speed through the
    stable phase (the first estimate alone would have used 73% of the budget when the machine sped up, and run
    out of time before its decay when it slowed down); the decay, once started, is one straight line."""
    _install(monkeypatch, FakeClock(lambda n: first if n <= 40 else then))
    assert call_cli(*_args(tmp_path, small_corpus, "drift")) == 0
    out = _manifest(tmp_path / "drift")
    total, start = out["steps"], out["budget"]["decay_start"]
    assert out["stopped_by"] == "steps" and out["budget"]["calibrated_steps"] == total
    seconds = 40 * first + (total - 40) * then  # what the fake clock charged
    assert out["train_seconds"] == round(seconds, 2)
    assert 0.95 * BUDGET <= seconds <= BUDGET * (1 - budget.MARGIN) + 1e-9
    assert out["budget"]["seconds_per_step"] == then and 40 < start < total
    _assert_one_decay(tmp_path / "drift", total, start)


def _killed_child(args: list[str], log: str, kill_at: int) -> None:
    """In a fresh child: the fake clock, then ``lmforge ARGS``, SIGKILLed while it seals checkpoint ``kill_at``."""
    _install(pytest.MonkeyPatch(), FakeClock(lambda n: STEP))
    test_faults._cli_child(args, log, kill_at)


def test_a_run_killed_mid_way_resumes_to_the_same_weights(tmp_path, small_corpus, monkeypatch):
    """A real SIGKILL (test_faults' fork server) while checkpoint 40 is sealed: the run resumes from 30, keeps
    the estimate saved before the kill (its window of step times) and ends bitwise where the unbroken run ends
    (same machine, one thread, steps as long as before)."""
    _install(monkeypatch, FakeClock(lambda n: STEP))
    assert call_cli(*_args(tmp_path, small_corpus, "ref")) == 0
    shutil.copytree(tmp_path / "ref", tmp_path / "killed", ignore=shutil.ignore_patterns("train"))
    args = _args(tmp_path, small_corpus, "killed", "--train.ckpt_every=10")
    proc = test_faults._CTX.Process(target=_killed_child, args=(args, str(tmp_path / "killed.log"), 40))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert Checkpointer(tmp_path / "killed" / "train" / "ckpt").latest_valid().name == "step_000030"
    _install(monkeypatch, FakeClock(lambda n: STEP))  # the resumed process's steps take as long as before
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
    # The data stages log their progress first; the error is the last line, and the only one.
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert sum(line.startswith("error:") or "Traceback" in line for line in lines) == 1
    assert err.startswith("error: train.max_seconds (2 s) buys about") and "\n" not in err
    assert "train.warmup_steps (5)" in err
    assert not (tmp_path / "small" / "train" / "manifest.json").exists()
    assert not (tmp_path / "small" / "train" / "ckpt").exists() or not any((tmp_path / "small" / "train" / "ckpt").iterdir())
