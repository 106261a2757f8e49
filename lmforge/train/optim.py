"""Optimizer and learning-rate schedules for the training loop.

:func:`build_optimizer` makes AdamW with two parameter groups: weight decay for matrices and
embeddings (``dim >= 2``), none for norms and biases (``dim < 2``), with tied parameters once.
With ``train.optimizer: muon`` the hidden matrices (every 2-D weight except the token embedding
and the output head) are updated by :class:`Muon` instead, and the rest by AdamW, through one
:class:`MuonAdamW` that checkpoints, resumes and takes the schedule like a single optimizer.
:class:`Muon` is ``torch.optim.Muon``'s algorithm with its Newton-Schulz orthogonalisation in a
dtype of our choosing (``train.muon_precision``): torch's runs it in bf16 always, which is about
100x slower than fp32 on CPUs without bf16 instructions.
:func:`lr_at` is the schedule as a pure function of the step, so resuming needs no schedule state::

    optimizer = build_optimizer(model, cfg.train, device.type)
    print(group_summary(optimizer))   # {"decay": {"tensors": 9, "params": 811008}, "no_decay": ...}
    for step in range(start, cfg.train.steps):     # steps: auto -> the length StepBudget fixed
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
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.config import TrainConfig
from lmforge.runtime import fast_bf16


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


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (fused kernel on GPUs), or :class:`MuonAdamW` for ``optimizer: muon``."""
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg, device_type)
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return _adamw(groups, cfg, device_type)


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # fused=True is one kernel for the whole update (CUDA, and CPU since torch 2.4: 5.6x faster than foreach
    # for the 1M-parameter speedrun model here); elsewhere foreach batches the update over tensors.
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def _is_io_weight(model: nn.Module, p: nn.Parameter) -> bool:
    """The token embedding and the output head: Muon is meant for hidden matrices, not for these."""
    io = [getattr(model, name, None) for name in ("tok_emb", "lm_head")]
    return any(m is not None and any(p is q for q in m.parameters()) for m in io)


