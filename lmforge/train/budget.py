"""The schedule's length: ``train.steps`` as given, or sized to the time budget (``train.steps: auto``).

With ``steps: auto`` and ``train.max_seconds`` set, :class:`StepBudget` times the training steps
(leaving out the first :data:`SKIP_STEPS` of each process, which pay for allocations, caches and
``torch.compile``) and keeps the most recent ones that add up to :data:`WINDOW_FRACTION` of the budget
(at least :data:`MIN_WINDOW_STEPS`). Once that window is first full, and again after every step, it
estimates the total: ``steps done + (budget * (1 - MARGIN) - seconds spent) / step time``, the step
time being the window's mean or, when slower, the mean of its newer half (a slowdown is followed twice
as fast as a speedup: a total too long runs out of time before its decay completes, while one too
short only leaves a little of the budget unused). The estimate follows a machine whose speed drifts during warmup and the stable phase, where
the rate does not depend on the total. It is frozen when the decay starts (the first step at or past
the decay's start for the current estimate): from there the decay has a fixed length and ends on
``min_lr_ratio x lr`` at the frozen total, so the schedule no longer moves. Warmup still counts in
steps (``train.warmup_steps``). ``cosine`` and ``linear`` decay from the end of warmup, so their total
is frozen at the first estimate; ``constant`` never decays and follows the estimate to its end.

The budget counts what ``train.max_seconds`` counts: the time of the training steps, evaluation and
checkpoints excluded (:meth:`lmforge.train.job.TrainJob.out_of_time`).

Resume: every checkpoint holds the estimator's whole state (``schedule``: the window of step times,
the estimate, and once frozen the decay's start), so a resumed run continues the schedule decided so
far. What is exact: a total frozen before the checkpoint is kept as it was, and an estimate not yet
frozen continues from the saved window, then follows this process's step times (its own first
:data:`SKIP_STEPS` left out, as in every process). A resumed run therefore ends bitwise where the
unbroken run ends when its steps take the same time (same machine, threads and load); on a machine
that is slower or faster after the resume, the stable phase is re-sized to the budget left, which is
the point of the budget. With a whole number of steps nothing here acts::

    budget = StepBudget(cfg.train)
    while not budget.done(step):
        lr = lr_at(step, cfg.train, budget.steps, budget.decay_start)
        ...                                   # one training step, taking dt seconds
        budget.measure(step + 1, spent, dt)   # re-estimates budget.steps; freezes it when the decay starts
"""

from __future__ import annotations

from lmforge.config import ConfigError, TrainConfig

SKIP_STEPS = 3  # steps 0-2 of each process are left out: first allocations, caches, torch.compile
WINDOW_FRACTION = 0.05  # the step time is the mean over the most recent 5% of the budget...
MIN_WINDOW_STEPS = 5  # ... and over at least this many steps
MARGIN = 0.03  # the schedule aims at 97% of the budget: step times wander by a few percent during a run
MIN_STEPS = 10  # steps after warmup that a budget must buy, or the run would train nothing worth keeping


def _mean(times: list[float]) -> float:
    return sum(times) / len(times)


class BudgetTooSmall(ConfigError):
    """The budget buys fewer steps than warmup + MIN_STEPS of this model here; the message names the settings."""


