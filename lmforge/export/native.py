"""lmforge's own export format, for every architecture: weights, config and tokenizer in one folder.

Hugging Face and GGUF exports exist only for the Llama-compatible Transformer;
LSTM, GRU and CNN models are exported here instead, and lmforge (``serve``,
``generate``, ``eval``) loads them back::

    lmforge export runs/gru --format lmforge --out exported/gru
    lmforge serve exported/gru

The folder holds ``model.safetensors`` (tied weights stored once),
``lmforge.json`` (format marker, the run's resolved config, the training step)
and ``tokenizer.json``. Its reader is :mod:`lmforge.trained.native`, one of the
formats :func:`lmforge.trained.load_model` opens.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.train.weights import save_weights
from lmforge.trained import TrainedModel
from lmforge.trained.native import FORMAT, MARKER, VERSION


def export_native(tm: TrainedModel, out: Path) -> list[Path]:
    """Write ``tm`` to the folder ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_weights(tm.model, weights)  # tied tensors stored once; lmforge.trained.native re-ties them on load
    tokenizer = tm.tokenizer.save(out)
    info = {"format": FORMAT, "version": VERSION, "step": tm.step, "config": tm.cfg.model_dump(mode="json")}
    marker = out / MARKER
    marker.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return [weights, tokenizer, marker]
