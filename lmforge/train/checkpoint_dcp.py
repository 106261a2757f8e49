"""A run's checkpoints on any number of ranks: lmforge's single-file format plus sharded DCP folders.

:mod:`lmforge.train.checkpoint` writes one self-contained folder per checkpoint
(safetensors weights, optimizer, RNG, state) and is what eval, serving and export read.
This module wraps a :class:`~lmforge.train.checkpoint.Checkpointer` for the training loop
and decides who writes what:

- one process, or DDP: rank 0 writes the ordinary checkpoint (every rank holds the same
  weights); every rank reads it at resume, whatever the number of ranks now.
- FSDP: every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP) to
  ``train/dcp/step_000123/`` (plus ``state.json`` from rank 0), so no rank ever holds
  the whole model. When training ends (last step, time limit, signal, early stop),
  :meth:`RunCheckpoints.finish` gathers the weights and optimizer state once and rank 0
  writes them as an ordinary checkpoint in ``train/ckpt/``, so everything downstream
  just works.

A resume takes the newest checkpoint of either kind and loads it into whatever the run
is now: DCP re-shards to any number of ranks, and an ordinary checkpoint is scattered
into FSDP shards, so a run can move between 1 process, DDP and FSDP. Resuming from a DCP
folder on one process needs no process group (DCP reads it locally). Usage (the loop)::

    ckpt = RunCheckpoints(Checkpointer(run_dir / "train" / "ckpt"), rt, fsdp=par.mode == "fsdp")
    if (path := ckpt.latest_valid()) is not None:
        saved = ckpt.read_state(path)
        state = ckpt.load(path, model, optimizer)
    ...
    ckpt.save(step, model, optimizer, state)      # on every rank; each does its part
    ckpt.finish(model, optimizer)                  # after the loop: FSDP -> single-file checkpoint
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from lmforge.runtime import Runtime, barrier
from lmforge.train.checkpoint import OPTIMIZER, Checkpointer, CheckpointError, load_weights, read_state

STATE = "state.json"
DCP_META = ".metadata"  # written by DCP's coordinator once every rank's shards are on disk
_STEP_RE = re.compile(r"step_(\d+)")


class _Held:
    """A state dict already gathered, presented as the object Checkpointer.save expects."""

    def __init__(self, sd: dict) -> None:
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def _names(model: nn.Module, optimizer: Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the order index-keyed optimizer state uses)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(osd: dict) -> dict:
    """A name-keyed optimizer state dict (DCP's) as torch's usual index-keyed one."""
    index = {name: i for i, name in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def _by_name(osd: dict, names: list[str], path: Path) -> dict:
    """An index-keyed optimizer state dict as a name-keyed one, for the optimizer whose order is ``names``."""
    saved = [i for g in osd["param_groups"] for i in g["params"]]
    if sorted(saved) != list(range(len(names))):
        raise CheckpointError(f"{path / OPTIMIZER} holds {len(saved)} parameters but this optimizer has "
                              f"{len(names)}; the checkpoint was made for a different model or optimizer config")
    return {"state": {names[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


class RunCheckpoints:
    """The loop's view of its checkpoints on any number of ranks; see the module docstring."""

    def __init__(self, ckpt: Checkpointer, rt: Runtime, fsdp: bool = False) -> None:
        self.ckpt, self.rt, self.fsdp = ckpt, rt, fsdp
        self.dcp_dir = ckpt.ckpt_dir.parent / "dcp"
        self._last_dcp: Path | None = None

    def __getattr__(self, name: str):  # every other Checkpointer method and attribute (should_save, list, ...)
        return getattr(self.ckpt, name)

    # ------------------------------------------------------------------ finding
    def dcp_list(self) -> list[Path]:
        """Complete DCP checkpoint folders, oldest step first."""
        if not self.dcp_dir.is_dir():
            return []
        found = [p for p in self.dcp_dir.iterdir() if _STEP_RE.fullmatch(p.name)
                 and (p / DCP_META).is_file() and (p / STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_valid(self) -> Path | None:
        """The newest checkpoint of either kind (the single-file one when both hold the same step).

        When checkpoints exist and none is valid, :class:`CheckpointError` names them and says how to
        start over on purpose: a run never starts from step 0 over its user's work by itself.
        """
        sharded = (self.dcp_list() or [None])[-1]
        try:
            single = self.ckpt.latest_valid()
        except CheckpointError as e:
            if sharded is None:
                raise CheckpointError(f"{e}. To train from step 0 on purpose, pass --train.resume=false (it "
                                      f"deletes them) or move {self.ckpt.ckpt_dir} elsewhere first") from None
            single = None  # a sharded checkpoint is left to resume from
        if sharded is None or (single is not None and int(single.name[5:]) >= int(sharded.name[5:])):
            return single
        return sharded

    def _is_dcp(self, path: Path) -> bool:
        return Path(path).parent == self.dcp_dir

    def read_state(self, path: Path) -> dict:
        if self._is_dcp(path):
            return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
        return read_state(path)

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict:
        """Weights and optimizer state from ``path`` into the model as it is now (plain, DDP or FSDP)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
            set_state_dict,
        )

        path = Path(path)
        if self._is_dcp(path):
            import torch.distributed.checkpoint as dcp

            msd, osd = get_state_dict(model, optimizer)  # this run's layout; DCP reads each rank's part into it
            sd = {"model": msd, "optim": osd}
            alone = not torch.distributed.is_initialized()
            with warnings.catch_warnings():  # DCP warns that one process reads the shards alone: here it is meant to
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(sd, checkpoint_id=str(path), no_dist=alone)
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            return self.read_state(path)
        if not self.fsdp:
            return self.ckpt.load(path, model, optimizer)
        # A single-file checkpoint into FSDP shards: every rank reads the file and keeps its own slice.
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_weights(path), options=full)
        if not (path / OPTIMIZER).is_file():
            raise CheckpointError(f"checkpoint {path} holds no optimizer state: it cannot resume training")
        osd = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, _by_name(osd, _names(model, optimizer), path), options=full)
        return read_state(path)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, model: nn.Module, optimizer: Optimizer, state: dict) -> Path | None:
        """Called on every rank: rank 0 writes the single-file checkpoint, or every rank its DCP shards."""
        if not self.fsdp:
            return self.ckpt.save(step, model, optimizer, state) if self.rt.is_main else None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.dcp_dir / f"step_{step:06d}"
        tmp = self.dcp_dir / f".tmp-{final.name}"
        if self.rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        msd, osd = get_state_dict(model, optimizer)  # sharded: each rank writes only its own part
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))  # returns once every rank's part is written
        if self.rt.is_main:
            (tmp / STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # whole or absent: a crash mid-save leaves only a .tmp- folder
            self._prune(step)
        barrier()
        self._last_dcp = final
        return final

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` DCP checkpoints; drop those of an abandoned later timeline."""
        found = self.dcp_list()
        older = [p for p in found if int(p.name[5:]) < step]
        doomed = [p for p in found if int(p.name[5:]) > step] + older[: max(0, len(older) - (self.ckpt.keep_last - 1))]
        for p in doomed + [p for p in self.dcp_dir.iterdir() if p.name.startswith(".tmp-")]:  # + a crash's debris
            shutil.rmtree(p, ignore_errors=True)

    def finish(self, model: nn.Module, optimizer: Optimizer) -> Path | None:
        """FSDP: write the last DCP checkpoint's step as an ordinary checkpoint (all ranks take part)."""
        if not self.fsdp or self._last_dcp is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Gathered to rank 0's CPU memory only; the other ranks get empty dicts.
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        written = None
        if self.rt.is_main:
            first: dict[int, str] = {}
            for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor, stored once
                if id(p) in first and first[id(p)] in msd:
                    msd[name] = msd[first[id(p)]]
                first.setdefault(id(p), name)
            state = self.read_state(self._last_dcp)
            written = self.ckpt.save(state["step"], _Held(msd), _Held(_by_index(osd)), state)
        barrier()
        return written

    def clear(self) -> None:
        """An explicit fresh start (train.resume=false): old checkpoints of both kinds must not be resumed later."""
        for folder in (self.ckpt.ckpt_dir, self.dcp_dir):
            if folder.exists():
                shutil.rmtree(folder)
