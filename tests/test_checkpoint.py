"""Checkpoints: exact round trip, atomic writes, pruning, damage detection and strict loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from lmforge.train import checkpoint as ckpt_mod
from lmforge.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    load,
    load_weights,
    read_state,
    resolve,
    verify,
)


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> linear head, optionally tied, following the LanguageModel forward contract."""

    def __init__(self, vocab: int = 16, d: int = 8, tie: bool = True, extra: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        if extra:
            self.proj = nn.Linear(d, d)

    def forward(self, idx, targets=None):
        logits = self.head(self.norm(self.emb(idx)))  # (B, T, V)
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _trained(seed: int = 0, **kw) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        idx = torch.randint(0, 16, (2, 5))
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _save_steps(tmp_path: Path, steps, keep_last: int = 10) -> Checkpointer:
    ck = Checkpointer(tmp_path / "ckpt", keep_last=keep_last)
    for s in steps:
        model, opt = _trained(seed=s)
        ck.save(s, model, opt, {"step": s})
    return ck


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path / "ckpt")
    state = {"step": 7, "loader": {"pos": [1, 2]}, "val": {"loss": 1.5}}
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    path = ck.save(7, model, opt, state)
    expected = _draws()

    assert path == tmp_path / "ckpt" / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "checksums.json"])
    sums = json.loads((path / "checksums.json").read_text())
    assert set(sums) == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert all(sums[f]["bytes"] == (path / f).stat().st_size for f in sums)

    fresh, fresh_opt = _trained(seed=99)
    _draws()  # move every generator away from the saved state
    loaded = Checkpointer(tmp_path / "ckpt").load(path, fresh, fresh_opt)
    assert loaded == state
    assert _draws() == expected
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert want.keys() == got.keys()
    for k in want:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(want[k][field], got[k][field])
    # The tie survives: one tensor stored, both names restored and still shared.
    assert fresh.head.weight is fresh.emb.weight
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "norm.bias", "norm.weight"]
    weights = load_weights(path)
    assert torch.equal(weights["head.weight"], model.emb.weight.detach())
    assert read_state(path) == state
    served = TinyLM()
    assert load(path, served, restore_rng=False) == state
    assert torch.equal(served.emb.weight, model.emb.weight)


def test_resumed_training_matches_uninterrupted(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path)
    path = ck.save(2, model, opt, {})
    torch.manual_seed(5)
    idx = torch.randint(0, 16, (2, 5))
    model(idx, idx)[1].backward()
    opt.step()

    other, other_opt = _trained(seed=3)
    ck.load(path, other, other_opt, restore_rng=False)
    other(idx, idx)[1].backward()
    other_opt.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_should_save_and_keep_last(tmp_path):
    ck = _save_steps(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert [p.name for p in ck.list()] == ["step_000003", "step_000004"]
    every = Checkpointer(tmp_path, every=250)
    assert [every.should_save(s, False) for s in (249, 250, 500, 501)] == [False, True, True, False]
    assert every.should_save(501, True)
    assert not Checkpointer(tmp_path, every=0).should_save(500, False)


def test_saving_an_earlier_step_removes_the_abandoned_later_ones(tmp_path):
    ck = _save_steps(tmp_path, [10, 20, 30])
    model, opt = _trained()
    ck.save(20, model, opt, {"step": 20, "again": True})
    assert [p.name for p in ck.list()] == ["step_000010", "step_000020"]
    assert read_state(ck.list()[-1]) == {"step": 20, "again": True}


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: _truncate(p / "model.safetensors"), "truncated"),
    (lambda p: _flip_bit(p / "model.safetensors"), "sha256"),
    (lambda p: (p / "checksums.json").unlink(), "did not finish"),
    (lambda p: (p / "rng.pt").unlink(), "rng.pt is missing"),
])
def test_damaged_checkpoint_falls_back_with_warning(tmp_path, damage, reason):
    newest = _save_steps(tmp_path, [1, 2, 3]).list()[-1]
    damage(newest)
    ck = Checkpointer(tmp_path / "ckpt")  # a new process: nothing verified yet
    with pytest.warns(CheckpointWarning, match=rf"step_000003 is damaged \(.*{reason}.*\); falling back to .*step_000002"):
        assert ck.latest_valid() == tmp_path / "ckpt" / "step_000002"
    with pytest.raises(CheckpointError, match=f"step_000003 is damaged: .*{reason}"):
        ck.load(newest, TinyLM())
    with pytest.raises(CheckpointError, match=f"step_000003 is damaged: .*{reason}"):
        load(newest, TinyLM())
    with pytest.raises(CheckpointError, match="damaged"):
        verify(newest)


