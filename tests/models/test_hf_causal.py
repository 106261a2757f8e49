"""The ``hf`` architecture (lmforge.models.hf_causal) against transformers, family by family.

Run: ``pytest tests/models/test_hf_causal.py``. Every family of tests/hf_families.py (Llama 3.x
with llama3 rotary scaling, Qwen2.5, Qwen3, Gemma 3 with sliding-window layers, Phi-3, Mistral,
SmolLM, GPT-2) is opened by ``load_model`` as lmforge would open a downloaded folder; the
families lmforge's Transformer computes exactly load natively, the others wrapped. Tolerance:
1e-5 on float32 logits of order 1 (rounding of the same operations in another order; the
wrapped forward runs transformers' own code, so it is exact).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import HFCausalLM
from lmforge.serve.batch import concat_rows, select_rows
from lmforge.trained import load_model
from tests.hf_families import FAMILIES, VOCAB, reference

NAMES = sorted(FAMILIES)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(name, hf_family_folders):
    folder = hf_family_folders[name]
    tm = load_model(folder)
    assert tm.cfg.model.arch == FAMILIES[name].arch and tm.cfg.model.vocab_size == VOCAB
    idx = torch.cat([ids(24, 1), ids(24, 2)])
    with torch.no_grad():
        ours, theirs = tm.model(idx)[0], reference(folder)(input_ids=idx).logits
    assert ours.abs().max() > 0.1  # perturbed norms: the logits are not all near zero
    assert float((ours - theirs).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_rows_joining_and_leaving_decode_like_the_full_forward(name, hf_family_folders):
    """As the server's scheduler does: row A runs alone, B joins mid-way at another length, A leaves."""
    model = load_model(hf_family_folders[name]).model
    a, b = ids(16, 3), ids(10, 4)  # a: 9 prefill + 7 steps; b: 4 prefill + 6 steps (past Gemma's window of 4)
    with torch.inference_mode():
        full_a, full_b = model(a)[0][0], model(b)[0][0]
        got_a, state = model.step(a[:, :9], model.new_state(1))
        seen_a = [got_a[0]]
        for i in range(9, 12):  # A alone
            logits, state = model.step(a[:, i : i + 1], state)
            seen_a.append(logits[0])
        got_b, state_b = model.step(b[:, :4], model.new_state(1))
        seen_b = [got_b[0]]
        state = concat_rows([state, state_b])  # B joins: rows at lengths 12 and 4
        assert state.lens.tolist() == [12, 4]
        for i in range(3):  # both
            logits, state = model.step(torch.cat([a[:, 12 + i : 13 + i], b[:, 4 + i : 5 + i]]), state)
            seen_a.append(logits[0])
            seen_b.append(logits[1])
        state = select_rows(state, torch.tensor([1]))  # A leaves
        for i in range(7, 10):
            logits, state = model.step(b[:, i : i + 1], state)
            seen_b.append(logits[0])
    torch.testing.assert_close(torch.cat(seen_a)[:15], full_a[:15], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(seen_b), full_b, atol=1e-5, rtol=0)


def test_a_family_without_a_key_value_cache_cannot_decode_step_by_step():
    from transformers import MambaConfig

    hf = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2).to_dict()
    model = HFCausalLM(ModelConfig(arch="hf", vocab_size=64, context=16, hf_config=hf))
    idx = torch.zeros(1, 3, dtype=torch.long)
    assert model(idx)[0].shape == (1, 3, 64)  # it trains and scores ...
    with pytest.raises(ValueError, match="MambaForCausalLM .*cannot decode step by step"):
        model.new_state(1)  # ... but has no key/value cache to batch


def test_hf_config_goes_with_arch_hf_only():
    with pytest.raises(ValueError, match="model.hf_config is set only for model.arch=hf"):
        ModelConfig(arch="hf", vocab_size=10)
    with pytest.raises(ValueError, match="model.hf_config is set only for model.arch=hf"):
        ModelConfig(arch="transformer", vocab_size=10, hf_config={"model_type": "llama"})


def test_eager_attention_families_decode_like_the_full_forward():
    """Gemma 2 runs transformers' eager attention (soft-capped scores), which takes an additive float mask."""
    from transformers import Gemma2Config

    hf = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=32, sliding_window=4).to_dict()
    torch.manual_seed(0)
    model = HFCausalLM(ModelConfig(arch="hf", vocab_size=VOCAB, context=32, hf_config=hf)).eval()
    assert model.hf.config._attn_implementation == "eager"
    seqs = [ids(14, 7), ids(14, 8)]
    with torch.inference_mode():
        full = [model(s)[0][0] for s in seqs]
        states = [model.step(s[:, :n], model.new_state(1))[1] for s, n in zip(seqs, (9, 3), strict=True)]
        state, got = concat_rows(states), [[], []]
        for i in range(5):  # rows at lengths 9 and 3 step together, past the window of 4
            logits, state = model.step(torch.cat([seqs[0][:, 9 + i : 10 + i], seqs[1][:, 3 + i : 4 + i]]), state)
            got[0].append(logits[0, -1])
            got[1].append(logits[1, -1])
    torch.testing.assert_close(torch.stack(got[0]), full[0][9:14], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(got[1]), full[1][3:8], atol=1e-5, rtol=0)
