"""The serving scheduler: one background thread owns the model and runs continuous batching.

Requests arrive from any thread (the HTTP server's event loop) through
:meth:`Scheduler.submit`; each carries a *sink*, a callable that receives its
:class:`Event` s (new text and tokens, then the finished completions, or an
error). The thread admits waiting requests in arrival order while their rows fit
in ``max_batch``, prefills them into the running :class:`~lmforge.serve.batch.DecodeBatch`,
steps the batch, and hands every request its deltas after each step.

- The waiting queue is bounded: past ``max_waiting`` requests, ``submit`` raises
  :class:`QueueFull` (the API answers 429 with Retry-After).
- :meth:`Scheduler.cancel` (a client that disconnected) removes the request
  from the queue or the batch before the next step: its rows are free at once.
- A failing model step fails the requests of that batch with an error event; the
  scheduler goes on with the next ones.

Example::

    sched = Scheduler(engine, max_batch=32, max_waiting=64).start()
    events = queue.Queue()
    ticket = sched.submit([engine.request("Hello", params)], events.put)
    while (event := events.get()).kind == "delta": print(event.deltas)
    sched.close()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.serve.batch import Completion, Delta, Request
from lmforge.serve.engine import Engine


class QueueFull(Exception):
    """The waiting queue is full; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Event:
    """What a sink receives: ``delta`` (deltas of one request), ``done`` (its completions) or ``error``."""

    kind: Literal["delta", "done", "error"]
    request: int  # position of the request in its ticket
    deltas: list[Delta] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    error: str = ""


@dataclass(eq=False)
class Ticket:
    """A submitted group of requests (the prompts of one API call) and where their events go."""

    requests: list[Request]
    sink: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    remaining: int = 0  # requests not finished yet

    @property
    def rows(self) -> int:
        return sum(r.params.n for r in self.requests)


