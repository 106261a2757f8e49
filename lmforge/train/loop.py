"""THE training loop, shared by pre-training and fine-tuning.

Reads top to bottom like nanoGPT's ``train.py``: set up (runtime, tokenizer,
model, optimizer, loaders, checkpointer, logger), resume if a checkpoint of
this run exists, then step: learning rate, forward, backward, clip, update,
log, evaluate, checkpoint. Every component decides for itself when to act.

Run it through the CLI (``lmforge train --config configs/demo.yaml``), which
prepares the tokenizer and shards first, or import it::

    from lmforge.train.loop import main
    stats = main(cfg, run_dir)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from lmforge import artifacts
from lmforge.config import ConfigError, RunConfig
from lmforge.data.loader import TokenLoader
from lmforge.data.pack import list_shards, shard_info
from lmforge.data.tokenizer import Tokenizer, tokenizer_digest
from lmforge.models import build_model, fit_to_budget
from lmforge.runtime import Runtime
from lmforge.train.checkpoint import Checkpointer
from lmforge.train.checkpoint_dcp import RunCheckpoints
from lmforge.train.distributed import Parallel
from lmforge.train.early_stop import EarlyStopper, OnEval
from lmforge.train.guard import StepGuard, save_checkpoint
from lmforge.train.metrics import MetricsLogger, Throughput, peak_flops
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.preemption import Preemption

if TYPE_CHECKING:
    from lmforge.finetune.setup import FinetuneSetup


class Probe(Protocol):
    """Eval tasks every N steps (:class:`lmforge.eval.tasks.TaskProbe`), built by the caller: train imports no eval."""

    def maybe_run(self, step: int, model: torch.nn.Module, logger: MetricsLogger) -> None: ...


def train_fingerprint(cfg: RunConfig, data_fingerprint: str = "") -> str:
    """Hash of everything that shapes the trajectory of the weights: config and training data.

    The config fields are those marked as invalidating the train stage (lmforge.config); the others
    (how long to train, how to display it, how the batch is spread over ranks) may change on resume.
    """
    return artifacts.fingerprint(cfg, "train", resume=True, data=data_fingerprint)


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, loader_args: dict, n_batches: int, rt: Runtime,
                      make_loader: Callable = TokenLoader) -> dict:
    """Mean loss and next-token accuracy over the same fixed validation batches every time."""
    loader = make_loader(**loader_args)
    was_training = model.training
    model.eval()
    losses, correct, count = [], 0, 0
    for _ in range(n_batches):
        x, y = (t.to(rt.device) for t in loader.next_batch())
        with rt.autocast():
            logits, loss = model(x, y)
        losses.append(loss.item())
        scored = y != -100  # fine-tuning masks targets (prompts, padding); pre-training scores all
        correct += ((logits.argmax(-1) == y) & scored).sum().item()
        count += scored.sum().item()
    model.train(was_training)
    loss = sum(losses) / len(losses)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "acc": correct / count}


def main(cfg: RunConfig, run_dir: Path, bytes_per_token: float | None = None, data_fingerprint: str = "",
         on_eval: OnEval | None = None, finetune: FinetuneSetup | None = None, probe: Probe | None = None) -> dict:
    # ---------------------------------------------------------------- setup
    t_start = time.time()
    cfg = cfg.model_copy(deep=True)  # vocab_size is filled in below; the caller's config stays as given
    tc = cfg.train
    rt = Runtime.setup(tc, seed=cfg.seed)
    tok = finetune.tokenizer if finetune else Tokenizer.load(run_dir / "tokenizer")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size})")
    cfg.model = fit_to_budget(cfg.model)  # a parameter budget becomes the width saved with every checkpoint
    model = build_model(cfg.model).to(rt.device)
    if finetune:
        finetune.prepare(model)  # pretrained weights, then LoRA adapters or frozen layers
    par = Parallel(tc, rt)  # the global batch split over ranks; prints the plan under torchrun
    fwd = par.wrap(model)  # DDP / FSDP2 / torch.compile, applied from outside; before the optimizer (FSDP)
    optimizer = build_optimizer(model, tc, rt.device.type)
    data_dir = finetune.data_dir if finetune else run_dir / "pack"
    make_loader = finetune.loader if finetune else TokenLoader  # fine-tuning: chat batches or text shards
    context, batch = (finetune.context if finetune else cfg.model.context), tc.batch_size
    train_loader = make_loader(data_dir, "train", par.micro_batch, context, seed=cfg.seed,
                               rank=rt.rank, world_size=rt.world_size)
    val_context = min(context, _val_tokens(data_dir) - 1) if make_loader is TokenLoader else context
    val_args = dict(shards=data_dir, split="val", batch_size=batch, context=val_context,  # every rank scores
                    seed=0, rank=0, world_size=1)  # the same batches: the figure a single process gets
    out_dir = finetune.out_dir if finetune else run_dir / "train"
    ckpt = RunCheckpoints(Checkpointer(out_dir / "ckpt", keep_last=tc.keep_last, every=tc.ckpt_every), rt,
                          fsdp=par.mode == "fsdp")  # who writes what on many ranks; DCP shards under FSDP
    if rt.is_main and (debris := ckpt.remove_debris()):  # left by a kill or a disk error during a save
        print(f"removed {len(debris)} half-written checkpoint folder(s) in {ckpt.ckpt_dir}: {', '.join(debris)}")
    guard = StepGuard(tc.max_bad_steps, tc.spike_factor, par.micro_batch * par.accum,  # NaN/inf: skip the update
                      hint=f"The checkpoints in {ckpt.ckpt_dir} are intact; lower train.lr (now {tc.lr}) or "
                           f"raise train.warmup_steps, then run the same command to resume")
    fingerprint = train_fingerprint(cfg, data_fingerprint)
    tok_digest = tokenizer_digest(finetune.tokenizer_path if finetune else run_dir / "tokenizer" / "tokenizer.json")
    stopper = EarlyStopper(tc.early_stop_patience, tc.early_stop_min_delta, on_eval)  # may end the run at an eval

    # --------------------------------------------------------------- resume
    step, tokens_seen, train_seconds = 0, 0, 0.0
    last_val: dict = {}
    path = ckpt.latest_valid() if tc.resume else None
    if path is not None:
        saved = ckpt.read_state(path)
        saved_arch = saved["config"]["model"]["arch"]
        if saved_arch != cfg.model.arch:
            raise ConfigError(f"{path} holds a '{saved_arch}' model but model.arch is '{cfg.model.arch}'; "
                              f"use another --name or --train.resume=false")
        if saved.get("fingerprint") != fingerprint:
            raise ConfigError(f"{path} was trained with another model/train config; start a new run "
                              f"(--name NEW) or pass --train.resume=false to train this one from scratch")
        state = ckpt.load(path, model, optimizer)
        step, tokens_seen = state["step"], state["tokens_seen"]
        train_seconds = state["train_seconds"]
        last_val = state.get("val") or {}  # a finished run resumed at its end still reports its score
        train_loader.load_state_dict(state["loader"])
        stopper.load_state_dict(state.get("early_stop", {}))
        guard.load_state_dict(state.get("guard", {}))
        print(f"resumed from {path} at step {step}")
    elif not tc.resume and rt.is_main:
        ckpt.clear()  # an explicit fresh start: old checkpoints must not be resumed later
    par.reseed(cfg.seed, step)  # under torchrun: each rank its own random stream (dropout)

    logger = MetricsLogger(out_dir, total_steps=tc.steps, start_step=step, tensorboard=tc.tensorboard,
                           progress=tc.progress, enabled=rt.is_main)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(rt.device)
    meter = Throughput()
    tokens_per_step = par.plan.global_batch * context  # all ranks together
    model.train()
    preempt = Preemption().install()  # SIGTERM / Ctrl-C: checkpoint at the step boundary, exit cleanly

    # ----------------------------------------------------------------- loop
    stopped_by = "steps"
    train_loss: float | None = None  # None until the first log_every steps are measured
    loss_acc = torch.zeros((), device=rt.device)
    while step < tc.steps and not (tc.max_seconds is not None and train_seconds >= tc.max_seconds):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        at, step_loss = train_loader.state_dict(), torch.zeros((), device=rt.device)  # at: names the batch
        for micro in range(par.accum):
            x, y = (t.to(rt.device, non_blocking=True) for t in train_loader.next_batch())
            with par.no_sync(fwd, micro):  # gradients are reduced across ranks on the last micro-batch only
                with rt.autocast():
                    _, loss = fwd(x, y)
                loss = guard.inject(loss, step)  # test hook (LMFORGE_FAULT_NAN_STEPS); a no-op otherwise
                (loss / par.accum).backward()
            step_loss += loss.detach() / par.accum
        step_loss = par.average(step_loss)  # the global batch's loss, the same on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        grad_norm = par.grad_norm(grad_norm)  # a plain tensor (FSDP returns a DTensor)
        if guard.skip(step, step_loss, grad_norm, train_loader, at, logger):  # NaN/inf: same step, next batch
            optimizer.zero_grad(set_to_none=True)
            continue
        loss_acc += step_loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        rt.sync()
        dt = time.perf_counter() - t0
        dt, signalled = par.agree(dt, preempt.requested is not None)  # every rank stops at the same step
        train_seconds += dt
        meter.update(tokens_per_step, dt)
        out_of_time = tc.max_seconds is not None and train_seconds >= tc.max_seconds
        interrupted = (tc.stop_at is not None and step >= tc.stop_at) or signalled
        last_step = step == tc.steps or out_of_time or interrupted

        if step % tc.log_every == 0 or last_step:
            train_loss = loss_acc.item() / (step % tc.log_every or tc.log_every)
            loss_acc.zero_()
            tps = meter.tokens_per_s()
            logger.log(step, "train", {"loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                                       "tokens_per_s": tps, "mfu": meter.mfu(tps, flops_per_token, peak),
                                       "tokens": tokens_seen, "seconds": train_seconds})
        if (tc.eval_every and step % tc.eval_every == 0) or last_step:
            last_val = estimate_val_loss(model, val_args, tc.eval_batches, rt, make_loader)
            if bytes_per_token:
                last_val["bpb"] = last_val["loss"] / math.log(2) / bytes_per_token
            logger.log(step, "val", {**last_val, "seconds": train_seconds})
            last_step = stopper.update(step, last_val) or last_step
        if probe is not None and rt.is_main:
            probe.maybe_run(step, model, logger)
        logger.advance(step, {"loss": train_loss, "val": last_val.get("loss"),
                              "tok/s": f"{meter.tokens_per_s():,.0f}"})
        if ckpt.should_save(step, last_step):  # every rank: RunCheckpoints decides who writes
            save_checkpoint(ckpt, tc.on_save_error, logger, step, model, optimizer, {
                "step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                "loader": train_loader.state_dict(), "fingerprint": fingerprint,
                "config": cfg.model_dump(), "val": last_val, "tokenizer_sha256": tok_digest,
                "early_stop": stopper.state_dict(), "guard": guard.state_dict(),
                **(finetune.checkpoint_state() if finetune else {}),
            }, last_step)
        if out_of_time or interrupted or stopper.reason:
            stopped_by = stopper.reason or ("time" if out_of_time else preempt.requested or "stop_at")
            break
    preempt.restore()
    ckpt.finish(model, optimizer)  # FSDP: the last sharded checkpoint also as a single file for eval/serve/export
    logger.close()
    tps = tokens_seen / train_seconds if train_seconds else 0.0
    return {
        "steps": step, "stopped_by": stopped_by, "complete": stopped_by not in ("stop_at", "pruned", "SIGTERM", "SIGINT"),
        "tokens_seen": tokens_seen, **stopper.summary(), "skipped_steps": guard.skipped,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - t_start, 2),
        "tokens_per_s": round(tps, 1), "mfu": meter.mfu(tps, flops_per_token, peak),
        "params": model.num_params(), "params_non_embedding": model.num_params(exclude_embeddings=True),
        "d_model": cfg.model.d_model, "flops_per_token": flops_per_token, "peak_flops": peak,
        "last_val": last_val, "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."),
    }


def _val_tokens(data_dir: Path) -> int:
    return sum(shard_info(p)["tokens"] for p in list_shards(data_dir, "val"))
