"""End to end: `lmforge run` on the tiny preset, rerun skipping, exact resume across processes."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main as cli_main
from lmforge.train.metrics import read_metrics
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_corpus) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    t0 = time.time()
    cli_main(["run", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{small_corpus}]"])
    assert time.time() - t0 < 60
    return runs / "tiny"


def test_run_writes_every_artifact(tiny_run: Path):
    summary = json.loads((tiny_run / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "val_bpb", "val_acc", "tokens_seen", "train_seconds", "total_seconds"):
        assert key in summary and math.isfinite(summary[key]), key
    assert summary["tokens_seen"] == 30 * 8 * 32
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-6)
    # Better than a uniform guess over the vocabulary, in bits per byte.
    pack = json.loads((tiny_run / "pack" / "manifest.json").read_text())["outputs"]
    bytes_per_token = pack["val"]["bytes"] / pack["val"]["tokens"]
    uniform_bpb = math.log2(320) / bytes_per_token
    assert summary["val_bpb"] < uniform_bpb
    for stage in ("collect", "clean", "docs", "tokenizer", "pack", "train", "eval", "sample", "report"):
        assert (tiny_run / stage / "manifest.json").is_file(), stage
    assert (tiny_run / "report" / "card.html").stat().st_size > 1000
    assert "cleaning.kept documents" in (tiny_run / "report" / "card.md").read_text()
    assert (tiny_run / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sonnets" in json.loads((tiny_run / "docs" / "manifest.json").read_text())["outputs"]["val_ids"]
    samples = json.loads((tiny_run / "sample" / "samples.json").read_text())
    assert samples[0]["prompt"] == "ROMEO:" and samples[0]["tokens"] > 0
    assert "train:" in (tiny_run / "config.yaml").read_text()


def test_rerun_skips_finished_stages(tiny_run: Path, small_corpus: Path, capsys):
    before = {s: json.loads((tiny_run / s / "manifest.json").read_text())["finished_at"]
              for s in ("collect", "clean", "docs", "tokenizer", "pack", "train", "eval", "sample")}
    cli_main(["run", "--config", str(TINY), f"--runs_dir={tiny_run.parent}", f"--data.train=[{small_corpus}]"])
    after = {s: json.loads((tiny_run / s / "manifest.json").read_text())["finished_at"] for s in before}
    assert before == after
    assert capsys.readouterr().out.count("up to date, skipped") == 10  # the 8 above, finetune and dpo (disabled)


def test_exact_resume_in_a_new_process(tmp_path: Path, small_corpus: Path):
    """N steps, stop, a new process, N more == 2N straight: same losses, bitwise the same weights.

    Bitwise: lmforge promises exact resume on the same machine and thread count (docs/reliability.md).
    """
    common = ["train", "--config", str(TINY), f"--runs_dir={tmp_path}", f"--data.train=[{small_corpus}]",
              "--train.steps=20", "--train.log_every=1", "--train.ckpt_every=0", "--model.dropout=0.1"]
    straight = run_cli(*common, "--name=straight")
    assert straight.returncode == 0, straight.stderr
    first = run_cli(*common, "--name=resumed", "--train.stop_at=10")
    assert first.returncode == 0, first.stderr
    second = run_cli(*common, "--name=resumed")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout

    def losses(name: str) -> dict[int, float]:
        rows = read_metrics(tmp_path / name / "train" / "metrics.jsonl")
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    assert losses("straight") == losses("resumed")
    assert sorted(losses("resumed")) == list(range(1, 21))
    a = load_file(tmp_path / "straight" / "train" / "ckpt" / "step_000020" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "train" / "ckpt" / "step_000020" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoint_falls_back_to_previous(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    ckpts = sorted((run / "train" / "ckpt").glob("step_*"))
    assert len(ckpts) >= 2
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    result = run_cli("eval", str(run), f"--eval.text={run / 'docs' / 'val.jsonl'}", "--eval.max_tokens=500")
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr
    assert json.loads(result.stdout)["step"] == int(ckpts[-2].name.split("_")[1])
