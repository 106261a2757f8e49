"""The CPU speedrun recipe validates and keeps the settings its figures depend on."""

from __future__ import annotations

from lmforge.config import load_config
from lmforge.models import build_model
from tests.conftest import ROOT


def test_speedrun_config_validates_and_uses_the_nanogpt_split():
    cfg = load_config(ROOT / "configs" / "speedrun-cpu.yaml")
    assert cfg.data.split == "tail" and cfg.data.val_fraction == 0.1 and not cfg.data.train  # embedded corpus
    assert cfg.train.max_seconds == 300
    assert cfg.train.optimizer == "muon" and cfg.train.schedule == "wsd"
    model = build_model(cfg.model.model_copy(update={"vocab_size": cfg.tokenizer.vocab_size}))
    assert 0.5e6 < model.num_params() < 3e6  # small enough for thousands of steps in 5 minutes
