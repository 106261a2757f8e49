"""Progress of a long data job: documents and MB done (of the total when known), MB/s, ETA, tasks done.

A :class:`Meter` draws a tqdm bar on a terminal; in a log (stderr not a terminal) it prints the
same line, formatted by tqdm, at most every ``every`` seconds, and once at the end. Across datatrove
tasks, each task runs a :class:`CountStep` right after its reader, which passes the documents
through and writes ``<logs>/progress/<task>.json`` (documents and bytes so far) at most once a
second; :func:`watch` reads those files and datatrove's ``completions/`` markers from the
launching process (locally or on a Slurm login node, the folder being shared), so the work itself
only counts bytes. ::

    meter = Meter("clean a", total_bytes=5_400_000, total_docs=42, tasks=8)
    with watch(Path("runs/demo/clean/work/logs/a"), meter):
        executor.run()
    meter.docs, meter.bytes     # 42, 5400000 when the tasks are done
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from lmforge import artifacts


class Meter:
    """One line of progress; :meth:`update` takes running totals (documents, bytes, tasks finished).

    With neither a byte nor a document total but a task count (a stage that reads no documents), the
    line counts tasks instead of bytes, unless ``counts_docs`` (documents read, total unknown: collect).
    """

    def __init__(
        self,
        label: str,
        total_bytes: int | None = None,
        total_docs: int | None = None,
        tasks: int | None = None,
        every: float = 30.0,
        file=None,
        counts_docs: bool = False,
    ) -> None:
        self.label, self.total_bytes, self.total_docs, self.tasks = label, total_bytes, total_docs, tasks
        self.every, self.file = every, file or sys.stderr
        self.docs = self.bytes = self.tasks_done = 0
        self.start = self.shown = time.monotonic()
        self.by_tasks = total_bytes is None and total_docs is None and tasks is not None and not counts_docs
        tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.bar = tqdm(desc=label, file=self.file, mininterval=0.5, leave=True, **self._units()) if tty else None

    def _units(self) -> dict:
        if self.by_tasks:
            return {"total": self.tasks, "unit": " tasks"}
        return {"total": self.total_bytes, "unit": "B", "unit_scale": True, "unit_divisor": 1000}

    def _n(self) -> int:
        return self.tasks_done if self.by_tasks else self.bytes

    def _postfix(self) -> str:
        if self.by_tasks:
            return ""
        docs = f"{self.docs:,}" + (f"/{self.total_docs:,}" if self.total_docs else "") + " docs"
        return docs + (f", {self.tasks_done}/{self.tasks} tasks" if self.tasks else "")

    def line(self) -> str:
        """The progress line: tqdm's meter (MB done / total, MB/s, ETA; or tasks) and the document and task counts."""
        return tqdm.format_meter(
            self._n(),
            self._units()["total"],
            time.monotonic() - self.start,
            prefix=self.label,
            postfix=self._postfix() or None,
            **{k: v for k, v in self._units().items() if k != "total"},
        )

    def update(self, docs: int, nbytes: int, tasks_done: int = 0) -> None:
        before = self._n()
        self.docs, self.bytes, self.tasks_done = docs, nbytes, tasks_done
        if self.bar is not None:
            self.bar.update(self._n() - before)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
        elif time.monotonic() - self.shown >= self.every:
            self.shown = time.monotonic()
            print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), file=self.file, flush=True)


class CountStep(PipelineStep):
    """Passes documents through, writing this task's documents and bytes so far to ``<folder>/<task>.json``."""

    name = "progress"

    def __init__(self, folder: str, every: float = 1.0) -> None:
        super().__init__()
        self.folder, self.every = Path(folder), every

    def _write(self, rank: int, docs: int, nbytes: int) -> None:
        artifacts.write_json(self.folder / f"{rank:05d}.json", {"docs": docs, "bytes": nbytes}, indent=None)

    def run(self, data, rank: int = 0, world_size: int = 1):
        docs = nbytes = 0
        last = time.monotonic()
        for doc in data:
            docs += 1
            nbytes += len(doc.text.encode("utf-8", errors="surrogatepass"))
            if time.monotonic() - last >= self.every:
                last = time.monotonic()
                self._write(rank, docs, nbytes)
            yield doc
        self._write(rank, docs, nbytes)


def read_counts(logs: Path) -> tuple[int, int, int]:
    """``(documents, bytes, tasks finished)`` from the progress files and completion markers under ``logs``."""
    docs = nbytes = 0
    for path in (logs / "progress").glob("*.json"):
        try:
            counts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # replaced between the listing and the read: next time
            continue
        docs, nbytes = docs + counts["docs"], nbytes + counts["bytes"]
    done = sum(1 for _ in (logs / "completions").glob("*")) if (logs / "completions").is_dir() else 0
    return docs, nbytes, done


@contextlib.contextmanager
def watch(logs: Path, meter: Meter, every: float = 0.5) -> Iterator[Meter]:
    """Update ``meter`` from ``logs`` every ``every`` seconds while the body runs, once more at the end."""
    stop = threading.Event()

    def poll() -> None:
        # The first look waits for the local executor to fork its workers: a child forked while this thread
        # held stderr's lock would inherit it locked.
        if stop.wait(max(every, 2.0)):
            return
        while True:
            meter.update(*read_counts(logs))
            if stop.wait(every):
                return

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield meter
    finally:
        stop.set()
        thread.join()
        meter.update(*read_counts(logs))
        meter.close()
