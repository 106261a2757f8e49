"""Preference losses against hand-computed values, and the reference of a LoRA run (one copy of the weights)."""

from __future__ import annotations

import math

import torch

from lmforge.config import FinetuneConfig, ModelConfig
from lmforge.finetune.setup import objective
from lmforge.models.transformer import Transformer
from lmforge.train import lora
from lmforge.train.preference import IGNORE, PreferenceObjective, dpo, sequence_logprobs, simpo


def test_dpo_loss_and_rewards_by_hand():
    # Policy log-probs -10 (chosen), -12 (rejected); reference -11 for both; beta 0.1.
    loss, chosen, rejected = dpo(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                 torch.tensor([-11.0]), beta=0.1)
    assert math.isclose(chosen.item(), 0.1, abs_tol=1e-6) and math.isclose(rejected.item(), -0.1, abs_tol=1e-6)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-0.2)), abs_tol=1e-6)  # -log sigmoid(0.2) = 0.598139
    # A policy equal to its reference: margin 0, loss log 2.
    loss, chosen, rejected = dpo(*(torch.tensor([-5.0, -7.0]),) * 4, beta=0.5)
    assert torch.allclose(loss, torch.full((2,), math.log(2))) and not chosen.any() and not rejected.any()


def test_simpo_loss_and_rewards_by_hand():
    # Chosen: -6 over 3 tokens, rejected: -12 over 4; beta 2, gamma 0.5: rewards -4 and -6.
    loss, chosen, rejected = simpo(torch.tensor([-6.0]), torch.tensor([-12.0]), torch.tensor([3]), torch.tensor([4]),
                                   beta=2.0, gamma=0.5)
    assert chosen.item() == -4.0 and rejected.item() == -6.0
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1.5)), abs_tol=1e-6)  # -log sigmoid(2 - 0.5)


def test_sequence_logprobs_sum_only_the_targets():
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: every target costs log 4
    logits[1, 2] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # p(token 0) = 3/6
    targets = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, 0]])
    total, count = sequence_logprobs(logits, targets)
    assert count.tolist() == [2, 1]
    assert torch.allclose(total, torch.tensor([-2 * math.log(4), math.log(0.5)]))


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch="transformer", vocab_size=40, context=16, d_model=32, n_layers=2,
                                   init_std=0.2, transformer={"n_heads": 2}))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 40, (4, 10), generator=g)  # pairs 0, 1: chosen rows 0-1, rejected rows 2-3
    y = torch.randint(0, 40, (4, 10), generator=g)
    y[:, :5] = IGNORE  # the shared prompt
    return x, y


def test_dpo_objective_matches_the_formula_on_the_model():
    model, x_y = _model(), _batch()
    x, y = x_y
    obj = objective(FinetuneConfig(mode="dpo"))(model, model)
    margins, loss = obj(x, y)
    assert math.isclose(loss.item(), math.log(2), abs_tol=1e-6) and margins.abs().max() < 1e-6  # policy == reference
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the policy moves; the reference stays
        logp, _ = sequence_logprobs(model(x)[0], y)
        ref, _ = sequence_logprobs(obj.reference(x)[0], y)
    margins, loss = obj(x, y)
    expected, c, r = dpo(logp[:2], logp[2:], ref[:2], ref[2:], beta=0.1)
    assert math.isclose(loss.item(), expected.mean().item(), abs_tol=1e-6)
    torch.testing.assert_close(margins, c - r, atol=1e-6, rtol=0)


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def test_lora_dpo_holds_one_copy_of_the_weights_and_its_reference_is_the_base():
    model = _model()
    x, y = _batch()
    with torch.no_grad():
        base_logp, _ = sequence_logprobs(model(x)[0], y)
    lora.attach_lora(model, FinetuneConfig().lora.model_copy(update={"rank": 4}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # trained adapters: the policy now differs from the base
    obj = objective(FinetuneConfig(mode="dpo", lora={"rank": 4}))(model, model)
    assert obj.reference is None and _storages(obj) == _storages(model)  # nothing beyond the model itself
    assert not torch.allclose(sequence_logprobs(model(x)[0], y)[0], base_logp)
    torch.testing.assert_close(obj._reference_logprobs(x, y), base_logp, atol=1e-6, rtol=0)
    # Full fine-tuning keeps a frozen copy instead: its own storage, no gradients.
    full = objective(FinetuneConfig(mode="dpo"))(_model(), _model())
    assert not _storages(full.reference) & _storages(full.policy)
    assert not any(p.requires_grad for p in full.reference.parameters())


def test_simpo_needs_no_reference():
    model = _model()
    obj = objective(FinetuneConfig(mode="simpo"))(model, model)
    assert isinstance(obj, PreferenceObjective) and obj.reference is None and obj.adapters_off is None
    x, y = _batch()
    margins, loss = obj(x, y)
    logp, n = sequence_logprobs(model(x)[0], y)
    expected, c, r = simpo(logp[:2], logp[2:], n[:2], n[2:], beta=2.0, gamma=0.5)
    assert math.isclose(loss.item(), expected.mean().item(), abs_tol=1e-6)


def test_nll_term_adds_the_chosen_answers_loss_per_token():
    model, (x, y) = _model(), _batch()
    plain = objective(FinetuneConfig(mode="dpo"))(model, model)
    with_nll = objective(FinetuneConfig(mode="dpo", preference={"nll": 0.5}))(model, model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
        logp, n = sequence_logprobs(model(x)[0], y)
    _, base = plain(x, y)
    _, loss = with_nll(x, y)
    expected = base.item() + 0.5 * (-logp[:2] / n[:2]).mean().item()  # rows 0-1 are the chosen answers
    assert math.isclose(loss.item(), expected, rel_tol=1e-6) and loss.item() > base.item()
