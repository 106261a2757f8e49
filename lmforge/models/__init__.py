"""The model registry: every architecture lmforge can train, behind one contract.

``model.arch`` in the config names an entry of :data:`REGISTRY` (:mod:`lmforge.models.registry`); :func:`build_model`
builds it from a :class:`~lmforge.config.ModelConfig` whose ``vocab_size`` is set.
All entries implement :class:`~lmforge.models.base.LanguageModel` (forward with
loss, init, parameter and flop counts, incremental decoding), so the rest of
lmforge never branches on the architecture. A new architecture is a new file in
this folder, its class in :data:`REGISTRY` and its name in :data:`lmforge.config.ARCHS` (the one list of
names, which the config's ``model.arch`` choices and ``--help`` read: config cannot import the models).

Usage::

    from lmforge.models import build_model
    model = build_model(cfg.model)        # cfg.model.vocab_size > 0
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.base import LanguageModel
from lmforge.models.cnn import GatedCNN
from lmforge.models.hf_causal import HFCausalLM
from lmforge.models.registry import REGISTRY
from lmforge.models.rnn import GRUModel, LSTMModel
from lmforge.models.sizing import fit_to_budget
from lmforge.models.transformer import Transformer


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the registry model named by ``cfg.arch``, initialized from torch's current RNG state.

    With ``model.param_budget`` set, the width is chosen first (:func:`~lmforge.models.sizing.fit_to_budget`);
    the built model's ``cfg`` holds the chosen ``d_model``. Raises :class:`~lmforge.config.ConfigError` (a ``ValueError``) when
    ``model.vocab_size`` is 0 or ``model.arch`` is not in the registry.
    """
    if cfg.vocab_size <= 0:
        raise ConfigError(
            f"model.vocab_size is {cfg.vocab_size}: set it from the tokenizer (its vocabulary size) "
            f"before building the model"
        )
    if cfg.arch not in REGISTRY:
        raise ConfigError(f"model.arch '{cfg.arch}' is not one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[cfg.arch](fit_to_budget(cfg))


__all__ = ["REGISTRY", "GRUModel", "GatedCNN", "HFCausalLM", "LSTMModel", "LanguageModel", "Transformer", "build_model", "fit_to_budget"]
