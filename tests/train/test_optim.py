"""AdamW parameter groups and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.train.optim import build_optimizer, group_summary, lr_at, param_groups, set_lr


def cfg(**kw) -> TrainConfig:
    base = dict(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    return TrainConfig(**{**base, **kw})


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ffn = nn.Linear(d, d)  # weight decays, bias does not
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
def test_warmup_then_peak(schedule):
    c = cfg(schedule=schedule)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == 1.0
    assert lr_at(10, c) == 1.0  # exactly the peak right after warmup
    warm = [lr_at(s, c) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_decay_reaches_min_lr_at_last_step_and_never_rises(schedule):
    c = cfg(schedule=schedule)
    assert lr_at(99, c) == pytest.approx(0.1, abs=1e-12)
    after = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert min(after) >= 0.1 - 1e-12
    zero = cfg(schedule=schedule, min_lr_ratio=0.0)
    assert lr_at(99, zero) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, zero) >= 0.0 for s in range(0, 120))


def test_cosine_and_linear_midpoints():
    # steps=101, warmup=10: progress runs over steps 10..100, so step 55 is the midpoint.
    assert lr_at(55, cfg(schedule="cosine", steps=101)) == pytest.approx(0.55)
    assert lr_at(55, cfg(schedule="linear", steps=101)) == pytest.approx(0.55)
    assert lr_at(32, cfg(schedule="cosine", steps=101)) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr_at(32, cfg(schedule="linear", steps=101)) == pytest.approx(1.0 - 0.9 * 22 / 90)


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    c = cfg(schedule="wsd", decay_fraction=0.2)  # the last 20 of 100 steps decay
    assert [lr_at(s, c) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(80, c) == pytest.approx(1.0 - 0.9 / 20)
    assert lr_at(89, c) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(99, c) == pytest.approx(0.1)
    # The decay never starts inside warmup.
    short = cfg(schedule="wsd", steps=12, warmup_steps=10, decay_fraction=0.5)
    assert lr_at(9, short) == 1.0
    assert lr_at(10, short) == pytest.approx(0.55)
    assert lr_at(11, short) == pytest.approx(0.1)


def test_no_warmup_and_constant():
    c = cfg(schedule="cosine", warmup_steps=0)
    assert lr_at(0, c) == 1.0
    assert lr_at(99, c) == pytest.approx(0.1)
    assert {lr_at(s, cfg(schedule="constant")) for s in range(10, 100)} == {1.0}


def test_param_groups_split_by_dimension_and_keep_ties_once():
    model = TiedLM()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["decay"] == {id(model.emb.weight), id(model.ffn.weight)}
    assert ids["no_decay"] == {id(model.ffn.bias), id(model.norm.weight), id(model.norm.bias)}
    assert len(groups["decay"]["params"]) == 2  # the tied embedding/head once
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.1, 0.0)


def test_build_optimizer_uses_config_and_steps():
    model = TiedLM()
    opt = build_optimizer(model, cfg(beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert opt.defaults["fused"]  # one fused kernel on CPUs too (torch >= 2.4)
    assert group_summary(opt) == {"decay": {"tensors": 2, "params": 12 * 6 + 6 * 6},
                                  "no_decay": {"tensors": 3, "params": 6 + 6 + 6}}
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    before = model.norm.weight.detach().clone()
    model.head(model.norm(model.emb(torch.tensor([[1, 2]])))).sum().backward()
    opt.step()
    assert not torch.equal(before, model.norm.weight)
    assert model.head.weight is model.emb.weight


def test_frozen_model_is_refused():
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, cfg())