def orthogonalize(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """Muon's quintic Newton-Schulz iteration on ``g`` (A, B), computed in ``dtype``; a new (A, B) tensor.

    The same operations in the same order as ``torch.optim.Muon``'s, so in bf16 the result is
    bitwise torch's. It does not converge to the exact orthogonal factor U V^T of ``g = U S V^T``
    but to U S' V^T with S' roughly in [0.5, 1.5], which trains as well (Keller Jordan's Muon).
    """
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # a copy even in fp32: the in-place division must not touch the momentum
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # iterate on the wide side: the Gram matrix is (min(A, B), min(A, B))
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape rate factor: Keller's "original" or Moonshot's "match_rms_adamw"."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else 1.0


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan's) for 2-D parameters, with the orthogonalisation in ``dtype`` (bf16 or fp32).

    ``torch.optim.Muon`` (torch 2.9 on) hard-codes bf16; this is its step (momentum, Nesterov, decoupled
    weight decay, per-shape rate), defaults and state (``momentum_buffer``), so in bf16 it updates
    bitwise as torch's does and the state dicts of the two are interchangeable.
    """

    def __init__(self, params: Iterable, dtype: torch.dtype = torch.bfloat16, lr: float = 1e-3,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon updates only 2-D parameters (matrices)")
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-(lr * _lr_ratio(group["adjust_lr_fn"], p.shape)))


_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def muon_precision(setting: str, device_type: str) -> str:
    """``train.muon_precision`` resolved: ``auto`` is bf16 where bf16 products are fast here, fp32 elsewhere."""
    if setting != "auto":
        return setting
    fast = fast_bf16(device_type)
    if dist.is_initialized() and device_type == "cpu":
        # CPU ranks measure apart; a near tie could split them and the DDP replicas would drift apart.
        flag = torch.tensor([int(fast)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        fast = bool(flag.item())
    return "bf16" if fast else "fp32"


class MuonAdamW:
    """Muon for the hidden 2-D weights, AdamW for embeddings, head, norms and biases, as one optimizer.

    :class:`Muon` orthogonalizes each matrix's momentum with a few Newton-Schulz iterations, in
    bf16 or fp32 (:func:`muon_precision`), and accepts only 2-D parameters. Its learning rate is
    adjusted per matrix shape the way Moonshot's version does (``match_rms_adamw``), so the update's size matches AdamW's and both
    halves follow one schedule; ``train.muon_lr_scale`` multiplies the Muon half's rate.
    ``param_groups`` lists the groups of both (so :func:`set_lr` reaches them), and the state dict
    holds both halves, so a checkpoint resumes exactly.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> None:
        hidden, other = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (hidden if p.dim() == 2 and not _is_io_weight(model, p) else other).append(p)
        if not hidden:
            raise ValueError("train.optimizer muon: the model has no hidden 2-D weights for Muon; use adamw")
        if any(type(p).__name__ == "DTensor" for p in hidden):
            # Newton-Schulz needs each whole matrix; FSDP holds only a shard of it on each rank.
            raise ValueError("train.optimizer muon does not work with train.parallel fsdp; use ddp or adamw")
        self.setting = cfg.muon_precision
        self.precision = muon_precision(cfg.muon_precision, device_type)
        self.muon = Muon([{"name": "muon", "params": hidden, "lr_scale": cfg.muon_lr_scale}],
                         _PRECISIONS[self.precision], lr=cfg.lr * cfg.muon_lr_scale, weight_decay=cfg.weight_decay,
                         momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
        groups = [{"name": "decay", "params": [p for p in other if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"name": "no_decay", "params": [p for p in other if p.dim() < 2], "weight_decay": 0.0}]
        self.adamw = _adamw([g for g in groups if g["params"]], cfg, device_type)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict(), "muon_precision": self.precision}

    def load_state_dict(self, state: dict) -> None:
        if not {"muon", "adamw"} <= set(state) <= {"muon", "adamw", "muon_precision"}:
            raise ValueError("the saved optimizer state is not a Muon + AdamW pair")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        saved = state.get("muon_precision")  # absent in checkpoints from before the setting
        if self.setting == "auto" and saved in _PRECISIONS:
            # auto is decided when a run starts and kept on resume, so the resumed run continues exactly:
            # on a near tie the measurement behind it could come out the other way in a new process.
            self.precision, self.muon.dtype = saved, _PRECISIONS[saved]


def lr_at(step: int, cfg: TrainConfig, steps: int | None = None, decay_start: int | None = None) -> float:
    """Learning rate for the update made at 0-based ``step`` of ``steps`` (default ``cfg.steps``); never
    negative. With ``steps: auto`` and no length fixed yet (:mod:`lmforge.train.budget`), the rate after
    warmup holds at ``lr``. ``decay_start``: where wsd's decay began when ``steps: auto`` froze the total
    (default: ``decay_fraction`` of ``steps`` before its end)."""
    lr, warmup = cfg.lr, cfg.warmup_steps
    steps = cfg.steps if steps is None else steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant" or steps == "auto":
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
        start = max(steps - n_decay, warmup) if decay_start is None else decay_start  # never eats into warmup
        if step < start:
            return lr
        if start >= steps:  # past the end of a run that was all warmup
            return min_lr
        done = min(1.0, (step - start + 1) / (steps - start))  # 1/n after the first decay step, 1 at the last
        return max(0.0, lr + (min_lr - lr) * done)
    raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r} (expected cosine, wsd, constant or linear)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (times the group's ``lr_scale``, if it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def group_summary(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Tensors and scalar parameters per named group, e.g. for the run log and the run card:
    ``{"decay": {"tensors": 9, "params": 811008}, "no_decay": {"tensors": 9, "params": 1728}}``."""
    return {group.get("name", f"group{i}"): {"tensors": len(group["params"]),
                                             "params": sum(p.numel() for p in group["params"])}
            for i, group in enumerate(optimizer.param_groups)}
