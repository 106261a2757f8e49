"""The Muon option: which parameters it takes, one schedule for both halves, and exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ModelConfig, TrainConfig
from lmforge.models import build_model
from lmforge.train.optim import MuonAdamW, build_optimizer, group_summary, set_lr

from .conftest import TINY, run_cli


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, context=16, d_model=32, n_layers=2, transformer={"n_heads": 2}))


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01, muon_lr_scale=2.0))
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for p in opt.muon.param_groups[0]["params"]}
    layer = model.layers[0]
    assert id(layer.attn.q.weight) in muon and id(layer.mlp.down.weight) in muon
    assert id(model.tok_emb.weight) not in muon  # tied with lm_head: AdamW, once
    assert all(p.dim() == 2 for p in opt.muon.param_groups[0]["params"])
    summary = group_summary(opt)
    assert summary["muon"]["tensors"] == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert summary["decay"] == {"tensors": 1, "params": 64 * 32}
    assert sum(g["params"] for g in summary.values()) == model.num_params()
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5, 0.5]


def test_muon_state_dict_round_trip_continues_identically():
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(m, o):
        m(idx, idx)[1].backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    other = _model()
    other.load_state_dict(model.state_dict())
    other_opt = build_optimizer(other, TrainConfig(optimizer="muon", lr=0.01))
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk: no shared tensors
    step(model, opt)
    step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    with pytest.raises(ValueError, match="Muon"):
        other_opt.load_state_dict(torch.optim.AdamW(other.parameters()).state_dict())


def _args(runs: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), f"--runs_dir={runs}", f"--data.train=[{corpus}]", f"--name={name}",
            "--train.optimizer=muon", "--train.steps=20", "--train.ckpt_every=0", "--train.eval_every=0", *extra]


def test_muon_training_resumes_bitwise(tmp_path: Path, small_corpus: Path):
    """Bitwise: lmforge promises exact resume on the same machine and thread count (docs/reliability.md)."""
    straight = run_cli(*_args(tmp_path, small_corpus, "straight"))
    assert straight.returncode == 0, straight.stderr
    first = run_cli(*_args(tmp_path, small_corpus, "stopped", "--train.stop_at=8"))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "stopped" / "train" / "ckpt" / "step_000008").is_dir()
    resumed = run_cli(*_args(tmp_path, small_corpus, "stopped"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "train" / "ckpt" / "step_000020" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "train" / "ckpt" / "step_000020" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
