"""Continuous batching in the engine: requests join and leave a running batch without changing results.

Run: ``.venv/bin/pytest tests/serve/test_engine_batching.py``. Uses the byte-level stand-ins
of ``test_engine.py`` (exact arithmetic) and real registry models.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.serve.engine import Engine, SamplingParams
from tests.serve.test_engine import TOK, VOCAB, TinyLM


def real_model(arch: str, context: int = 64):
    torch.manual_seed(0)
    # A wide init spreads the logits, so argmax never hinges on float rounding across batch layouts.
    cfg = ModelConfig(arch=arch, vocab_size=VOCAB, context=context, d_model=32, n_layers=2, init_std=0.5,
                      transformer={"n_heads": 4})
    return build_model(cfg)


@pytest.mark.parametrize("arch", ["transformer", "gru", "cnn"])
def test_batched_generate_equals_one_prompt_at_a_time(arch):
    engine = Engine(real_model(arch), TOK)
    prompts = ["a", "hello there", "xyz!", "The quick brown fox"]
    for params in (SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[]),
                   SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, n=2, stop_token_ids=[])):
        together = engine.generate(prompts, params)
        alone = [c for p in prompts for c in engine.generate([p], params)]
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        for c, ref in zip(together, alone, strict=True):
            assert c.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_requests_join_a_running_batch_at_other_positions():
    """TinyLM's logits depend on each row's own position: joining mid-run must keep positions per row."""
    engine = Engine(TinyLM(script=TOK.encode("abcdefghijklmnopqrstuvwxyz")), TOK)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
    batch = engine.batch()
    first = engine.request("0123456", params)
    batch.add(first)
    batch.step()
    batch.step()
    second = engine.request("", params)  # joins while the first is two tokens in
    batch.add(second)
    assert len(batch.rows) == 2
    while batch.rows:
        batch.step()
    assert first.completions()[0].text == "ghijkl"  # the prompt ends at position 6, which predicts script[6]
    assert second.completions()[0].text == "abcdef"  # its prompt [eot] sits at position 0
    assert second.completions()[0].token_ids == engine.generate([""], params)[0].token_ids


def test_transformer_rows_joining_mid_decode_match_solo_runs():
    engine = Engine(real_model("transformer"), TOK)
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[], logprobs=2)
    solo = {p: engine.generate([p], params)[0] for p in ("short", "a much longer prompt here")}
    batch = engine.batch()
    reqs = {"short": engine.request("short", params)}
    batch.add(reqs["short"])
    for _ in range(3):
        batch.step()
    reqs["a much longer prompt here"] = engine.request("a much longer prompt here", params)
    batch.add(reqs["a much longer prompt here"])
    while batch.rows:
        batch.step()
    for p, req in reqs.items():
        [c] = req.completions()
        assert c.token_ids == solo[p].token_ids
        assert c.logprobs == pytest.approx(solo[p].logprobs, abs=1e-4)


def test_removed_request_leaves_at_once_and_others_continue():
    model = TinyLM(seed=3)
    engine = Engine(model, TOK)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1, n=3, stop_token_ids=[])
    batch = engine.batch()
    gone, kept = engine.request("x", params), engine.request("y", params)
    batch.add(gone)
    batch.add(kept)
    batch.step()
    batch.remove(gone)
    assert [r for r, _ in batch.rows] == [kept] * 3
    while batch.rows:
        batch.step()
    assert [c.token_ids for c in kept.completions()] == [c.token_ids for c in engine.generate(["y"], params)]
    assert not gone.finished


def test_max_batch_bounds_the_rows():
    model = TinyLM(seed=4)
    engine = Engine(model, TOK, max_batch=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=2, n=2, stop_token_ids=[])
    out = engine.generate(["a", "b", "c", "d", "e"], params)
    assert len(out) == 10 and all(c.completion_tokens == 5 for c in out)
    assert max(b for b, t in model.step_shapes if t == 1) == 4


def test_prompt_logprobs_and_scoring_only():
    model = real_model("transformer")
    engine = Engine(model, TOK)
    ids = TOK.encode("scoring a prompt")
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=3)
    [c] = engine.generate([ids], params)
    assert (c.text, c.token_ids, c.finish_reason, c.completion_tokens) == ("", [], "length", 0)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)
    expected = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert c.prompt_logprobs[0] is None and c.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert c.prompt_ids == ids and c.prompt_top_logprobs[0] is None
    for i, top in enumerate(c.prompt_top_logprobs[1:]):
        assert [t for t, _ in top] == logp[i].topk(3).indices.tolist()


def test_top_logprobs_of_generated_tokens():
    engine = Engine(TinyLM(seed=6), TOK)
    [c] = engine.generate(["q"], SamplingParams(temperature=0, max_new_tokens=4, logprobs=3, stop_token_ids=[]))
    assert len(c.top_logprobs) == 4
    for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
        assert len(top) == 3 and top[0] == (tok, pytest.approx(lp))  # greedy: the chosen one is the best
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_deltas_carry_tokens_and_finish_reason():
    engine = Engine(TinyLM(script=TOK.encode("héllo STOP more")), TOK)
    params = SamplingParams(temperature=0, max_new_tokens=30, stop=["STOP"], logprobs=1)
    batch = engine.batch()
    req = engine.request("", params)
    batch.add(req)
    deltas = []
    while not req.finished:
        batch.step()
        deltas += req.take_deltas(TOK)
    deltas += req.take_deltas(TOK)
    [c] = req.completions()
    assert "".join(d.text for d in deltas) == c.text == "héllo "
    assert sum((d.token_ids for d in deltas), []) == c.token_ids
    assert len(sum((d.top_logprobs for d in deltas), [])) == len(c.token_ids)
    assert [d.finish_reason for d in deltas][-1] == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert req.take_deltas(TOK) == []
