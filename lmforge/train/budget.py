"""The schedule's length: ``train.steps`` as given, or sized to the time budget (``train.steps: auto``).

With ``steps: auto`` and ``train.max_seconds`` set, :class:`StepBudget` measures the time of the
training steps over the first seconds of the run (leaving out the first :data:`SKIP_STEPS`, which pay
for allocations, caches and ``torch.compile``), and once :data:`WINDOW_FRACTION` of the budget is
measured it fixes the total so that warmup, the stable phase and the decay all end inside the budget:
``total = steps done + (budget * (1 - MARGIN) - seconds spent) / mean step time``. Warmup still counts
in steps (``train.warmup_steps``); only the total is chosen. Until it is, the rate warms up and then
holds at ``train.lr``, which is every schedule's rate there except cosine's (whose decay then starts
from the step the length is fixed: use ``wsd`` with ``auto``).

The budget counts what ``train.max_seconds`` counts: the time of the training steps, evaluation and
checkpoints excluded (:meth:`lmforge.train.job.TrainJob.out_of_time`), so periodic and final
evaluations need no share of it. The chosen total is part of the job's state (``schedule`` in every
checkpoint), so a resumed run continues the same schedule exactly and never measures again. With a
whole number of steps nothing here acts: ``total`` is ``train.steps``, and checkpoints hold what they
always held::

    budget = StepBudget(cfg.train)
    while not budget.done(step):
        lr = lr_at(step, cfg.train, budget.steps)
        ...                                   # one training step, taking dt seconds
        budget.measure(step + 1, spent, dt)   # fixes budget.steps once the window is measured
"""

from __future__ import annotations

from lmforge.config import ConfigError, TrainConfig

SKIP_STEPS = 3  # steps 0-2 of each process are left out: first allocations, caches, torch.compile
WINDOW_FRACTION = 0.05  # measure the step time over the first 5% of the budget...
MIN_WINDOW_STEPS = 5  # ... and over at least this many steps
MARGIN = 0.03  # the schedule aims at 97% of the budget: step times wander by a few percent during a run
MIN_STEPS = 10  # steps after warmup that a budget must buy, or the run would train nothing worth keeping


class BudgetTooSmall(ConfigError):
    """The budget buys fewer steps than warmup + MIN_STEPS of this model here; the message names the settings."""


class StepBudget:
    """How many optimizer steps the run's schedule spans; Stateful, measured once for ``steps: auto``."""

    def __init__(self, tc: TrainConfig) -> None:
        self.auto = tc.steps == "auto"
        self.max_seconds = tc.max_seconds
        self.warmup = tc.warmup_steps
        self.steps: int | None = None if self.auto else int(tc.steps)
        self.seconds_per_step: float | None = None  # the measured mean, once fixed
        self.times: list[float] = []  # this process's step times past SKIP_STEPS (not saved: resumes never remeasure)
        self.seen = 0  # steps run by this process

    def done(self, step: int) -> bool:
        """Whether the schedule is complete after ``step`` steps (never before its length is fixed)."""
        return self.steps is not None and step >= self.steps

    def measure(self, step: int, spent: float, dt: float) -> None:
        """Record one step of ``dt`` seconds (``step`` steps and ``spent`` training seconds done in all);
        fixes the length when the window is measured, or when the budget ran out before it was."""
        if self.steps is not None:
            return
        self.seen += 1
        if self.seen > SKIP_STEPS:
            self.times.append(dt)
        assert self.max_seconds is not None  # the config refuses steps: auto without it
        window = len(self.times) >= MIN_WINDOW_STEPS and sum(self.times) >= WINDOW_FRACTION * self.max_seconds
        if window or spent >= self.max_seconds:
            self._fix(step, spent)

    def _fix(self, step: int, spent: float) -> None:
        per_step = sum(self.times) / len(self.times) if self.times else spent / step
        assert self.max_seconds is not None
        total = step + max(0, int((self.max_seconds * (1 - MARGIN) - spent) / per_step))
        if total < self.warmup + MIN_STEPS:
            raise BudgetTooSmall(
                f"train.max_seconds ({self.max_seconds:g} s) buys about {total} steps of this model here "
                f"({per_step:.3g} s each), fewer than train.warmup_steps ({self.warmup}) + {MIN_STEPS}; raise "
                f"train.max_seconds, lower train.warmup_steps, or train a smaller model")
        self.steps, self.seconds_per_step = total, per_step

    def summary(self, train_seconds: float) -> dict:
        """For the run's summary and card: the budget, the length chosen and the share of the budget used."""
        return {"max_seconds": self.max_seconds, "steps": "auto" if self.auto else self.steps,
                "calibrated_steps": self.steps, "seconds_per_step": self.seconds_per_step,
                "used_fraction": round(train_seconds / self.max_seconds, 4) if self.max_seconds else None}

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        return {"steps": self.steps, "seconds_per_step": self.seconds_per_step}

    def load_state_dict(self, state: dict) -> None:
        """A length fixed before the checkpoint is kept; ``steps: auto`` only (a number in the config wins)."""
        if self.auto and state.get("steps") is not None:
            self.steps, self.seconds_per_step = int(state["steps"]), state.get("seconds_per_step")
