"""Data-parallel and sharded training from outside the model: DDP, FSDP2, compile, batch plan.

The training loop asks one :class:`Parallel` object for everything that depends on the
number of ranks, so the same loop runs on one CPU, one GPU or many GPUs on many machines
(``torchrun --nproc_per_node=8 -m lmforge train --config configs/gpu-124m.yaml``)::

    par = Parallel(cfg.train, rt)              # the batch plan; prints it on rank 0 under torchrun
    fwd = par.wrap(model)                       # DDP, FSDP2 (fully_shard per block + root) or the model
    optimizer = build_optimizer(model, ...)     # after wrap: FSDP2 swaps the parameters for DTensor shards
    for micro in range(par.accum):
        with par.no_sync(fwd, micro):           # gradients are reduced once, on the last micro-batch
            loss = fwd(x, y)[1]
            (loss / par.accum).backward()

**The global batch** is ``train.batch_size * train.grad_accum`` sequences per optimizer
step, whatever the number of ranks: ``world_size`` ranks each take an equal share and
split it into ``accum`` micro-batches of ``micro_batch`` sequences
(``micro_batch * accum * world_size == global batch``). With the loader's global window
stream (:mod:`lmforge.data.loader`) a step sees the very windows one process would, so
the trajectory is the same up to float summation order, and a checkpoint resumes on any
number of ranks that divides the global batch.

Collectives run on every rank in the same order: the loss average and the agreement on
when to stop happen every step, so no rank leaves the loop while another waits for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError, TrainConfig
from lmforge.runtime import Runtime, seed_everything


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of one optimizer step is split over ranks and micro-batches."""

    global_batch: int  # sequences per optimizer step, all ranks together
    world_size: int
    micro_batch: int  # sequences per forward pass on one rank
    accum: int  # micro-batches per rank per step

    def describe(self) -> str:
        return (f"global batch {self.global_batch} sequences = {self.world_size} rank(s) x {self.accum} "
                f"accumulation step(s) x {self.micro_batch} sequences")


def plan_batches(tc: TrainConfig, world_size: int) -> BatchPlan:
    """The :class:`BatchPlan` for ``world_size`` ranks; a clear :class:`ConfigError` when it cannot be split."""
    total = tc.batch_size * tc.grad_accum
    if total % world_size:
        raise ConfigError(f"{world_size} ranks do not divide the global batch of {total} sequences "
                          f"(train.batch_size {tc.batch_size} x train.grad_accum {tc.grad_accum}); use a number of "
                          f"ranks that divides it, or change batch_size / grad_accum")
    share = total // world_size
    if tc.micro_batch is None:
        micro = max(d for d in range(1, min(share, tc.batch_size) + 1) if share % d == 0)
    elif share % tc.micro_batch:
        raise ConfigError(f"train.micro_batch={tc.micro_batch} does not divide the {share} sequences each of the "
                          f"{world_size} ranks takes per step (train.batch_size x train.grad_accum / ranks)")
    else:
        micro = tc.micro_batch
    return BatchPlan(global_batch=total, world_size=world_size, micro_batch=micro, accum=share // micro)


class Parallel:
    """Everything in the loop that depends on the number of ranks; see the module docstring."""

    def __init__(self, tc: TrainConfig, rt: Runtime) -> None:
        self.rt = rt
        self.plan = plan_batches(tc, rt.world_size)
        self.micro_batch, self.accum = self.plan.micro_batch, self.plan.accum
        self.mode = tc.parallel if rt.distributed else "single"
        # Compile by default where it pays off: CUDA (on 2 CPU cores it measured within noise of eager).
        self.compile = rt.device.type == "cuda" if tc.compile is None else tc.compile
        if self.mode == "fsdp" and tc.tasks_every:
            raise ConfigError("train.tasks_every runs the task probe on rank 0 alone, which a model sharded with "
                              "train.parallel=fsdp cannot do; set train.tasks_every=0 or train.parallel=ddp")
        if rt.distributed and rt.is_main:
            print(f"{self.mode}: {self.plan.describe()}", flush=True)

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on: DDP, FSDP2 (in place), compiled, or ``model`` itself.

        ``model`` stays the plain module for checkpoints and evaluation; under FSDP it is the same
        object, now holding sharded parameters.
        """
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6 kept FSDP2 under its first name
                from torch.distributed._composable.fsdp import fully_shard

            mesh = init_device_mesh(self.rt.device.type, (self.rt.world_size,))
            for block in getattr(model, "layers", []):  # one all-gather per block, overlapped with compute
                if self.compile:
                    block.compile()  # per block, before sharding: the pattern FSDP2 documents
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head (tied ones once)
            return model
        if self.mode == "ddp":
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            wrapped = model
        return torch.compile(wrapped) if self.compile else wrapped

    def no_sync(self, wrapped: nn.Module, micro: int) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction on every micro-batch but the last (forward and backward go inside)."""
        last = micro == self.accum - 1
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.mode == "ddp" and not last:
            return getattr(wrapped, "_orig_mod", wrapped).no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ agreement
    def average(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (every rank gets it); the value itself on one process."""
        if self.mode == "single":
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return total / self.rt.world_size

    def agree(self, seconds: float, signalled: bool) -> tuple[float, bool]:
        """The slowest rank's step time and whether any rank was signalled, the same on every rank.

        Every decision to stop (time limit, SIGTERM) is taken from these, so all ranks leave together.
        """
        if self.mode == "single":
            return seconds, signalled
        flags = torch.tensor([seconds, float(signalled)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return float(flags[0]), bool(flags[1] > 0)

    def grad_norm(self, norm: torch.Tensor) -> float:
        """``clip_grad_norm_``'s result as a number (a replicated DTensor under FSDP)."""
        full = getattr(norm, "full_tensor", None)
        return float(full() if full is not None else norm)

    def reseed(self, seed: int, step: int) -> None:
        """Give each rank its own random stream (dropout) from (seed, rank, step); a no-op on one process.

        All ranks were seeded alike so that they built identical weights; a resumed run restores rank 0's
        saved state, so the per-rank streams are re-derived here after any resume as well.
        """
        if self.mode != "single":
            seed_everything(int(np.random.SeedSequence([seed, self.rt.rank, step]).generate_state(1)[0]))

    def _comm_device(self) -> torch.device:
        return self.rt.device if dist.get_backend() == "nccl" else torch.device("cpu")