class StepBudget:
    """How many optimizer steps the run's schedule spans; Stateful, re-estimated until the decay for ``steps: auto``."""

    def __init__(self, tc: TrainConfig) -> None:
        self.auto = tc.steps == "auto"
        self.max_seconds = tc.max_seconds
        self.warmup, self.schedule, self.decay_fraction = tc.warmup_steps, tc.schedule, tc.decay_fraction
        self.steps: int | None = None if self.auto else int(tc.steps)
        self.decay_start: int | None = None  # set when an auto total is frozen (wsd: the step its decay began)
        self.frozen = not self.auto
        self.seconds_per_step: float | None = None  # the window's mean at the last estimate
        self.window: list[float] = []  # the most recent step times past each process's SKIP_STEPS
        self.seen = 0  # steps run by this process (not saved: every process skips its own first steps)

    def done(self, step: int) -> bool:
        """Whether the schedule is complete after ``step`` steps (never before its length is estimated)."""
        return self.steps is not None and step >= self.steps

    def measure(self, step: int, spent: float, dt: float) -> None:
        """Record one step of ``dt`` seconds (``step`` steps and ``spent`` training seconds done in all); estimate
        the total once the window is full (or the budget ran out first), and freeze it when the decay starts."""
        if self.frozen:
            return
        assert self.max_seconds is not None  # the config refuses steps: auto without it
        self.seen += 1
        if self.seen > SKIP_STEPS:
            self.window.append(dt)
            limit = WINDOW_FRACTION * self.max_seconds
            while len(self.window) > MIN_WINDOW_STEPS and sum(self.window[1:]) >= limit:
                self.window.pop(0)  # the oldest time is no longer needed to fill the window
        full = len(self.window) >= MIN_WINDOW_STEPS and sum(self.window) >= WINDOW_FRACTION * self.max_seconds
        if self.steps is not None or full or spent >= self.max_seconds:
            self._estimate(step, spent)

    def _estimate(self, step: int, spent: float) -> None:
        per_step = max(_mean(self.window), _mean(self.window[len(self.window) // 2 :])) if self.window else spent / step
        assert self.max_seconds is not None
        total = step + max(0, int((self.max_seconds * (1 - MARGIN) - spent) / per_step))
        first = self.steps is None
        if first and total < self.warmup + MIN_STEPS:
            raise BudgetTooSmall(
                f"train.max_seconds ({self.max_seconds:g} s) buys about {total} steps of this model here "
                f"({per_step:.3g} s each), fewer than train.warmup_steps ({self.warmup}) + {MIN_STEPS}; raise "
                f"train.max_seconds, lower train.warmup_steps, or train a smaller model")
        self.steps, self.seconds_per_step = max(total, step), per_step
        if self.schedule in ("cosine", "linear"):
            self.frozen = True  # their decay runs from the end of warmup: the first estimate is the one
        elif self.schedule == "wsd" and step >= self._wsd_start(self.steps):
            # The decay starts at this step whatever the estimate said before: a total that fell (a slower machine)
            # gets a shorter decay, never a jump into the middle of one.
            self.frozen, self.decay_start = True, max(self.warmup, min(step, self.steps - 1))

    def _wsd_start(self, total: int) -> int:
        """Where warmup-stable-decay's decay starts for ``total`` steps (:func:`lmforge.train.optim.lr_at`'s rule)."""
        return max(total - max(1, round(self.decay_fraction * total)), self.warmup)

    def summary(self, train_seconds: float) -> dict:
        """For the run's summary and card: the budget, the length chosen and the share of the budget used."""
        return {"max_seconds": self.max_seconds, "steps": "auto" if self.auto else self.steps,
                "calibrated_steps": self.steps, "decay_start": self.decay_start,
                "seconds_per_step": self.seconds_per_step,
                "used_fraction": round(train_seconds / self.max_seconds, 4) if self.max_seconds else None}

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        return {"steps": self.steps, "seconds_per_step": self.seconds_per_step, "frozen": self.frozen,
                "decay_start": self.decay_start, "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        """The schedule decided before the checkpoint; ``steps: auto`` only (a number in the config wins). A state
        without ``frozen`` comes from a version that fixed the total once: it stays fixed."""
        if not self.auto or (state.get("steps") is None and not state.get("window")):
            return
        self.steps = None if state.get("steps") is None else int(state["steps"])
        self.seconds_per_step = state.get("seconds_per_step")
        self.frozen = bool(state.get("frozen", True))
        self.decay_start = state.get("decay_start")
        self.window = [float(t) for t in state.get("window", [])]
