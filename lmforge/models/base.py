"""The LanguageModel contract that every registry model implements.

Training, evaluation, fine-tuning and serving talk to models only through this
interface, so no code outside ``lmforge/models`` branches on the architecture:

- ``forward(idx, targets=None) -> (logits, loss)``: ``idx`` and ``targets`` are
  ``(B, T)`` int64; logits are ``(B, T, V)``; the loss is the float32 mean
  cross-entropy over the targets that are not ``-100``. In training with targets
  the logits may be None: the head and the loss then run fused (``head_loss``).
- ``init_weights()``: deterministic given torch's RNG; the constructor calls it.
- ``num_params()`` and ``flops_per_token()`` (training flops, for MFU).
- ``new_state(B)`` / ``step(idx, state) -> (logits, state)`` / ``reorder_state``
  / ``concat_states`` / ``max_state_len``: incremental decoding. Feeding a
  sequence through ``step`` in chunks of any sizes gives the logits of one
  ``forward`` over the whole of it. States of different lengths can be
  concatenated into one batch and stepped together (the serving engine's
  continuous batching), each row continuing exactly as it would alone.
  ``decode_greedy(idx, state, n)`` runs ``n`` steps with argmax choices in one
  call (a default loop over ``step``; models may make it faster).

Example::

    model = build_model(cfg.model)                # lmforge.models.build_model
    logits, loss = model(idx, targets)            # training
    model.eval()
    with torch.inference_mode():
        state = model.new_state(batch_size=idx.shape[0])
        logits, state = model.step(idx, state)    # prefill
        logits, state = model.step(next_ids, state)   # one more token, (B, 1)

Model code is single-device: mixed precision, compile, DDP / FSDP and LoRA are
applied from outside.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.head_loss import head_cross_entropy
from lmforge.models.layers import RMSNorm, causal_lm_loss


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
    def new_state(self, batch_size: int) -> Any:
        """An empty decode state for ``batch_size`` sequences, on the model's device and dtype."""

    @abstractmethod
    def step(self, idx: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Feed ``idx`` (B, T_new) after what ``state`` has seen: ``(logits (B, T_new, V), new state)``.

        ``state`` is not modified in a way visible to its holder: it stays usable,
        so a caller may branch (step it again with other tokens).
        """

    @abstractmethod
    def reorder_state(self, state: Any, index: Tensor) -> Any:
        """A state holding only the batch rows ``index`` (int64, any order, repeats allowed)."""

    @abstractmethod
    def concat_states(self, states: list[Any]) -> Any:
        """One state holding the rows of ``states`` in order; they may have seen different numbers of tokens.

        Stepping the result with one token per row gives each row the logits it
        would get stepped alone (for a bounded state, every row stays within
        ``max_state_len``). The inputs stay valid.
        """

    def decode_greedy(self, idx: Tensor, state: Any, n: int) -> tuple[Tensor, Tensor, Tensor, Any]:
        """Feed ``idx`` (B, 1), then ``n - 1`` greedy choices of the model's own: ``n`` steps in one call.

        See :func:`greedy_loop`, which this is unless a model overrides it with a faster loop.
        """
        return greedy_loop(self, idx, state, n)

    def compile_decoding(self) -> bool:
        """Compile the one-token decode step (``torch.compile``) where the model has one; True if it did.

        The first compiled step pays the compile (seconds to a minute on a CPU; cached on disk by
        inductor afterwards), so servers opt in and one-shot generation does not.
        """
        return False

    @property
    def max_state_len(self) -> int | None:
        """The longest total sequence a decode state can hold; None = unbounded."""
        return None

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


def greedy_loop(model: nn.Module, idx: Tensor, state: Any, n: int) -> tuple[Tensor, Tensor, Tensor, Any]:
    """``n`` calls of ``model.step``, the first fed ``idx`` (B, 1) and each later one the argmax of the last.

    Returns ``(picked, logprobs, last, state)``: ``picked`` (B, n - 1) int64 are the argmax tokens fed
    after ``idx``, ``logprobs`` (B, n - 1) float32 their log-probabilities, and ``last`` (B, V) the
    logits after the final step, for the caller's next choice. The serving engine uses it (through
    ``decode_greedy`` where a model has one) to spend its per-token bookkeeping once per ``n`` tokens.
    """
    picked, logprobs = [], []
    logits, state = model.step(idx, state)
    last = logits[:, -1, :]
    for _ in range(n - 1):
        token = last.argmax(dim=-1, keepdim=True)  # (B, 1)
        logprobs.append(torch.log_softmax(last.float(), dim=-1).gather(-1, token))
        picked.append(token)
        logits, state = model.step(token, state)
        last = logits[:, -1, :]
    if not picked:
        return idx.new_zeros(idx.shape[0], 0), last.new_zeros(idx.shape[0], 0, dtype=torch.float32), last, state
    return torch.cat(picked, dim=1), torch.cat(logprobs, dim=1), last, state
