"""Token shards -> training batches, shuffled by epoch, split across ranks, resumable exactly.

An epoch cuts every shard into windows of ``context + 1`` tokens that start at
``offset + i * context`` (consecutive windows share one token: the last target of
one is the first input of the next). ``offset`` is drawn per epoch from the seed, so
successive epochs see different cut points. All windows of all shards are shuffled
with ``np.random.default_rng([seed, epoch])``, and the epochs follow one another as
one global stream of windows. Rank ``r`` of ``world_size`` serves the stream's
positions ``r, r + world_size, r + 2 * world_size, ...`` (running from one epoch into
the next without dropping a window), and a batch is the rank's next ``batch_size``
windows. So ``world_size`` ranks with batches of ``b`` together consume exactly the
windows one process with batches of ``world_size * b`` would, step for step.

The shards are memory-mapped: memory holds one int64 per window for the shuffle,
not the tokens. ``state_dict()`` is the global position (epoch, cursor: windows of the
stream all ranks together have consumed) plus what must not change for it to mean the
same thing. It is the same on every rank and does not depend on ``world_size``, so the
state saved by rank 0 resumes any number of ranks. Usage::

    loader = TokenLoader(Path("runs/demo/tokens"), "train", batch_size=16, context=256, seed=1337)
    x, y = loader.next_batch()          # (B, T) int64 each; y[:, t] == x[:, t + 1]
    state = loader.state_dict()         # JSON-serializable; goes into the checkpoint
    loader.load_state_dict(state)       # later batches are exactly those that would have come

``doc_ids=True`` (packed text fine-tuning, ``finetune.pack``) adds a third tensor to each batch: the
document each input token belongs to (from the shards' document index), so a model that honours it
(the Transformer) attends within each document only and restarts positions at each one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.data.pack import list_shards, read_index, read_shard
from lmforge.data.sources import DataError

STATE_VERSION = 1


class TokenLoader:
    """Random windows of packed tokens as ``(x, y)`` batches; see the module docstring."""

    def __init__(self, shards: list[Path] | Path, split: str, batch_size: int, context: int, seed: int,
                 rank: int = 0, world_size: int = 1, doc_ids: bool = False) -> None:
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be positive, got {batch_size} and {context}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split, self.batch_size, self.context, self.seed = split, batch_size, context, seed
        self.rank, self.world_size = rank, world_size

        if isinstance(shards, (str, Path)):
            paths = list_shards(Path(shards), split)
            if not paths:
                raise DataError(f"no {split} token shards in {shards}; run the pack stage first (lmforge pack)")
        else:
            paths = [Path(p) for p in shards]
            if not paths:
                raise DataError(f"no {split} token shards given")
        self.paths = paths
        self._data = [read_shard(p) for p in paths]  # memmaps: the OS pages tokens in on demand
        self.doc_ids = doc_ids
        self._starts = [read_index(p) for p in paths] if doc_ids else None  # document start offsets per shard
        lengths = np.array([len(d) for d in self._data], dtype=np.int64)

        # Windows per shard at offset 0; the slack is the room left to slide them by the epoch's offset
        # without losing one, so every epoch has the same number of windows.
        self._windows = np.maximum(lengths - 1, 0) // context
        self._slack = np.where(self._windows > 0, lengths - 1 - self._windows * context, 0)
        self._first = np.concatenate([[0], np.cumsum(self._windows)])  # first global window of each shard
        self.n_windows = int(self._first[-1])
        if self.n_windows == 0:
            raise DataError(f"the {split} split has {int(lengths.sum())} tokens in {len(paths)} shard(s), the "
                            f"longest {int(lengths.max())}; one window needs context+1 = {context + 1} tokens "
                            "within one shard: add text or lower model.context")
        if self.n_windows < world_size:
            raise DataError(f"the {split} split has {self.n_windows} windows of context+1 = {context + 1} tokens, "
                            f"fewer than the {world_size} ranks; add text or lower model.context")

        self._pos = rank  # position in the global stream (epoch * n_windows + index) of this rank's next window
        self._plan_epoch = -1
        self._offset = 0
        self._order = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ sampling
    @property
    def epoch(self) -> int:
        """The epoch this rank's next window comes from (0-based)."""
        return self._pos // self.n_windows

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens all ranks together train on in one epoch."""
        return self.n_windows * self.context

    def _plan(self, epoch: int) -> None:
        """The shuffled window order and cut offset of ``epoch`` (rebuilt only when the epoch changes)."""
        if self._plan_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self._offset = int(rng.integers(0, self.context))
        self._order = rng.permutation(self.n_windows)
        self._plan_epoch = epoch

    def _locate(self, window: int) -> tuple[int, int]:
        """Global window number -> (shard, start token) under this epoch's offset."""
        shard = int(np.searchsorted(self._first, window, side="right")) - 1
        offset = self._offset % (int(self._slack[shard]) + 1)
        return shard, offset + (window - int(self._first[shard])) * self.context

    def epoch_windows(self) -> list[tuple[int, int]]:
        """(shard, start) of every window this rank serves in the current epoch, in serving order."""
        epoch = self.epoch
        self._plan(epoch)
        first = (self.rank - epoch * self.n_windows) % self.world_size  # this rank's first index in the epoch
        return [self._locate(int(w)) for w in self._order[first:: self.world_size]]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """Inputs and targets, each (B, T) int64, targets shifted one token left of the inputs (and, with
        ``doc_ids``, each input token's document number, (B, T))."""
        span = self.context + 1
        buf = np.empty((self.batch_size, span), dtype=np.int64)  # (B, T + 1)
        docs = np.empty((self.batch_size, self.context), dtype=np.int64)  # (B, T)
        for b in range(self.batch_size):
            epoch, index = divmod(self._pos, self.n_windows)
            self._plan(epoch)
            shard, start = self._locate(int(self._order[index]))
            buf[b] = self._data[shard][start: start + span]
            if self._starts is not None:
                docs[b] = np.searchsorted(self._starts[shard], np.arange(start, start + self.context), side="right")
            self._pos += self.world_size
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))  # (B, T)
        return (x, y) if self._starts is None else (x, y, torch.from_numpy(docs))

    def windows_from(self, epoch: int, cursor: int, n: int) -> list[list]:
        """``[shard file, start token]`` of the ``n`` windows served from position (epoch, cursor).

        Names a batch after the fact (e.g. one that gave a NaN loss); the loader's position is unchanged.
        """
        found, pos = [], epoch * self.n_windows + cursor + self.rank  # (epoch, cursor) as state_dict() gives it
        for _ in range(n):
            e, index = divmod(pos, self.n_windows)
            self._plan(e)  # the plan is a cache keyed by epoch: next_batch re-plans if this moved it
            shard, start = self._locate(int(self._order[index]))
            found.append([self.paths[shard].name, start])
            pos += self.world_size
        return found

    # ------------------------------------------------------------------- resume
    def _identity(self) -> dict:
        return {"split": self.split, "seed": self.seed, "context": self.context, "n_windows": self.n_windows}

    def state_dict(self) -> dict:
        """The global position (JSON-serializable) and what must match for it to resume the same sequence.

        Every rank has served as many windows as the others, so ``_pos - rank`` is the same on all of them:
        the number of stream windows consumed, whatever the number of ranks.
        """
        epoch, cursor = divmod(self._pos - self.rank, self.n_windows)
        return {"version": STATE_VERSION, "epoch": epoch, "cursor": cursor, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises :class:`DataError` if it belongs to different data or settings."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, now in self._identity().items():
            if state.get(key) != now:
                raise DataError(f"loader state does not match this run: {key} was {state.get(key)!r}, now {now!r} "
                                "(the data, seed or model.context changed since the checkpoint)")
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not isinstance(epoch, int) or not isinstance(cursor, int) or epoch < 0 \
                or not 0 <= cursor < self.n_windows:
            raise DataError(f"loader state has an invalid position: epoch={epoch!r}, cursor={cursor!r}")
        self._pos = epoch * self.n_windows + cursor + self.rank
