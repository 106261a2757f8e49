"""LoRA on every registry model: only adapters train, merging is exact, adapters save and load alone;
frozen layers for full fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import ConfigError, LoraConfig, ModelConfig
from lmforge.finetune.setup import freeze
from lmforge.models import build_model
from lmforge.train.lora import (
    LoRAConv1d,
    LoRALinear,
    LoRARNN,
    adapter_state,
    attach_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    select_targets,
)
from tests.conftest import file_modes

ARCHS = {
    "transformer": {"transformer": {"n_heads": 2}},
    "lstm": {},
    "gru": {"rnn": {"hidden": 24}},  # width projections too
    "cnn": {"cnn": {"kernel_size": 3, "dilation_growth": 2}},
}


def _model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, vocab_size=50, context=16, d_model=16, n_layers=2, init_std=0.3,
                                   **ARCHS[arch]))


def _train(model, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 50, (4, 12), generator=gen)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_trains_only_adapters_and_merges_exactly(arch):
    model = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = attach_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    kinds = {type(model.get_submodule(n)) for n in names}
    assert kinds == {"transformer": {LoRALinear}, "lstm": {LoRARNN}, "gru": {LoRARNN, LoRALinear},
                     "cnn": {LoRAConv1d, LoRALinear}}[arch]
    assert "lm_head" not in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    lora_before = {k: v.clone() for k, v in adapter_state(model).items()}
    _train(model)
    # Base weights bitwise unchanged (their names gain ".base" inside a wrapper); every adapter moved.
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not torch.equal(v, lora_before[k]) for k, v in adapter_state(model).items() if "lora_B" in k)
    model.eval()
    idx = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = model(idx)
        merged = merge_lora(copy.deepcopy(model))
        got, _ = merged(idx)
    assert set(merged.state_dict()) == set(before)  # plain names again: checkpoints and exports fit
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _model(arch).eval()(idx)[0], atol=1e-3)  # the adapter did change the model


@pytest.mark.parametrize("arch", ["transformer", "cnn"])
def test_adapter_saved_alone_loads_onto_a_fresh_base(arch, tmp_path):
    model = _model(arch)
    names = attach_lora(model, LoraConfig(rank=2, targets=["layers.1.*"] if arch == "cnn" else ["q", "v"]))
    _train(model)
    files = save_adapter(model, tmp_path / "adapter", LoraConfig(rank=2), names, {"note": "test"})
    saved = {f.name for f in files}
    assert saved == {"adapter.safetensors", "adapter.json"}
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < 20_000  # adapters only
    fresh = _model(arch)
    meta = load_adapter(fresh, tmp_path / "adapter")
    assert meta["targets"] == names and meta["note"] == "test"
    idx = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    model.eval()
    fresh.eval()
    # Bitwise: the same weights through the same code path in one process, so the same arithmetic.
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_targets_by_name_pattern_and_layer():
    model = _model("transformer")
    assert select_targets(model, LoraConfig(rank=2, targets=["q", "mlp.down"])) == [
        "layers.0.attn.q", "layers.1.attn.q", "layers.0.mlp.down", "layers.1.mlp.down"]
    assert select_targets(model, LoraConfig(rank=2, targets=["layers.*.attn.v"]), last_layers=1) == ["layers.1.attn.v"]
    with pytest.raises(ConfigError, match="'qproj' matches no Linear"):
        select_targets(model, LoraConfig(rank=2, targets=["qproj"]))


def test_freeze_last_layers_and_embeddings():
    model = _model("transformer")
    freeze(model, train_layers=1, freeze_embeddings=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("layers.1.") or n == "norm.weight" for n in trainable)
    assert "norm.weight" in trainable and not model.tok_emb.weight.requires_grad
    rnn = _model("lstm")
    freeze(rnn, train_layers=1, freeze_embeddings=False)
    frozen = sorted(n for n, p in rnn.named_parameters() if not p.requires_grad)
    assert frozen == ["rnn.bias_hh_l0", "rnn.bias_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    with pytest.raises(ConfigError, match="nothing to train"):
        freeze(_model("lstm"), train_layers=0, freeze_embeddings=True)


def test_adapter_files_get_the_umask_mode(tmp_path, umask):
    model = _model("transformer")
    names = attach_lora(model, LoraConfig(rank=2, targets=["q", "v"]))
    save_adapter(model, tmp_path / "adapter", LoraConfig(rank=2), names, {})
    assert file_modes(tmp_path) == {"adapter/adapter.safetensors": umask, "adapter/adapter.json": umask}
