"""The output head and the cross-entropy loss in one pass, chunk by chunk, for training.

A language model's last step, ``logits = h @ W.T`` followed by a softmax cross-entropy,
writes and reads a ``(tokens, vocabulary)`` matrix several times: the logits, their
log-softmax, the zero-filled gradient, the gradient of the log-softmax. At a vocabulary
of 2,048 and 1,536 tokens per batch that is 12.6 MB per pass, far beyond a CPU's cache,
and it was the largest cost of a small model's training step after the matmuls.
:func:`head_cross_entropy` instead takes a few dozen rows at a time, so each chunk of
logits stays in cache: it computes the chunk's loss and, since the loss is the end of the
graph, the chunk's gradients with respect to ``h``, ``W`` and the bias right away
(``softmax - one_hot``), as Liger Kernel's fused linear cross-entropy does on GPUs. The
backward pass only scales the stored gradients. The logits are never held whole, which
also saves their memory.

Usage (what ``LanguageModel.head_loss`` does in training)::

    loss = head_cross_entropy(h.reshape(-1, d), lm_head.weight, lm_head.bias, targets.reshape(-1))

The result equals ``causal_lm_loss(F.linear(h, W, b), targets)`` (mean over the targets that
are not ``ignore_index``; 0 when every target is ignored) within float rounding, and so do
its gradients; tests/models/test_head_loss.py checks both.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

# Rows per chunk: about 512 KB of float32 logits, so a chunk and its gradient stay in a core's L2 cache.
_CHUNK_FLOATS = 1 << 17


def chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk for a vocabulary of ``vocab`` (at least 16, so the matmuls stay efficient)."""
    return max(16, _CHUNK_FLOATS // max(1, vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int) -> Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = chunk_rows(vocab)
        for start in range(0, n, step):
            hc, tc = h[start : start + step], targets[start : start + step]
            logits = (hc @ weight.t() if bias is None else torch.addmm(bias, hc, weight.t())).float()  # (c, V)
            valid = tc != ignore_index
            safe = torch.where(valid, tc, 0)[:, None]  # (c, 1): ignored rows read column 0, then count 0
            top = logits.amax(-1, keepdim=True)
            picked = logits.gather(1, safe)
            probs = logits.sub_(top).exp_()  # in place: the logits are not needed again
            sums = probs.sum(-1, keepdim=True)
            # loss_i = log(sum exp(l - m)) + m - l[t]
            total += ((sums.log() + top - picked)[:, 0] * valid).sum()
            # d loss_i / d logits = softmax - one_hot(t), zero for ignored rows
            probs.div_(sums).scatter_add_(1, safe, torch.full_like(picked, -1.0))
            probs.mul_(valid[:, None])
            probs = probs.to(h.dtype)
            if grad_h is not None:
                torch.mm(probs, weight, out=grad_h[start : start + step])
            if grad_w is not None:
                grad_w.addmm_(probs.t(), hc)
            if grad_b is not None:
                grad_b += probs.sum(0)
        count = (targets != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None), count)
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)  # type: ignore[attr-defined]
        return total / count

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = list(ctx.saved_tensors)  # type: ignore[attr-defined]
        scale = grad_out / grads.pop()  # the chain rule through the mean: d mean / d sum = 1 / count
        out = [grads.pop(0) * scale if has else None for has in ctx.has]  # type: ignore[attr-defined]
        return out[0], out[1], out[2], None, None


def head_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                       ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T + bias`` (``h``: (N, d), ``weight``: (V, d)) against ``targets`` (N,).

    Targets equal to ``ignore_index`` count for nothing; when all are ignored the loss is 0
    with zero gradients, as :func:`lmforge.models.layers.causal_lm_loss` gives.
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"head_cross_entropy takes h (N, d) and targets (N,), got {tuple(h.shape)} "
                         f"and {tuple(targets.shape)}")
    return _HeadCrossEntropy.apply(h, weight, bias, targets, ignore_index)
