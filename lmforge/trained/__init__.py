"""One way to load a model: :func:`load_model` opens a run, a checkpoint, an export or a Hugging Face folder.

Every verb that takes a model (``eval``, ``harness``, ``generate``, ``serve``, ``chat``, ``export``,
``finetune --init``, the run card's samples) opens it here and gets a :class:`TrainedModel` (weights,
tokenizer and config together)::

    tm = load_model("runs/demo")                        # its fine-tuned model when it has one
    tm = load_model("runs/demo/train", device="cuda")   # its pre-trained model
    logits, _ = tm.model(torch.tensor([tm.tokenizer.encode("ROMEO:")]))

Which model a path means is one rule, :data:`PATH_RULE` (:func:`run_model_path`), shown in every such
verb's ``--help``. A fine-tuned model's id (:attr:`TrainedModel.name`, what ``/v1/models`` lists) is the
run's name with ``-finetune``. The format readers, one module each:

- :mod:`lmforge.trained.run`: lmforge checkpoints (a run folder, its checkpoint folder, one checkpoint);
- :mod:`lmforge.trained.native`: lmforge exports (``lmforge export --format lmforge``);
- :mod:`lmforge.trained.hf`: Hugging Face folders of any causal LM (lmforge's Transformer where it computes
  the family exactly, else the ``hf`` architecture wrapping transformers' own code).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.train.checkpoint import Checkpointer, CheckpointError
from lmforge.trained.hf import is_hf_folder, load_hf_folder
from lmforge.trained.model import FINETUNE_DIR, TrainedModel
from lmforge.trained.native import MARKER, load_native
from lmforge.trained.run import load_checkpoint

PATH_RULE = ("a run folder means its fine-tuned model (RUN/finetune) when it has one, else its pre-trained "
             "one (RUN/train); a checkpoint, export or Hugging Face folder means itself")


def run_model_path(path: str | Path) -> Path:
    """The model ``path`` means (:data:`PATH_RULE`): ``RUN/finetune`` for a run with fine-tuning checkpoints."""
    path = Path(path).expanduser()
    if Checkpointer(path / FINETUNE_DIR / "ckpt").list():
        return path / FINETUNE_DIR
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model ``path`` means (:data:`PATH_RULE`), on ``device`` in eval mode; CheckpointError says what is wrong."""
    path = run_model_path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected an lmforge run, checkpoint or export, "
                              f"or a Hugging Face model folder)")
    if (path / MARKER).is_file():
        return load_native(path, device)
    if is_hf_folder(path):
        return load_hf_folder(path, device)
    return load_checkpoint(path, device)


__all__ = ["FINETUNE_DIR", "PATH_RULE", "TrainedModel", "load_model", "run_model_path"]
