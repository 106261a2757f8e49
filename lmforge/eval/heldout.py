"""Evaluate a trained model on held-out text: the ``eval`` stage and ``lmforge eval``.

The stage scores the run's whole validation split (every token, sliding window
of ``eval.stride``) and a same-sized slice of the training split, so the report
shows train and validation side by side. ``lmforge eval RUN --eval.text=FILE``
scores any UTF-8 files or folders instead, so models with different tokenizers
can be compared on the same text through bits per byte. With ``eval.tasks`` the
stage also runs those evaluation tasks (:mod:`lmforge.eval.tasks`)::

    lmforge eval runs/demo --eval.text=my_notes.txt
    lmforge eval --config configs/demo.yaml --eval.tasks=[speaker,minimal_pairs,cloze]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmforge.config import RunConfig
from lmforge.data.pack import list_shards, read_shard
from lmforge.data.readers.files import read_documents
from lmforge.data.sources import DataError
from lmforge.eval.perplexity import bits_per_byte, evaluate_tokens
from lmforge.trained import TrainedModel, load_model


def _split_tokens(data_dir: Path, split: str, limit: int | None = None) -> np.ndarray:
    parts, total = [], 0
    for shard in list_shards(data_dir, split):
        arr = read_shard(shard)
        if limit is not None:
            arr = arr[: max(0, limit - total)]
        parts.append(np.asarray(arr, dtype=np.int64))
        total += len(arr)
        if limit is not None and total >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def main(cfg: RunConfig, run_dir: Path, pack_stats: dict) -> dict:
    """The eval stage: validation and a training slice, from the packed shards."""
    tm = load_model(run_dir / "train")  # the pre-trained model, also in a run that has a fine-tuned one
    context = tm.cfg.model.context
    kw = dict(context=context, stride=cfg.eval.stride, batch_size=cfg.eval.batch_size,
              bos_id=tm.tokenizer.bos_id, max_tokens=cfg.eval.max_tokens, progress=cfg.train.progress)
    val_tokens = _split_tokens(run_dir / "pack", "val")
    val = evaluate_tokens(tm.model, val_tokens, **kw)
    # bits per byte needs the bytes of exactly the text scored; with max_tokens we scale by the ratio.
    val_bytes = pack_stats["val"]["bytes"] * val["tokens"] / max(1, len(val_tokens))
    val["bpb"] = bits_per_byte(val["nats"], val_bytes)
    # A training slice as long as the validation text: the overfitting check.
    train = evaluate_tokens(tm.model, _split_tokens(run_dir / "pack", "train", limit=len(val_tokens)), **kw)
    train_bpt = pack_stats["train"]["bytes"] / max(1, pack_stats["train"]["tokens"])
    train["bpb"] = train["loss"] / math.log(2) / train_bpt
    result = {"step": tm.step, "val": val, "train": train, "gap": val["loss"] - train["loss"]}
    if cfg.eval.tasks:  # one record per task: the run card shows them as a table; per-item results in eval/tasks/
        from lmforge.eval.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(tm.model, tm.tokenizer, context, cfg.eval.tasks,
                                         out_dir=run_dir / "eval" / "tasks", batch_size=cfg.eval.batch_size)
    return result


def evaluate_files(tm: TrainedModel, paths: list[str], cfg: RunConfig) -> dict:
    """Score every document of ``paths``; totals are summed so bits per byte covers all bytes."""
    totals = {"nats": 0.0, "tokens": 0, "bytes": 0, "correct": 0.0, "docs": 0}
    per_doc = []
    for doc in read_documents(paths):
        if not doc.text:
            continue
        ids = np.asarray(tm.tokenizer.encode(doc.text), dtype=np.int64)
        r = evaluate_tokens(tm.model, ids, context=tm.cfg.model.context, stride=cfg.eval.stride,
                            batch_size=cfg.eval.batch_size, bos_id=tm.tokenizer.bos_id,
                            max_tokens=cfg.eval.max_tokens, progress=cfg.train.progress)
        n_bytes = len(doc.text.encode("utf-8"))
        if r["tokens"] < len(ids):  # eval.max_tokens cut the text: count only the bytes scored
            n_bytes = n_bytes * r["tokens"] / len(ids)
        totals["nats"] += r["nats"]
        totals["tokens"] += r["tokens"]
        totals["bytes"] += n_bytes
        totals["correct"] += r["acc"] * r["tokens"]
        totals["docs"] += 1
        per_doc.append({"id": doc.id, "tokens": r["tokens"], "loss": r["loss"],
                        "bpb": bits_per_byte(r["nats"], n_bytes)})
    if totals["tokens"] == 0:
        raise DataError(f"nothing to evaluate: no text in {', '.join(paths)}")
    loss = totals["nats"] / totals["tokens"]
    return {
        "checkpoint": str(tm.path), "step": tm.step, "docs": totals["docs"], "tokens": totals["tokens"],
        "bytes": int(totals["bytes"]), "loss": loss, "ppl": math.exp(min(loss, 50.0)),
        "bpb": bits_per_byte(totals["nats"], totals["bytes"]), "acc": totals["correct"] / totals["tokens"],
        "per_doc": per_doc,
    }
