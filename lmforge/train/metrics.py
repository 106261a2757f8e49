"""Training metrics: JSON-lines and TensorBoard sinks, progress bar, tokens/s and MFU.

:class:`MetricsLogger` appends one JSON object per call to ``<out_dir>/metrics.jsonl`` (``step``,
``kind`` such as ``train`` or ``val``, unix ``time`` and the values), mirrors it to TensorBoard
(``<out_dir>/tb``, tags ``kind/key``) and drives a tqdm bar. Resumed at ``start_step`` it first drops
lines past that step, written by a run that died after its last checkpoint. :class:`Throughput` and
:func:`peak_flops` give tokens/s and model FLOPs utilisation::

    logger = MetricsLogger(run_dir / "train", total_steps=1000, start_step=step)
    meter, peak = Throughput(), peak_flops(device)
    ...
    meter.update(tokens_in_step, seconds_for_step)
    tps = meter.tokens_per_s()
    logger.log(step, "train", {"loss": loss, "tokens_per_s": tps, "mfu": mfu(tps, flops_per_token, peak)})
    logger.advance(step, {"loss": f"{loss:.3f}"})
    logger.close()

    rows = read_metrics(run_dir / "train")   # the lines back, as dicts

``peak_flops`` uses a table of dense bf16 peaks for known GPUs and otherwise measures a matmul once,
caching the figure in ``$LMFORGE_CACHE/peak_flops.json`` (default ``~/.cache/lmforge/``).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge import artifacts
from lmforge.cache import cache_dir

METRICS_FILE = "metrics.jsonl"
_TB_WARNED = False


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as python numbers, so they serialize."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value


class MetricsLogger:
    """Metrics sink for one training run; every method is a no-op when ``enabled`` is False."""

    def __init__(self, out_dir: Path, total_steps: int | None, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._file = self._tb = self.bar = None
        if not enabled:  # non-zero distributed ranks: rank 0 writes for everyone
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open until close())
        if tensorboard:
            self._tb = _summary_writer(Path(out_dir) / "tb", start_step)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """Keep only lines a resumed run continues from; a fresh run (step 0) starts a fresh file."""
        if not self.path.exists():
            return
        kept = []
        if start_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
                    kept.append(line + "\n")
        artifacts.write_text(self.path, "".join(kept))

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Append ``{"step", "kind", "time", **values}`` and mirror numbers to TensorBoard."""
        if not self.enabled:
            return
        clash = {"step", "kind", "time"} & set(values)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the record itself")
        values = {k: _plain(v) for k, v in values.items()}
        row = {"step": int(step), "kind": kind, "time": time.time(), **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def advance(self, step: int, postfix: dict, total: int | None = None) -> None:
        """Move the progress bar to ``step`` and show ``postfix`` (floats to 4 digits, strings as given);
        ``total``: the schedule's length once known (``train.steps: auto`` fixes it after the first seconds).

        A value of None is one not measured yet (the loss before the first ``log_every`` steps, the
        validation loss before the first estimate): shown as ``-``, never as ``nan``, which would read
        as divergence.
        """
        if self.bar is None:
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        shown = {k: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
        self.bar.set_postfix(shown, refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(tb_dir: Path, start_step: int):
    """A TensorBoard writer, or None with one warning per process when tensorboard is not installed."""
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_WARNED:
            warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only "
                          "(pip install 'lmforge[tb]' or set train.tensorboard=false)", stacklevel=3)
            _TB_WARNED = True
        return None
    if start_step == 0 and tb_dir.is_dir():  # a fresh run: old event files would mix two runs in one chart
        for f in tb_dir.glob("events.out.tfevents.*"):
            f.unlink()
    # purge_step hides events at or after it that an earlier, crashed run wrote past its checkpoint.
    return SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step > 0 else None)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of the one in folder ``path``), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # the last line of a run killed mid-write
                break
            raise ValueError(f"{path}:{i}: not a JSON line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------ throughput
def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s x training FLOPs per token) over the peak."""
    if peak_flops <= 0 or not math.isfinite(peak_flops):
        return 0.0
    return tokens_per_s * flops_per_token / peak_flops


class Throughput:
    """Tokens per second over the last ``window`` steps, leaving out the first (warm-up, compile)."""

    mfu = staticmethod(mfu)

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be at least 1 (got {window})")
        self._first: tuple[int, float] | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    def update(self, tokens: int, seconds: float) -> None:
        """Record one step that processed ``tokens`` in ``seconds``."""
        if self._first is None:
            self._first = (tokens, seconds)
        else:
            self._recent.append((tokens, seconds))

    def tokens_per_s(self) -> float:
        """Tokens/s over the window; the first step's figure until a second one exists; 0 before any."""
        data = list(self._recent) or ([self._first] if self._first else [])
        seconds = sum(s for _, s in data)
        return sum(n for n, _ in data) / seconds if seconds > 0 else 0.0


