"""Metrics sinks (JSONL, TensorBoard, progress), resume truncation, tokens/s, MFU and peak FLOP/s."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from lmforge.train import metrics
from lmforge.train.metrics import MetricsLogger, Throughput, gpu_peak_flops, mfu, peak_flops, read_metrics


def _logger(tmp_path, **kw) -> MetricsLogger:
    return MetricsLogger(tmp_path, total_steps=20, **{"tensorboard": False, "progress": False, **kw})


def test_log_writes_json_lines(tmp_path):
    t0 = time.time()
    with _logger(tmp_path) as log:
        log.log(1, "train", {"loss": 2.5, "lr": torch.tensor(0.01), "tokens": np.int64(512)})
        log.log(1, "val", {"loss": 2.75})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["kind"], r["loss"]) for r in rows] == [(1, "train", 2.5), (1, "val", 2.75)]
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[0]["tokens"] == 512
    assert all(t0 <= r["time"] <= time.time() for r in rows)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_resume_drops_points_past_the_checkpoint(tmp_path):
    with _logger(tmp_path) as log:
        for step in range(1, 11):
            log.log(step, "train", {"loss": 10.0 - step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "kind": "tr')  # the run died mid-line
    with _logger(tmp_path, start_step=5) as log:
        log.log(6, "train", {"loss": 0.5})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] == 0.5


def test_fresh_run_starts_a_fresh_file_and_disabled_writes_nothing(tmp_path):
    with _logger(tmp_path) as log:
        log.log(3, "train", {"loss": 1.0})
    with _logger(tmp_path, start_step=0) as log:
        log.log(1, "train", {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    quiet = MetricsLogger(tmp_path / "rank1", total_steps=5, enabled=False)
    quiet.log(1, "train", {"loss": 1.0})
    quiet.advance(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "rank1").exists()


def test_reserved_names_and_bad_lines(tmp_path):
    with _logger(tmp_path) as log, pytest.raises(ValueError, match="reserved"):
        log.log(1, "train", {"step": 3.0})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_progress_bar_follows_steps(tmp_path):
    log = _logger(tmp_path, progress=True, start_step=4)
    assert (log.bar.n, log.bar.total) == (4, 20)
    log.advance(7, {"loss": 1.23456, "tok/s": "1,000"})
    assert log.bar.n == 7
    assert log.bar.postfix == "loss=1.235, tok/s=1,000"
    log.advance(8, {"loss": None, "val": None})  # nothing measured yet: a dash, not nan
    assert log.bar.postfix == "loss=-, val=-"
    log.close()
    assert log.bar is None


def test_tensorboard_mirror(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _logger(tmp_path, tensorboard=True) as log:
        log.log(1, "train", {"loss": 3.0, "note": "text is not a scalar"})
        log.log(2, "train", {"loss": 2.0})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(metrics, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        log = _logger(tmp_path, tensorboard=True)
    log.log(1, "train", {"loss": 1.0})
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0]
    assert not (tmp_path / "tb").exists()


def test_throughput_skips_first_step_and_windows():
    meter = Throughput(window=2)
    assert meter.tokens_per_s() == 0.0
    meter.update(100, 10.0)  # warm-up step
    assert meter.tokens_per_s() == 10.0  # the only figure so far
    meter.update(100, 1.0)
    meter.update(100, 0.5)
    assert meter.tokens_per_s() == pytest.approx(200 / 1.5)
    meter.update(300, 0.5)  # the 1.0 s step leaves the window
    assert meter.tokens_per_s() == pytest.approx(400 / 1.0)


def test_mfu():
    assert mfu(1000.0, 6e6, 6e9) == pytest.approx(1.0)
    assert Throughput().mfu(500.0, 6e6, 6e9) == pytest.approx(0.5)
    assert mfu(1000.0, 6e6, 0.0) == 0.0


def test_gpu_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12
    assert gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert gpu_peak_flops("Imaginary GPU 9000") is None


def test_cuda_peak_comes_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == 756e12


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "_MEMO", {})
    measured = peak_flops("cpu", measure_seconds=0.05)
    assert 1e8 < measured < 1e14
    table = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = table
    assert key.startswith("cpu|") and key.endswith(f"|{torch.get_num_threads()} threads")
    assert table[key] == measured
    # A later process reads the cached figure instead of measuring again.
    table[key] = 1234.0
    (tmp_path / "peak_flops.json").write_text(json.dumps(table))
    monkeypatch.setattr(metrics, "_MEMO", {})
    assert peak_flops(torch.device("cpu")) == 1234.0
