"""The serving engine's fused one-token Transformer step and its compiled form (lmforge/serve/fast_transformer.py).

Run: ``pytest tests/serve/test_fast_decode.py``. The fused path must give the logits of the full
forward (within float rounding), follow weight changes, step aside for wrapped projections,
and the compiled step must choose the same tokens as the eager one. Importing the serving
code installs no process-wide hooks. The compiled tests pay one inductor compile (5-30 s on
a CPU; inductor caches it on disk afterwards).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch

import lmforge.serve.fast_transformer as fast
from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.serve.batch import concat_rows
from lmforge.serve.decoder import Decoder
from lmforge.serve.fast_transformer import FastTransformer, accelerate

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


def one_by_one(decoder: Decoder, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``idx[:, prefill:]`` fed one token at a time after a prefill of ``prefill`` tokens."""
    _, state = decoder.step(idx[:, :prefill], decoder.model.new_state(idx.shape[0]))
    out = []
    for i in range(prefill, idx.shape[1]):
        logits, state = decoder.step(idx[:, i : i + 1], state)
        out.append(logits)
    return torch.cat(out, dim=1)


def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every call of the fused step."""
    calls: list[int] = []
    real = fast.decode_one

    def counting(plan, idx, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(idx.shape[0])
        return real(plan, idx, *args, **kwargs)

    monkeypatch.setattr(fast, "decode_one", counting)
    return calls


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_step_equals_forward_and_is_taken(name, monkeypatch):
    model = make(VARIANTS[name], tie=name != "relu2")
    decoder = accelerate(model)
    assert isinstance(decoder, FastTransformer)
    calls = fused_calls(monkeypatch)
    idx = tokens(2)
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(decoder, idx, prefill=5)
    torch.testing.assert_close(stepped, full[:, 5:], atol=1e-5, rtol=0)
    assert calls == [2] * (T - 5), "one-token steps did not go through the fused plan"


def test_rows_at_different_lengths_take_the_fused_path(monkeypatch):
    model = make(VARIANTS["gqa-qknorm"])
    decoder = accelerate(model)
    calls = fused_calls(monkeypatch)
    a, b = tokens(1, seed=2), tokens(1, seed=3)
    with torch.inference_mode():
        full_a, full_b = model(a)[0], model(b)[0]
        _, sa = decoder.step(a[:, :4], model.new_state(1))
        _, sb = decoder.step(b[:, :9], model.new_state(1))
        state = concat_rows([sa, sb])
        for i in range(6):  # row a at position 4 + i, row b at 9 + i
            logits, state = decoder.step(torch.cat([a[:, 4 + i : 5 + i], b[:, 9 + i : 10 + i]]), state)
            torch.testing.assert_close(logits[0, 0], full_a[0, 4 + i], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[1, 0], full_b[0, 9 + i], atol=1e-5, rtol=0)
    assert calls == [2] * 6


def test_plan_follows_weight_updates_and_moves():
    model = make(VARIANTS["llama"])
    decoder = accelerate(model)
    idx = tokens(1)
    with torch.inference_mode():
        one_by_one(decoder, idx, prefill=3)
    first = decoder.plan
    # Train one step: every parameter changes in place (version counters move).
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx, idx)[1].backward()
    opt.step()
    model.eval()
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(decoder, idx, prefill=3)
    torch.testing.assert_close(stepped, full[:, 3:], atol=1e-5, rtol=0)
    assert decoder.plan is not first
    # load_state_dict copies in place too.
    other = make(VARIANTS["llama"], seed=7)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(one_by_one(decoder, idx, prefill=3), other(idx)[0][:, 3:], atol=1e-5, rtol=0)


def test_wrapped_projections_keep_the_module_path():
    from lmforge.config.finetune import LoraConfig
    from lmforge.train.lora import attach_lora

    model = make(VARIANTS["llama"])
    idx = tokens(1)
    assert accelerate(model) is not None  # the plain model has a fused step
    attach_lora(model, LoraConfig(rank=2))
    with torch.no_grad():  # make the adapters matter: B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert accelerate(model) is None  # the LoRA-wrapped one has not: the engine decodes through model.step
    with torch.inference_mode():
        full, _ = model(idx)
        stepped = one_by_one(Decoder(model), idx, prefill=3)
    torch.testing.assert_close(stepped, full[:, 3:], atol=1e-5, rtol=0)


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
    assert compiled.compiled and not eager.compiled and type(compiled.decoder) is FastTransformer
    params = SamplingParams(temperature=0, max_new_tokens=T - 4, stop_token_ids=[])
    prompts = [[5, 9, 2], [7]]
    ours = [c.token_ids for c in eager.generate(prompts, params)]
    theirs = [compiled.generate([p], params)[0].token_ids for p in prompts]  # alone: batch 1, the compiled step
    assert ours == theirs
    assert [c.token_ids for c in compiled.generate(prompts, params)] == ours  # together: the fused eager step
    assert compiled.decoder.compiled_steps, "the compiled graph was never called"
    idx = tokens(1)
    with torch.inference_mode():
        torch.testing.assert_close(one_by_one(compiled.decoder, idx, prefill=4), model(idx)[0][:, 4:],
                                   atol=1e-5, rtol=0)


def test_compiled_step_refuses_buffers_it_was_not_built_for():
    model = make({"n_heads": 4})
    decoder = FastTransformer(model, compile=True)
    idx = tokens(1)
    with torch.inference_mode():
        want, _ = model(idx)
        one_by_one(decoder, idx, prefill=4)  # compiles for contiguous (1, kv, T, hd) buffers
        _, state = decoder.step(idx[:, :4], model.new_state(1))
        # The same values in buffers with other strides: the graph must not read them as if contiguous.
        odd = tuple(t.transpose(2, 3).contiguous().transpose(2, 3) for t in state.tensors)
        state = dataclasses.replace(state, tensors=odd)
        assert not state.tensors[0].is_contiguous()
        logits, _ = decoder.step(idx[:, 4:5], state)
    torch.testing.assert_close(logits[:, 0], want[:, 4], atol=1e-5, rtol=0)


def test_importing_the_serving_code_installs_no_global_hooks() -> None:
    """No process-wide nn.Module hooks at import: they would run for every model of the process."""
    code = ("import lmforge.serve.engine, lmforge.serve.api\n"
            "from torch.nn.modules import module as m\n"
            "print(len(m._global_module_registration_hooks), len(m._global_parameter_registration_hooks),"
            " len(m._global_buffer_registration_hooks), len(m._global_forward_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0", "0", "0"]
