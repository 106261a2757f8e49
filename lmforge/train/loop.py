"""THE training loop, shared by pre-training and fine-tuning.

Reads top to bottom like nanoGPT's ``train.py``. The job (:mod:`lmforge.train.job`) is built before
it: model, optimizer, loaders, guards and checkpointer, each Stateful. :func:`train` resumes the job
if a checkpoint of it exists, then steps: learning rate, forward, backward, clip, update, log,
evaluate, checkpoint. Every component decides for itself when to act, so the loop never asks whether
it pre-trains or fine-tunes (:func:`lmforge.finetune.setup.build_job` builds the fine-tuning job).

Run it through the CLI (``lmforge train --config configs/demo.yaml``), which prepares the tokenizer
and shards first, or import it::

    from lmforge.train.loop import main
    stats = main(cfg, run_dir)          # pre-training: builds the job, then train(job)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmforge import artifacts
from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.train.early_stop import OnEval
from lmforge.train.job import Probe, TrainJob, build_job
from lmforge.train.metrics import MetricsLogger, Throughput
from lmforge.train.optim import lr_at, set_lr
from lmforge.train.preemption import Preemption


def train_fingerprint(cfg: RunConfig, data_fingerprint: str = "") -> str:
    """Hash of everything that shapes the trajectory of the weights: config and training data.

    The config fields are those marked as invalidating the train stage (lmforge.config); the others
    (how long to train, how to display it, how the batch is spread over ranks) may change on resume.
    """
    return artifacts.fingerprint(cfg, "train", resume=True, data=data_fingerprint)


def main(cfg: RunConfig, run_dir: Path, bytes_per_token: float | None = None, data_fingerprint: str = "",
         on_eval: OnEval | None = None, probe: Probe | None = None) -> dict:
    """Pre-train on ``run_dir``'s packed shards into ``run_dir/train``; returns the run's summary."""
    job = build_job(cfg, tokenizer=Tokenizer.load(run_dir / "tokenizer"),
                    tokenizer_path=run_dir / "tokenizer" / "tokenizer.json", data_dir=run_dir / "pack",
                    out_dir=run_dir / "train",
                    fingerprint=lambda resolved: train_fingerprint(resolved, data_fingerprint),
                    bytes_per_token=bytes_per_token, on_eval=on_eval, probe=probe)
    return train(job)


def train(job: TrainJob) -> dict:
    """Resume ``job`` where its checkpoints left it, train until a stop condition, return the summary."""
    job.resume()
    meter = Throughput()
    # SIGTERM / Ctrl-C: checkpoint at the step boundary, exit cleanly. Both are closed and restored however
    # the steps end (an error too: a budget too small for steps: auto, too many bad steps).
    with job.open_logger() as logger, Preemption() as preempt:
        stopped_by = _steps(job, logger, meter, preempt)
        job.ckpt.finish()  # FSDP: the last sharded checkpoint also as a single file for eval/serve/export
    return summary(job, stopped_by, meter)


def _steps(job: TrainJob, logger: MetricsLogger, meter: Throughput, preempt: Preemption) -> str:
    """Train until a stop condition; returns what stopped it."""
    tc, rt, par, model, optimizer, loader, guard = (job.cfg.train, job.rt, job.par, job.model, job.optimizer,
                                                    job.loader, job.guard)
    done = job.progress
    tokens_per_step = par.plan.global_batch * job.context  # all ranks together
    model.train()
    stopped_by, train_loss = "steps", None  # no loss until the first log_every steps are measured
    loss_acc = torch.zeros((), device=rt.device)
    while not job.budget.done(done.step) and not job.out_of_time():
        t0 = time.perf_counter()
        lr = lr_at(done.step, tc, job.budget.steps, job.budget.decay_start)
        set_lr(optimizer, lr)
        at, step_loss = loader.state_dict(), torch.zeros((), device=rt.device)  # at: names the batch
        for micro in range(par.accum):
            # (inputs, targets) or, packed fine-tuning, (inputs, targets, doc_ids): the model takes them as they come
            batch = [t.to(rt.device, non_blocking=True) for t in loader.next_batch()]
            with par.no_sync(job.fwd, micro):  # gradients are reduced across ranks on the last micro-batch only
                with rt.autocast():
                    _, loss = job.fwd(*batch)
                (loss / par.accum).backward()
            step_loss += loss.detach() / par.accum
        step_loss = par.average(step_loss)  # the global batch's loss, the same on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        grad_norm = par.grad_norm(grad_norm)  # a plain tensor (FSDP returns a DTensor)
        if guard.skip(done.step, step_loss, grad_norm, loader, at, logger):  # NaN/inf: same step, next batch
            optimizer.zero_grad(set_to_none=True)
            continue
        loss_acc += step_loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rt.sync()
        dt, signalled = par.agree(time.perf_counter() - t0, preempt.requested is not None)  # all stop together
        done.advance(tokens_per_step, dt)
        meter.update(tokens_per_step, dt)
        job.budget.measure(done.step, done.train_seconds, dt)  # steps: auto: re-estimates the length until the decay
        out_of_time = job.out_of_time()
        interrupted = (tc.stop_at is not None and done.step >= tc.stop_at) or signalled
        last_step = job.budget.done(done.step) or out_of_time or interrupted

        if done.step % tc.log_every == 0 or last_step:
            train_loss = _log_train(job, logger, meter, loss_acc, lr, grad_norm)
        if (tc.eval_every and done.step % tc.eval_every == 0) or last_step:
            done.val = job.validate()
            logger.log(done.step, "val", {**done.val, "seconds": done.train_seconds})
            last_step = job.stopper.update(done.step, done.val) or last_step
        if job.probe is not None:
            job.probe.maybe_run(done.step, model, logger)
        logger.advance(done.step, {"loss": train_loss, "val": done.val.get("loss"),
                                   "tok/s": f"{meter.tokens_per_s():,.0f}"}, total=job.budget.steps)
        job.ckpt.save(done.step, last_step)  # on every rank, when due; the checkpointer decides who writes
        if out_of_time or interrupted or job.stopper.reason:
            stopped_by = job.stopper.reason or ("time" if out_of_time else preempt.requested or "stop_at")
            break
    return stopped_by


def _log_train(job: TrainJob, logger: MetricsLogger, meter: Throughput, loss_acc: torch.Tensor, lr: float,
               grad_norm: torch.Tensor) -> float:
    """Log the mean training loss since the last log line (and speed); reads the loss off the device once."""
    done, every = job.progress, job.cfg.train.log_every
    train_loss = loss_acc.item() / (done.step % every or every)
    loss_acc.zero_()
    tps = meter.tokens_per_s()
    logger.log(done.step, "train", {"loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                                    "tokens_per_s": tps, "mfu": meter.mfu(tps, job.flops, job.peak),
                                    "tokens": done.tokens_seen, "seconds": done.train_seconds})
    return train_loss


def summary(job: TrainJob, stopped_by: str, meter: Throughput) -> dict:
    """What the run reports: steps, why it stopped, speed, size, the last validation estimate."""
    done, model = job.progress, job.model
    tps = done.tokens_seen / done.train_seconds if done.train_seconds else 0.0
    return {
        "steps": done.step, "stopped_by": stopped_by,
        "complete": stopped_by not in ("stop_at", "pruned", "SIGTERM", "SIGINT"),
        "tokens_seen": done.tokens_seen, **job.stopper.summary(), "skipped_steps": job.guard.skipped,
        "train_seconds": round(done.train_seconds, 2), "wall_seconds": round(time.time() - job.started, 2),
        "tokens_per_s": round(tps, 1), "mfu": meter.mfu(tps, job.flops, job.peak),
        "params": model.num_params(), "params_non_embedding": model.num_params(exclude_embeddings=True),
        "d_model": job.cfg.model.d_model, "flops_per_token": job.flops, "peak_flops": job.peak,
        "last_val": done.val, "device": str(job.rt.device), "dtype": str(job.rt.dtype).removeprefix("torch."),
        **({"budget": job.budget.summary(done.train_seconds)} if job.budget.auto else {}),
    }
