"""A trained model in memory: weights, tokenizer and config together, whatever it was read from.

Every reader of :mod:`lmforge.trained` returns one; :func:`lmforge.trained.load_model` picks the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import LanguageModel

FINETUNE_DIR = "finetune"  # runs/<name>/finetune: where lmforge.finetune.run writes its checkpoints


@dataclass
class TrainedModel:
    model: LanguageModel
    tokenizer: Tokenizer
    cfg: RunConfig
    path: Path  # what it was read from: a checkpoint folder, an export or a Hugging Face folder
    step: int

    @property
    def name(self) -> str:
        """The model's id: the run's name, with ``-finetune`` for a run's fine-tuned model (RUN/finetune/ckpt)."""
        finetuned = self.path.parent.name == "ckpt" and self.path.parent.parent.name == FINETUNE_DIR
        return f"{self.cfg.name}-finetune" if finetuned else self.cfg.name
