"""SIGTERM during training: a checkpoint at the step boundary, exit 0, and a resume equal to no interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, run_cli


def _args(runs: Path, corpus: Path, name: str) -> list[str]:
    return ["train", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{corpus}]", f"--name={name}",
            "--train.steps=300", "--train.log_every=1", "--train.ckpt_every=0", "--train.eval_every=0",
            "--train.threads=1"]  # one thread: two on two shared cores are many times slower


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path: Path, small_corpus: Path):
    straight = run_cli(*_args(tmp_path, small_corpus, "straight"))
    assert straight.returncode == 0, straight.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *_args(tmp_path, small_corpus, "stopped")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = tmp_path / "stopped" / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):  # training has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ckpts = sorted((tmp_path / "stopped" / "train" / "ckpt").glob("step_*"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("_")[1])
    assert 5 <= stopped_at < 300  # stopped early, at a step boundary, with a checkpoint
    assert not (tmp_path / "stopped" / "train" / "manifest.json").exists()  # not marked done

    resumed = run_cli(*_args(tmp_path, small_corpus, "stopped"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "train" / "ckpt" / "step_000300" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "train" / "ckpt" / "step_000300" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "stopped" / "train" / "manifest.json").read_text())
    assert state["outputs"]["steps"] == 300
