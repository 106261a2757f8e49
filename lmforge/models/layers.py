"""Building blocks shared by more than one registry model.

Only pieces that two or more architectures use live here; everything else stays
inside its model's own file so that each model reads on its own.

- :class:`RMSNorm`: root-mean-square normalization (Transformer blocks, gated CNN blocks).
- :class:`Rotary`: rotary position embeddings in the Llama / Hugging Face convention
  (``rotate_half`` on the two halves of each head), for any attention-based model.
- :func:`make_lm_head`: the output projection, optionally tied to the input embedding.
- :class:`Packed`: positions and the block-diagonal causal mask of rows holding several examples
  (packed fine-tuning), for the Transformer and the models wrapped from Hugging Face.

Usage::

    norm = RMSNorm(256, eps=1e-5)
    rope = Rotary(head_dim=64, max_len=1024, theta=10000.0)
    q = rope(q, start=0)             # q: (B, T, n_heads, head_dim)
    head = make_lm_head(tok_emb, tie=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension, computed in float32.

    The statistics are taken in float32 whatever the input dtype (as Llama does),
    so the layer is safe under bfloat16 / float16 autocast; the result is cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            # One fused kernel instead of six ops (forward and backward); bitwise equal to the lines below
            # in float32, and the op count matters most when decoding one token at a time.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension split in two halves (Llama / HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embeddings with precomputed cos / sin tables for ``max_len`` positions.

    ``inv_freq[i] = theta ** (-2i / head_dim)``; the angle of position ``p`` on
    channel ``j`` is ``p * inv_freq[j mod head_dim/2]`` (the frequencies are laid
    out twice, once per half), which is exactly Hugging Face's ``LlamaRotaryEmbedding``
    with ``rope_type="default"``. The tables are non-persistent buffers: they are
    not part of the state dict (so checkpoints and exports hold only weights) and
    :meth:`reset` recomputes them, e.g. after building the model on the meta device.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.max_len = max_len
        self.theta = theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (max_len, head_dim)
        self.register_buffer("sin", sin, persistent=False)  # (max_len, head_dim)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Always computed in float32 (float64 would not match HF's rounding; bf16 would lose positions).
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)  # (head_dim/2,)
        positions = torch.arange(self.max_len, dtype=torch.int64, device=device).float()
        freqs = torch.outer(positions, inv_freq)  # (max_len, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def reset(self) -> None:
        """Recompute the cos / sin tables in place on the buffers' current device."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, x: Tensor, start: int | Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(B, T, H, head_dim)`` holding positions ``[start, start + T)``.

        ``start`` may instead be a ``(B, T)`` int64 tensor of each row's own positions (rows of a
        decode batch at different lengths); the caller keeps them below ``max_len``, since checking
        here would synchronize with the device on every layer.
        """
        if isinstance(start, Tensor):
            cos = self.cos[start].to(x.dtype)[:, :, None]  # (B, T, 1, head_dim), broadcast over H
            sin = self.sin[start].to(x.dtype)[:, :, None]
            return x * cos + rotate_half(x) * sin
        t = x.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"positions up to {start + t} exceed the rotary table of {self.max_len} positions")
        cos = self.cos[start : start + t].to(x.dtype)[:, None]  # (T, 1, head_dim), broadcast over B and H
        sin = self.sin[start : start + t].to(x.dtype)[:, None]
        return x * cos + rotate_half(x) * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_len={self.max_len}, theta={self.theta}"


def make_lm_head(tok_emb: nn.Embedding, tie: bool) -> nn.Linear:
    """The ``d_model -> vocab`` output projection (no bias); with ``tie`` it shares ``tok_emb.weight``.

    Tying makes both modules hold the same :class:`~torch.nn.Parameter`, so the
    optimizer, ``num_params`` and ``state_dict`` see one tensor under two names.
    """
    vocab, dim = tok_emb.weight.shape
    head = nn.Linear(dim, vocab, bias=False, device=tok_emb.weight.device, dtype=tok_emb.weight.dtype)
    if tie:
        head.weight = tok_emb.weight
    return head


def causal_lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy in float32 over the targets that are not ``ignore_index``.

    ``logits``: (B, T, V), ``targets``: (B, T). When every target is ignored the
    loss is 0 (still attached to the graph, with zero gradients) instead of the
    NaN that a plain mean over nothing would give, so a fully masked fine-tuning
    batch cannot poison the weights.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count


@dataclass
class Packed:
    """Several examples packed into each row: per-token positions restarting at 0 in every example, and a
    block-diagonal causal mask so that no token attends across an example boundary."""

    positions: Tensor  # (B, T) int64: the token's position inside its own example
    mask: Tensor  # (B, 1, T, T) bool, True = attend: same example and not in the future

    @staticmethod
    def of(doc_ids: Tensor) -> Packed:
        """From ``doc_ids`` (B, T): equal ids = one example; an example's tokens are contiguous."""
        b, t = doc_ids.shape
        ar = torch.arange(t, device=doc_ids.device)  # (T,)
        first = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T): True where an example starts
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start = torch.where(first, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        causal = ar[None, :] <= ar[:, None]  # (T, T): key column <= query row
        return Packed(ar - start, (same & causal)[:, None])
