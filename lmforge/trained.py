"""A trained model on disk, loaded for use: weights, tokenizer and config together.

``TrainedModel.load(path)`` accepts a run folder (``runs/demo``), its
checkpoint folder (``runs/demo/train/ckpt``, newest valid checkpoint) or one
checkpoint (``runs/demo/train/ckpt/step_001000``). Evaluation, sampling and
serving all start here::

    tm = TrainedModel.load("runs/demo")
    logits, _ = tm.model(torch.tensor([tm.tokenizer.encode("ROMEO:")]))

Which model a run folder means is one rule, :func:`run_model_path` (:data:`PATH_RULE`), for every
verb that opens a model by path (``serve``, ``chat``, ``generate``, ``eval``, ``export``): the
fine-tuned model when the run has one, else the pre-trained one. A fine-tuned model's id
(:attr:`TrainedModel.name`, what ``/v1/models`` lists) is the run's name with ``-finetune``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import LanguageModel, build_model
from lmforge.train import checkpoint
from lmforge.train.checkpoint import Checkpointer, CheckpointError

FINETUNE_DIR = "finetune"  # runs/<name>/finetune: where lmforge.finetune.run writes its checkpoints
PATH_RULE = ("a run folder means its fine-tuned model (RUN/finetune) when it has one, else its pre-trained "
             "one; a checkpoint, export or Hugging Face folder means itself")


def run_model_path(path: str | Path) -> Path:
    """The model ``path`` means (:data:`PATH_RULE`): ``RUN/finetune`` for a run with fine-tuning checkpoints."""
    path = Path(path).expanduser()
    if Checkpointer(path / FINETUNE_DIR / "ckpt").list():
        return path / FINETUNE_DIR
    return path


def tokenizer_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_tokenizer(ckpt_path: Path) -> Path:
    """The tokenizer.json of a checkpoint: in the checkpoint, or the run's tokenizer/ folder above it."""
    for d in [ckpt_path, *list(ckpt_path.parents)[:4]]:
        for cand in (d / "tokenizer.json", d / "tokenizer" / "tokenizer.json"):
            if cand.is_file():
                return cand
    raise CheckpointError(f"no tokenizer.json found for checkpoint {ckpt_path} (looked in it and the run folder)")


@dataclass
class TrainedModel:
    model: LanguageModel
    tokenizer: Tokenizer
    cfg: RunConfig
    path: Path
    step: int

    @property
    def name(self) -> str:
        """The model's id: the run's name, with ``-finetune`` for a run's fine-tuned model (RUN/finetune/ckpt)."""
        finetuned = self.path.parent.name == "ckpt" and self.path.parent.parent.name == FINETUNE_DIR
        return f"{self.cfg.name}-finetune" if finetuned else self.cfg.name

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
        ckpt_path = checkpoint.resolve(Path(path))
        state = checkpoint.read_state(ckpt_path)
        cfg = RunConfig.model_validate(state["config"])
        tok_path = find_tokenizer(ckpt_path)
        expected = state.get("tokenizer_sha256")
        if expected and tokenizer_digest(tok_path) != expected:
            raise CheckpointError(f"{tok_path} is not the tokenizer {ckpt_path} was trained with (digest differs)")
        tokenizer = Tokenizer.load(tok_path)
        model = build_model(cfg.model)
        if state.get("lora"):  # a LoRA fine-tune: adapters are loaded with the weights, then merged into them
            from lmforge.finetune.adapters import attach_from_state, merge_lora

            attach_from_state(model, state["lora"])
        checkpoint.load(ckpt_path, model, optimizer=None, restore_rng=False)
        if state.get("lora"):
            merge_lora(model)
        model.to(device).eval()
        return cls(model=model, tokenizer=tokenizer, cfg=cfg, path=ckpt_path, step=int(state["step"]))
