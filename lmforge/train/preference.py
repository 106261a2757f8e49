"""Preference tuning objectives: DPO, and SimPO (reference-free), as a module the training loop calls.

A preference batch (:class:`lmforge.finetune.data.PairLoader`) holds ``2B`` rows: the chosen answers
(rows ``0..B-1``) then the rejected ones (rows ``B..2B-1``), each after the same prompt, with targets
``-100`` everywhere but on the answer's tokens. :class:`PreferenceObjective` wraps the model being
trained and returns ``(margins, loss)`` like a model returns ``(logits, loss)``, so THE loop
(:func:`lmforge.train.loop.train`) runs it unchanged: ``_, loss = job.fwd(x, y)``.

- **DPO** (Rafailov et al. 2023): ``loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))`` where ``p`` and
  ``r`` are the summed log-probabilities of an answer under the policy and the reference; the implicit
  rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``. The reference is the frozen starting model:
  a frozen copy for full fine-tuning, or, for a LoRA run, the same weights with the adapters switched
  off (:func:`lmforge.train.lora.adapters_disabled`), so a LoRA run holds one copy of the weights.
- **SimPO** (Meng et al. 2024): no reference; ``loss = -log sigmoid(beta * (pc/|c| - pr/|r|) - gamma)``
  with length-normalised log-probabilities; rewards are ``beta * p/|answer|``.
- ``nll`` > 0 adds ``nll * (-pc/|c|)``, the chosen answers' negative log-likelihood per token, to either
  loss (as RPO does, Pang et al. 2024): DPO alone can widen the margin by lowering both answers.

Usage::

    objective = PreferenceObjective(fwd, "dpo", beta=0.1, reference=frozen_copy)   # or reference=None + LoRA
    margins, loss = objective(x, y)                  # x, y: (2B, T); margins: (B,) reward margins
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def sequence_logprobs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's targets and how many there are: ``(sum (R,), count (R,))``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (R, T, V)
    scored = targets != IGNORE  # (R, T)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (R, T)
    return (picked * scored).sum(-1), scored.sum(-1)


def dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPO per pair: ``(loss (B,), chosen reward (B,), rejected reward (B,))`` from summed log-probs."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def simpo(pc: Tensor, pr: Tensor, nc: Tensor, nr: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO per pair: ``(loss, chosen reward, rejected reward)`` from summed log-probs and answer lengths."""
    chosen, rejected = beta * pc / nc.clamp(min=1), beta * pr / nr.clamp(min=1)
    return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected


def frozen_copy(model: nn.Module) -> nn.Module:
    """The DPO reference for full fine-tuning: the starting weights, frozen, in eval mode."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class PreferenceObjective(nn.Module):
    """``(x, y) -> (reward margins (B,), mean loss)`` over a batch of chosen-then-rejected rows."""

    def __init__(self, policy: nn.Module, loss: Literal["dpo", "simpo"], beta: float, gamma: float = 0.0,
                 reference: nn.Module | None = None, adapters_off=None, nll: float = 0.0) -> None:
        super().__init__()
        if loss == "dpo" and reference is None and adapters_off is None:
            raise ValueError("DPO needs a reference: a frozen copy, or adapters that can be switched off")
        self.policy, self.loss, self.beta, self.gamma, self.nll = policy, loss, beta, gamma, nll
        self.reference = reference
        self.adapters_off = adapters_off  # a context manager factory: the base model, adapters disabled

    @torch.no_grad()
    def _reference_logprobs(self, x: Tensor, y: Tensor) -> Tensor:
        if self.reference is not None:
            return sequence_logprobs(self.reference(x)[0], y)[0]
        with self.adapters_off():
            return sequence_logprobs(self.policy(x)[0], y)[0]

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0] // 2
        logp, n = sequence_logprobs(self.policy(x)[0], y)  # (2B,) each
        if self.loss == "dpo":
            ref = self._reference_logprobs(x, y)
            losses, chosen, rejected = dpo(logp[:b], logp[b:], ref[:b], ref[b:], self.beta)
        else:
            losses, chosen, rejected = simpo(logp[:b], logp[b:], n[:b], n[b:], self.beta, self.gamma)
        margins = (chosen - rejected).detach()
        if self.nll:
            losses = losses - self.nll * logp[:b] / n[:b].clamp(min=1)
        return margins, losses.mean()

    # Under DDP / FSDP the loop skips gradient reduction on all micro-batches but the last: that is the policy's.
    def no_sync(self):
        return getattr(self.policy, "_orig_mod", self.policy).no_sync()

    def set_requires_gradient_sync(self, value: bool) -> None:
        self.policy.set_requires_gradient_sync(value)

    @staticmethod
    def hits(margins: Tensor, y: Tensor) -> tuple[int, int]:
        """Reward accuracy counts for validation: pairs whose chosen answer wins, and pairs."""
        return int((margins > 0).sum()), margins.numel()
