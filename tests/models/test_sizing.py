"""Sizing by parameter budget (lmforge.models.sizing) and truncated BPTT in the recurrent models.

Run: ``pytest tests/models/test_sizing.py`` (a few seconds: models are counted on the meta device).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import SCRATCH_ARCHS, ConfigError, ModelConfig
from lmforge.models import build_model
from lmforge.models.sizing import count_params, fit_to_budget, with_width

V = 300


def budget_cfg(arch: str, budget: int, **over) -> ModelConfig:
    base = dict(arch=arch, vocab_size=V, n_layers=2, context=32, param_budget=budget,
                transformer={"n_heads": 3}, cnn={"kernel_size": 3})
    return ModelConfig(**{**base, **over})


@pytest.mark.parametrize("arch", SCRATCH_ARCHS)
@pytest.mark.parametrize("budget", [70_000, 150_000])
def test_budget_picks_the_closest_width(arch, budget):
    cfg = budget_cfg(arch, budget)
    sized = fit_to_budget(cfg)
    assert sized.param_budget is None and sized.arch == arch
    step = 24 if arch == "transformer" else 8  # lcm(8, 2 * n_heads) keeps the rotary head dimension even
    assert sized.d_model % step == 0
    # No other multiple of the step comes closer (checked by brute force over the plausible range).
    best = min(range(step, 320, step), key=lambda d: abs(count_params(with_width(cfg, d)) - budget))
    assert sized.d_model == best
    # The count is the real model's: build it for real and count.
    assert build_model(sized).num_params() == count_params(sized)


@pytest.mark.parametrize("arch", SCRATCH_ARCHS)
def test_budget_gives_the_same_model_as_the_explicit_width(arch):
    """Sizing draws nothing from the RNG, so a budget and the width it chose build identical weights."""
    torch.manual_seed(3)
    by_budget = build_model(budget_cfg(arch, 60_000))
    width = by_budget.cfg.d_model
    torch.manual_seed(3)
    explicit = build_model(budget_cfg(arch, None, d_model=width))
    a, b = by_budget.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if arch in ("lstm", "gru"):  # the recurrent width follows d_model
        assert by_budget.hidden == width


def test_budget_out_of_reach_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.param_budget \(1,000\) is out of reach"):
        fit_to_budget(budget_cfg("lstm", 1_000))
    with pytest.raises(ConfigError, match=r"model\.param_budget needs model\.vocab_size"):
        fit_to_budget(budget_cfg("cnn", 50_000, vocab_size=0))


def test_budget_frees_the_transformer_width_check_but_not_the_head_check():
    ModelConfig(arch="transformer", param_budget=10**6, transformer={"n_heads": 5})  # d_model=192 is replaced
    with pytest.raises(ValueError, match=r"model\.transformer\.n_kv_heads"):
        ModelConfig(arch="transformer", param_budget=10**6, transformer={"n_heads": 4, "n_kv_heads": 3})


def test_rnn_width_and_budget_are_exclusive():
    with pytest.raises(ValueError, match=r"model\.rnn\.hidden \(64\) and model\.param_budget"):
        ModelConfig(arch="gru", param_budget=10**5, rnn={"hidden": 64})
    ModelConfig(arch="cnn", param_budget=10**5, rnn={"hidden": 64})  # the rnn section does not apply to a CNN


def rnn(arch: str, bptt: int | None, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, vocab_size=50, d_model=16, n_layers=2, context=16,
                                   tie_embeddings=False, rnn={"bptt": bptt}))


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_bptt_cuts_gradients_but_not_values(arch):
    idx = torch.arange(16).view(1, 16)  # each token id once, so an embedding row's gradient is one position's
    reached = {}
    for bptt in (None, 6):
        model = rnn(arch, bptt)
        logits, _ = model(idx)
        F.cross_entropy(logits[:, -1], idx[:, -1]).backward()
        reached[bptt] = (model.tok_emb.weight.grad[:16].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert reached[None] == list(range(16))
    assert reached[6] == [12, 13, 14, 15]  # chunks [0, 6) [6, 12) [12, 16): only the last one sends gradient back
    # Values: the same arithmetic up to the order of summation, not bitwise. Cut into chunks, the input
    # projection is one matmul per chunk instead of one for the sequence, and BLAS may split a sum
    # differently by shape and thread count (1.8e-12 apart seen on an AMD EPYC with 2 threads). The logits
    # of this small-init model are ~1e-5, so the tolerance is relative to their scale: 1e-3 of it, while
    # a state lost at a chunk boundary moves the last chunk's logits by about a third of it (checked below).
    full, cut = rnn(arch, None)(idx)[0], rnn(arch, 6)(idx)[0]
    scale = full.abs().max().item()
    torch.testing.assert_close(cut, full, atol=1e-3 * scale, rtol=1e-3)
    fresh_state = rnn(arch, None)(idx[:, 12:])[0]  # the last chunk without the state carried into it
    assert (fresh_state - full[:, 12:]).abs().max().item() > 0.05 * scale


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_bptt_model_decodes_like_its_forward(arch):
    model = rnn(arch, 4).eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        state, parts = model.new_state(2), []
        for chunk in idx.split([3, 1, 7, 5], dim=1):
            logits, state = model.step(chunk, state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_budget_counts_the_gpt2_variant_parts():
    gpt2 = {"n_heads": 3, "norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True}
    sized = fit_to_budget(budget_cfg("transformer", 150_000, transformer=gpt2))
    d, hidden = sized.d_model, 4 * sized.d_model
    # Per layer: q, k, v, o with biases, the 2-matrix MLP with biases, two LayerNorms (weight + bias);
    # plus the token and position embeddings (head tied) and the final LayerNorm.
    per_layer = 4 * (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 2 * 2 * d
    assert count_params(sized) == 2 * per_layer + V * d + 32 * d + 2 * d
    assert abs(count_params(sized) - 150_000) <= 0.25 * 150_000


def test_budget_refused_for_a_wrapped_family():
    """A wrapped Hugging Face family is sized by its own config, so a parameter budget is an error."""
    with pytest.raises(ValueError, match=r"model\.param_budget \(50000\) does not apply to model\.arch=hf"):
        ModelConfig(arch="hf", vocab_size=V, param_budget=50_000, hf_config={"model_type": "qwen3"})
