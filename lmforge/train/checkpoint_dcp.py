"""The checkpoint layouts for FSDP: sharded DCP folders, and the single file gathered from the shards.

:class:`~lmforge.train.checkpoint.Checkpointer` writes and reads every layout the same way (temporary
name, fsync, checksums, rename, pruning, one save-error policy); a layout only says how the model and
optimizer state are laid out in the folder:

- :class:`Sharded`: every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP) to
  ``train/dcp/step_000123/``, so no rank ever holds the whole model; the main rank adds ``state.json``,
  ``rng.pt`` and ``checksums.json``. DCP re-shards at load to any number of ranks, and one process
  reads the folder without a process group.
- :class:`GatheredFile`: the single-file layout under FSDP. Writing gathers the weights and optimizer
  state once to the main rank's CPU memory (when training ends, so that eval, serving and export just
  work); reading scatters a single-file checkpoint into this run's shards, so a run can move between
  one process, DDP and FSDP. Usage (the training job's builder)::

    layouts = (Sharded(), GatheredFile()) if par.mode == "fsdp" else (SingleFile(), Sharded())
    ckpt = Checkpointer(out_dir / "ckpt", model, optimizer, job_state, layouts=layouts, ...)
    ...
    ckpt.finish()    # after the loop: the last sharded checkpoint also as a single file
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from lmforge.train.checkpoint import (
    MODEL,
    OPTIMIZER,
    CheckpointError,
    SingleFile,
    load_weights,
    read_optimizer,
)
from lmforge.train.weights import save_weights


class Sharded:
    """Each rank's shards of the model and optimizer, written and read by DCP; see the module docstring."""

    collective = True

    def folder(self, ckpt_dir: Path) -> Path:
        return ckpt_dir.parent / "dcp"

    def needs(self, optimizer: Optimizer | None, restore_rng: bool) -> None:
        return None  # every shard is read: verify them all

    def write(self, tmp: Path, model: nn.Module, optimizer: Optimizer | None, is_main: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)  # sharded: each rank writes only its own part
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))  # returns once every rank's part is written

    def read(self, path: Path, model: nn.Module, optimizer: Optimizer | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)  # this run's layout; DCP reads each rank's part into it
        sd = {"model": msd, "optim": osd}
        alone = not torch.distributed.is_initialized()
        with warnings.catch_warnings():  # DCP warns that one process reads the shards alone: here it is meant to
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(sd, checkpoint_id=str(path), no_dist=alone)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class GatheredFile(SingleFile):
    """The single-file layout for a model sharded by FSDP: gathered to write, scattered to read."""

    collective = True  # the gather is a collective: every rank takes part

    def write(self, tmp: Path, model: nn.Module, optimizer: Optimizer | None, is_main: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Gathered to rank 0's CPU memory only; the other ranks get empty dicts.
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main:
            return
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor, stored once
            if id(p) in first and first[id(p)] in msd:
                msd[name] = msd[first[id(p)]]
            first.setdefault(id(p), name)
        save_weights(msd, tmp / MODEL)
        torch.save(_by_index(osd), tmp / OPTIMIZER)

    def read(self, path: Path, model: nn.Module, optimizer: Optimizer | None) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank reads the file and keeps its own slice.
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_weights(path), options=full)
        if optimizer is not None:
            osd = _by_name(read_optimizer(path), _names(model, optimizer), path)
            set_optimizer_state_dict(model, optimizer, osd, options=full)



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