class Scheduler:
    """Owns the engine's model in one thread; see the module docstring."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_waiting: int = 64) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0 (got {max_batch}, {max_waiting})")
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self.batch = engine.batch()
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []  # tickets with requests admitted to the batch
        self._owner: dict[int, tuple[Ticket, int]] = {}  # id(request) -> (ticket, position)
        self._pending: deque[tuple[Ticket, int]] = deque()  # admitted requests not prefilled yet
        self._stop = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.0  # moving average of a decode step per token, for Retry-After
        # Counters read by the metrics endpoint (only this class writes them).
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished_requests = 0
        self.failed_requests = 0
        self.steps = 0

    # ------------------------------------------------------------ threads API
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests admitted to the batch and not finished (those of every running ticket)."""
        with self._cond:
            return sum(t.remaining for t in self._running)

    @property
    def running_rows(self) -> int:
        return len(self.batch.rows)

    def submit(self, requests: list[Request], sink: Callable[[Event], None]) -> Ticket:
        """Queue ``requests`` (all or none) for decoding; raise :class:`QueueFull` or ValueError."""
        ticket = Ticket(list(requests), sink, remaining=len(requests))
        if ticket.rows > self.max_batch:
            raise ValueError(f"the request needs {ticket.rows} sequences (prompts x n) but the server runs at "
                             f"most {self.max_batch} at once (serve.max_batch)")
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down", retry_after=1)
            if len(self._waiting) >= self.max_waiting and not self._fits_now(ticket):
                raise QueueFull(f"too many requests: {len(self._waiting)} are waiting (serve.max_waiting "
                                f"= {self.max_waiting})", retry_after=self._retry_after())
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop ``ticket``'s requests; their rows leave the batch before the next step."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (checked after every scheduler iteration) or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # ------------------------------------------------------------- internals
    def _fits_now(self, ticket: Ticket) -> bool:
        """Whether the ticket would be admitted at the next iteration (nothing queued ahead of it)."""
        busy = sum(t.rows for t in self._running)
        return not self._waiting and busy + ticket.rows <= self.max_batch

    def _retry_after(self) -> int:
        # Roughly how long until a waiting slot frees: a typical request's worth of steps.
        return max(1, round(self._step_seconds * 256))

    def _admit(self) -> None:
        """Move tickets from the queue to the batch while their rows fit; drop cancelled ones (under the lock)."""
        for t in [t for t in self._waiting if t.cancelled]:
            self._waiting.remove(t)
        for t in [t for t in self._running if t.cancelled]:
            self._retire(t)
        busy = sum(t.rows for t in self._running)
        while self._waiting and busy + self._waiting[0].rows <= self.max_batch:
            t = self._waiting.popleft()
            busy += t.rows
            self._running.append(t)
            for i, r in enumerate(t.requests):
                self._owner[id(r)] = (t, i)
                self._pending.append((t, i))

    def _retire(self, ticket: Ticket) -> None:
        self._running.remove(ticket)
        for r in ticket.requests:
            self._owner.pop(id(r), None)
            if r in self.batch.requests:
                self.batch.remove(r)
        self._pending = deque(p for p in self._pending if p[0] is not ticket)

    def _emit(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.sink(event)
        except RuntimeError:  # the receiver's event loop is gone (server shutting down): nobody listens
            ticket.cancelled = True

    def _finish(self, ticket: Ticket, position: int, error: str | None = None) -> None:
        req = ticket.requests[position]
        ticket.remaining -= 1
        if error is None:
            self.finished_requests += 1
            self._emit(ticket, Event("done", position, completions=req.completions()))
        else:
            self.failed_requests += 1
            self._emit(ticket, Event("error", position, error=error))
        if ticket.remaining == 0 and ticket in self._running:
            self._running.remove(ticket)
            for r in ticket.requests:
                self._owner.pop(id(r), None)

    def _deliver(self, req: Request) -> None:
        ticket, position = self._owner[id(req)]
        deltas = req.take_deltas(self.engine.tokenizer)
        if deltas:
            self.generated_tokens += sum(len(d.token_ids) for d in deltas)
            self._emit(ticket, Event("delta", position, deltas=deltas))
        if req.finished:
            self._finish(ticket, position)

    def _fail_batch(self, error: BaseException) -> None:
        message = f"generation failed: {type(error).__name__}: {error}"
        for req in self.batch.requests:
            if id(req) in self._owner:
                self._finish(*self._owner[id(req)], error=message)
        self.batch.clear()

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.notify_all()  # wake wait_until() callers after every iteration
                self._admit()
                while not self._stop and not self.batch.rows and not self._pending and not self._waiting:
                    self._cond.wait()
                    self._admit()
                if self._stop:
                    return
                pending, self._pending = list(self._pending), deque()
            for ticket, position in pending:
                if ticket.cancelled:
                    continue
                req = ticket.requests[position]
                try:
                    self.batch.add(req)
                    self.prompt_tokens += len(req.prompt_ids)
                except Exception as e:  # a failure of one prompt's prefill fails that request only
                    with self._cond:
                        self._finish(ticket, position, error=f"prefill failed: {type(e).__name__}: {e}")
                    continue
                if req.finished:  # scoring only (max_tokens 0): done at prefill
                    with self._cond:
                        self._deliver_or_fail(req)
            if not self.batch.rows:
                continue
            start = time.perf_counter()
            try:
                touched = self.batch.step()
            except Exception as e:  # the model failed mid-batch: fail its requests, keep serving others
                with self._cond:
                    self._fail_batch(e)
                continue
            self.steps += 1
            seconds = (time.perf_counter() - start) / self.batch.tokens_per_row  # per token of each row
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * seconds
            with self._cond:
                for req in touched:
                    if id(req) in self._owner:
                        self._deliver_or_fail(req)

    def _deliver_or_fail(self, req: Request) -> None:
        """Hand out ``req``'s new output; if that fails (it never should), fail this request, not the thread."""
        owner = self._owner[id(req)]
        try:
            self._deliver(req)
        except Exception as e:
            self.batch.remove(req)
            self._finish(*owner, error=f"delivering the output failed: {type(e).__name__}: {e}")
