"""Stopping on validation: early stopping, and an outside judge such as a sweep's pruner.

The training loop hands every validation estimate to :meth:`EarlyStopper.update`, which says
whether to stop now. Two reasons can end a run early:

- ``early_stop``: the validation loss has not improved on its best by more than ``min_delta``
  for ``patience`` estimates in a row (``train.early_stop_patience``, 0 = off);
- ``pruned``: the ``on_eval(step, metrics)`` callable returned True (``lmforge sweep`` passes one
  that reports the value to its Optuna trial and asks whether the trial should be pruned).

The state (best loss, its step, estimates without improvement) is saved with each checkpoint, so a
resumed run stops exactly where an uninterrupted one would. The decision is a pure function of the
metrics it is given: with several processes, every rank must be handed the same (all-reduced)
validation loss so that all ranks stop at the same step::

    stopper = EarlyStopper(patience=3, min_delta=0.01)
    ...
    last_step = stopper.update(step, val_metrics) or last_step
    ...
    if stopper.reason: stopped_by = stopper.reason      # "early_stop" or "pruned"
"""

from __future__ import annotations

import math
from collections.abc import Callable

OnEval = Callable[[int, dict], bool]


class EarlyStopper:
    """Decides after each validation estimate whether training should stop; see the module docstring."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, on_eval: OnEval | None = None) -> None:
        if patience < 0 or min_delta < 0:
            raise ValueError(f"patience ({patience}) and min_delta ({min_delta}) must be >= 0")
        self.patience, self.min_delta, self.on_eval = patience, min_delta, on_eval
        self.best = math.inf
        self.best_step = 0
        self.bad_evals = 0  # estimates in a row without an improvement of more than min_delta
        self.reason: str | None = None

    def update(self, step: int, metrics: dict) -> bool:
        """Record the validation ``metrics`` (with a ``loss``) of ``step``; True = stop after this step."""
        loss = float(metrics["loss"])
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
        else:
            self.bad_evals += 1
        if self.on_eval is not None and self.on_eval(step, metrics):
            self.reason = "pruned"
        elif self.patience and self.bad_evals >= self.patience:
            self.reason = "early_stop"
        return self.reason is not None

    def summary(self) -> dict:
        """What the run's outputs record: the best validation loss and its step."""
        return {"best_val_loss": self.best if math.isfinite(self.best) else None, "best_step": self.best_step}

    def state_dict(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "best_step": self.best_step,
                "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.best_step = int(state.get("best_step", 0))
        self.bad_evals = int(state.get("bad_evals", 0))
