"""A training job: everything one run holds, built before the loop, every part Stateful.

Pre-training (:func:`lmforge.train.loop.main`) and fine-tuning (:func:`lmforge.finetune.setup.build_job`)
each build a :class:`TrainJob` with :func:`build_job`, handing it only what differs between them: the
tokenizer, the data folder and its loader, the context, the output folder, how the fresh model is
prepared (pretrained weights, adapters) and what extra state its checkpoints carry. THE loop
(:func:`lmforge.train.loop.train`) then runs any job the same way, without asking which kind it is.

The parts are Stateful (``state_dict`` / ``load_state_dict``): the model and optimizer, and the job's
own state (:meth:`TrainJob.state_dict`: progress counters, loader position, guard, early stopper,
extras, the schedule's length when ``train.steps: auto`` chose it (:mod:`lmforge.train.budget`), and
what the checkpoint must match to be resumed). The job's
:class:`~lmforge.train.checkpoint.Checkpointer` saves them as one checkpoint and restores them all::

    job = build_job(cfg, tokenizer=tok, tokenizer_path=..., data_dir=run_dir / "pack",
                    out_dir=run_dir / "train", fingerprint=lambda resolved: train_fingerprint(resolved, fp))
    job.resume()                     # the newest checkpoint restored into every part, or a fresh start
    ...
    job.ckpt.save(job.progress.step, last_step)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from lmforge.config import ConfigError, RunConfig
from lmforge.data.loader import TokenLoader
from lmforge.data.pack import list_shards, shard_info
from lmforge.data.tokenizer import Tokenizer, tokenizer_digest
from lmforge.models import build_model, fit_to_budget
from lmforge.runtime import Runtime
from lmforge.train.budget import StepBudget
from lmforge.train.checkpoint import Checkpointer, SingleFile, Stateful
from lmforge.train.checkpoint_dcp import GatheredFile, Sharded
from lmforge.train.distributed import Parallel
from lmforge.train.early_stop import EarlyStopper, OnEval
from lmforge.train.guard import StepGuard
from lmforge.train.metrics import MetricsLogger, peak_flops
from lmforge.train.optim import build_optimizer


class Probe(Protocol):
    """Eval tasks every N steps (:class:`lmforge.eval.tasks.TaskProbe`), built by the caller: train imports no eval."""

    def maybe_run(self, step: int, model: nn.Module, logger: MetricsLogger) -> None: ...


@dataclass
class Progress:
    """How far the run has come; restored at resume, so the counters and the last score carry on."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    val: dict = field(default_factory=dict)  # the last validation estimate

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_seconds = state["train_seconds"]
        self.val = state.get("val") or {}  # a finished run resumed at its end still reports its score

    def advance(self, tokens: int, seconds: float) -> None:
        """One update applied: ``tokens`` (all ranks together) in ``seconds``."""
        self.step += 1
        self.tokens_seen += tokens
        self.train_seconds += seconds


