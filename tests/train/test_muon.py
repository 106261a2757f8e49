"""The Muon option: which parameters it takes, one schedule for both halves, exact resume, and its
orthogonalisation in bf16 (bitwise torch.optim.Muon's) or fp32 (for CPUs without fast bf16)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ModelConfig, TrainConfig
from lmforge.models import build_model
from lmforge.train import optim
from lmforge.train.optim import Muon, MuonAdamW, build_optimizer, group_summary, orthogonalize, set_lr
from tests.conftest import TINY, run_cli


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


def _train_step(model: torch.nn.Module, opt: MuonAdamW) -> None:
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_muon_state_dict_round_trip_continues_identically(precision: str):
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01, muon_precision=precision))
    _train_step(model, opt)
    other = _model()
    other.load_state_dict(model.state_dict())
    other_opt = build_optimizer(other, TrainConfig(optimizer="muon", lr=0.01, muon_precision=precision))
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk: no shared tensors
    _train_step(model, opt)
    _train_step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    with pytest.raises(ValueError, match="Muon"):
        other_opt.load_state_dict(torch.optim.AdamW(other.parameters()).state_dict())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])  # wide, tall (transposed inside), square
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_bf16_steps_are_torch_muon_bitwise(shape, nesterov, adjust_lr_fn):
    """Bitwise, not within a tolerance: in bf16 ours runs torch's operations in torch's order."""
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(*shape, generator=gen) for _ in range(3)]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    reference, muon = torch.optim.Muon(theirs, **kw), Muon(ours, torch.bfloat16, **kw)
    for _ in range(3):  # momentum and weight decay carry over steps
        for a, b in zip(theirs, ours, strict=True):
            a.grad = torch.randn(*shape, generator=gen)
            b.grad = a.grad.clone()
        reference.step()
        muon.step()
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    assert not any(torch.equal(a, w) for a, w in zip(ours, start, strict=True))  # it did move
    ours_state, their_state = muon.state_dict(), reference.state_dict()
    assert ours_state["state"][0]["momentum_buffer"].equal(their_state["state"][0]["momentum_buffer"])
    assert ours_state["param_groups"] == their_state["param_groups"]  # a torch Muon checkpoint loads as it is


@pytest.mark.parametrize("shape", [(32, 48), (96, 32), (128, 344)])  # the last: a speedrun MLP matrix
def test_muon_fp32_orthogonalisation_is_bf16_s_to_bf16_precision(shape):
    """fp32 is the exact iteration (float64 to 1e-5); bf16 keeps 8 significant bits (relative rounding 2^-9,
    about 0.2%) and five iterations of three products compound it to 1.2-1.7% in Frobenius norm here: 3% bounds it."""
    coefficients, g = (3.4445, -4.7750, 2.0315), torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    exact, fp32, bf16 = (orthogonalize(g, coefficients, 5, 1e-7, dtype).double()
                         for dtype in (torch.float64, torch.float32, torch.bfloat16))
    assert fp32.shape == bf16.shape == g.shape
    assert ((fp32 - exact).norm() / exact.norm()).item() < 1e-5
    assert ((fp32 - bf16).norm() / fp32.norm()).item() < 0.03
    buf = g.clone()
    orthogonalize(buf, coefficients, 5, 1e-7, torch.float32)
    assert torch.equal(buf, g)  # the momentum it is given stays as it was, in fp32 too


@pytest.mark.parametrize(("setting", "fast", "dtype"), [("auto", True, torch.bfloat16), ("auto", False, torch.float32),
                                                        ("bf16", False, torch.bfloat16), ("fp32", True, torch.float32)])
def test_muon_precision_follows_the_machine_unless_set(monkeypatch, setting, fast, dtype):
    monkeypatch.setattr(optim, "fast_bf16", lambda device_type: fast)
    opt = build_optimizer(_model(), TrainConfig(optimizer="muon", muon_precision=setting))
    assert opt.muon.dtype == dtype
    assert opt.state_dict()["muon_precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def test_muon_auto_precision_resumes_in_the_precision_the_run_started_with(monkeypatch):
    model = _model()
    monkeypatch.setattr(optim, "fast_bf16", lambda device_type: False)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.01))  # auto: fp32 on this "machine"
    _train_step(model, opt)
    other = _model()
    other.load_state_dict(model.state_dict())
    monkeypatch.setattr(optim, "fast_bf16", lambda device_type: True)  # a new process that measured otherwise
    other_opt = build_optimizer(other, TrainConfig(optimizer="muon", lr=0.01))
    assert other_opt.muon.dtype == torch.bfloat16
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other_opt.muon.dtype == torch.float32
    _train_step(model, opt)
    _train_step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    forced = build_optimizer(_model(), TrainConfig(optimizer="muon", lr=0.01, muon_precision="bf16"))
    old = {k: v for k, v in copy.deepcopy(opt.state_dict()).items() if k != "muon_precision"}
    forced.load_state_dict(old)  # a checkpoint from before the setting; a forced setting wins
    assert forced.muon.dtype == torch.bfloat16


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
