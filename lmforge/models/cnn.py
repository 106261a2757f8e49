"""Gated convolutional language model (Dauphin et al. 2017), decoding with rolling input buffers.

Token embedding -> ``n_layers`` residual blocks -> final RMSNorm -> ``lm_head``
(tied to the embedding when ``model.tie_embeddings``). Each block::

    x + dropout(proj(GLU(causal_conv(norm(x)))))

where the causal 1-D convolution (kernel ``model.cnn.kernel_size``, dilation
``dilation_growth ** (i % dilation_cycle)`` for layer ``i``, left padding
``(kernel_size - 1) * dilation``) makes ``2 * expansion * d_model`` channels,
the gated linear unit keeps ``a * sigmoid(b)`` and a 1x1 projection returns to
``d_model``. A position sees only the last :attr:`GatedCNN.receptive_field` tokens.

For decoding, each layer keeps the last ``(kernel_size - 1) * dilation`` inputs
of its convolution (zeros at the start, as the padding), so feeding tokens one by
one computes exactly what ``forward`` computes over the whole sequence, with no
length limit.

Usage::

    from lmforge.config import ModelConfig
    from lmforge.models.cnn import GatedCNN
    model = GatedCNN(ModelConfig(arch="cnn", vocab_size=2048, d_model=256, n_layers=6))
    logits, loss = model(idx, targets)                  # idx, targets: (B, T)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.base import DecodeState, LanguageModel
from lmforge.models.layers import RMSNorm, make_lm_head


class GatedConvBlock(nn.Module):
    """Pre-norm residual block: causal dilated conv -> GLU -> 1x1 projection."""

    def __init__(self, cfg: ModelConfig, dilation: int) -> None:
        super().__init__()
        d, width = cfg.d_model, cfg.cnn.expansion * cfg.d_model
        self.dilation = dilation
        self.pad = (cfg.cnn.kernel_size - 1) * dilation  # past inputs the conv needs at each position
        self.norm = RMSNorm(d)
        self.conv = nn.Conv1d(d, 2 * width, kernel_size=cfg.cnn.kernel_size, dilation=dilation)
        self.proj = nn.Linear(width, d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, buffer: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x`` (B, T, C) -> (output (B, T, C), new buffer or None when ``buffer`` is None)."""
        h = self.norm(x).transpose(1, 2)  # (B, C, T): Conv1d wants channels first
        if buffer is None:
            h = F.pad(h, (self.pad, 0))  # (B, C, pad + T), zeros on the left keep it causal
            new_buffer = None
        else:
            h = torch.cat((buffer.to(h.dtype), h), dim=2)  # (B, C, pad + T)
            # Copy (not a view) so the state does not pin the whole concatenation.
            new_buffer = h[:, :, h.shape[2] - self.pad :].contiguous()  # (B, C, pad)
        a, b = self.conv(h).chunk(2, dim=1)  # each (B, width, T)
        gated = (a * torch.sigmoid(b)).transpose(1, 2)  # (B, T, width)
        return x + self.drop(self.proj(gated)), new_buffer


class GatedCNN(LanguageModel):
    """Gated convolutional LM (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c = cfg.cnn
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            GatedConvBlock(cfg, c.dilation_growth ** (i % c.dilation_cycle)) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = make_lm_head(self.tok_emb, cfg.tie_embeddings)
        self.init_weights()

    @property
    def receptive_field(self) -> int:
        """Tokens that the logits at one position depend on (that position and the ones before it)."""
        return 1 + sum(layer.pad for layer in self.layers)

    def residual_projections(self) -> list[nn.Module]:
        return [layer.proj for layer in self.layers]

    def _run(self, idx: Tensor, buffers: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        x = self.tok_emb(idx)  # (B, T, C)
        new_buffers: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, buf = layer(x, None if buffers is None else buffers[i])
            if buf is not None:
                new_buffers.append(buf)
        return self.norm(x), new_buffers  # (B, T, C): the head is applied by the caller

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self._check_idx(idx)
        h, _ = self._run(idx, None)
        return self.head_loss(h, targets)

    def flops_per_token(self) -> float:
        """``6 * N_matmul``: per layer the convolution (``kernel_size * d_model * 2 * expansion * d_model``)
        and the 1x1 projection (``expansion * d_model * d_model``), plus the ``lm_head`` (``d_model * V``).
        Dilation does not change the work per token; biases, norms and gates are not counted."""
        cfg = self.cfg
        d, width = cfg.d_model, cfg.cnn.expansion * cfg.d_model
        per_layer = cfg.cnn.kernel_size * d * 2 * width + width * d
        return float(6 * (cfg.n_layers * per_layer + d * cfg.vocab_size))

    # ---------------------------------------------------------------- decoding
    def new_state(self, batch_size: int) -> DecodeState:
        """Per layer, the last ``(kernel_size - 1) * dilation`` conv inputs ``(B, d_model, width)``: batch on dim 0."""
        p = self._param_like()
        buffers = tuple(torch.zeros(batch_size, self.cfg.d_model, layer.pad, device=p.device, dtype=p.dtype)
                        for layer in self.layers)
        return DecodeState(buffers, torch.zeros(batch_size, dtype=torch.long), batch_dim=0)

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        self._check_idx(idx)
        state.check_step(idx)
        h, buffers = self._run(idx, list(state.tensors))  # new buffers are fresh tensors: no aliasing
        logits = self.lm_head(h)  # (B, T, V)
        return logits, state.advanced(tuple(buffers), idx.shape[1])
