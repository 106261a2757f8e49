"""The serving scheduler on its own (lmforge/serve/scheduler.py): admission, ordering, cancellation, failures.

Run: ``.venv/bin/pytest tests/serve/test_scheduler.py``. No HTTP: requests go to
:meth:`Scheduler.submit` with a sink that records their events, and the tests wait
for the scheduler thread with :meth:`Scheduler.wait_until` (no sleeps). The model is
``test_engine``'s TinyLM, whose greedy tokens spell a known script, so every
completion is known in advance.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import Tensor

from lmforge.models.base import DecodeState
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.serve.scheduler import Event, QueueFull, Scheduler, Ticket
from tests.serve.test_engine import TOK, TinyLM

SCRIPT = "abcdefghijklmnopqrstuvwxyz"
WAIT = 60.0  # seconds at most for the scheduler thread to reach a state (it takes milliseconds)


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=tokens, stop_token_ids=[])


class Log:
    """Every event of every ticket, in the order the scheduler thread emitted them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []

    def sink(self, name: str):  # noqa: ANN201
        return lambda event: self.events.append((name, event))

    def kinds(self, name: str) -> list[str]:
        return [e.kind for n, e in self.events if n == name]

    def first(self, name: str, kind: str | None = None) -> int:
        """Position in the log of ``name``'s first event (of ``kind`` when given)."""
        return next(i for i, (n, e) in enumerate(self.events) if n == name and kind in (None, e.kind))

    def done(self, name: str) -> Event:
        return next(e for n, e in self.events if n == name and e.kind in ("done", "error"))

    def finished(self, *names: str) -> bool:
        return all(any(n == name and e.kind in ("done", "error") for n, e in self.events) for name in names)


@pytest.fixture
def engine() -> Engine:
    return Engine(TinyLM(script=TOK.encode(SCRIPT)), TOK)


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def make(engine: Engine) -> Iterator:
    made: list[Scheduler] = []

    def build(**kw: int) -> Scheduler:
        made.append(Scheduler(engine, **kw))
        return made[-1]

    yield build
    for sched in made:
        sched.close()


def submit(sched: Scheduler, log: Log, name: str, prompt: str, params: SamplingParams, n: int = 1) -> Ticket:
    params.n = n
    return sched.submit([sched.engine.request(prompt, params)], log.sink(name))


def test_completions_and_deltas_equal_the_engines_and_counters_add_up(engine, make, log):
    sched = make(max_batch=4, max_waiting=4).start()
    submit(sched, log, "a", "abc", greedy(5))
    submit(sched, log, "b", "", greedy(3), n=2)
    assert sched.wait_until(lambda: log.finished("a", "b"), WAIT)
    a, b = log.done("a"), log.done("b")
    assert [c.text for c in a.completions] == ["cdefg"]  # the prompt ends at position 2, which predicts 'c'
    assert [c.text for c in b.completions] == ["abc", "abc"]
    assert [c.token_ids for c in a.completions] == [engine.generate(["abc"], greedy(5))[0].token_ids]
    streamed = [d.text for name, e in log.events if name == "a" and e.kind == "delta" for d in e.deltas]
    assert "".join(streamed) == "cdefg"
    assert log.kinds("a")[-1] == "done" and set(log.kinds("a")[:-1]) == {"delta"}
    assert (sched.prompt_tokens, sched.generated_tokens, sched.finished_requests, sched.failed_requests) == (4, 11, 2, 0)
    assert sched.running == 0 and sched.running_rows == 0 and sched.waiting == 0


def test_admission_follows_arrival_order_and_waits_for_rows(make, log):
    """Tickets queued before the thread starts are admitted first come, first served, while their rows fit:
    a ticket never overtakes an earlier one that does not fit yet."""
    sched = make(max_batch=2, max_waiting=8)
    submit(sched, log, "a", "a", greedy(4))  # 1 row
    submit(sched, log, "big", "b", greedy(4), n=2)  # 2 rows: waits until "a" leaves
    submit(sched, log, "c", "c", greedy(4))  # 1 row: would fit beside "a", but arrived after "big"
    assert sched.waiting == 3 and sched.running == 0  # nothing runs before start()
    sched.start()
    assert sched.wait_until(lambda: log.finished("a", "big", "c"), WAIT)
    assert log.first("a") < log.first("big") < log.first("c")
    assert log.first("a", "done") < log.first("big")  # "big" needed both rows
    assert log.first("big", "done") < log.first("c")  # and "c" did not overtake it
    assert all(log.done(n).kind == "done" for n in ("a", "big", "c"))


def test_requests_that_fit_together_run_together(make, log):
    sched = make(max_batch=3, max_waiting=8)
    for name in ("x", "y", "z"):
        submit(sched, log, name, "", greedy(6))
    sched.start()
    assert sched.wait_until(lambda: log.finished("x", "y", "z"), WAIT)
    # All three rows were admitted at once: each streamed before any of them finished.
    assert max(log.first(n) for n in "xyz") < min(log.first(n, "done") for n in "xyz")


def test_a_ticket_larger_than_the_batch_is_refused(make, log):
    sched = make(max_batch=2, max_waiting=8)
    with pytest.raises(ValueError, match=r"needs 3 sequences .* at most 2 at once \(serve.max_batch\)"):
        submit(sched, log, "a", "a", greedy(2), n=3)
    assert sched.waiting == 0


