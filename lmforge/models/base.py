"""The LanguageModel contract that every registry model implements.

Training, evaluation, fine-tuning and serving talk to models only through this
interface, so no code outside ``lmforge/models`` branches on the architecture:

- ``forward(idx, targets=None) -> (logits, loss)``: ``idx`` and ``targets`` are
  ``(B, T)`` int64; logits are ``(B, T, V)``; the loss is the float32 mean
  cross-entropy over the targets that are not ``-100``. In training with targets
  the logits may be None: the head and the loss then run fused (``head_loss``).
- ``init_weights()``: deterministic given torch's RNG; the constructor calls it.
- ``num_params()`` and ``flops_per_token()`` (training flops, for MFU).
- ``new_state(B)`` / ``step(idx, state) -> (logits, state)``: incremental
  decoding. Feeding a sequence through ``step`` in chunks of any sizes (one token
  or a short span) gives the logits of one ``forward`` over the whole of it.
  ``step`` may write into the state's tensors in place: the caller goes on with the
  state it returns and drops the one it passed.

Every model's decode state is a :class:`DecodeState`: a tuple of tensors that all
carry the batch on one declared dimension, the number of tokens each row has seen,
and the most a row can hold. Serving (``lmforge/serve``) joins, drops and reorders
rows with ``index_select`` / ``cat`` on that dimension and never asks the model.
That works because a model's state tensors have the same shape whatever the rows
have seen (a Transformer's KV cache is allocated for the whole context, a row
keeping its keys in columns ``[0, lens[b])``), so rows of different lengths sit in
one batch with no padding. Choosing tokens, batching requests and lookahead live in
``lmforge/serve``; a model returns logits.

Example::

    model = build_model(cfg.model)                # lmforge.models.build_model
    logits, loss = model(idx, targets)            # training
    model.eval()
    with torch.inference_mode():
        state = model.new_state(batch_size=idx.shape[0])
        logits, state = model.step(idx, state)    # prefill
        logits, state = model.step(next_ids, state)   # one more token, (B, 1)

Model code is single-device: mixed precision, compile, DDP / FSDP, LoRA and
architecture-specific decode speed-ups (``lmforge/serve/fast_transformer.py``) are
applied from outside.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.head_loss import head_cross_entropy
from lmforge.models.layers import RMSNorm, causal_lm_loss


@dataclass(frozen=True)
class DecodeState:
    """A decode state that serving can batch without knowing the architecture.

    ``tensors``: everything the model carries between steps, each tensor with the
    batch on dimension ``batch_dim`` and, across states of one model, the same shape
    on every other dimension. ``lens`` (B,) int64 on the CPU: tokens each row has
    seen. ``capacity``: the most tokens a row can hold (a preallocated cache's
    length), None when unbounded. Rows are selected and joined by
    ``index_select`` / ``cat`` of every tensor on ``batch_dim`` (and of ``lens``),
    which is all ``lmforge.serve.batch`` does with a state.
    """

    tensors: tuple[Tensor, ...]
    lens: Tensor
    batch_dim: int = 0
    capacity: int | None = None

    @property
    def batch_size(self) -> int:
        return int(self.lens.shape[0])

    def advanced(self, tensors: tuple[Tensor, ...], new_tokens: int) -> DecodeState:
        """This state after a step of ``new_tokens`` per row, now holding ``tensors``."""
        return replace(self, tensors=tensors, lens=self.lens + new_tokens)

    def check_step(self, idx: Tensor) -> list[int]:
        """``lens`` as a list, after checking that ``idx`` (B, T) fits: the state's rows, within ``capacity``."""
        if idx.shape[0] != self.batch_size:
            raise ValueError(f"idx has {idx.shape[0]} rows but the decode state holds {self.batch_size}")
        lens = self.lens.tolist()  # one conversion instead of a max and an any over a tensor
        longest = max(lens, default=0)
        if self.capacity is not None and longest + idx.shape[1] > self.capacity:
            raise ValueError(
                f"decode state holds {longest} tokens; {idx.shape[1]} more would make {longest + idx.shape[1]}, "
                f"past model.context ({self.capacity}): re-prefill a shorter window"
            )
        return lens

