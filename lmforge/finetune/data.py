"""Fine-tuning data: prepare it once into the run's ``finetune/data`` folder, then serve batches to the loop.

- Text (``finetune.mode=text``): the files are read by the data stage's readers, split into train and
  validation documents (:mod:`lmforge.data.split`) and packed into token shards (:mod:`lmforge.data.pack`)
  with the pretrained model's tokenizer; the loop reads them with the pre-training
  :class:`~lmforge.data.loader.TokenLoader`.
- Chat (``finetune.mode=chat``): conversations are checked and encoded with their loss masks
  (:mod:`lmforge.finetune.chat`) into ``chat_train.npz`` / ``chat_val.npz``; :class:`ChatLoader`
  batches them.

:class:`ChatLoader` has the TokenLoader interface (``next_batch``, ``state_dict``,
``load_state_dict``), so the training loop does not care which one it holds. A batch is padded on the
right to its longest conversation (conversations of similar length are batched together): with causal
attention (and recurrent or causal-convolution models) no real token ever sees a pad, and positions
start at 0 in every row exactly as at serving time, so no attention mask is needed; targets of pad
positions and of non-assistant tokens are -100, which the models' loss ignores::

    loader = ChatLoader(Path("runs/x/finetune/data"), "train", batch_size=8, context=256, seed=1)
    x, y = loader.next_batch()      # (B, T) each, T = longest row of this batch - 1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.artifacts import AtomicFile
from lmforge.data.sources import DataError
from lmforge.finetune.chat import Example

STATE_VERSION = 1
IGNORE = -100
BUCKET_BATCHES = 32  # batches whose conversations are grouped by length


def save_examples(examples: list[Example], path: Path) -> None:
    """One ``.npz`` (no pickles): concatenated ids and masks, and each example's offset."""
    lengths = np.array([len(e.ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.array([t for e in examples for t in e.ids], dtype=np.int64)
    mask = np.array([m for e in examples for m in e.mask], dtype=np.uint8)
    with AtomicFile(path) as f:
        np.savez(f, ids=ids, mask=mask, offsets=offsets)


def load_examples(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} not found; prepare the fine-tuning data first (lmforge finetune)")
    with np.load(path, allow_pickle=False) as f:
        return f["ids"], f["mask"], f["offsets"]


class ChatLoader:
    """Padded batches of encoded conversations, shuffled per epoch, split across ranks, resumable."""

    def __init__(self, shards: Path, split: str, batch_size: int, context: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0) -> None:
        self.split, self.batch_size, self.context, self.seed = split, batch_size, context, seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.ids, self.mask, self.offsets = load_examples(Path(shards) / f"chat_{split}.npz")
        self.n_examples = len(self.offsets) - 1
        longest = int(np.diff(self.offsets).max()) if self.n_examples else 0
        if longest > context + 1:
            raise DataError(f"the {split} conversations reach {longest} tokens, more than model.context+1 = "
                            f"{context + 1}; lower finetune.max_length")
        self.per_rank = self.n_examples // world_size
        if self.per_rank == 0:
            raise DataError(f"the {split} split has {self.n_examples} conversations, fewer than the "
                            f"{world_size} ranks; add conversations")
        self._epoch, self._cursor, self._plan_epoch = 0, 0, -1
        self._mine = np.zeros(0, dtype=np.int64)

    def _plan(self) -> None:
        if self._plan_epoch == self._epoch:
            return
        rng = np.random.default_rng([self.seed, self._epoch])
        mine = rng.permutation(self.n_examples)[self.rank: self.per_rank * self.world_size: self.world_size]
        # Length buckets: within each run of BUCKET_BATCHES batches, conversations of similar length are
        # batched together (less padding), and those batches come in random order.
        lengths = np.diff(self.offsets)[mine]
        span = self.batch_size * BUCKET_BATCHES
        for s in range(0, len(mine), span):
            part = mine[s: s + span][np.argsort(lengths[s: s + span], kind="stable")]
            groups = [part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            mine[s: s + span] = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
        self._mine = mine
        self._plan_epoch = self._epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            self._plan()
            i = int(self._mine[self._cursor])
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            rows.append((self.ids[a:b], self.mask[a:b]))
            self._cursor += 1
            if self._cursor == self.per_rank:
                self._epoch, self._cursor = self._epoch + 1, 0
        width = max(len(ids) for ids, _ in rows) - 1
        x = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # (B, T)
        y = np.full((len(rows), width), IGNORE, dtype=np.int64)  # (B, T)
        for r, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            # Token t+1 is a target only where the mask marks it (assistant content and its end-of-turn).
            y[r, :n] = np.where(mask[1:] == 1, ids[1:], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _identity(self) -> dict:
        return {"split": self.split, "seed": self.seed, "world_size": self.world_size,
                "n_examples": self.n_examples, "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "chat", "epoch": self._epoch, "cursor": self._cursor,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "chat":
            raise DataError(f"loader state {state.get('kind')!r} v{state.get('version')!r} is not a chat loader's")
        for key, now in self._identity().items():
            if state.get(key) != now:
                raise DataError(f"loader state does not match this run: {key} was {state.get(key)!r}, now {now!r}")
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not isinstance(epoch, int) or not isinstance(cursor, int) or not 0 <= cursor < self.per_rank:
            raise DataError(f"loader state has an invalid position: epoch={epoch!r}, cursor={cursor!r}")
        self._epoch, self._cursor = epoch, cursor
