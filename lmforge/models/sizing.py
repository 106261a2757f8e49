"""Size a model by its parameter count: ``model.param_budget`` -> the width that fits it.

Every architecture is sized the same way, so a bake-off can compare like with
like: given the depth (``model.n_layers``), the vocabulary and the family's own
options, the width ``d_model`` (for the LSTM and GRU also the recurrent width,
which then equals ``d_model``) becomes the multiple of :data:`WIDTH_MULTIPLE`
whose total parameter count, embeddings included and a tied output head counted
once, is closest to the budget. For the Transformer the width is also a multiple
of ``2 * n_heads``, so the rotary head dimension stays even.

The count comes from building the model on PyTorch's ``meta`` device (shapes
only: no memory, no draws from the random generator), so it is exact for every
registry model, present and future, with no per-architecture formula to keep in
step with the model code::

    from lmforge.models.sizing import fit_to_budget
    sized = fit_to_budget(cfg.model)   # cfg.model.vocab_size > 0; a copy with d_model set, param_budget None
    sized.d_model, count_params(sized)
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.registry import REGISTRY

WIDTH_MULTIPLE = 8  # widths stay multiples of 8: what vector units and tensor cores handle best
MAX_WIDTH = 65_536
TOLERANCE = 0.25  # a budget no width comes within 25% of is a config error, not a silent surprise


def count_params(cfg: ModelConfig) -> int:
    """Distinct parameters of the model that ``cfg`` describes, counted without allocating it."""
    with torch.device("meta"):
        model = REGISTRY[cfg.arch](cfg)
    return model.num_params()


def width_step(cfg: ModelConfig) -> int:
    """The granularity of widths tried for ``cfg``'s architecture."""
    if cfg.arch == "transformer":
        return math.lcm(WIDTH_MULTIPLE, 2 * cfg.transformer.n_heads)
    return WIDTH_MULTIPLE


def with_width(cfg: ModelConfig, d_model: int) -> ModelConfig:
    """A validated copy of ``cfg`` with this width and no budget (so it builds as given)."""
    return ModelConfig.model_validate({**cfg.model_dump(), "d_model": d_model, "param_budget": None})


def fit_to_budget(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``d_model`` chosen to match ``cfg.param_budget``; ``cfg`` itself when it has no budget.

    Raises :class:`ConfigError` naming ``model.param_budget`` when no width comes
    within 25% of the budget (the embeddings alone may exceed a small one).
    """
    budget = cfg.param_budget
    if budget is None:
        return cfg
    if cfg.vocab_size <= 0:
        raise ConfigError("model.param_budget needs model.vocab_size: size the model after the tokenizer exists")
    step = width_step(cfg)
    cache: dict[int, int] = {}

    def params(k: int) -> int:  # parameters at width k * step, memoized: each count builds a model
        if k not in cache:
            cache[k] = count_params(with_width(cfg, k * step))
        return cache[k]

    # Parameters grow with the width: find the first multiple at or past the budget (doubling, then
    # bisecting, so small models need few counts), then take the closer of it and the one below.
    lo, hi, top = 1, 1, MAX_WIDTH // step
    while hi < top and params(hi) < budget:
        lo, hi = hi + 1, min(2 * hi, top)
    while lo < hi:
        mid = (lo + hi) // 2
        if params(mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if k >= 1), key=lambda k: abs(params(k) - budget))
    if abs(params(best) - budget) > TOLERANCE * budget:
        raise ConfigError(
            f"model.param_budget ({budget:,}) is out of reach for model.arch={cfg.arch} with model.n_layers="
            f"{cfg.n_layers} and a vocabulary of {cfg.vocab_size:,}: the closest width, d_model={best * step}, has "
            f"{params(best):,} parameters; change the budget or model.n_layers"
        )
    return with_width(cfg, best * step)
