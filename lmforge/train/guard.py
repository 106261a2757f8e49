"""The training loop's guard against bad numbers: a NaN, infinite or spiking loss skips an update.

:class:`StepGuard` looks at each step's loss and gradient norm before the optimizer runs. A NaN or
infinite value (or, with ``train.spike_factor``, a loss above that multiple of the running mean) makes
the loop skip the update:

- parameters, optimizer state (moments, step count), the step counter and so the LR schedule are
  untouched: the next attempt is the same step again;
- the batch is consumed: the loader moves past it, so the next attempt sees new data;
- the skip is written to ``metrics.jsonl`` as ``{"kind": "skip", "step": <the step attempted>,
  "reason", "loss", "grad_norm", "loader": {"epoch", "cursor"}, "windows": [[shard, start token], ...]}``;
- after ``train.max_bad_steps`` in a row, :class:`BadStepsError` ends the run (the CLI exits 1);
  no checkpoint is written, so the last good one is what a resume starts from.

The check is one ``torch.isfinite`` on the loss and the norm already computed (a device sync on a GPU,
free on a CPU); the spike guard also reads the loss value, so it is off by default.

A failed checkpoint save is the checkpointer's to handle (``train.on_save_error``, in
:class:`lmforge.train.checkpoint.Checkpointer`). Used by ``lmforge/train/loop.py``::

    guard = StepGuard(tc.max_bad_steps, tc.spike_factor, batch * tc.grad_accum, hint="...")
    if guard.skip(step, step_loss, grad_norm, loader, at, logger): ...   # no update this time
"""

from __future__ import annotations

import math
import sys

import torch

from lmforge.data.loader import TokenLoader
from lmforge.train.metrics import MetricsLogger

SPIKE_BETA = 0.95  # running mean of the loss over roughly the last 20 good steps
SPIKE_WARMUP = 20  # good steps seen before the spike guard judges (the mean must settle first)
MAX_WINDOWS_LOGGED = 64  # a skip record names at most this many windows of its batch


class BadStepsError(FloatingPointError):
    """Too many updates in a row had a non-finite (or spiking) loss or gradient norm."""


class StepGuard:
    """Decides, step by step, whether an update is safe to apply; see the module docstring."""

    def __init__(self, max_bad_steps: int, spike_factor: float | None = None, windows_per_step: int = 1,
                 hint: str = "") -> None:
        self.max_bad_steps = max_bad_steps
        self.windows_per_step = windows_per_step  # batch_size x grad_accum: the windows one attempt consumes
        self.spike_factor = spike_factor
        self.hint = hint
        self.skipped = 0  # over the whole run (restored on resume)
        self.in_a_row = 0
        self.mean, self.good = 0.0, 0  # spike guard: running mean of good losses and how many it holds

    def _reason(self, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> tuple[str | None, float]:
        # The loop passes the global batch's loss and norm, the same on every rank, so all ranks agree.
        grad_norm = torch.as_tensor(grad_norm)
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # the only per-step sync
            return ("nonfinite_loss" if not torch.isfinite(loss) else "nonfinite_grad_norm"), float(loss)
        if not self.spike_factor:
            return None, math.nan
        value = loss.item()
        if self.good >= SPIKE_WARMUP:
            mean = self.mean / (1 - SPIKE_BETA ** self.good)  # bias-corrected, as Adam does
            if value > self.spike_factor * mean:
                return "loss_spike", value
        self.mean = SPIKE_BETA * self.mean + (1 - SPIKE_BETA) * value
        self.good += 1
        return None, value

    def skip(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float, loader: TokenLoader,
             at: dict, logger: MetricsLogger) -> bool:
        """True if the update of step ``step + 1`` must be skipped; ``at`` is the loader state before its batches.

        Raises :class:`BadStepsError` on the ``max_bad_steps``-th bad step in a row.
        """
        reason, value = self._reason(loss, grad_norm)
        if reason is None:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        name = getattr(loader, "windows_from", None)  # token shards name their windows; other loaders their position
        windows = name(at["epoch"], at["cursor"], min(self.windows_per_step, MAX_WINDOWS_LOGGED)) if name else []
        norm = float(grad_norm)
        logger.log(step + 1, "skip", {"reason": reason, "loss": value, "grad_norm": norm,
                                      "loader": at,
                                      "windows": windows, "in_a_row": self.in_a_row, "skipped": self.skipped})
        print(f"warning: step {step + 1} skipped ({reason}: loss {value:.4g}, grad norm {norm:.4g}; batch at "
              f"loader position {_position(at)}); {self.in_a_row} in a row, the run stops at "
              f"{self.max_bad_steps}", file=sys.stderr, flush=True)
        if self.in_a_row >= self.max_bad_steps:
            logger.close()  # the skip records reach the disk before the run ends
            raise BadStepsError(f"training stopped at step {step + 1}: {self.in_a_row} bad steps in a row (train."
                                f"max_bad_steps={self.max_bad_steps}; last: {reason}, loss {value:.4g}, grad norm "
                                f"{norm:.4g}); no update was applied from them. {self.hint}")
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "mean": self.mean, "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.mean, self.good = float(state.get("mean", 0.0)), int(state.get("good", 0))


def _position(state: dict) -> str:
    return ", ".join(f"{k} {state[k]}" for k in ("epoch", "cursor") if k in state) or "unknown"

