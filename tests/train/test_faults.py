"""Fault injection: real kill -9, disk errors, NaN losses; every run must end where an unbroken one ends.

One reference run trains the tiny model for STEPS steps; the others break on purpose and must resume
to bitwise the same weights (promised on the same machine and thread count: docs/reliability.md). Processes are real wherever a kill is involved: children of a
multiprocessing fork server that has imported torch and lmforge once, so a restart costs milliseconds,
not an interpreter start-up; each runs the CLI's ``main`` and dies by a real SIGKILL. The rare failures
happen on cue from outside the production code: a public function is patched in the test's process or
the child's (``os.replace`` for a save that dies or fails at the rename, the model's ``forward`` for a
NaN loss), or a real child is killed at a moment observed from outside. All runs use one torch thread:
two threads on two shared cores are many times slower.

    .venv/bin/pytest -q tests/train/test_faults.py
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.models.transformer import Transformer
from lmforge.train.checkpoint import Checkpointer, read_state, verify
from tests.conftest import ROOT, TINY
from tests.in_process import call_cli

STEPS, EVERY = 60, 3
KILLS = 20


def _args(runs: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{corpus}]", f"--name={name}",
            f"--train.steps={STEPS}", f"--train.ckpt_every={EVERY}", "--train.log_every=1", "--train.eval_every=0",
            "--train.threads=1", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus: Path) -> Path:
    """A folder holding ``ref``: the data stages and an uninterrupted training run of STEPS steps."""
    folder = tmp_path_factory.mktemp("faults")
    assert call_cli(*_args(folder, small_corpus, "ref")) == 0
    return folder


def _clone(runs: Path, name: str) -> Path:
    """A new run sharing the reference's prepared data (its stages are skipped), without its training."""
    src = runs / "ref"
    shutil.copytree(src, runs / name, ignore=lambda d, names: ["train"] if Path(d) == src else [])
    return runs / name


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "train" / "ckpt" / f"step_{STEPS:06d}" / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _ckpts(run: Path) -> list[str]:
    """Checkpoint folder names; asserts every one verifies and no half-written folder is left."""
    folder = run / "train" / "ckpt"
    found = Checkpointer(folder).list()
    for p in found:
        verify(p)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    return [p.name for p in found]


def _fail_rename(step: int, fail) -> None:
    """Patch ``os.replace`` so that renaming checkpoint ``step`` into place calls ``fail(tmp)`` instead: the
    worst moment, its files all written and fsynced, its folder not yet under its final name."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name == f".tmp-step_{step:06d}":
            fail(Path(src))
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def _disk_error(code: int):
    def fail(folder: Path) -> None:  # what a full disk (ENOSPC) or a read-only folder (EROFS) raises
        raise OSError(code, os.strerror(code), str(folder))

    return fail


def _kill(folder: Path) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: what a power cut or OOM killer does


def _nan_losses(monkeypatch, attempts: set[int]) -> None:
    """The loss of these update attempts (1-based, skipped ones included) becomes NaN, through the graph,
    so the gradients are NaN too."""
    real, seen = Transformer.forward, [0]

    def forward(self, idx, targets=None):
        logits, loss = real(self, idx, targets)
        if self.training and targets is not None:
            seen[0] += 1
            if seen[0] in attempts:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", forward)


def _cli_child(args: list[str], log: str, kill_at: int | None) -> None:
    """``lmforge ARGS`` in a fresh child process, its output appended to ``log``; SIGKILLed while saving
    checkpoint ``kill_at`` if given."""
    if kill_at is not None:
        _fail_rename(kill_at, _kill)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # a file, not a pipe: a killed child never blocks
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the child
    from lmforge.cli import main

    main(args)


_CTX = multiprocessing.get_context("forkserver")
# What a run imports on its way (torch._dynamo comes with the optimizer), imported once for all children.
_CTX.set_forkserver_preload(["torch", "torch._dynamo", "lmforge.cli", "lmforge.pipeline", "lmforge.train.loop",
                             "lmforge.data.curate", "lmforge.data.clean", "lmforge.data.data_card"])


def _spawn(args: list[str], log: Path, kill_at: int | None = None) -> multiprocessing.Process:
    proc = _CTX.Process(target=_cli_child, args=(args, str(log), kill_at))
    proc.start()
    return proc


def _run(args: list[str], log: Path, kill_at: int | None = None) -> int:
    proc = _spawn(args, log, kill_at)
    proc.join(300)
    return proc.exitcode


def _wait_for(ready, proc: multiprocessing.Process, timeout: float = 120) -> None:
    """Poll until ``ready()`` or the process ends."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.is_alive():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _inode(path: Path) -> int | None:
    return path.stat().st_ino if path.exists() else None


