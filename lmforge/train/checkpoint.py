"""Checkpoints: the only place in lmforge that writes or reads them.

A checkpoint is a folder ``<ckpt_dir>/step_000123/`` holding ``model.safetensors`` (weights; tied
tensors stored once, their aliases in the metadata), ``optimizer.pt`` (absent when saved without an
optimizer), ``rng.pt`` (torch CPU/CUDA, numpy and python ``random`` states), ``state.json`` (the job's
state: step, loader position, config, counters) and, written last, ``checksums.json``
(``{file: {"sha256", "bytes"}}``). That is the single-file layout (:class:`SingleFile`); the sharded one
(:class:`lmforge.train.checkpoint_dcp.Sharded`, under FSDP) holds DCP's shards and ``.metadata`` in place
of the weights and optimizer files, in a ``dcp/`` folder beside ``ckpt/``. One :class:`Checkpointer` writes
and reads both, the same way:

Writes are atomic: everything goes to ``.tmp-step_000123/``, each file and the folder are fsynced, and
only then is the folder renamed to its final name, so a crash never leaves a folder that looks valid.
Readers check sizes and sha256 before trusting a file and fall back to the previous checkpoint when one
is truncated or damaged; when every one is damaged they raise :class:`CheckpointError` naming them. A
damaged checkpoint is never deleted: where pruning or a new save of its step would remove it, it is
renamed ``step_000123.damaged`` instead. Nothing is ever unpickled: safetensors for the weights and
``torch.load(weights_only=True)`` for the rest. Weights files (here and in the exports) are written by
:func:`lmforge.train.weights.write_safetensors`: the umask's file mode, and the same bytes for the same tensors.

A checkpointer is built over the parts of a job, every one :class:`Stateful`; the training loop then
only says when::

    ckpt = Checkpointer(run_dir / "train" / "ckpt", model, optimizer, job_state, keep_last=2, every=250)
    saved = ckpt.load()              # the newest valid checkpoint restored into every part, or None
    ...
    ckpt.save(step, last_step)       # writes when due; a disk error handled as train.on_save_error says

Eval and serving use :func:`resolve` (run folder, ckpt folder or checkpoint -> checkpoint),
:func:`load` (into a built model), :func:`load_weights` and :func:`read_state`.

The weights file itself (the safetensors writer, tied tensors, the model-compatibility check) is
:mod:`lmforge.train.weights`, which the exports and adapters write through too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from lmforge.config import ConfigError
from lmforge.runtime import barrier
from lmforge.train.weights import CheckpointError, check_compatible, read_weights, save_weights, unwrap

if TYPE_CHECKING:
    from lmforge.train.metrics import MetricsLogger

MODEL, OPTIMIZER, RNG, STATE, CHECKSUMS = "model.safetensors", "optimizer.pt", "rng.pt", "state.json", "checksums.json"
DCP_META = ".metadata"  # a sharded checkpoint's index, written by DCP once every rank's shards are on disk
_STEP_RE = re.compile(r"step_(\d+)")


def _log(message: str) -> None:
    """A warning for the person running lmforge: one line on stderr, as the rest of training reports."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ file safety
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk (folders only where the OS allows opening them)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _problem(path: Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint (checking only the files in ``only``), or None."""
    if not path.is_dir():
        return "not a folder" if path.exists() else "the folder does not exist"
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        return f"{CHECKSUMS} is missing: the write did not finish"
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{CHECKSUMS} is unreadable: {e}"
    if not isinstance(sums, dict):
        return f"{CHECKSUMS} is not a mapping of files"
    for name in (STATE, RNG, DCP_META if DCP_META in sums else MODEL):  # sharded, or single-file
        if name not in sums:
            return f"{name} is not listed in {CHECKSUMS}"
    for name, entry in sums.items():
        if only is not None and name not in only:
            continue
        if "/" in name or "\\" in name or (name.startswith(".") and name != DCP_META) or not isinstance(entry, dict):
            return f"{CHECKSUMS} has an invalid entry {name!r}"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, expected {entry.get('bytes')} (truncated or overwritten)"
        if _sha256(f) != entry.get("sha256"):
            return f"{name} does not match its sha256 (corrupted)"
    return None


def _disk_error(e: BaseException, folder: Path) -> OSError | None:
    """A writer's failure as the OSError it stands for (torch and safetensors raise their own types)."""
    if isinstance(e, OSError) or not isinstance(e, Exception):
        return None
    found = re.search(r"os error (\d+)", str(e))  # safetensors (Rust) names the errno
    if found:
        code = int(found.group(1))
    else:  # torch.save says only "iostream error": ask the file system
        try:
            st = os.statvfs(folder)
        except OSError:
            return None
        if st.f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif st.f_bavail * st.f_frsize < (1 << 20):
            code = errno.ENOSPC
        else:
            return None
    return OSError(code, os.strerror(code), str(folder))


def _signature(path: Path) -> tuple:
    """Cheap identity of a checkpoint's files, to skip re-hashing one verified moments ago."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))


def verify(path: Path, only: tuple[str, ...] | None = None) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's files (or those in ``only``) are intact."""
    reason = _problem(Path(path), only)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {reason}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder ``path`` (checksum-verified) as a state dict on the CPU."""
    verify(path, only=(MODEL,))
    return read_weights(Path(path) / MODEL)


def read_state(path: Path) -> dict:
    """The ``state.json`` dict of checkpoint folder ``path`` (checksum-verified)."""
    verify(path, only=(STATE,))
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ RNG
def _rng_state() -> dict:
    """All global generator states as tensors and plain lists, so ``weights_only`` loading accepts them."""
    algo, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"algorithm": str(algo), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has.
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------ layouts
class Stateful(Protocol):
    """What a checkpoint saves and restores: every part of a training job has these two methods."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SingleFile:
    """The single-file layout: the main process writes ``model.safetensors`` and ``optimizer.pt``.

    What eval, serving and export read. Every rank holds the same weights (one process, DDP), so the
    main one writes for all, and every rank reads the file at resume, whatever the number of ranks now.
    """

    collective = False  # only the main process takes part in a write

    def folder(self, ckpt_dir: Path) -> Path:
        return ckpt_dir

    def needs(self, optimizer: Optimizer | None, restore_rng: bool) -> tuple[str, ...]:
        """The files a load reads, so only those are hashed: serving skips the (larger) optimizer state."""
        return (MODEL, STATE) + ((OPTIMIZER,) if optimizer is not None else ()) + ((RNG,) if restore_rng else ())

    def write(self, tmp: Path, model: nn.Module, optimizer: Optimizer | None, is_main: bool) -> None:
        if is_main:
            save_weights(model, tmp / MODEL)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER)

    def read(self, path: Path, model: nn.Module, optimizer: Optimizer | None) -> None:
        target = unwrap(model)
        weights = read_weights(path / MODEL)
        check_compatible(weights, target, path)
        target.load_state_dict(weights, strict=True)
        if optimizer is not None:
            try:
                optimizer.load_state_dict(read_optimizer(path))
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{path / OPTIMIZER} does not fit this optimizer ({e}); the checkpoint "
                                      f"was made for a different model or optimizer config") from None