# ------------------------------------------------------------------ peak FLOP/s
# Dense (no sparsity) bf16 tensor-core peaks; fp16 for V100 and T4, which lack bf16. Most specific first.
# Sources: the vendors' datasheets, which print the sparse figure (2x) beside or instead of the dense one:
# NVIDIA H100/H200 SXM 989 TFLOPS (1,979 sparse), H100 PCIe 756, H100/H200 NVL 835, A100 312, L40S 362,
# L40 181, L4 121 (242 sparse), A10 125, B200 2,250; AMD Instinct MI300X/MI325X 1,307, MI250X 383.
# H800 / A800 are the export variants of H100 / A100 with the same compute; H20 is 148.
_GPU_PEAKS: list[tuple[str, float]] = [
    (r"GH200", 989e12), (r"H200.*NVL", 835e12), (r"H200", 989e12), (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12), (r"H100|H800", 989e12), (r"\bH20\b", 148e12), (r"B200", 2250e12),
    (r"A100|A800", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12), (r"\bL4\b", 121e12),
    (r"MI300X|MI325X", 1307e12), (r"MI250X", 383e12),
    (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"\bA10\b", 125e12), (r"V100", 125e12), (r"\bT4\b", 65e12),
]
_MEMO: dict[tuple[str, str], float] = {}


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its ``torch.cuda.get_device_name``, or None if unknown."""
    for pattern, flops in _GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


def _cache_file() -> Path:
    return cache_dir() / "peak_flops.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for keys of figures measured on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _measure(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul over about ``seconds`` of repeats."""
    # A private generator: drawing from the global one would shift a training run's dropout masks
    # depending on whether the figure was cached yet, breaking exact resume.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    is_cuda = device.type == "cuda"
    inner = 10 if is_cuda else 1  # a GPU matmul is shorter than the launch/sync overhead of timing it alone

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    a @ b  # warm-up: allocation, kernel selection
    sync()
    best, reps, deadline = math.inf, 0, time.perf_counter() + seconds
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
        reps += 1
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, measure_seconds: float = 0.5) -> float:
    """Peak FLOP/s of ``device``: a known GPU's bf16 figure, else a cached one-time matmul measurement.

    The CPU figure is fp32 (bf16 is far slower on most CPUs) at torch's current thread count, cached
    per CPU model and thread count.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name)
        if known is not None:
            return known
        key, n = f"cuda|{name}", 4096
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu":
        key, n, dtype = f"cpu|{cpu_model()}|{torch.get_num_threads()} threads", 1024, torch.float32
    else:
        key, n, dtype = f"{device.type}|{device}", 2048, torch.float32
    cache = _cache_file()
    if (str(cache), key) in _MEMO:
        return _MEMO[(str(cache), key)]
    try:
        table = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure and rewrite
        table = {}
    table = table if isinstance(table, dict) else {}
    value = table.get(key)
    if not (isinstance(value, (int, float)) and value > 0):
        value = _measure(device, dtype, n, measure_seconds)
        table[key] = value
        with contextlib.suppress(OSError):  # a read-only home: the figure is still right, only not remembered
            artifacts.write_text(cache, json.dumps(table, indent=2, sort_keys=True))
    _MEMO[(str(cache), key)] = float(value)
    return float(value)
