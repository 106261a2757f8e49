"""Graceful stops: SIGTERM or SIGINT ends training at the next step boundary with a checkpoint.

Clusters announce preemption with SIGTERM (Slurm, Kubernetes, spot VMs) and a
person stops a run with Ctrl-C. Either way the loop finishes the step it is in,
writes a checkpoint and exits 0, and the same command resumes it. A second
signal while the first is being honoured restores the default behaviour, so a
stuck run can still be killed. Used by the loop as::

    preempt = Preemption().install()
    while ...:
        ...
        if preempt.requested: ...   # checkpoint, then leave the loop
    preempt.restore()
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


class Preemption:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one arrives
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # second signal: stop waiting for the step boundary
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = name
        print(f"\n{name} received: finishing this step, then writing a checkpoint (send again to abort)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def install(self) -> Preemption:
        # Signal handlers can only be installed from the main thread (e.g. not inside a server worker).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
