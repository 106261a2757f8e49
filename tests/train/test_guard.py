"""The step guard alone: verdicts, the spike guard, the stop after K bad steps, resume state, batch names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.pack import ShardWriter
from lmforge.train.guard import SPIKE_WARMUP, BadStepsError, StepGuard
from lmforge.train.metrics import MetricsLogger


def _shards(folder: Path, sizes: list[int]) -> list[int]:
    """Shards whose tokens count 0, 1, 2, ... across all of them; returns each shard's first token."""
    folder.mkdir()
    writer = ShardWriter(folder, "train", vocab_size=100_000, shard_tokens=1)  # one document per shard
    firsts, start = [], 0
    for n in sizes:
        writer.add(list(range(start, start + n)))
        firsts.append(start)
        start += n
    writer.close()
    return firsts


@pytest.fixture
def setup(tmp_path: Path):
    firsts = _shards(tmp_path / "pack", [200, 131])
    loader = TokenLoader(tmp_path / "pack", "train", batch_size=4, context=8, seed=0)
    logger = MetricsLogger(tmp_path / "train", total_steps=100, tensorboard=False, progress=False)
    yield loader, logger, firsts, tmp_path / "train" / "metrics.jsonl"
    logger.close()


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


def test_windows_from_names_the_batches_served(setup):
    loader, _, firsts, _ = setup
    loader.load_state_dict({**loader.state_dict(), "cursor": loader.n_windows - 2})  # across an epoch end
    at = loader.state_dict()
    named = loader.windows_from(at["epoch"], at["cursor"], 8)
    x, _ = loader.next_batch()
    x2, _ = loader.next_batch()
    firsts_by_name = {f"train_{i:03d}.bin": first for i, first in enumerate(firsts)}
    assert [firsts_by_name[name] + start for name, start in named] == torch.cat([x, x2])[:, 0].tolist()
    assert loader.state_dict()["epoch"] == 1  # naming them did not move the loader; serving them did


def test_non_finite_values_are_skipped_and_logged_until_k_in_a_row(setup):
    loader, logger, _, metrics = setup
    guard = StepGuard(max_bad_steps=3, windows_per_step=4)
    at = loader.state_dict()
    assert not guard.skip(0, _t(2.0), _t(1.0), loader, at, logger)
    assert guard.skip(1, _t(math.nan), _t(1.0), loader, at, logger)
    assert guard.skip(1, _t(2.0), math.inf, loader, at, logger)  # a plain float norm (FSDP's) works too
    assert not guard.skip(1, _t(2.0), _t(1.0), loader, at, logger)  # a good step resets the count
    assert guard.skip(2, _t(math.inf), _t(1.0), loader, at, logger)
    assert guard.skip(2, _t(math.nan), _t(math.nan), loader, at, logger)
    with pytest.raises(BadStepsError, match=r"training stopped at step 3: 3 bad steps in a row"):
        guard.skip(2, _t(math.nan), _t(1.0), loader, at, logger)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["step"], r["reason"], r["in_a_row"]) for r in rows] == [
        (2, "nonfinite_loss", 1), (2, "nonfinite_grad_norm", 2),
        (3, "nonfinite_loss", 1), (3, "nonfinite_loss", 2), (3, "nonfinite_loss", 3)]
    assert all(len(r["windows"]) == 4 and r["loader"] == at for r in rows)
    assert guard.skipped == 5


def test_spike_guard_waits_for_a_settled_mean_then_skips_spikes(setup):
    loader, logger, _, _ = setup
    at = loader.state_dict()
    guard = StepGuard(max_bad_steps=5, spike_factor=3.0)
    assert not guard.skip(0, _t(100.0), _t(1.0), loader, at, logger)  # the first steps are never judged
    for step in range(1, SPIKE_WARMUP):
        assert not guard.skip(step, _t(2.0), _t(1.0), loader, at, logger)
    assert not guard.skip(SPIKE_WARMUP, _t(2.5), _t(1.0), loader, at, logger)
    mean = guard.mean / (1 - 0.95 ** guard.good)
    assert guard.skip(SPIKE_WARMUP + 1, _t(3.01 * mean), _t(1.0), loader, at, logger)
    assert not guard.skip(SPIKE_WARMUP + 1, _t(2.9 * mean), _t(1.0), loader, at, logger)

    resumed = StepGuard(max_bad_steps=5, spike_factor=3.0)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # through a checkpoint's state.json
    assert resumed.state_dict() == guard.state_dict() and resumed.skipped == 1


def test_without_spike_factor_a_high_finite_loss_is_applied(setup):
    loader, logger, _, _ = setup
    guard = StepGuard(max_bad_steps=1)
    for step in range(2 * SPIKE_WARMUP):
        assert not guard.skip(step, _t(1.0 if step < SPIKE_WARMUP else 1e6), _t(1.0), loader,
                              loader.state_dict(), logger)
