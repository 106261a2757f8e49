"""Several greedy tokens per model call: ``Decoder.greedy`` and the engine's ``lookahead``.

Run: ``.venv/bin/pytest tests/serve/test_lookahead.py``. ``Decoder(model).greedy(idx, state, n)``
must give exactly what ``n`` calls of ``step`` with an argmax between them give, for every
architecture, and the Transformer's fused and compiled steps (``lmforge.serve.fast_transformer``)
the same tokens within rounding of the logits; the engine must produce the same
completions (tokens, text, finish reasons, log-probabilities) with a lookahead of 8 as
with none, through stop tokens, stop strings, ``max_new_tokens`` and full context windows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.serve.decoder import Decoder
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.serve.fast_transformer import FastTransformer
from tests.serve.test_engine import TOK, TinyLM

V = 64


def tiny(arch: str, context: int = 48) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=32, n_layers=2, vocab_size=V, context=context, tie_embeddings=True,
                      transformer={"n_heads": 4, "n_kv_heads": 2})
    return build_model(cfg).eval()


def stepped(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: prefill, then ``n`` plain steps with an argmax between them."""
    logits, state = model.step(prompt, model.new_state(prompt.shape[0]))
    token = logits[:, -1].argmax(-1, keepdim=True)
    picked, logps, last = [], [], None
    logits, state = model.step(token, state)
    for _ in range(n - 1):
        last = logits[:, -1]
        token = last.argmax(-1, keepdim=True)
        picked.append(token)
        logps.append(torch.log_softmax(last.float(), -1).gather(-1, token))
        logits, state = model.step(token, state)
    return torch.cat(picked, 1), torch.cat(logps, 1), logits[:, -1]


def greedy(decoder: Decoder, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    model = decoder.model
    logits, state = decoder.step(prompt, model.new_state(prompt.shape[0]))
    token = logits[:, -1].argmax(-1, keepdim=True)
    picked, logps, last, state = decoder.greedy(token, state, n)
    after, _ = model.step(last.argmax(-1, keepdim=True), state)  # the state goes on from the n-th token
    return picked, logps, last, after


@pytest.mark.parametrize("arch", ["transformer", "transformer-fused", "lstm", "gru", "cnn"])
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_equals_stepping(arch: str, rows: int) -> None:
    model = tiny(arch.split("-")[0])
    decoder = FastTransformer(model) if arch.endswith("fused") else Decoder(model)
    prompt = torch.randint(0, V, (rows, 5), generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want_picked, want_logps, want_last = stepped(model, prompt, 6)
        picked, logps, last, _ = greedy(decoder, prompt, 6)
        one = decoder.greedy(prompt[:, -1:], model.step(prompt[:, :-1], model.new_state(rows))[1], 1)
    assert picked.shape == (rows, 5) and picked.dtype == torch.int64 and logps.dtype == torch.float32
    # Picked tokens exactly, log-probabilities within rounding. The plain decoder loops over step (the same
    # arithmetic as the reference); the fused Transformer step differs by rounding only, and the top-two
    # logit margins here are above 0.1, far above 1e-5: no argmax can flip.
    assert torch.equal(picked, want_picked)
    torch.testing.assert_close(logps, want_logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(last, want_last, atol=1e-5, rtol=0)
    assert one[0].shape == (rows, 0) and one[1].shape == (rows, 0)  # n = 1: one step, nothing picked


def test_compiled_greedy_matches_eager() -> None:
    eager = tiny("transformer")
    compiled = FastTransformer(copy.deepcopy(eager), compile=True)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want = greedy(Decoder(eager), prompt, 9)
        got = greedy(compiled, prompt, 9)
    assert compiled.compiled_steps == 9, "the compiled graph was not used for every step"
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def completions(engine: Engine, prompts: list, params: SamplingParams) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, [round(x, 4) for x in c.logprobs])
            for c in engine.generate(prompts, params)]


def spy_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The n of every multi-token call the batch makes through the plain :class:`Decoder`."""
    calls: list[int] = []
    real = Decoder.greedy

    def counting(self, idx, state, n):  # noqa: ANN001, ANN202
        calls.append(n)
        return real(self, idx, state, n)

    monkeypatch.setattr(Decoder, "greedy", counting)
    return calls


def test_engine_lookahead_changes_nothing_but_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch)
    text = "the cat sat on the mat. the end"
    cases = [
        SamplingParams(temperature=0, max_new_tokens=25, stop_token_ids=[]),
        SamplingParams(temperature=0, max_new_tokens=40, stop=["mat."]),  # a stop string inside a burst
        SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[TOK.encode("d")[0]]),  # a stop token
        SamplingParams(temperature=0, max_new_tokens=30, n=2, stop_token_ids=[]),
        SamplingParams(temperature=0, max_new_tokens=9, logprobs=0, stop_token_ids=[]),
    ]
    for max_len in (None, 12):  # 12: rows refill their window every few tokens
        plain = Engine(TinyLM(script=TOK.encode(text), max_len=max_len), TOK, lookahead=1)
        ahead = Engine(TinyLM(script=TOK.encode(text), max_len=max_len), TOK, lookahead=8)
        for params in cases:
            prompts = ["", "the", "x"]
            assert completions(ahead, prompts, params) == completions(plain, prompts, params), (max_len, params)
    assert calls and max(calls) == 8 and all(1 < n <= 8 for n in calls)
    # Sampling, penalties and top log-probs keep one token per call.
    calls.clear()
    ahead.generate(["the"], SamplingParams(temperature=0.8, max_new_tokens=20, seed=3))
    ahead.generate(["the"], SamplingParams(temperature=0, max_new_tokens=20, frequency_penalty=1.0))
    ahead.generate(["the"], SamplingParams(temperature=0, max_new_tokens=20, logprobs=2))
    assert calls == []


def test_engine_lookahead_on_a_transformer_with_a_full_window(monkeypatch) -> None:
    # The burst length follows the measured step time (at most ~10 ms of tokens per call); on a loaded machine
    # a step can take longer than that, and the multi-token path would never be taken. Lift the time cap so the
    # test checks the path itself, not the machine's speed.
    monkeypatch.setattr("lmforge.serve.batch._BURST_SECONDS", 1e6)
    model = tiny("transformer", context=16)
    params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]  # the second refills after a few tokens
    want = completions(Engine(model, TOK, lookahead=1), prompts, params)
    calls: list[int] = []
    engine = Engine(model, TOK, lookahead=8)
    real = engine.decoder.greedy

    def counting(idx, state, n):  # noqa: ANN001, ANN202
        calls.append(n)
        return real(idx, state, n)

    engine.decoder.greedy = counting  # type: ignore[method-assign]
    assert completions(engine, prompts, params) == want
    assert all(len(tokens) == 40 for tokens, *_ in want)
    assert calls and max(calls) > 1  # the multi-token call was taken


def test_lookahead_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lookahead must be at least 1"):
        Engine(TinyLM(), TOK, lookahead=0)
