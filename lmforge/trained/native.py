"""Read lmforge's own export format (``lmforge export --format lmforge``), for every architecture.

The folder holds ``model.safetensors`` (tied weights stored once), ``lmforge.json`` (:data:`MARKER`:
format name and version, the run's resolved config, the training step) and ``tokenizer.json``.
:mod:`lmforge.export.native` writes it; this module is its one reader::

    tm = load_native(Path("exported/gru"))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import build_model
from lmforge.train.checkpoint import CheckpointError
from lmforge.trained.model import TrainedModel

MARKER, FORMAT, VERSION = "lmforge.json", "lmforge-export", 1


def load_native(folder: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a folder written by :func:`lmforge.export.native.export_native`."""
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
