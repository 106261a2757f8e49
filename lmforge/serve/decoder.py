"""How a decode batch runs its model: one step, or ``n`` greedy steps in one call (the lookahead).

:class:`Decoder` is the plain way, through the model's own ``step`` (the
:class:`~lmforge.models.base.LanguageModel` contract) for every architecture. An
accelerator for one architecture subclasses it and is applied by the engine from
outside the model, when it applies (:func:`lmforge.serve.fast_transformer.accelerate`);
nothing else in ``lmforge/serve`` knows which model it runs.

Example::

    decoder = Decoder(model)
    logits, state = decoder.step(idx, state)                    # idx (B, T)
    picked, logprobs, last, state = decoder.greedy(idx, state, 8)   # idx (B, 1): 8 steps, 7 argmax tokens
"""

from __future__ import annotations

from torch import Tensor, nn

from lmforge.models.base import DecodeState
from lmforge.serve.sampling import GreedyRun, greedy_steps


class Decoder:
    """Decodes through ``model.step``; accelerators override :meth:`step` and :meth:`greedy`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """``model.step``: logits ``(B, T, V)`` of ``idx`` (B, T) and the state after it."""
        return self.model.step(idx, state)

    def greedy(self, idx: Tensor, state: DecodeState, n: int) -> GreedyRun:
        """Feed ``idx`` (B, 1), then ``n - 1`` argmax choices: see :func:`~lmforge.serve.sampling.greedy_steps`."""
        return greedy_steps(self.step, idx, state, n)
