"""Run a datatrove pipeline as tasks: local processes or a Slurm job array, chosen by ``data.executor``.

:func:`run_tasks` builds datatrove's ``LocalPipelineExecutor`` or ``SlurmPipelineExecutor``
for one stage, runs it, waits for a Slurm job array to leave the queue, and raises a
one-line :class:`~lmforge.data.sources.DataError` when a task did not finish. Finished
tasks leave datatrove's marker in ``<logs>/completions/``, so calling it again after a kill
runs only the unfinished ones. ::

    run_tasks(cfg.data, "a", [ReadRange(...), CleanTask(...)], tasks=8, logs=Path("runs/demo/clean/work/logs"))
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.config import DataConfig
from lmforge.data.progress import CountStep, Meter, watch
from lmforge.data.sources import DataError


def run_tasks(cfg: DataConfig, stage: str, pipeline: list, tasks: int, logs: Path,
              total: tuple[int, int] | None = None, label: str = "clean", count: bool = False) -> int:
    """Run ``pipeline`` as ``tasks`` tasks logging under ``logs/<stage>``; returns how many were already done.

    Progress (tasks finished, and with ``total`` = (documents, bytes) the documents and MB its first
    step reads, MB/s and ETA; with ``count`` and no total, the documents and MB read so far) is shown
    while it runs (:mod:`lmforge.data.progress`).
    """
    folder = logs / stage
    count = count or total is not None
    if count:  # count what the reader hands on, in each task
        pipeline = [pipeline[0], CountStep(str(folder / "progress")), *pipeline[1:]]
    from loguru import logger

    # lmforge prints its own lines and progress per stage; a task's error still comes back raised, and on
    # Slurm each task's log is in data.slurm.logs_dir.
    logger.disable("datatrove")
    if cfg.executor == "slurm":
        executor = _slurm(cfg, stage, pipeline, tasks, folder)
    else:
        from datatrove.executor import LocalPipelineExecutor

        workers = min(cfg.workers or os.cpu_count() or 1, tasks)
        # fork: workers start at once and re-import nothing (forkserver would re-run the calling script).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(folder),
                                         start_method=method)
    done = tasks - len(executor.get_incomplete_ranks(range(tasks)))
    docs, nbytes = total or (None, None)
    meter = Meter(f"[{label}] stage {stage}", total_bytes=nbytes, total_docs=docs, tasks=tasks, counts_docs=count)
    with watch(folder, meter):
        if cfg.executor == "slurm":
            _run_slurm(executor, cfg, stage, tasks, label)
        else:
            executor.run()
    left = executor.get_incomplete_ranks(range(tasks))
    if left:
        raise DataError(f"{label} stage {stage}: {len(left)} of {tasks} tasks did not finish (task {left[0]} first); "
                        f"see {folder / 'logs'}")
    return done


def _slurm(cfg: DataConfig, stage: str, pipeline: list, tasks: int, folder: Path):
    from datatrove.executor import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def launch_merge_stats(self) -> None:
            """lmforge merges its own per-task ledgers; no second job that waits on this one."""

    s = cfg.slurm
    if not s.partition:
        raise DataError("data.executor=slurm needs data.slurm.partition (the partition to submit to, see sinfo)")
    if shutil.which("sbatch") is None:
        raise DataError("data.executor=slurm but sbatch is not on PATH: run lmforge on a Slurm login node")
    env = s.env_command
    if env is None:  # the jobs import lmforge from the environment that runs this process
        activate = Path(sys.prefix) / "bin" / "activate"
        env = f"source {activate}" if activate.is_file() else ""
    return Executor(pipeline, tasks=tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
                    mem_per_cpu_gb=s.mem_per_cpu_gb, workers=cfg.workers or -1, job_name=f"{s.job_name}-{stage}",
                    qos=s.qos, env_command=env, sbatch_args=dict(s.sbatch_args), logging_dir=str(folder),
                    slurm_logs_folder=s.logs_dir or str(folder / "slurm_logs"), requeue=False, mail_type="NONE")


def _run_slurm(executor, cfg: DataConfig, stage: str, tasks: int, label: str) -> None:
    """Submit the job array and wait until it has left the queue."""
    try:
        executor.run()
    except subprocess.CalledProcessError as e:
        raise DataError(f"Slurm refused the {label} stage's job {stage} (sbatch exit {e.returncode}, its message is "
                        f"above): check data.slurm (partition {cfg.slurm.partition!r}, time {cfg.slurm.time!r}, "
                        f"sbatch_args {cfg.slurm.sbatch_args})") from None
    job = getattr(executor, "job_id", None)
    if job in (None, -1):  # every task was done already
        return
    print(f"[{label}] stage {stage}: Slurm job {job} ({tasks} tasks) submitted; waiting")
    while executor.get_incomplete_ranks(range(tasks)):
        queued = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
        if (queued.returncode == 0 and not queued.stdout.strip()) or "Invalid job id" in queued.stderr:
            break  # the array left the queue; whatever is unfinished now failed
        time.sleep(cfg.slurm.poll_seconds)
