"""What showing progress costs the clean stage: CPU seconds with and without the counting step.

Runs the clean stage (``lmforge.data.curate.main``) on the embedded corpus, ``--rounds`` times
each way, alternating, with progress (each task's reader followed by
:class:`lmforge.data.progress.CountStep`, the launching process polling its files) and without (the
stage run with no totals, so no counting step). CPU seconds are those of this process and of
the task processes it reaped (``resource.getrusage``), so the figure is per core, not wall time.
Prints one line per run and the ratio of the medians. ::

    python benchmarks/progress_overhead.py --tasks 4 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from lmforge.config import RunConfig
from lmforge.data import collect, curate


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _one(cfg: RunConfig, col: Path, collected: dict, out: Path, progress: bool) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    if progress:
        curate.main(cfg, col, out, collected, "fp")
    else:
        with mock.patch.object(curate, "_reads", lambda *a: None):
            curate.main(cfg, col, out, collected, "fp")
    return time.perf_counter() - t0, _cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge-progress-"))
    cfg = RunConfig.model_validate(
        {"name": "p", "runs_dir": str(root), "data": {"tasks": args.tasks, "workers": args.workers}}
    )
    collected = collect.main(cfg, root / "collect")
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for progress in (r % 2 == 0, r % 2 == 1):  # alternate which side goes first
            wall, used = _one(cfg, root / "collect", collected, root / f"clean-{r}-{progress}", progress)
            cpu[progress].append(used)
            print(f"round {r} progress={'on ' if progress else 'off'}: {wall:6.2f} s wall, {used:6.2f} CPU s")
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    mb = collected["bytes"] / 1e6
    print(
        f"{mb:.1f} MB, tasks={args.tasks} workers={args.workers}: median CPU s with progress {on:.2f}, "
        f"without {off:.2f}: ratio {on / off:.3f}"
    )


if __name__ == "__main__":
    main()
