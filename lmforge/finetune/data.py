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

Packing (``pack=True``; ``finetune.pack``): the same ``batch_size`` conversations of a step are laid end
to end into as few rows of at most ``context`` tokens as fit (first fit, longest first), and the batch
carries a third tensor, ``doc`` (R, W): which conversation each position belongs to (the row width is
chosen per batch to compute the fewest positions, :func:`plan_rows`). The Transformer
attends only within a conversation and restarts positions at each one, so every target gets exactly
the logits it gets unpacked, and the mean loss of a step is the same; only the padding is gone.
``pack="auto"`` packs when the plan of the first epoch shows it saves at least :data:`PACK_PAYS` of
the positions computed.

:class:`PairLoader` serves preference pairs (``finetune.mode=dpo|simpo``): ``batch_size`` pairs as one
batch of ``2 * batch_size`` rows, the chosen answers first, then the rejected ones in the same order.
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
PACK_PAYS = 0.2  # pack="auto": pack when it removes at least this share of the positions computed


def save_examples(examples: list[Example], path: Path) -> None:
    """One ``.npz`` (no pickles): concatenated ids and masks, and each example's offset."""
    lengths = np.array([len(e.ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.array([t for e in examples for t in e.ids], dtype=np.int64)
    mask = np.array([m for e in examples for m in e.mask], dtype=np.uint8)
    with AtomicFile(path) as f:
        np.savez(f, ids=ids, mask=mask, offsets=offsets)


def load_examples(path: Path, prefix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} not found; prepare the fine-tuning data first (lmforge finetune)")
    with np.load(path, allow_pickle=False) as f:
        return f[prefix + "ids"], f[prefix + "mask"], f[prefix + "offsets"]


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Which items go into which row: first fit, longest first, rows of at most ``width`` positions."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(width)
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def plan_rows(lengths: list[int], context: int) -> list[list[int]]:
    """Rows for one batch: the packing (:func:`pack_rows`) whose rows x longest row is smallest, over row
    widths from the longest item to ``context`` (a small batch fits best in short rows, not one full one)."""
    total, longest = sum(lengths), max(lengths)
    widths = {min(context, max(longest, -(-total // k) + slack)) for k in range(1, len(lengths) + 1)
              for slack in (0, longest // 4)} | {context}
    best: list[list[int]] = []
    cost = None
    for w in sorted(widths):
        rows = pack_rows(lengths, w)
        c = len(rows) * max(sum(lengths[i] for i in r) for r in rows)
        if cost is None or c < cost:
            best, cost = rows, c
    return best


def shifted(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one example: token t+1 is a target only where the mask marks it."""
    return ids[:-1], np.where(mask[1:] == 1, ids[1:], IGNORE)


class ChatLoader:
    """Padded batches of encoded conversations, shuffled per epoch, split across ranks, resumable."""

    kind = "chat"

    def __init__(self, shards: Path, split: str, batch_size: int, context: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0, pack: bool | str = False) -> None:
        self.split, self.batch_size, self.context, self.seed = split, batch_size, context, seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self._load(Path(shards), split)
        self.n_examples = len(self.lengths)
        longest = int(self.lengths.max()) if self.n_examples else 0
        if longest > context + 1:
            raise DataError(f"the {split} conversations reach {longest} tokens, more than model.context+1 = "
                            f"{context + 1}; lower finetune.max_length")
        self.per_rank = self.n_examples // world_size
        if self.per_rank == 0:
            raise DataError(f"the {split} split has {self.n_examples} conversations, fewer than the "
                            f"{world_size} ranks; add conversations")
        self._epoch, self._cursor, self._plan_epoch = 0, 0, -1
        self._mine = np.zeros(0, dtype=np.int64)
        self.pack = self._packing_pays() if pack == "auto" else bool(pack)

    def _load(self, shards: Path, split: str) -> None:
        self.ids, self.mask, self.offsets = load_examples(shards / f"chat_{split}.npz")
        self.lengths = np.diff(self.offsets)  # tokens per example

    def _rows(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Example ``i`` as (inputs, targets) rows."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return [shifted(self.ids[a:b], self.mask[a:b])]

    def _packing_pays(self) -> bool:
        """Positions computed over the first epoch's batches, packed against padded (``pack="auto"``)."""
        self._plan()
        n = len(self._mine) // self.batch_size * self.batch_size
        batches = (self.lengths[self._mine[:n]] - 1).reshape(-1, self.batch_size)  # (batches, B) positions
        padded = int(batches.max(axis=1).sum()) * self.batch_size
        packed = 0
        for b in batches:
            rows = plan_rows(b.tolist(), self.context)
            packed += len(rows) * max(int(sum(b[r])) for r in rows)
        return packed <= (1 - PACK_PAYS) * padded

    def _plan(self) -> None:
        if self._plan_epoch == self._epoch:
            return
        rng = np.random.default_rng([self.seed, self._epoch])
        mine = rng.permutation(self.n_examples)[self.rank: self.per_rank * self.world_size: self.world_size]
        # Length buckets: within each run of BUCKET_BATCHES batches, conversations of similar length are
        # batched together (less padding), and those batches come in random order.
        lengths = self.lengths[mine]
        span = self.batch_size * BUCKET_BATCHES
        for s in range(0, len(mine), span):
            part = mine[s: s + span][np.argsort(lengths[s: s + span], kind="stable")]
            groups = [part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            mine[s: s + span] = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
        self._mine = mine
        self._plan_epoch = self._epoch

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        picked = []
        for _ in range(self.batch_size):
            self._plan()
            picked.append(int(self._mine[self._cursor]))
            self._cursor += 1
            if self._cursor == self.per_rank:
                self._epoch, self._cursor = self._epoch + 1, 0
        rows = [row for i in picked for row in self._rows(i)]
        return self._packed(rows) if self.pack else self._padded(rows)

    def _padded(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(xs) for xs, _ in rows)
        x = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # (B, T)
        y = np.full((len(rows), width), IGNORE, dtype=np.int64)  # (B, T)
        for r, (xs, ys) in enumerate(rows):
            x[r, : len(xs)], y[r, : len(ys)] = xs, ys
        return torch.from_numpy(x), torch.from_numpy(y)

    def _packed(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
        plan = plan_rows([len(xs) for xs, _ in rows], self.context)
        width = max(sum(len(rows[i][0]) for i in r) for r in plan)
        x = np.full((len(plan), width), self.pad_id, dtype=np.int64)  # (R, W)
        y = np.full((len(plan), width), IGNORE, dtype=np.int64)  # (R, W)
        doc = np.full((len(plan), width), len(rows), dtype=np.int64)  # (R, W); the padding is its own "example"
        for r, members in enumerate(plan):
            at = 0
            for i in members:
                xs, ys = rows[i]
                x[r, at: at + len(xs)], y[r, at: at + len(xs)], doc[r, at: at + len(xs)] = xs, ys, i
                at += len(xs)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(doc)

    def _identity(self) -> dict:
        return {"split": self.split, "seed": self.seed, "world_size": self.world_size,
                "n_examples": self.n_examples, "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": self.kind, "epoch": self._epoch, "cursor": self._cursor,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise DataError(f"loader state {state.get('kind')!r} v{state.get('version')!r} is not a "
                            f"{self.kind} loader's")
        for key, now in self._identity().items():
            if state.get(key) != now:
                raise DataError(f"loader state does not match this run: {key} was {state.get(key)!r}, now {now!r}")
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not isinstance(epoch, int) or not isinstance(cursor, int) or not 0 <= cursor < self.per_rank:
            raise DataError(f"loader state has an invalid position: epoch={epoch!r}, cursor={cursor!r}")
        self._epoch, self._cursor = epoch, cursor


class PairLoader(ChatLoader):
    """Preference pairs from ``pairs_{split}.npz``: each batch is the chosen rows, then the rejected ones."""

    kind = "pairs"

    def _load(self, shards: Path, split: str) -> None:
        path = shards / f"pairs_{split}.npz"
        self.chosen = load_examples(path, "chosen_")
        self.rejected = load_examples(path, "rejected_")
        self.lengths = np.maximum(np.diff(self.chosen[2]), np.diff(self.rejected[2]))

    def _rows(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for ids, mask, offsets in (self.chosen, self.rejected):
            a, b = int(offsets[i]), int(offsets[i + 1])
            out.append(shifted(ids[a:b], mask[a:b]))
        return out

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        x, y = super().next_batch()[:2]  # rows: chosen, rejected of pair 0, then of pair 1, ...
        order = torch.cat([torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)])
        return x[order], y[order]  # (2B, T): chosen rows 0..B-1, rejected rows B..2B-1