class LanguageModel(nn.Module, ABC):
    """Abstract base of the registry models; see the module docstring for the contract.

    Subclasses build their modules in ``__init__`` (after calling this one), name
    the token embedding ``tok_emb`` and the output projection ``lm_head``, and then
    call :meth:`init_weights`.
    """

    tok_emb: nn.Embedding
    lm_head: nn.Linear

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size is {cfg.vocab_size}: set it to the tokenizer's vocabulary size before building "
                f"the model (0 means 'take it from the tokenizer', which the caller must resolve)"
            )
        self.cfg = cfg

    # ------------------------------------------------------------------ training
    @abstractmethod
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx`` (B, T) -> ``(logits (B, T, V), loss or None)``; loss ignores targets equal to -100.

        Training with targets may return ``(None, loss)`` (see :meth:`head_loss`).
        """

    def head_loss(self, h: Tensor, targets: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(logits, loss)`` from the final hidden states ``h`` (B, T, d) through ``lm_head``.

        While training on a CPU (train mode, gradients on, no autocast, a plain ``nn.Linear`` head) with
        targets, the head and the loss run fused and chunked (:mod:`lmforge.models.head_loss`) and
        the logits are not returned (None): the training loop needs only the loss. Otherwise the
        logits are computed whole and the loss, when targets are given, from them.
        """
        head = self.lm_head
        # CPU only: the chunks are sized for a core's cache (measured there); on a GPU they would be many tiny matmuls.
        if (targets is not None and self.training and torch.is_grad_enabled() and type(head) is nn.Linear
                and h.device.type == "cpu" and not torch.is_autocast_enabled(h.device.type)):
            flat = h.reshape(-1, h.shape[-1])
            return None, head_cross_entropy(flat, head.weight, head.bias, targets.reshape(-1))
        logits = head(h)  # (B, T, V)
        return logits, None if targets is None else causal_lm_loss(logits, targets)

    def residual_projections(self) -> list[nn.Module]:
        """Modules whose output is added onto a residual stream (GPT-2 scales their init down)."""
        return []

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter from torch's global RNG, in module order (so a seed fixes the result).

        Matrices, convolution kernels and embeddings get ``normal(0, init_std)``;
        the projections listed by :meth:`residual_projections` get
        ``normal(0, init_std / sqrt(number of residual branches))`` as in GPT-2, so
        the residual stream's variance does not grow with depth; biases get zeros
        and norm weights ones. A parameter shared by two modules (tied
        embeddings) is initialized once, by its first owner.
        """
        std = self.cfg.init_std
        residual = {id(p) for m in self.residual_projections() for p in m.parameters() if p.dim() > 1}
        residual_std = std / math.sqrt(max(1, len(self.residual_projections())))
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()  # weight ones (and a LayerNorm's bias zeros)
                seen.update(id(p) for p in module.parameters(recurse=False))
                continue
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if name.startswith("bias") or p.dim() == 1:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=residual_std if id(p) in residual else std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied embedding / head matrix counts once).

        ``exclude_embeddings`` leaves out the token embedding table (the usual
        "non-embedding parameters" of scaling laws); when the head is tied to it,
        that shared matrix is left out too, while an untied ``lm_head`` is counted.
        """
        unique = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            unique.pop(id(self.tok_emb.weight), None)
        return sum(p.numel() for p in unique.values())

    @abstractmethod
    def flops_per_token(self) -> float:
        """Training flops (forward + backward = 3x forward) per token, counting every matmul."""

    # ---------------------------------------------------------------- decoding
    @abstractmethod
    def new_state(self, batch_size: int) -> DecodeState:
        """An empty decode state for ``batch_size`` sequences, on the model's device and dtype."""

    @abstractmethod
    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Feed ``idx`` (B, T_new) after what ``state`` has seen: ``(logits (B, T_new, V), new state)``.

        Rows may have seen different numbers of tokens (``state.lens``); each row
        continues exactly as it would alone. The passed state may be written in place.
        """

    # ------------------------------------------------------------------ helpers
    def _param_like(self) -> Tensor:
        """A parameter whose device and dtype decode states should use."""
        return self.tok_emb.weight

    def _check_idx(self, idx: Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")

    def extra_repr(self) -> str:
        return f"arch={self.cfg.arch}, params={self.num_params():,}"
