"""Where and how the computation runs: device, precision, seeds, threads, ranks.

This module is the only reader of the distributed environment variables
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set by
torchrun). Under torchrun it joins the process group (NCCL on CUDA, gloo on CPU) once,
pins each rank to the GPU of its ``LOCAL_RANK`` and leaves the group when the process
exits; a missing or unreachable rendezvous is a :class:`ConfigError` naming what is
wrong. Everything else asks it through :class:`Runtime`::

    rt = Runtime.setup(cfg.train, seed=cfg.seed)   # e.g. torchrun --nproc_per_node=2 -m lmforge train
    model.to(rt.device)
    with rt.autocast():
        logits, loss = model(x, y)

Every rank is seeded with the same ``seed``, so every rank builds the same initial
weights (FSDP shards them as they are); the training loop then gives each rank its own
random stream (:mod:`lmforge.train.distributed`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from lmforge.config import ConfigError, TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. auto: bf16 on GPUs with native bf16, else fp32.

    On CPU auto stays fp32 even where bf16 is fast: autocast changes a run's numerics, and on CPUs
    without bf16 instructions bf16 matmuls are ~100x slower. GPUs older than Ampere only emulate bf16
    (slowly), and fp16 would need loss scaling, so they train in fp32 too.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matrix products are at least as fast as fp32 ones on this kind of device (once per process).

    CUDA: a GPU with native bf16 (Ampere or newer, or ROCm), not torch's emulation on older ones. CPU:
    measured (:func:`bf16_time_ratio`): CPUs with bf16 instructions (AVX512-BF16, AMX, Arm BF16) run a
    bf16 product in about half the time of an fp32 one, those without emulate it about 100x slower
    (AMD EPYC Zen 3, 512^3: 201 ms against 1.9 ms), so the answer is far from the threshold. Other devices: False.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    return bf16_time_ratio() <= 1.0


def bf16_time_ratio(n: int = 256, pairs: int = 7) -> float:
    """Time of an (n, n) @ (n, n) product in bf16 over its time in fp32 on the CPU, at the current thread count.

    The median over ``pairs`` back-to-back pairs: another job on a shared CPU slows both halves of a
    pair alike, and a pair it hit harder than the other (seen here: ratios of 0.05 and 33 among 0.5s)
    does not move the median. About 0.2 s on a CPU without bf16 instructions, 3 ms with them.
    """
    gen = torch.Generator().manual_seed(0)  # its own generator: the run's random stream stays untouched
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    operands = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.bfloat16, torch.float32)}
    seconds = {dtype: [] for dtype in operands}
    for i in range(pairs + 1):
        for dtype, (x, y) in operands.items():
            start = time.perf_counter()
            x @ y
            if i:  # the first pair pays for allocation and kernel selection
                seconds[dtype].append(time.perf_counter() - start)
    return statistics.median(b / f for b, f in zip(seconds[torch.bfloat16], seconds[torch.float32], strict=True))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def ranks() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment; ``(0, 0, 1)`` outside it."""
    rank, local_rank, world_size = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}): launch with torchrun, which sets both")
    return rank, local_rank, world_size


def join(cfg: TrainConfig) -> tuple[int, int]:
    """Join the process group when launched by torchrun (once per process); returns ``(rank, world_size)``.

    NCCL when training on CUDA (each rank on the GPU of its ``LOCAL_RANK``), gloo otherwise. Waits at most
    ``train.dist_timeout`` seconds for the other ranks; failures are one-line :class:`ConfigError` messages.
    """
    rank, local_rank, world_size = ranks()
    if world_size == 1 or dist.is_initialized():
        return rank, world_size
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: there is no rendezvous to "
                          f"join; launch with torchrun (e.g. torchrun --nproc_per_node={world_size} -m lmforge train "
                          f"...), which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    device = pick_device(cfg.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _reach(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), cfg.dist_timeout, rank, world_size)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=cfg.dist_timeout))
    except (RuntimeError, ValueError) as e:  # DistStoreError (timeout, refused) and friends
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"rank {rank} of {world_size} could not join the process group at {where} within "
                          f"train.dist_timeout={cfg.dist_timeout:g}s ({reason}); start every rank (torchrun "
                          f"--nnodes/--nproc_per_node) and check that all of them can reach that address") from None
    atexit.register(leave)
    return rank, world_size


def _reach(host: str, port: int, timeout: float, rank: int, world_size: int) -> None:
    """Wait until the rendezvous store accepts connections (torch's own failure is a page of C++ log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"rank {rank} of {world_size} could not reach the rendezvous at {host}:{port} "
                                  f"within train.dist_timeout={timeout:g}s ({e.strerror or e}); start rank 0 (torchrun "
                                  f"--nnodes/--nproc_per_node) and check that every node can reach that address") from None
            time.sleep(0.2)  # rank 0 may simply not be up yet


def leave() -> None:
    """Destroy the process group if one is up (registered to run at exit by :func:`join`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for outside torchrun)."""
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(cls, cfg: TrainConfig, seed: int) -> Runtime:
        rank, local_rank, world_size = ranks()
        join(cfg)
        device = pick_device(cfg.device)
        if device.type == "cuda" and world_size > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            # TF32 matmuls: same convergence as fp32 in practice, several times the throughput.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(seed)  # the same on every rank: identical initial weights (see the module docstring)
        return cls(device=device, dtype=pick_dtype(cfg.dtype, device), rank=rank,
                   local_rank=local_rank, world_size=world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
