"""Where and how the computation runs: device, precision, seeds, threads, ranks.

This module is the only reader of the distributed environment variables
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` set by torchrun). Everything else asks
it through :class:`Runtime`::

    rt = Runtime.setup(cfg.train, seed=cfg.seed)
    model.to(rt.device)
    with rt.autocast():
        logits, loss = model(x, y)
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

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
    """Autocast dtype. On CPU, bf16/fp16 matmuls are ~100x slower than fp32, so auto means fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
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
        seed_everything(seed + rank)
        return cls(device=device, dtype=pick_dtype(cfg.dtype, device), rank=rank,
                   local_rank=local_rank, world_size=world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
