"""Contract tests for every model in lmforge.models.REGISTRY (a new entry gets them for free).

Run: ``pytest tests/models/test_models.py``. Tiny models (d_model 32, 2 layers, vocab 50,
context 16) keep the whole file to a few seconds on a laptop CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models import REGISTRY, LanguageModel, build_model
from lmforge.models.transformer import ffn_hidden_size
from tests.hf_families import tiny_hf_config

V, T = 50, 16
# Transformer variants go through every contract test too: "transformer-NAME" = the transformer with these options.
VARIANTS = {
    "transformer-gpt2": {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True},
    "transformer-relu2": {"mlp": "relu2"},
}
ARCHS = sorted(REGISTRY) + sorted(VARIANTS)


def tiny_cfg(arch: str, **over) -> ModelConfig:
    base = dict(
        arch=arch,
        d_model=32,
        n_layers=2,
        vocab_size=V,
        context=T,
        transformer={"n_heads": 4, "n_kv_heads": 2},
        rnn={"hidden": 48},  # differs from d_model so the width projections are exercised
        cnn={"kernel_size": 3, "dilation_growth": 2},
    )
    if arch in VARIANTS:
        base.update(arch="transformer", transformer={**base["transformer"], **VARIANTS[arch]})
    base.update(over)
    if arch == "hf":  # a tiny Qwen3 of the same size, through the wrapper of transformers' own code
        base["hf_config"] = tiny_hf_config(V, base["d_model"], base["n_layers"], T, dropout=base.get("dropout", 0.0))
    return ModelConfig(**base)


def make(arch: str, seed: int = 0, **over) -> LanguageModel:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(arch, **over))


def tokens(b: int, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def decode(model: LanguageModel, idx: torch.Tensor, sizes: list[int], state=None, start: int = 0):
    """Feed ``idx[:, start:]`` through ``step`` in chunks of ``sizes``; return the logits and the last state."""
    state = model.new_state(idx.shape[0]) if state is None else state
    out = []
    for n in sizes:
        logits, state = model.step(idx[:, start : start + n], state)
        out.append(logits)
        start += n
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_initial_loss(arch):
    model = make(arch)
    idx, targets = tokens(3), tokens(3, seed=2)
    none, fused = model(idx, targets)  # training: the head and the loss run fused, without logits
    # (transformers' own head returns its logits: hf models have no fused path)
    assert (none is None) != (arch == "hf") and fused.dtype == torch.float32 and fused.shape == ()
    model.eval()
    logits, loss = model(idx, targets)
    assert logits.shape == (3, T, V)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(fused, loss, atol=1e-6, rtol=0)
    # Small init: predictions are near uniform, so the loss starts near ln(V).
    assert abs(loss.item() - math.log(V)) < 0.1
    logits2, none = model(idx)
    assert none is None and torch.equal(logits, logits2)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_ignores_masked_targets(arch):
    model = make(arch)
    idx, targets = tokens(2), tokens(2, seed=2)
    targets[0, :5] = -100
    targets[1, 10:] = -100
    _, fused = model(idx, targets)  # training: fused head and loss
    model.eval()
    logits, loss = model(idx, targets)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep].double(), targets[keep])
    assert loss.item() == pytest.approx(manual.item(), abs=1e-5)
    assert fused.item() == pytest.approx(manual.item(), abs=1e-5)
    # A fully masked batch gives 0, not NaN, and (training) zero gradients.
    _, empty = model(idx, torch.full_like(targets, -100))
    assert empty.item() == 0.0
    model.train()
    _, empty = model(idx, torch.full_like(targets, -100))
    empty.backward()
    assert empty.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(arch):
    model = make(arch)
    idx, targets = tokens(4), tokens(4, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(idx, targets)[1].item() < 0.5 * first


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch):
    model = make(arch)
    model(tokens(2), tokens(2, seed=2))[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sizes", [[1] * T, [5] + [1] * (T - 5), [7, 1, 1, 4, 3], [T]])
def test_incremental_decoding_equals_forward(arch, sizes):
    model = make(arch).eval()
    idx = tokens(3)
    with torch.no_grad():
        full, _ = model(idx)
        stepped, _ = decode(model, idx, sizes)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_state_declares_its_batch_dimension_and_lengths(arch):
    """Serving batches any model's state by its declared batch dimension: every tensor carries the rows there."""
    model = make(arch).eval()
    with torch.no_grad():
        _, state = decode(model, tokens(3), [5, 1, 2])
    assert state.batch_size == 3 and state.lens.tolist() == [8, 8, 8] and state.lens.device.type == "cpu"
    assert state.tensors and all(t.shape[state.batch_dim] == 3 for t in state.tensors)
    empty = model.new_state(2)
    assert [t.shape for t in empty.tensors] == [
        t.shape[: state.batch_dim] + (2,) + t.shape[state.batch_dim + 1:] for t in state.tensors]


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_deterministic_for_a_seed(arch):
    models = make(arch, seed=5), make(arch, seed=5), make(arch, seed=6)
    (one, two, _), (emb, _, other) = (m.state_dict() for m in models), (m.tok_emb.weight for m in models)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(emb, other)
    std = tiny_cfg(arch).init_std
    assert emb.std().item() == pytest.approx(std, rel=0.1)
    assert all(one[k].eq(0).all() for k in one if ".bias" in k or k.startswith("rnn.bias"))


