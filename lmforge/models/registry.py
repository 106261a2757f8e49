"""The model registry: architecture name -> model class, for :func:`lmforge.models.build_model`.

The names are :data:`lmforge.config.ARCHS` (what ``model.arch`` accepts), paired in order with the
classes here; a new architecture adds its name there and its class here.
"""

from __future__ import annotations

from lmforge.config import ARCHS
from lmforge.models.base import LanguageModel
from lmforge.models.cnn import GatedCNN
from lmforge.models.hf_causal import HFCausalLM
from lmforge.models.rnn import GRUModel, LSTMModel
from lmforge.models.transformer import Transformer

REGISTRY: dict[str, type[LanguageModel]] = dict(zip(ARCHS, (Transformer, LSTMModel, GRUModel, GatedCNN, HFCausalLM), strict=True))
