"""Optimizer and learning-rate schedules for the training loop.

:func:`build_optimizer` makes AdamW with two parameter groups: weight decay for matrices and
embeddings (``dim >= 2``), none for norms and biases (``dim < 2``), with tied parameters once.
:func:`lr_at` is the schedule as a pure function of the step, so resuming needs no schedule state::

    optimizer = build_optimizer(model, cfg.train, device.type)
    print(group_summary(optimizer))   # {"decay": {"tensors": 9, "params": 811008}, "no_decay": ...}
    for step in range(start, cfg.train.steps):
        set_lr(optimizer, lr_at(step, cfg.train))
        ...

Schedules (``train.schedule``), after ``warmup_steps`` of linear warmup ``lr * (step + 1) / warmup``
and with ``min_lr = lr * min_lr_ratio``:

- ``constant``: ``lr``.
- ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``, ``p`` from 0 right after warmup to 1 at
  the last step ``steps - 1``.
- ``linear``: from ``lr`` right after warmup straight down to ``min_lr`` at the last step.
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction * steps`` steps, each of which
  lowers the rate linearly so the last step runs at exactly ``min_lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into named ``decay`` (dim >= 2) and ``no_decay`` (dim < 2) groups.

    ``named_parameters`` yields a tied tensor (embedding = output projection) once, so it is updated
    once per step. Frozen parameters (``requires_grad=False``, e.g. a base model under LoRA) are left out.
    Empty groups are dropped, since AdamW refuses a group without parameters.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with the fused CUDA kernel on GPUs."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    # fused=True is one kernel for the whole update on CUDA; elsewhere torch picks foreach when it can.
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at 0-based ``step`` of ``cfg.steps``; never negative."""
    lr, warmup, steps = cfg.lr, cfg.warmup_steps, cfg.steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    min_lr = lr * cfg.min_lr_ratio
    last = steps - 1
    if cfg.schedule in ("cosine", "linear"):
        span = last - warmup
        # One step after warmup (span 0) is already the last one: it runs at min_lr.
        progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
        if cfg.schedule == "cosine":
            rate = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        else:
            rate = lr + (min_lr - lr) * progress
        return max(0.0, rate)
    if cfg.schedule == "wsd":
        n_decay = max(1, round(cfg.decay_fraction * steps))
        start = max(steps - n_decay, warmup)  # the decay never eats into warmup
        if step < start:
            return lr
        if start >= steps:  # past the end of a run that was all warmup
            return min_lr
        done = min(1.0, (step - start + 1) / (steps - start))  # 1/n after the first decay step, 1 at the last
        return max(0.0, lr + (min_lr - lr) * done)
    raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r} (expected cosine, wsd, constant or linear)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def group_summary(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Tensors and scalar parameters per named group, e.g. for the run log and the run card:
    ``{"decay": {"tensors": 9, "params": 811008}, "no_decay": {"tensors": 9, "params": 1728}}``."""
    return {group.get("name", f"group{i}"): {"tensors": len(group["params"]),
                                             "params": sum(p.numel() for p in group["params"])}
            for i, group in enumerate(optimizer.param_groups)}
