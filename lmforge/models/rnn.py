"""LSTM and GRU language models, with the recurrent hidden state as their decode state.

Token embedding (``d_model``) -> embedding dropout -> projection to the recurrent
width when ``model.rnn.hidden`` differs from ``d_model`` -> ``n_layers`` of
``torch.nn.LSTM`` / ``torch.nn.GRU`` (fused kernels; dropout ``model.dropout``
between layers) -> output dropout -> projection back to ``d_model`` -> ``lm_head``
(tied to the embedding when ``model.tie_embeddings``).

Training uses truncated backpropagation through time: every ``forward`` starts
from a zero state, so gradients never reach past the training sequence
(``model.context`` tokens); with ``model.rnn.bptt`` they are cut shorter, every
``bptt`` tokens, while the hidden state itself carries on through the whole
sequence. Cutting gradients changes no forward value, so evaluation and decoding
are the same with or without it. Decoding carries ``(h, c)`` (LSTM) or ``h``
(GRU) forward and is unbounded in length.

Usage::

    from lmforge.config import ModelConfig
    from lmforge.models.rnn import LSTMModel
    model = LSTMModel(ModelConfig(arch="lstm", vocab_size=2048, d_model=256, n_layers=2))
    logits, loss = model(idx, targets)                  # idx, targets: (B, T)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.base import DecodeState, LanguageModel
from lmforge.models.layers import make_lm_head


class RecurrentLM(LanguageModel):
    """Shared body of the LSTM and GRU models; subclasses choose the recurrent module."""

    rnn_class: type[nn.RNNBase]
    n_gates: int  # gate blocks per recurrent matmul: 4 for the LSTM (i, f, g, o), 3 for the GRU (r, z, n)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.hidden = cfg.rnn.hidden or d
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.emb_drop = nn.Dropout(cfg.rnn.embed_dropout)
        # Projections exist only when the recurrent width differs from the embedding width.
        self.in_proj = nn.Linear(d, self.hidden, bias=False) if self.hidden != d else None
        self.rnn = self.rnn_class(
            self.hidden,
            self.hidden,
            num_layers=cfg.n_layers,
            batch_first=True,
            # torch warns about (and ignores) inter-layer dropout with one layer.
            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0,
        )
        self.out_drop = nn.Dropout(cfg.dropout)
        self.out_proj = nn.Linear(self.hidden, d, bias=False) if self.hidden != d else None
        self.lm_head = make_lm_head(self.tok_emb, cfg.tie_embeddings)
        self.init_weights()

    def _run(self, idx: Tensor, init: Any = None) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        x = self.emb_drop(self.tok_emb(idx))  # (B, T, d_model)
        if self.in_proj is not None:
            x = self.in_proj(x)  # (B, T, hidden)
        y, new = self._recur(x, init)  # y: (B, T, hidden)
        y = self.out_drop(y)
        if self.out_proj is not None:
            y = self.out_proj(y)  # (B, T, d_model)
        return y, new  # (B, T, d_model): the head is applied by the caller

    def _recur(self, x: Tensor, init: Tensor | tuple[Tensor, Tensor] | None) -> tuple[Tensor, Any]:
        """The recurrent stack over ``x`` (B, T, hidden); with ``model.rnn.bptt``, truncated when training."""
        bptt = self.cfg.rnn.bptt
        if bptt is None or x.shape[1] <= bptt or not (self.training and torch.is_grad_enabled()):
            return self.rnn(x, init)  # one fused call over the whole sequence
        outs, state = [], init
        for start in range(0, x.shape[1], bptt):
            y, state = self.rnn(x[:, start : start + bptt], state)  # y: (B, <=bptt, hidden)
            outs.append(y)
            # The next chunk starts from this state's values but cannot send gradients back through it.
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return torch.cat(outs, dim=1), state

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self._check_idx(idx)
        h, _ = self._run(idx, None)  # zero initial state: truncated BPTT over this sequence
        return self.head_loss(h, targets)

    def flops_per_token(self) -> float:
        """``6 * N_matmul``: per layer ``n_gates * hidden * (hidden + hidden)`` (input and recurrent
        gate matmuls), the two width projections when present (``2 * d_model * hidden``) and the
        ``lm_head`` (``d_model * V``). Biases and the gates' elementwise work are not counted."""
        d, h = self.cfg.d_model, self.hidden
        n_matmul = self.cfg.n_layers * self.n_gates * h * (h + h) + d * self.cfg.vocab_size
        if h != d:
            n_matmul += 2 * d * h
        return float(6 * n_matmul)

    # ---------------------------------------------------------------- decoding
    def new_state(self, batch_size: int) -> DecodeState:
        """Hidden ``h`` (and for the LSTM the cell ``c``), each ``(n_layers, B, hidden)``: batch on dim 1."""
        p = self._param_like()
        shape = (self.cfg.n_layers, batch_size, self.hidden)
        tensors = tuple(torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(2 if self.n_gates == 4 else 1))
        return DecodeState(tensors, torch.zeros(batch_size, dtype=torch.long), batch_dim=1)

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        self._check_idx(idx)
        state.check_step(idx)
        # nn.LSTM takes its state as (h, c), nn.GRU as h alone.
        h, new = self._run(idx, state.tensors if len(state.tensors) == 2 else state.tensors[0])
        logits = self.lm_head(h)  # (B, T, V)
        return logits, state.advanced(tuple(new) if isinstance(new, tuple) else (new,), idx.shape[1])


class LSTMModel(RecurrentLM):
    """LSTM language model (``model.arch = "lstm"``)."""

    rnn_class = nn.LSTM
    n_gates = 4


class GRUModel(RecurrentLM):
    """GRU language model (``model.arch = "gru"``)."""

    rnn_class = nn.GRU
    n_gates = 3
