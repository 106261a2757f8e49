"""The Transformer's fused one-token decode step and its compiled form (lmforge/models/transformer_decode.py).

Run: ``pytest tests/test_fast_decode.py``. The fused path must give the logits of the full
forward (within float rounding), follow weight changes, step aside for wrapped projections,
and the compiled step must choose the same tokens as the eager one. The compiled test pays one
inductor compile (5-30 s on a CPU; inductor caches it on disk afterwards).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.models.transformer_decode import DecodePlan

V, T = 64, 24
VARIANTS = {
    "llama": {"n_heads": 4},
    "gqa-qknorm": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
    "gpt2": {"n_heads": 2, "norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True},
    "relu2": {"n_heads": 2, "mlp": "relu2"},
}


def make(transformer: dict, seed: int = 0, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="transformer", d_model=32, n_layers=2, vocab_size=V, context=T, tie_embeddings=tie,
                      transformer=transformer)
    return build_model(cfg).eval()


def tokens(b: int, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def one_by_one(model, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``idx[:, prefill:]`` fed one token at a time after a prefill of ``prefill`` tokens."""
    _, state = model.step(idx[:, :prefill], model.new_state(idx.shape[0]))
    out = []
    for i in range(prefill, idx.shape[1]):
        logits, state = model.step(idx[:, i : i + 1], state)
        out.append(logits)
    return torch.cat(out, dim=1)


def plan_of(model) -> DecodePlan | None:
    cached = model.__dict__.get("_decode_plan")
    return None if cached is None else cached.plan


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_step_equals_forward_and_is_taken(name):
    model = make(VARIANTS[name], tie=name != "relu2")
    idx = tokens(2)
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(model, idx, prefill=5)
    torch.testing.assert_close(stepped, full[:, 5:], atol=1e-5, rtol=0)
    assert plan_of(model) is not None, "one-token steps did not go through the fused plan"


def test_rows_at_different_lengths_take_the_fused_path():
    model = make(VARIANTS["gqa-qknorm"])
    a, b = tokens(1, seed=2), tokens(1, seed=3)
    with torch.inference_mode():
        full_a, full_b = model(a)[0], model(b)[0]
        _, sa = model.step(a[:, :4], model.new_state(1))
        _, sb = model.step(b[:, :9], model.new_state(1))
        state = model.concat_states([sa, sb])
        for i in range(6):  # row a at position 4 + i, row b at 9 + i
            logits, state = model.step(torch.cat([a[:, 4 + i : 5 + i], b[:, 9 + i : 10 + i]]), state)
            torch.testing.assert_close(logits[0, 0], full_a[0, 4 + i], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[1, 0], full_b[0, 9 + i], atol=1e-5, rtol=0)


def test_plan_follows_weight_updates_and_moves():
    model = make(VARIANTS["llama"])
    idx = tokens(1)
    with torch.inference_mode():
        one_by_one(model, idx, prefill=3)
    first = plan_of(model)
    # Train one step: every parameter changes in place (version counters move).
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx, idx)[1].backward()
    opt.step()
    model.eval()
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(model, idx, prefill=3)
    torch.testing.assert_close(stepped, full[:, 3:], atol=1e-5, rtol=0)
    assert plan_of(model) is not first
    # load_state_dict copies in place too.
    other = make(VARIANTS["llama"], seed=7)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(one_by_one(model, idx, prefill=3), other(idx)[0][:, 3:], atol=1e-5, rtol=0)


def test_wrapped_projections_keep_the_module_path():
    from lmforge.config.finetune import LoraConfig
    from lmforge.train.lora import attach_lora

    model = make(VARIANTS["llama"])
    idx = tokens(1)
    with torch.inference_mode():
        one_by_one(model, idx, prefill=3)  # a plan exists for the plain model
    attach_lora(model, LoraConfig(rank=2))
    with torch.no_grad():  # make the adapters matter: B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(model, idx, prefill=3)
    torch.testing.assert_close(stepped, full[:, 3:], atol=1e-5, rtol=0)
    assert plan_of(model) is None


def test_compiled_step_matches_eager_tokens_and_logits():
    from lmforge.serve.engine import Engine, SamplingParams

    class Tok:  # token ids in, ids out: the engine needs only these
        eot_id, end_ids, vocab_size = 0, [0], V

        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def with_bos(self, ids: list[int]) -> list[int]:
            return list(ids)  # no begin token: the prompts are the ids given

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return " ".join(map(str, ids))

    model = make({"n_heads": 4, "n_kv_heads": 2})
    eager = Engine(model, Tok())
    compiled = Engine(copy.deepcopy(model), Tok(), compile=True)
    assert compiled.compiled and not eager.compiled
    params = SamplingParams(temperature=0, max_new_tokens=T - 4, stop_token_ids=[])
    prompts = [[5, 9, 2], [7]]
    ours = [c.token_ids for c in eager.generate(prompts, params)]
    theirs = [compiled.generate([p], params)[0].token_ids for p in prompts]  # alone: batch 1, the compiled step
    assert ours == theirs
    assert [c.token_ids for c in compiled.generate(prompts, params)] == ours  # together: the fused eager step
    plan = plan_of(compiled.model)
    assert plan is not None and plan.compiled is not None and plan.compiled.graph is not None, "graph not captured"
    idx = tokens(1)
    with torch.inference_mode():
        torch.testing.assert_close(one_by_one(compiled.model, idx, prefill=4), model(idx)[0][:, 4:],
                                   atol=1e-5, rtol=0)


def test_compiled_step_refuses_buffers_it_was_not_built_for():
    model = make({"n_heads": 4})
    model.compile_decoding()
    idx = tokens(1)
    with torch.inference_mode():
        want, _ = model(idx)
        one_by_one(model, idx, prefill=4)  # compiles and captures for contiguous (1, kv, T, hd) buffers
        _, state = model.step(idx[:, :4], model.new_state(1))
        # The same values in buffers with other strides: the captured graph must not read them blindly.
        state.k = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in state.k]
        assert not state.k[0].is_contiguous()
        logits, _ = model.step(idx[:, 4:5], state)
    torch.testing.assert_close(logits[:, 0], want[:, 4], atol=1e-5, rtol=0)


def test_registration_hook_adds_no_compile_guard() -> None:
    """A compiled model that re-assigns a submodule in its forward compiles once, not once per call."""
    import torch._dynamo

    class Reassigns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.lin = self.lin  # a module registration: torch runs the global hooks, ours among them
            return self.lin(x)

    compiles = []

    def counting(gm: torch.fx.GraphModule, _inputs: list) -> object:
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = torch.compile(Reassigns(), backend=counting)
    x = torch.randn(2, 4)
    outs = [model(x) for _ in range(4)]
    assert len(compiles) == 1
    assert torch.equal(outs[0], outs[3])