class Layout(Protocol):
    """How model and optimizer state are laid out in a checkpoint folder: :class:`SingleFile`, or sharded
    (:class:`lmforge.train.checkpoint_dcp.Sharded`). The checkpointer does the rest, the same for both."""

    collective: bool  # every rank takes part in a write (and waits for the others)

    def folder(self, ckpt_dir: Path) -> Path: ...

    def needs(self, optimizer: Optimizer | None, restore_rng: bool) -> tuple[str, ...] | None: ...

    def write(self, tmp: Path, model: nn.Module, optimizer: Optimizer | None, is_main: bool) -> None: ...

    def read(self, path: Path, model: nn.Module, optimizer: Optimizer | None) -> None: ...


def read_optimizer(path: Path) -> dict:
    """The optimizer state dict of checkpoint ``path`` (never unpickled: tensors and plain values only)."""
    if not (path / OPTIMIZER).is_file():
        raise CheckpointError(f"checkpoint {path} holds no optimizer state: load it without an optimizer")
    return torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ checkpointer
def _step_of(path: Path) -> int:
    return int(_STEP_RE.fullmatch(path.name).group(1))


class Checkpointer:
    """Saves and restores the parts of one job (model, optimizer, ``state``); lists, verifies and prunes.

    ``state`` is a :class:`Stateful` (or a plain dict) whose ``state_dict()`` is stored as ``state.json``.
    ``layouts[0]`` is how this run writes; every layout's folder is searched at resume, so a run moves
    between one process, DDP and FSDP. ``save(step, last_step)`` writes when due (every ``every`` steps
    and at the last step) and applies the one save-error policy, ``on_error``: a disk error stops the run
    (``stop``) or is reported and skipped (``continue``), except at the last step, whose checkpoint is the
    run's result. A checkpoint verified (or written) here is not hashed again while its files keep their
    sizes and modification times, so ``latest_valid()`` followed by ``load()`` reads the bytes once.
    """

    def __init__(self, ckpt_dir: Path, model: nn.Module | None = None, optimizer: Optimizer | None = None,
                 state: Stateful | dict | None = None, *, keep_last: int = 2, every: int = 0,
                 layouts: tuple[Layout, ...] = (SingleFile(),), on_error: str = "stop", is_main: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last})")
        if every < 0:
            raise ValueError(f"every must be 0 (only the last step) or positive (got {every})")
        self.ckpt_dir = Path(ckpt_dir)
        self.model, self.optimizer, self.state = model, optimizer, state
        self.keep_last, self.every, self.layouts = keep_last, every, layouts
        self.on_error, self.is_main = on_error, is_main
        self.logger: MetricsLogger | None = None  # where a skipped save is recorded (set once the run logs)
        self._verified: dict[Path, tuple] = {}
        self._last: int | None = None  # the step this process last wrote

    # ------------------------------------------------------------------ finding
    def list(self) -> list[Path]:
        """Checkpoint folders of every layout (valid or not, temporary ones excluded), oldest step first.

        Of two checkpoints of the same step, the single-file one comes last: the one a resume prefers.
        """
        found = []
        for rank, layout in enumerate(reversed(self.layouts)):
            folder = layout.folder(self.ckpt_dir)
            if folder.is_dir():
                found += [(_step_of(p), isinstance(layout, SingleFile), rank, p) for p in folder.iterdir()
                          if p.is_dir() and _STEP_RE.fullmatch(p.name)]
        return [p for *_, p in sorted(found)]

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files all verify, or None when the folder holds no checkpoint.

        A damaged one is skipped with a warning line on stderr. When checkpoints exist and none verifies,
        :class:`CheckpointError` names each with its reason: a run must never take that for "no checkpoint
        yet" and start again from step 0.
        """
        ckpts, damaged = self.list(), []
        for i in range(len(ckpts) - 1, -1, -1):
            reason = self._check(ckpts[i])
            if reason is None:
                return ckpts[i]
            damaged.append(f"{ckpts[i].name} ({reason})")
            if i > 0:
                _log(f"checkpoint {ckpts[i]} is damaged ({reason}); falling back to {ckpts[i - 1].name}")
        if damaged:
            raise CheckpointError(f"no valid checkpoint in {self.ckpt_dir}: every one is damaged: "
                                  f"{'; '.join(damaged)}. Nothing was deleted")
        return None

    def _check(self, path: Path, only: tuple[str, ...] | None = None) -> str | None:
        if path in self._verified and path.is_dir() and self._verified[path] == _signature(path):
            return None
        reason = _problem(path, only)
        if reason is None and only is None:
            self._verified[path] = _signature(path)
        return reason

    def _layout_of(self, path: Path) -> Layout:
        for layout in self.layouts:
            if layout.folder(self.ckpt_dir) == path.parent:
                return layout
        return self.layouts[0]

    # ------------------------------------------------------------------ loading
    def load(self, path: Path | None = None, restore_rng: bool = True) -> dict | None:
        """Restore ``state``, weights, optimizer and RNG from ``path``; returns the saved state dict.

        Without ``path``: the newest valid checkpoint (a resume, said on stdout), or None when there is
        none yet. The state is restored first, so a checkpoint of another config is refused before its
        weights are read.
        """
        resuming = path is None
        if resuming:
            try:
                path = self.latest_valid()
            except CheckpointError as e:
                raise CheckpointError(f"{e}. To train from step 0 on purpose, pass --train.resume=false (it "
                                      f"deletes them) or move {self.ckpt_dir} elsewhere first") from None
            if path is None:
                return None
        path = Path(path)
        layout = self._layout_of(path)
        reason = self._check(path, layout.needs(self.optimizer, restore_rng))
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {reason}")
        saved = json.loads((path / STATE).read_text(encoding="utf-8"))
        if self.state is not None and not isinstance(self.state, dict):
            try:
                self.state.load_state_dict(saved)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        layout.read(path, self.model, self.optimizer)
        if restore_rng:
            _set_rng_state(torch.load(path / RNG, map_location="cpu", weights_only=True))
        if resuming:
            print(f"resumed from {path} at step {saved.get('step')}")
        return saved

    # ------------------------------------------------------------------ saving
    def save(self, step: int, last_step: bool = False) -> Path | None:
        """Write checkpoint ``step`` if one is due (every ``every`` steps, and the last step), on every rank.

        A disk error (full disk, read-only folder) is handled as ``on_error`` says; see the class docstring.
        """
        if not (last_step or (self.every > 0 and step % self.every == 0)):
            return None
        try:
            return self.write(step)
        except OSError as e:
            self._failed(step, e, last_step)
            return None

    def _failed(self, step: int, e: OSError, last_step: bool) -> None:
        """The save-error policy: one line naming the folder and the errno; stop, or go on without it."""
        found = [p for p in self.list() if p.parent == self.layouts[0].folder(self.ckpt_dir)]
        kept = f"the newest checkpoint, {found[-1].name}, is intact" if found else "no older checkpoint exists"
        folder = self.layouts[0].folder(self.ckpt_dir)
        what = f"could not write checkpoint step {step} to {folder}: [Errno {e.errno}] {e.strerror or e}"
        if self.on_error == "stop" or last_step:
            why = "" if self.on_error == "stop" else " (it is the last step's: the run's result)"
            if self.logger is not None:
                self.logger.close()  # the metrics so far reach the disk before the run ends
            raise CheckpointError(f"{what}; training stopped{why} and {kept}. Free space or make the folder "
                                  f"writable, then run the same command to resume") from None
        if self.logger is not None:
            self.logger.log(step, "save_error", {"errno": e.errno, "error": e.strerror or str(e), "folder": str(folder)})
        print(f"WARNING: {what}; training continues WITHOUT this checkpoint (train.on_save_error=continue); "
              f"{kept}", file=sys.stderr, flush=True)

    def write(self, step: int, layout: Layout | None = None) -> Path:
        """Write checkpoint ``step`` atomically (temporary name, fsync, rename), then prune; raises on error."""
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        layout = layout or self.layouts[0]
        folder = layout.folder(self.ckpt_dir)
        final, tmp = folder / f"step_{step:06d}", folder / f".tmp-step_{step:06d}"
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        try:
            state = self._state_json(step)  # first: a non-serializable value fails before any heavy write
            if self.is_main:
                (tmp / STATE).write_text(state, encoding="utf-8")
            if layout.collective:
                barrier()
            layout.write(tmp, self.model, self.optimizer, self.is_main)
            if layout.collective:
                barrier()  # every rank's part is on disk before the main one seals the folder
            if self.is_main:
                torch.save(_rng_state(), tmp / RNG)
                self._seal(tmp)
                self._publish(tmp, final)
        except BaseException as e:
            disk = _disk_error(e, folder)  # judged before the partial files are removed
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if disk is not None:
                raise disk from e
            raise
        if self.is_main:
            self._verified[final] = _signature(final)
            self._prune(folder, step)
        if layout.collective:
            barrier()
        self._last = step
        return final

    def _state_json(self, step: int) -> str:
        state = self.state if isinstance(self.state, dict) else self.state.state_dict() if self.state else {}
        try:
            return json.dumps(state, indent=2)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint state for step {step} must be JSON-serializable: {e}") from None

    @staticmethod
    def _seal(tmp: Path) -> None:
        """fsync every file, then write (and fsync) the checksum manifest and the folder itself."""
        sums = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            sums[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2), encoding="utf-8")
        _fsync(tmp / CHECKSUMS)
        _fsync(tmp)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the sealed folder to its final name: whole or absent, whatever happens meanwhile."""
        old = self._retire(final, "old") if final.exists() else None  # a step saved again (resumed run)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None and old.name.startswith(".tmp-"):  # put the previous copy back, not lose it
                os.replace(old, final)
            raise
        _fsync(final.parent)

    def finish(self) -> Path | None:
        """After a sharded run: its last checkpoint again in the single-file layout that eval, serving and
        export read (every rank takes part). A no-op when this run writes single files already."""
        if self._last is None or isinstance(self.layouts[0], SingleFile):
            return None
        single = next(layout for layout in self.layouts if isinstance(layout, SingleFile))
        return self.write(self._last, single)

    # ------------------------------------------------------------------ pruning
    def _prune(self, folder: Path, step: int) -> None:
        ckpts = [p for p in self.list() if p.parent == folder]
        older = [p for p in ckpts if _step_of(p) < step]
        # Checkpoints past the one just written belong to an abandoned timeline (a run resumed from an
        # earlier step); keeping them would let a later resume jump back onto it.
        doomed = [p for p in ckpts if _step_of(p) > step] + older[: max(0, len(older) - (self.keep_last - 1))]
        for p in doomed:  # renamed first: a crash mid-delete never leaves a half folder with a valid name
            self._retire(p, "del")
        for p in folder.iterdir():
            if p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _retire(self, path: Path, tag: str) -> Path:
        """Take a checkpoint out of use: hidden for deletion if it verifies, else set aside, never deleted.

        A checkpoint that does not verify was not written by this process (or was damaged since): it may
        be the user's only copy of their work, so it is renamed ``step_000123.damaged``, which no reader
        takes for a checkpoint and no prune touches. One written or verified here is not hashed again.
        """
        reason = self._check(path)
        if reason is None:  # a ``.tmp-`` name, which every reader ignores and the next prune deletes
            hidden = path.parent / f".tmp-{tag}-{path.name}-{os.getpid()}"
            shutil.rmtree(hidden, ignore_errors=True)
            os.replace(path, hidden)
            self._verified.pop(path, None)
            return hidden
        aside = path.with_name(f"{path.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{n}")
        os.replace(path, aside)
        self._verified.pop(path, None)
        _log(f"checkpoint {path} is damaged ({reason}); kept as {aside.name} rather than deleted")
        return aside

    def _folders(self) -> list[Path]:
        return [f for f in dict.fromkeys(layout.folder(self.ckpt_dir) for layout in self.layouts) if f.is_dir()]

    def remove_debris(self) -> list[str]:
        """Delete the ``.tmp-`` folders a killed or failed save left behind; returns their names.

        Call it before training starts, when no other process writes to these folders.
        """
        debris = sorted(p for folder in self._folders() for p in folder.iterdir() if p.name.startswith(".tmp-"))
        for p in debris:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        return [p.name for p in debris]

    def clear(self) -> None:
        """An explicit fresh start (train.resume=false): old checkpoints of every layout must not be resumed."""
        for folder in self._folders():
            shutil.rmtree(folder)


def load(path: Path, model: nn.Module, optimizer: Optimizer | None = None, restore_rng: bool = True) -> dict:
    """:meth:`Checkpointer.load` of one single-file checkpoint, for eval, serving and export."""
    path = Path(path)
    return Checkpointer(path.parent, model, optimizer).load(path, restore_rng)


def resolve(path: Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a ckpt folder or a run folder (newest valid one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint found in {path} (the path does not exist)")
    if path.is_dir() and ((path / CHECKSUMS).exists() or _STEP_RE.fullmatch(path.name)):
        verify(path)
        return path
    for folder in (path, path / "ckpt", path / "train" / "ckpt"):
        ckpt = Checkpointer(folder)
        if ckpt.list():
            return ckpt.latest_valid()  # raises when every one is damaged
    raise CheckpointError(f"no checkpoint found in {path}")
