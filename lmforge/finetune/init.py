"""Where fine-tuning starts: any pretrained model on disk, loaded as an lmforge :class:`TrainedModel`.

:func:`load_pretrained` accepts

- an lmforge run folder, checkpoint folder or single checkpoint (any registry architecture);
- an lmforge export (``lmforge export --format lmforge``: a folder with ``lmforge.json``);
- a local Hugging Face folder of a Llama-family or GPT-2 causal LM, as ``save_pretrained``
  writes it (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, ``tokenizer.json``),
  mapped onto lmforge's Transformer (:mod:`lmforge.finetune.hf_import`).

The result trains, evaluates, serves and exports like any lmforge model; ``lmforge eval``,
``generate`` and ``serve`` open paths through it (``lmforge.export.native.load_any``)::

    tm = load_pretrained("models/my-gpt2")       # tm.model, tm.tokenizer, tm.cfg (RunConfig)
    logits, _ = tm.model(torch.tensor([tm.tokenizer.encode("ROMEO:")]))
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.export.native import MARKER, load_native
from lmforge.finetune.hf_import import WEIGHT_FILES, load_hf_folder
from lmforge.train.checkpoint import CheckpointError
from lmforge.trained import TrainedModel


def is_hf_folder(path: Path) -> bool:
    """True for a folder that looks like a Hugging Face model (config.json or weights under HF's names)."""
    return path.is_dir() and not (path / MARKER).is_file() and any(
        (path / name).is_file() for name in ("config.json", *WEIGHT_FILES))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The pretrained model at ``path`` (see the module docstring); CheckpointError names what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected an lmforge run, checkpoint or export, "
                              f"or a Hugging Face model folder)")
    if (path / MARKER).is_file():
        return load_native(path, device)
    if is_hf_folder(path):
        return load_hf_folder(path, device)
    return TrainedModel.load(path, device)