# ------------------------------------------------------------------ kill -9
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(runs: Path, small_corpus: Path):
    reference, rng = _final(runs / "ref"), random.Random(8)
    kills, chains = 0, 0
    while kills < KILLS:
        name = f"chain{chains}"
        run = _clone(runs, name)
        log, metrics = runs / f"{name}.log", run / "train" / "metrics.jsonl"
        if chains == 0:  # the first life dies inside a checkpoint write: files written, not yet renamed
            assert _run(_args(runs, small_corpus, name), log, kill_at=2 * EVERY) == -signal.SIGKILL, log.read_text()
            left = sorted(p.name for p in (run / "train" / "ckpt").iterdir())
            assert len(left) == 2 and left[0].startswith(f".tmp-step_{2 * EVERY:06d}")  # half-written, ignored
            assert Checkpointer(run / "train" / "ckpt").latest_valid().name == f"step_{EVERY:06d}"
        chains += 1
        while True:
            before = _inode(metrics)
            proc = _spawn(_args(runs, small_corpus, name), log)
            if kills < KILLS:
                # The logger rewrites metrics.jsonl just before the loop starts: then a random moment.
                _wait_for(lambda before=before, metrics=metrics: _inode(metrics) != before, proc)
                proc.join(rng.uniform(0.0, 0.4))
                proc.kill()  # SIGKILL; a child that has already ended keeps its exit code
            proc.join(300)
            if proc.exitcode == 0:
                break
            assert proc.exitcode == -signal.SIGKILL, log.read_text()
            kills += 1
            for p in Checkpointer(run / "train" / "ckpt").list():  # a valid name always means a whole checkpoint
                verify(p)
        assert _same(_final(run), reference), f"{name} differs from the uninterrupted run"
        _ckpts(run)
    assert kills == KILLS


# ------------------------------------------------------------------ damaged checkpoints
def _damage(weights: Path, how: str) -> bytes:
    """Truncate or bit-flip a weights file; returns its damaged bytes."""
    data = bytearray(weights.read_bytes())
    if how == "truncate":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_is_rejected_and_the_previous_one_resumed(runs, small_corpus, damage):
    run = _clone(runs, f"damaged-{damage}")
    assert call_cli(*_args(runs, small_corpus, run.name, f"--train.stop_at={2 * EVERY}")) == 0
    ckpt = run / "train" / "ckpt"
    damaged = _damage(ckpt / f"step_{2 * EVERY:06d}" / "model.safetensors", damage)
    assert call_cli(*_args(runs, small_corpus, run.name)) == 0
    assert _same(_final(run), _final(runs / "ref"))
    # Saving that step again did not delete the damaged copy: it is kept aside, as it was.
    assert (ckpt / f"step_{2 * EVERY:06d}.damaged" / "model.safetensors").read_bytes() == damaged