def test_a_full_queue_answers_queue_full_with_a_retry_hint(make, log):
    sched = make(max_batch=1, max_waiting=1)  # not started: submissions stay queued
    submit(sched, log, "a", "a", greedy(2))
    with pytest.raises(QueueFull, match=r"1 are waiting \(serve.max_waiting = 1\)") as info:
        submit(sched, log, "b", "b", greedy(2))
    assert info.value.retry_after >= 1
    assert sched.waiting == 1
    # With no room to wait, a ticket is still taken when it would run at once.
    idle = make(max_batch=1, max_waiting=0)
    submit(idle, log, "c", "c", greedy(2))
    assert idle.waiting == 1


def test_cancelling_a_running_request_frees_its_rows_for_the_next(engine, make, log):
    sched = make(max_batch=2, max_waiting=8).start()
    endless = submit(sched, log, "endless", "", greedy(10**9), n=2)  # both rows, until cancelled
    assert sched.wait_until(lambda: sched.running_rows == 2 and "delta" in log.kinds("endless"), WAIT)
    submit(sched, log, "next", "xyz", greedy(4))
    assert sched.waiting == 1  # no free row
    sched.cancel(endless)
    assert sched.wait_until(lambda: log.finished("next"), WAIT)
    assert [c.token_ids for c in log.done("next").completions] == [engine.generate(["xyz"], greedy(4))[0].token_ids]
    assert "done" not in log.kinds("endless") and "error" not in log.kinds("endless")
    assert sched.wait_until(lambda: sched.running_rows == 0 and sched.running == 0, WAIT)


def test_cancelling_a_waiting_request_drops_it_before_it_runs(make, log):
    sched = make(max_batch=1, max_waiting=8)
    submit(sched, log, "a", "a", greedy(3))
    queued = submit(sched, log, "b", "b", greedy(3))
    sched.cancel(queued)
    sched.start()
    assert sched.wait_until(lambda: log.finished("a") and sched.waiting == 0 and sched.running == 0, WAIT)
    assert log.kinds("b") == []
    assert sched.prompt_tokens == 1  # only "a" was prefilled


class Faulty(TinyLM):
    """TinyLM whose decode steps (not prefills) fail while ``fail_steps`` is set, and whose 5-token prefill fails."""

    fail_steps = False

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        prefill = int(state.lens.max()) == 0
        if prefill and idx.shape[1] == 5:
            raise RuntimeError("bad prompt")
        if self.fail_steps and not prefill:
            raise RuntimeError("device lost")
        return super().step(idx, state)


def test_a_failing_step_fails_its_batch_and_the_scheduler_goes_on(log):
    model = Faulty(script=TOK.encode(SCRIPT))
    engine = Engine(model, TOK, lookahead=1)
    sched = Scheduler(engine, max_batch=2, max_waiting=8)
    try:
        model.fail_steps = True
        submit(sched, log, "a", "a", greedy(5))
        submit(sched, log, "b", "bb", greedy(5))
        sched.start()
        assert sched.wait_until(lambda: log.finished("a", "b"), WAIT)
        for name in ("a", "b"):
            event = log.done(name)
            assert event.kind == "error" and event.error == "generation failed: RuntimeError: device lost"
        model.fail_steps = False
        submit(sched, log, "c", "c", greedy(3))
        assert sched.wait_until(lambda: log.finished("c"), WAIT)
        assert [c.text for c in log.done("c").completions] == ["abc"]
        assert (sched.failed_requests, sched.finished_requests) == (2, 1)
        assert sched.alive
    finally:
        sched.close()


def test_a_failing_prefill_fails_that_request_only(log):
    engine = Engine(Faulty(script=TOK.encode(SCRIPT)), TOK)
    sched = Scheduler(engine, max_batch=2, max_waiting=8)
    try:
        submit(sched, log, "bad", "12345", greedy(3))  # 5 tokens: its prefill raises
        submit(sched, log, "good", "ab", greedy(3))
        sched.start()
        assert sched.wait_until(lambda: log.finished("bad", "good"), WAIT)
        assert log.done("bad").error == "prefill failed: RuntimeError: bad prompt"
        assert [c.text for c in log.done("good").completions] == ["bcd"]
        assert (sched.failed_requests, sched.finished_requests) == (1, 1)
    finally:
        sched.close()


def test_scoring_only_requests_finish_at_prefill(make, log):
    sched = make(max_batch=2, max_waiting=8).start()
    params = SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=0, stop_token_ids=[])
    submit(sched, log, "score", "abc", params)
    assert sched.wait_until(lambda: log.finished("score"), WAIT)
    [c] = log.done("score").completions
    assert c.token_ids == [] and c.finish_reason == "length" and len(c.prompt_logprobs) == 3
    assert c.prompt_logprobs[0] is None and all(lp < 0 for lp in c.prompt_logprobs[1:])


def test_after_close_submissions_are_refused(make, log):
    sched = make(max_batch=2, max_waiting=8).start()
    sched.close()
    assert not sched.alive
    with pytest.raises(QueueFull, match="shutting down"):
        submit(sched, log, "late", "a", greedy(2))


def test_bad_limits_are_refused(engine):
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Scheduler(engine, max_batch=0)
    with pytest.raises(ValueError, match="max_waiting >= 0"):
        Scheduler(engine, max_waiting=-1)
