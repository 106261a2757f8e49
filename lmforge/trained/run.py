"""Read a model from lmforge checkpoints: a run folder, its checkpoint folder or one checkpoint.

The newest valid checkpoint is taken (:func:`lmforge.train.checkpoint.resolve`); its tokenizer is the
``tokenizer.json`` in it or in the run folder above it, and must be the one it was trained with (the
checkpoint records its sha256). A LoRA fine-tune's adapters are loaded with the weights, then merged
into them, so the result is a plain registry model::

    tm = load_checkpoint(Path("runs/demo/train"))      # the pre-trained model of runs/demo
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.tokenizer import Tokenizer, tokenizer_digest
from lmforge.models import build_model
from lmforge.train import checkpoint
from lmforge.train.checkpoint import CheckpointError
from lmforge.train.lora import attach_from_state, merge_lora
from lmforge.trained.model import TrainedModel


def find_tokenizer(ckpt_path: Path) -> Path:
    """The tokenizer.json of a checkpoint: in the checkpoint, or the run's tokenizer/ folder above it."""
    for d in [ckpt_path, *list(ckpt_path.parents)[:4]]:
        for cand in (d / "tokenizer.json", d / "tokenizer" / "tokenizer.json"):
            if cand.is_file():
                return cand
    raise CheckpointError(f"no tokenizer.json found for checkpoint {ckpt_path} (looked in it and the run folder)")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The newest valid checkpoint under ``path`` (or ``path`` itself), adapters merged, in eval mode."""
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
        attach_from_state(model, state["lora"])
    checkpoint.load(ckpt_path, model, optimizer=None, restore_rng=False)
    if state.get("lora"):
        merge_lora(model)
    model.to(device).eval()
    return TrainedModel(model=model, tokenizer=tokenizer, cfg=cfg, path=ckpt_path, step=int(state["step"]))
