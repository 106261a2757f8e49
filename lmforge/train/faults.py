"""Fault-injection hooks for lmforge's reliability tests: inert unless an ``LMFORGE_FAULT_*`` variable is set.

Rare failures (a NaN loss, a kill in the middle of a checkpoint write, a full disk) must be made to
happen on cue, in a real process, for ``tests/test_faults.py`` to prove that training survives them.
The variables are read here and nowhere else; ``docs/reliability.md`` lists them. They are test hooks:
never set them for a real run. ::

    LMFORGE_FAULT_NAN_STEPS=5,6      the loss of update attempts 5 and 6 becomes NaN before backward
                                     (attempts count from 1 over the whole run, skipped ones included,
                                     so 5,6,7 gives three bad steps in a row)
    LMFORGE_FAULT_SAVE=kill@8        while writing checkpoint step 8, after its files are written and
                                     before the rename: SIGKILL this process (kill), or fail as a full
                                     disk (enospc) or a read-only folder (erofs) would; a comma-separated
                                     list such as enospc@4,kill@8 sets several

    LMFORGE_FAULT_SAVE=enospc@4 lmforge train --name t   # see what a full disk looks like
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

NAN_STEPS = "LMFORGE_FAULT_NAN_STEPS"
SAVE = "LMFORGE_FAULT_SAVE"
_SAVE_KINDS = ("kill", "enospc", "erofs")


def _bad(var: str, value: str, why: str) -> ValueError:
    return ValueError(f"test hook {var}={value!r}: {why}")


def nan_attempts() -> frozenset[int]:
    """The update attempts (1-based) whose loss the NaN hook poisons; empty when the hook is unset."""
    value = os.environ.get(NAN_STEPS, "").strip()
    if not value:
        return frozenset()
    try:
        steps = frozenset(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise _bad(NAN_STEPS, value, "expected comma-separated step numbers such as 5,6") from None
    if any(s < 1 for s in steps):
        raise _bad(NAN_STEPS, value, "step numbers start at 1")
    return steps


def _save_faults() -> dict[int, str]:
    value = os.environ.get(SAVE, "").strip()
    faults: dict[int, str] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        kind, _, step = item.partition("@")
        if kind not in _SAVE_KINDS or not step.isdigit():
            raise _bad(SAVE, value, f"expected KIND@STEP with KIND one of {', '.join(_SAVE_KINDS)}, e.g. kill@8")
        faults[int(step)] = kind
    return faults


def before_rename(step: int, folder: Path) -> None:
    """Called by the checkpointer once checkpoint ``step`` is fully written to the temporary ``folder``."""
    kind = _save_faults().get(step) if os.environ.get(SAVE) else None
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: what a power cut or OOM killer does
    elif kind is not None:
        code = errno.ENOSPC if kind == "enospc" else errno.EROFS
        raise OSError(code, os.strerror(code), str(folder))