class Record:
    """Extra state a job writes with every checkpoint for its readers (how to rebuild LoRA adapters);
    nothing to restore: the builder has set the model up from the config already."""

    def __init__(self, value: dict) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainJob:
    """One training run's parts; see the module docstring. ``model`` is the plain module (checkpoints,
    evaluation), ``fwd`` the one the step calls (DDP, FSDP or compiled)."""

    cfg: RunConfig  # resolved: vocabulary size and width filled in
    rt: Runtime
    par: Parallel
    model: nn.Module
    fwd: nn.Module
    optimizer: Optimizer
    loader: Any  # TokenLoader or ChatLoader: next_batch, state_dict, load_state_dict
    val_loader: Callable[[], Any]  # a fresh loader over the same fixed validation batches
    guard: StepGuard
    stopper: EarlyStopper
    probe: Probe | None  # eval tasks every N steps, run on the main process
    out_dir: Path
    context: int
    bytes_per_token: float | None
    identity: dict  # fingerprint, config, tokenizer: written with every checkpoint, matched at resume
    extras: dict[str, Stateful] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    budget: StepBudget = None  # type: ignore[assignment]  # set by build_job: the schedule's length
    ckpt: Checkpointer = None  # type: ignore[assignment]  # set by build_job: it saves this job
    flops: float = 0.0  # model FLOPs per token, for MFU
    peak: float = 0.0  # the device's peak FLOP/s
    started: float = field(default_factory=time.time)  # wall clock at build time, setup included

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The checkpoint's ``state.json``: the same keys as every lmforge checkpoint has held."""
        p = self.progress.state_dict()
        return {"step": p["step"], "tokens_seen": p["tokens_seen"], "train_seconds": p["train_seconds"],
                "loader": self.loader.state_dict(), "fingerprint": self.identity["fingerprint"],
                "config": self.identity["config"], "val": p["val"],
                "tokenizer_sha256": self.identity["tokenizer_sha256"], "early_stop": self.stopper.state_dict(),
                "guard": self.guard.state_dict(), **{k: v.state_dict() for k, v in self.extras.items()},
                **({"schedule": self.budget.state_dict()} if self.budget.auto else {})}  # steps: auto only

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's state; refuses one made by another model or train config."""
        saved_arch = state["config"]["model"]["arch"]
        if saved_arch != self.cfg.model.arch:
            raise ConfigError(f"holds a '{saved_arch}' model but model.arch is '{self.cfg.model.arch}'; "
                              f"use another --name or --train.resume=false")
        if state.get("fingerprint") != self.identity["fingerprint"]:
            raise ConfigError("was trained with another model/train config; start a new run (--name NEW) or "
                              "pass --train.resume=false to train this one from scratch")
        self.progress.load_state_dict(state)
        self.loader.load_state_dict(state["loader"])
        self.stopper.load_state_dict(state.get("early_stop", {}))
        self.guard.load_state_dict(state.get("guard", {}))
        self.budget.load_state_dict(state.get("schedule", {}))  # a length fixed before: never measured again
        for name, part in self.extras.items():
            part.load_state_dict(state.get(name, {}))

    def out_of_time(self) -> bool:
        """Whether ``train.max_seconds`` of training (setup and evaluation excluded) are spent."""
        limit = self.cfg.train.max_seconds
        return limit is not None and self.progress.train_seconds >= limit

    def resume(self) -> None:
        """The newest checkpoint restored into every part (``train.resume``), or old ones cleared (a fresh
        start on purpose); then each rank's random stream for the step reached."""
        if self.rt.is_main and (debris := self.ckpt.remove_debris()):  # left by a kill or a disk error
            print(f"removed {len(debris)} half-written checkpoint folder(s) in {self.ckpt.ckpt_dir}: "
                  f"{', '.join(debris)}")
        if self.cfg.train.resume:
            self.ckpt.load()
        elif self.rt.is_main:
            self.ckpt.clear()  # old checkpoints must not be resumed later
        self.par.reseed(self.cfg.seed, self.progress.step)  # under torchrun: each rank its own stream (dropout)

    def open_logger(self) -> MetricsLogger:
        """The run's metrics sink, from the step reached (a resumed run drops lines past it)."""
        tc = self.cfg.train
        self.ckpt.logger = MetricsLogger(self.out_dir, total_steps=self.budget.steps, start_step=self.progress.step,
                                         tensorboard=tc.tensorboard, progress=tc.progress, enabled=self.rt.is_main)
        return self.ckpt.logger

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self) -> dict:
        """Loss, perplexity, next-token accuracy (and bits per byte) over the same validation batches."""
        loader, model, rt = self.val_loader(), self.model, self.rt
        was_training = model.training
        model.eval()
        losses, correct, count = [], 0, 0
        # A preference objective scores pairs itself (its accuracy: chosen answers that win); a model, tokens.
        scorer = self.fwd if hasattr(self.fwd, "hits") else model
        hits = getattr(scorer, "hits", _next_token_hits)
        for _ in range(self.cfg.train.eval_batches):
            batch = [t.to(rt.device) for t in loader.next_batch()]
            with rt.autocast():
                out, loss = scorer(*batch)
            losses.append(loss.item())
            c, n = hits(out, batch[1])
            correct, count = correct + c, count + n
        model.train(was_training)
        mean = sum(losses) / len(losses)
        out = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "acc": correct / count}
        if self.bytes_per_token:
            out["bpb"] = mean / math.log(2) / self.bytes_per_token
        return out