def test_transformer_residual_projections_are_scaled_down():
    sd = make("transformer").state_dict()
    expected = 0.02 / math.sqrt(2 * 2)
    for key in ("layers.0.attn.o.weight", "layers.1.mlp.down.weight"):
        assert sd[key].std().item() == pytest.approx(expected, rel=0.15)
    assert sd["layers.0.attn.q.weight"].std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(sd["layers.0.attn_norm.weight"], torch.ones(32))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_and_tied_embeddings(arch, tie):
    model = make(arch, tie_embeddings=tie)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * 32
    shared = model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert shared == tie
    if not tie:
        # An untied head adds exactly one more V x d_model matrix.
        assert model.num_params() == make(arch, tie_embeddings=True).num_params() + V * 32


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_per_token_is_positive_and_grows_with_width(arch):
    small, wide = make(arch), make(arch, d_model=64)
    assert 0 < small.flops_per_token() < wide.flops_per_token()
    # At least 6 flops per matmul weight of the output head.
    assert small.flops_per_token() >= 6 * 32 * V


def test_transformer_flops_formula():
    cfg = tiny_cfg("transformer")
    model = build_model(cfg)
    d, h, kv = 32, ffn_hidden_size(cfg), 2 * (32 // 4)
    n_matmul = 2 * (d * d + d * kv + d * kv + d * d + 3 * d * h) + d * V
    assert h == 96  # 8/3 * 32 = 85.3, rounded up to a multiple of 32
    assert model.flops_per_token() == 6 * n_matmul + 12 * 2 * d * T


def test_transformer_variant_shapes_and_flops():
    gpt2, relu2 = make("transformer-gpt2"), make("transformer-relu2")
    d, h, kv = 32, 4 * 32, 2 * (32 // 4)  # the 2-matrix MLPs default to 4 * d_model
    n_matmul = 2 * (d * d + d * kv + d * kv + d * d + 2 * d * h) + d * V
    assert gpt2.flops_per_token() == relu2.flops_per_token() == 6 * n_matmul + 12 * 2 * d * T
    sd = gpt2.state_dict()
    assert sd["pos_emb.weight"].shape == (T, d) and sd["layers.0.mlp.up.weight"].shape == (h, d)
    assert torch.equal(sd["layers.0.attn_norm.weight"], torch.ones(d)) and sd["norm.bias"].eq(0).all()
    assert sd["layers.1.attn.q.bias"].shape == (d,) and "layers.0.mlp.gate.weight" not in sd
    assert isinstance(gpt2.layers[0].mlp_norm, torch.nn.LayerNorm)
    # The defaults stay Llama's, with exactly the parameter names older checkpoints hold.
    default = make("transformer").state_dict()
    assert not any("bias" in k or k.startswith("pos_emb") for k in default)
    assert "layers.0.mlp.gate.weight" in default
    # Learned positions move the logits (position matters), rotary tables are absent.
    idx = tokens(1)
    with torch.no_grad():
        before = gpt2(idx)[0]
        gpt2.pos_emb.weight.add_(0.5)
        assert not torch.allclose(before, gpt2(idx)[0])
    assert not hasattr(gpt2.rotary, "cos")


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_only_in_training(arch):
    model = make(arch, dropout=0.5)
    idx = tokens(2)
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_size_zero_is_refused(arch):
    with pytest.raises(ValueError, match=r"model\.vocab_size is 0"):
        build_model(tiny_cfg(arch, vocab_size=0))
    with pytest.raises(ValueError, match=r"model\.vocab_size is 0"):
        cfg = tiny_cfg(arch, vocab_size=0)
        REGISTRY[cfg.arch](cfg)


def test_transformer_state_is_bounded_by_context():
    model = make("transformer").eval()
    assert model.new_state(1).capacity == T
    assert all(make(a).new_state(1).capacity is None for a in ("lstm", "gru", "cnn"))
    with torch.no_grad():
        _, state = decode(model, tokens(1), [T])
        with pytest.raises(ValueError, match=r"16 tokens; 1 more would make 17"):
            model.step(tokens(1, 1), state)
        with pytest.raises(ValueError, match=r"longer than model.context \(16\)"):
            model(tokens(1, T + 1))


def test_unbounded_states_decode_past_the_context():
    for arch in ("lstm", "gru", "cnn"):
        model = make(arch).eval()
        with torch.no_grad():
            logits, state = decode(model, tokens(1, 3 * T), [T, T, T])
        assert logits.shape == (1, 3 * T, V) and torch.isfinite(logits).all()


def test_cnn_receptive_field():
    model = make("cnn").eval()
    # kernel 3, dilations 1 and 2: 1 + 2*1 + 2*2 = 7 tokens.
    assert model.receptive_field == 7
    idx = tokens(1)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % V
    with torch.no_grad():
        diff = (model(idx)[0] - model(changed)[0]).abs().amax(dim=-1)[0]  # (T,)
    assert (diff[:7] > 0).all()
    assert (diff[7:] == 0).all()


def test_lstm_and_gru_state_shapes():
    lstm, gru = make("lstm"), make("gru")
    s1, s2 = lstm.new_state(3), gru.new_state(3)
    assert [t.shape for t in s1.tensors] == [(2, 3, 48), (2, 3, 48)] and s1.batch_dim == 1  # h and c
    assert [t.shape for t in s2.tensors] == [(2, 3, 48)] and s2.batch_dim == 1  # h


@pytest.mark.parametrize(
    "transformer",
    [{"n_heads": 4, "qk_norm": True}, {"n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 40, "rope_theta": 100.0}],
)
def test_transformer_variants_decode_like_forward(transformer):
    model = make("transformer", tie_embeddings=False, transformer=transformer).eval()
    idx = tokens(2)
    with torch.no_grad():
        full, _ = model(idx)
        stepped, _ = decode(model, idx, [3, 1, 6, 1, 5])
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    if transformer.get("qk_norm"):
        assert model.layers[0].attn.q_norm is not None