def test_loading_weights_only_reads_what_it_needs(tmp_path):
    newest = _save_steps(tmp_path, [1]).list()[-1]
    _flip_bit(newest / "optimizer.pt")
    model = TinyLM()
    assert load(newest, model, restore_rng=False) == {"step": 1}  # serving ignores the optimizer state
    with pytest.raises(CheckpointError, match="optimizer.pt does not match its sha256"):
        load(newest, TinyLM(), torch.optim.AdamW(model.parameters()))


def test_all_damaged_gives_none(tmp_path):
    _flip_bit(_save_steps(tmp_path, [1]).list()[0] / "state.json")
    ck = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(CheckpointWarning, match="falling back to nothing"):
        assert ck.latest_valid() is None
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="every one is damaged"):
        resolve(tmp_path / "ckpt")


def test_leftover_tmp_folder_is_ignored_and_cleaned(tmp_path):
    ck = _save_steps(tmp_path, [1])
    stale = tmp_path / "ckpt" / ".tmp-step_000009-4242"
    stale.mkdir()
    (stale / "checksums.json").write_text("{}")
    assert ck.list() == [tmp_path / "ckpt" / "step_000001"]
    assert ck.latest_valid() == tmp_path / "ckpt" / "step_000001"
    model, opt = _trained()
    ck.save(2, model, opt, {})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001", "step_000002"]


def test_crash_mid_write_leaves_no_valid_looking_folder(tmp_path, monkeypatch):
    ck = _save_steps(tmp_path, [1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    model, opt = _trained()
    with pytest.raises(OSError, match="disk full"):
        ck.save(2, model, opt, {})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001"]
    assert ck.latest_valid() == tmp_path / "ckpt" / "step_000001"


def test_strict_load_names_keys_of_a_different_model(tmp_path):
    model, opt = _trained()
    path = Checkpointer(tmp_path).save(1, model, opt, {})
    with pytest.raises(CheckpointError, match=r"different model config: shape mismatches: emb\.weight: "
                                              r"checkpoint \(16, 8\) vs model \(16, 12\)"):
        Checkpointer(tmp_path).load(path, TinyLM(d=12))
    with pytest.raises(CheckpointError, match=r"missing keys: proj\.bias, proj\.weight"):
        Checkpointer(tmp_path).load(path, TinyLM(extra=True))
    # An untied model may start from tied weights; a tied one cannot take two different matrices.
    untied = TinyLM(tie=False)
    Checkpointer(tmp_path).load(path, untied)
    assert torch.equal(untied.head.weight, model.emb.weight)
    untied_path = Checkpointer(tmp_path / "u").save(1, TinyLM(tie=False), None, {})
    with pytest.raises(CheckpointError, match="tie_embeddings differs"):
        Checkpointer(tmp_path / "u").load(untied_path, TinyLM())
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        Checkpointer(tmp_path / "u").load(untied_path, TinyLM(tie=False), torch.optim.AdamW(TinyLM().parameters()))


def test_non_serializable_state_is_refused_before_writing(tmp_path):
    model, opt = _trained()
    with pytest.raises(TypeError, match="JSON-serializable"):
        Checkpointer(tmp_path).save(1, model, opt, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_resolve_accepts_checkpoint_ckpt_dir_and_run_dir(tmp_path):
    run = tmp_path / "run"
    ck = Checkpointer(run / "train" / "ckpt")
    model, opt = _trained()
    ck.save(1, model, opt, {})
    newest = ck.save(2, model, opt, {})
    assert resolve(run) == newest
    assert resolve(run / "train" / "ckpt") == newest
    assert resolve(newest) == newest
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
        resolve(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope")