def _next_token_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    scored = y != -100  # fine-tuning masks targets (prompts, padding); pre-training scores all
    return int(((logits.argmax(-1) == y) & scored).sum()), int(scored.sum())


def build_job(cfg: RunConfig, *, tokenizer: Tokenizer, tokenizer_path: Path, data_dir: Path, out_dir: Path,
              fingerprint: Callable[[RunConfig], str], context: int | None = None, make_loader: Callable = TokenLoader,
              prepare: Callable[[nn.Module], dict[str, Stateful]] | None = None,
              bytes_per_token: float | None = None, on_eval: OnEval | None = None,
              probe: Probe | None = None,
              objective: Callable[[nn.Module, nn.Module], nn.Module] | None = None) -> TrainJob:
    """Assemble a job: runtime, model (``prepare`` loads pretrained weights or adds adapters, returning the
    extra state to checkpoint), parallelism, optimizer, loaders, guards and checkpointer, in the order
    that fixes the random streams (the same weights and batches as every earlier lmforge for a seed).
    ``fingerprint`` hashes the resolved config (vocabulary and width filled in), as every checkpoint
    has recorded it."""
    started = time.time()
    cfg = cfg.model_copy(deep=True)  # vocab_size is filled in below; the caller's config stays as given
    tc = cfg.train
    rt = Runtime.setup(tc, seed=cfg.seed)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    cfg.model = fit_to_budget(cfg.model)  # a parameter budget becomes the width saved with every checkpoint
    model = build_model(cfg.model).to(rt.device)
    extras = prepare(model) if prepare else {}
    par = Parallel(tc, rt)  # the global batch split over ranks; prints the plan under torchrun
    fwd = par.wrap(model)  # DDP / FSDP2 / torch.compile, applied from outside; before the optimizer (FSDP)
    if objective is not None:  # preference tuning: a loss over pairs around the (wrapped) model
        fwd = objective(model, fwd)
    optimizer = build_optimizer(model, tc, rt.device.type)
    context = context or cfg.model.context
    loader = make_loader(data_dir, "train", par.micro_batch, context, seed=cfg.seed, rank=rt.rank,
                         world_size=rt.world_size)
    token_windows = getattr(make_loader, "func", make_loader) is TokenLoader  # a partial keeps its class in .func
    val_context = min(context, _val_tokens(data_dir) - 1) if token_windows else context
    val_args = dict(shards=data_dir, split="val", batch_size=tc.batch_size, context=val_context,  # every rank
                    seed=0, rank=0, world_size=1)  # scores the same batches: the figure one process gets
    ckpt_dir = out_dir / "ckpt"
    guard = StepGuard(tc.max_bad_steps, tc.spike_factor, par.micro_batch * par.accum,  # NaN/inf: skip the update
                      hint=f"The checkpoints in {ckpt_dir} are intact; lower train.lr (now {tc.lr}) or "
                           f"raise train.warmup_steps, then run the same command to resume")
    identity = {"fingerprint": fingerprint(cfg), "config": cfg.model_dump(),
                "tokenizer_sha256": tokenizer_digest(tokenizer_path)}
    job = TrainJob(cfg, rt, par, model, fwd, optimizer, loader, lambda: make_loader(**val_args), guard,
                   EarlyStopper(tc.early_stop_patience, tc.early_stop_min_delta, on_eval),  # may end a run at an eval
                   probe if rt.is_main else None,
                   out_dir, context, bytes_per_token, identity, extras)
    job.flops, job.peak, job.started = model.flops_per_token(), peak_flops(rt.device), started
    job.budget = StepBudget(tc)
    layouts = (Sharded(), GatheredFile()) if par.mode == "fsdp" else (SingleFile(), Sharded())
    job.ckpt = Checkpointer(ckpt_dir, model, optimizer, job, keep_last=tc.keep_last, every=tc.ckpt_every,
                            layouts=layouts, on_error=tc.on_save_error, is_main=rt.is_main)
    return job


def _val_tokens(data_dir: Path) -> int:
    return sum(shard_info(p)["tokens"] for p in list_shards(data_dir, "val"))
