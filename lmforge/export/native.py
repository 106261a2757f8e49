"""lmforge's own export format, for every architecture: weights, config and tokenizer in one folder.

Hugging Face and GGUF exports exist only for the Llama-compatible Transformer;
LSTM, GRU and CNN models are exported here instead, and lmforge (``serve``,
``generate``, ``eval``) loads them back::

    lmforge export runs/gru --format lmforge --out exported/gru
    lmforge serve exported/gru

The folder holds ``model.safetensors`` (tied weights stored once),
``lmforge.json`` (format marker, the run's resolved config, the training step)
and ``tokenizer.json``. :func:`load_any` is what the server uses to open a run,
a checkpoint, an lmforge export or a Hugging Face model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import build_model
from lmforge.train.checkpoint import CheckpointError, save_weights
from lmforge.trained import TrainedModel, run_model_path

MARKER, FORMAT, VERSION = "lmforge.json", "lmforge-export", 1


def export_native(tm: TrainedModel, out: Path) -> list[Path]:
    """Write ``tm`` to the folder ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_weights(tm.model, weights)  # tied tensors stored once; load_model below re-ties them
    tokenizer = tm.tokenizer.save(out)
    info = {"format": FORMAT, "version": VERSION, "step": tm.step, "config": tm.cfg.model_dump(mode="json")}
    marker = out / MARKER
    marker.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return [weights, tokenizer, marker]


def load_native(folder: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a folder written by :func:`export_native`."""
    folder = Path(folder)
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / MARKER} is not a readable lmforge export ({e})") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise CheckpointError(f"{folder / MARKER}: format {info.get('format')!r} version {info.get('version')!r} "
                              f"is not {FORMAT!r} version {VERSION}")
    cfg = RunConfig.model_validate(info["config"])
    model = build_model(cfg.model)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit model.arch={cfg.model.arch} "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.to(device).eval()
    return TrainedModel(model=model, tokenizer=Tokenizer.load(folder), cfg=cfg, path=folder,
                        step=int(info.get("step", 0)))


def load_any(path: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """A run folder, checkpoint, lmforge export or Hugging Face folder (Llama-family or GPT-2).

    A run folder means its fine-tuned model when it has one (:func:`lmforge.trained.run_model_path`,
    the one rule of ``serve``, ``chat``, ``generate``, ``eval`` and ``export``). Otherwise the same loader
    fine-tuning starts from: :func:`lmforge.finetune.init.load_pretrained`.
    """
    from lmforge.finetune.init import load_pretrained  # it imports this module

    return load_pretrained(run_model_path(path), device)

