"""Parity of our Transformer with Hugging Face's LlamaForCausalLM through the weight mapping.

Run: ``pytest tests/models/test_hf_parity.py``. Builds tiny random Llama models from a
``LlamaConfig`` (no download), loads our weights through
``to_hf_llama_state_dict`` and compares logits. Needs the ``transformers``
package (the ``dev`` / ``hf`` extras).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmforge.config import ConfigError, ModelConfig
from lmforge.export.hf_llama import hf_llama_config, to_hf_llama_state_dict
from lmforge.models import build_model

V, T = 61, 24


def our_model(n_kv_heads: int | None, tie: bool, **transformer) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="transformer",
        d_model=48,
        n_layers=2,
        vocab_size=V,
        context=T,
        tie_embeddings=tie,
        transformer={"n_heads": 6, "n_kv_heads": n_kv_heads, "rope_theta": 500.0, "norm_eps": 1e-6, **transformer},
    )
    model = build_model(cfg).eval()
    # Norm weights start at 1; perturb them so a swapped or skipped norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(ours) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config(ours.cfg))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(ours), strict=False)
    assert unexpected == []
    # A tied head is re-tied from the embedding, not loaded.
    assert missing == (["lm_head.weight"] if ours.cfg.tie_embeddings else [])
    return hf


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_llama(n_kv_heads, tie):
    ours = our_model(n_kv_heads, tie)
    hf = hf_model(ours)
    assert hf.config.num_key_value_heads == (n_kv_heads or 6)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=idx).logits
        got, _ = ours(idx)
    assert got.abs().max() > 0.1  # not a trivially tiny comparison
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_every_weight_is_mapped_once():
    ours = our_model(2, tie=False)
    mapped = to_hf_llama_state_dict(ours)
    hf_names = set(LlamaForCausalLM(LlamaConfig(**hf_llama_config(ours.cfg))).state_dict())
    assert set(mapped) == hf_names
    assert sum(t.numel() for t in mapped.values()) == ours.num_params()


def test_saved_folder_loads_with_auto_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = our_model(3, tie=True)
    (tmp_path / "config.json").write_text(json.dumps(hf_llama_config(ours.cfg, bos_token_id=1, eos_token_id=2)))
    save_file({k: v.contiguous() for k, v in to_hf_llama_state_dict(ours).items()}, tmp_path / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings is True and hf.config.eos_token_id == 2
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(input_ids=idx).logits, atol=1e-4, rtol=0)


def test_qk_norm_is_refused():
    ours = our_model(None, tie=True, qk_norm=True)
    with pytest.raises(ConfigError, match=r"model\.transformer\.qk_norm"):
        to_hf_llama_state_dict(ours)
    with pytest.raises(ConfigError, match=r"model\.transformer\.qk_norm"):
        hf_llama_config(ours.cfg)


def test_non_transformer_is_refused():
    with pytest.raises(ConfigError, match=r"model\.arch is 'lstm'"):
        hf_llama_config(ModelConfig(arch="lstm", vocab_size=V))


def test_biases_map_onto_llama_attention_and_mlp_bias():
    ours = our_model(2, tie=False, bias=True)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))  # biases start at 0: make a dropped one visible
    hf = hf_model(ours)
    assert hf.config.attention_bias and hf.config.mlp_bias
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(input_ids=idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("option", [{"norm": "layernorm"}, {"pos": "learned"}, {"mlp": "relu2"}])
def test_non_llama_variants_are_refused(option):
    ours = our_model(None, tie=True, **option)
    key, value = next(iter(option.items()))
    with pytest.raises(ConfigError, match=rf"model\.transformer\.{key} is '{value}'"):
        to_hf_llama_state_dict(ours)