def test_every_checkpoint_damaged_stops_the_run_and_deletes_nothing(runs, small_corpus, capsys):
    run = _clone(runs, "damaged-all")
    assert call_cli(*_args(runs, small_corpus, run.name, f"--train.stop_at={2 * EVERY}")) == 0
    ckpt = run / "train" / "ckpt"
    for i, step in enumerate((EVERY, 2 * EVERY)):
        _damage(ckpt / f"step_{step:06d}" / "model.safetensors", ("truncate", "flip")[i])
    before = {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert call_cli(*_args(runs, small_corpus, run.name)) == 1  # not a silent restart from step 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]  # the CLI's one-line error, naming both and the way to start over
    assert error.startswith("error: ") and f"step_{EVERY:06d}" in error and f"step_{2 * EVERY:06d}" in error
    assert "--train.resume=false" in error
    assert {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()} == before
    # Starting over on purpose: the flag the error names.
    assert call_cli(*_args(runs, small_corpus, run.name, "--train.resume=false")) == 0
    assert _same(_final(run), _final(runs / "ref"))


# ------------------------------------------------------------------ disk trouble
@pytest.mark.parametrize(("kind", "code"), [("enospc", 28), ("erofs", 30)])
def test_disk_error_while_saving_stops_and_keeps_the_last_checkpoint(runs, small_corpus, monkeypatch, capsys,
                                                                     kind, code):
    run = _clone(runs, f"disk-{kind}")
    monkeypatch.setattr(os, "replace", os.replace)  # undone after the test
    _fail_rename(2 * EVERY, _disk_error(code))
    assert call_cli(*_args(runs, small_corpus, run.name)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(run / "train" / "ckpt") in error and f"[Errno {code}]" in error
    assert _ckpts(run) == [f"step_{EVERY:06d}"]  # the previous one intact, no debris of the failed one
    assert not (run / "train" / "manifest.json").exists()

    monkeypatch.undo()  # space freed: the same command resumes and ends as if nothing happened
    assert call_cli(*_args(runs, small_corpus, run.name)) == 0
    assert _same(_final(run), _final(runs / "ref"))


def test_on_save_error_continue_trains_on_without_that_checkpoint(runs, small_corpus, monkeypatch):
    run = _clone(runs, "disk-continue")
    monkeypatch.setattr(os, "replace", os.replace)  # undone after the test
    _fail_rename(2 * EVERY, _disk_error(28))
    _fail_rename(STEPS - EVERY, _disk_error(30))
    assert call_cli(*_args(runs, small_corpus, run.name, "--train.on_save_error=continue")) == 0
    failed = [(r["step"], r["errno"]) for r in _metrics(run) if r["kind"] == "save_error"]
    assert failed == [(2 * EVERY, 28), (STEPS - EVERY, 30)]  # each one recorded, none silent
    assert _ckpts(run) == [f"step_{STEPS - 2 * EVERY:06d}", f"step_{STEPS:06d}"]
    assert _same(_final(run), _final(runs / "ref"))


def test_the_last_checkpoint_must_be_written_even_with_continue(runs, small_corpus, monkeypatch):
    run = _clone(runs, "disk-last")
    monkeypatch.setattr(os, "replace", os.replace)  # undone after the test
    _fail_rename(STEPS, _disk_error(28))
    assert call_cli(*_args(runs, small_corpus, run.name, "--train.on_save_error=continue")) == 1
    assert _ckpts(run) == [f"step_{STEPS - 2 * EVERY:06d}", f"step_{STEPS - EVERY:06d}"]
    assert not (run / "train" / "manifest.json").exists()  # not marked done


def _namespaces_work() -> bool:
    """Whether this user may make a private mount namespace (``unshare -rm``), where no root is needed to mount."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm (user and mount namespaces) to mount")
@pytest.mark.parametrize(("kind", "code"), [("full", 28), ("read-only", 30)])
def test_real_full_disk_and_read_only_folder_keep_the_last_checkpoint(runs, small_corpus, kind, code):
    """No hook: a real tmpfs that fills up, a real read-only bind mount (chmod cannot stop root)."""
    run = _clone(runs, f"realfs-{kind}")
    assert call_cli(*_args(runs, small_corpus, run.name, f"--train.stop_at={EVERY}")) == 0
    ckpt, seen = run / "train" / "ckpt", run / "seen"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "lmforge", *_args(runs, small_corpus, run.name)])
    if kind == "full":  # room for the checkpoint already there and a half of the next one
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) * 3 // 2
        script = (f"cp -a {ckpt}/. {seen}.tmp && mount -t tmpfs -o size={size} tmpfs {ckpt} && cp -a {seen}.tmp/. "
                  f"{ckpt} && {{ {cmd}; rc=$?; cp -a {ckpt}/. {seen}; exit $rc; }}")
    else:
        script = f"mount --bind {ckpt} {ckpt} && mount -o remount,bind,ro {ckpt} && {{ {cmd}; rc=$?; cp -a {ckpt} {seen}; exit $rc; }}"
    seen.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: could not write checkpoint step {2 * EVERY} to {ckpt}: [Errno {code}]"), \
        done.stderr
    checkpoints = Checkpointer(seen if kind == "full" else ckpt)
    assert [p.name for p in checkpoints.list()] == [f"step_{EVERY:06d}"]
    verify(checkpoints.list()[0])
    assert not list(seen.glob(".tmp-*"))  # the failed save left nothing behind on the full disk

    if kind == "full":  # what the user finds once space is freed: the checkpoint the full disk kept
        shutil.rmtree(ckpt)
        shutil.copytree(seen, ckpt)
    assert call_cli(*_args(runs, small_corpus, run.name)) == 0
    assert _same(_final(run), _final(runs / "ref"))


# ------------------------------------------------------------------ bad numbers
def test_nan_step_is_skipped_leaving_weights_optimizer_and_schedule_untouched(runs, small_corpus, monkeypatch):
    run = _clone(runs, "nan-once")
    _nan_losses(monkeypatch, {4})  # the 4th update attempt: its loss and gradients are NaN
    assert call_cli(*_args(runs, small_corpus, run.name, "--train.stop_at=4")) == 0
    ckpt = run / "train" / "ckpt" / "step_000004"
    state = read_state(ckpt)
    assert state["step"] == 4 and state["guard"]["skipped"] == 1
    assert state["loader"]["cursor"] == 5 * 8  # five batches of 8 consumed for four updates
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {4}  # AdamW saw four updates, not five
    rows = _metrics(run)
    skips = [r for r in rows if r["kind"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 4 and math.isnan(skips[0]["loss"])
    assert skips[0]["reason"] == "nonfinite_loss" and skips[0]["loader"]["cursor"] == 3 * 8
    assert len(skips[0]["windows"]) == 8 and all(w[0] == "train_000.bin" for w in skips[0]["windows"])
    lr = {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}
    ref_lr = {r["step"]: r["lr"] for r in _metrics(runs / "ref") if r["kind"] == "train"}
    assert [lr[s] for s in (1, 2, 3, 4)] == [ref_lr[s] for s in (1, 2, 3, 4)]  # the schedule did not move


def test_k_bad_steps_in_a_row_stop_the_run_with_the_last_checkpoint_intact(runs, small_corpus, monkeypatch, capsys):
    run = _clone(runs, "nan-row")
    _nan_losses(monkeypatch, {5, 6, 7})
    assert call_cli(*_args(runs, small_corpus, run.name, "--train.max_bad_steps=3")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: training stopped at step 5") and "train.max_bad_steps=3" in error
    assert [r["step"] for r in _metrics(run) if r["kind"] == "skip"] == [5, 5, 5]
    assert _ckpts(run) == [f"step_{EVERY:06d}"]
    monkeypatch.undo()  # the last good checkpoint resumes to the reference's weights
    assert call_cli(*_args(runs, small_corpus, run.name)) == 0
    assert _same(_final(run), _final(runs / "ref"))


# ------------------------------------------------------------------ the data stages
def _digests(run: Path) -> dict[str, str]:
    """sha256 of every output file of the data stages (manifests and the data card hold timings)."""
    out = {}
    for stage in ("clean", "docs", "tokenizer", "pack"):
        for f in sorted((run / stage).rglob("*")):
            if f.is_file() and f.name not in ("manifest.json", "data_card.json", "lengths.png"):
                out[str(f.relative_to(run))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_pipeline_killed_while_cleaning_and_packing_resumes_to_identical_outputs(tmp_path, small_corpus):
    def args(name: str) -> list[str]:  # several small shards and tasks, so each stage is killed between two of them
        return ["pack", "--config", str(TINY), f"--runs_dir={tmp_path}", f"--data.train=[{small_corpus}]",
                f"--name={name}", "--collect.shard_mb=0.05", "--data.tasks=4", "--data.workers=1", "--data.shard_tokens=1024"]

    log = tmp_path / "log"
    assert _run(args("straight"), log) == 0, log.read_text()
    run = tmp_path / "killed"
    # The collected shards stamp documents with the time of collection: share them, then compare bytes.
    shutil.copytree(tmp_path / "straight" / "collect", run / "collect")
    # Killed once a first datatrove task of the stage has finished (4 tasks: the stage is not over yet).
    for stage, first_output in (("clean", "clean/work/logs/a/completions/*"),
                                ("pack", "pack/work/train/logs/encode/completions/*")):
        proc = _spawn(args("killed"), log)
        _wait_for(lambda first_output=first_output: any(run.glob(first_output)), proc)
        proc.kill()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, log.read_text()
        assert not (run / stage / "manifest.json").exists(), f"the kill came after the {stage} stage ended"
    assert _run(args("killed"), log) == 0, log.read_text()
    clean = json.loads((run / "clean" / "manifest.json").read_text())["outputs"]
    assert clean["resumed_tasks"] >= 1  # tasks cleaned before the kill were not cleaned again
    expected = _digests(tmp_path / "straight")
    assert len(expected) > 10 and _digests(run) == expected
