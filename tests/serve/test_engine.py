"""Tests for lmforge.serve.engine: sampling rules, stop conditions, the sliding window and streaming.

Run: ``.venv/bin/pytest tests/serve/test_engine.py``. The model and tokenizer are small
stand-ins that follow the lmforge contracts, so these tests need no trained model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.base import DecodeState
from lmforge.serve.engine import Engine, SamplingParams, _stable_length, sample_next

VOCAB = 257  # byte tokenizer: id = byte + 1, 0 = end of text


class ByteTokenizer:
    """Byte-level stand-in: a multi-byte UTF-8 character spans several tokens."""

    eot_id = 0
    end_ids = [0]
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def with_bos(self, ids: list[int]) -> list[int]:
        return list(ids)  # no begin token, so a prompt's positions are those of its bytes (the script needs it)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - 1 for i in ids if i != 0).decode("utf-8", errors="replace")


class TinyLM(nn.Module):
    """Bigram logits (a V x V table) plus an optional positional script; the decode state holds only lengths.

    With a script, the token at position p strongly predicts ``script[p % len(script)]``,
    so greedy decoding after an empty prompt spells out the script.
    """

    def __init__(self, table: Tensor | None = None, script: list[int] | None = None,
                 max_len: int | None = None, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(table if table is not None else torch.randn(VOCAB, VOCAB, generator=g))
        self.script = script
        self.max_len = max_len
        self.step_shapes: list[tuple[int, int]] = []  # (batch, new tokens) of every step call

    def _logits(self, idx: Tensor, start: Tensor) -> Tensor:
        logits = self.table[idx]  # (B, T, V)
        if self.script:
            pos = start[:, None] + torch.arange(idx.size(1))  # (B, T)
            target = torch.tensor(self.script)[pos % len(self.script)]
            logits = logits + 20.0 * F.one_hot(target, VOCAB)
        return logits

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self._logits(idx, torch.zeros(idx.size(0), dtype=torch.long))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def new_state(self, batch_size: int) -> DecodeState:
        return DecodeState((), torch.zeros(batch_size, dtype=torch.long), capacity=self.max_len)

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        state.check_step(idx)
        self.step_shapes.append((idx.size(0), idx.size(1)))
        return self._logits(idx, state.lens), state.advanced((), idx.size(1))


TOK = ByteTokenizer()


def scripted(text: str, **kw) -> Engine:
    return Engine(TinyLM(script=TOK.encode(text), **kw), TOK)


# ------------------------------------------------------------------ sample_next
def test_greedy_topk1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0), g), best)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.5, top_k=1), g), best)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1.5, top_p=1e-6), g), best)


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 40_000
    for temperature in (0.7, 1.0, 2.0):
        params = SamplingParams(temperature=temperature)
        ids = sample_next(logits.expand(draws, 4), params, torch.Generator().manual_seed(5))
        freq = torch.bincount(ids, minlength=4).float() / draws
        expected = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(freq, expected, atol=0.015), (temperature, freq, expected)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(2)
    for params in (SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.75)):
        ids = sample_next(logits.expand(20_000, 4), params, g)
        freq = torch.bincount(ids, minlength=4).float() / 20_000
        assert freq[2] == 0 and freq[3] == 0
        assert abs(freq[0].item() - 0.5 / 0.8) < 0.02  # renormalized over the two kept tokens


def test_sample_next_is_pure_and_seeded():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, presence_penalty=0.5)
    counts = torch.ones(8, 30)
    a = sample_next(logits, params, torch.Generator().manual_seed(4), counts)
    b = sample_next(logits, params, torch.Generator().manual_seed(4), counts)
    assert torch.equal(a, b) and torch.equal(logits, before)


def test_penalties_follow_openai_semantics():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    g = torch.Generator()
    greedy = SamplingParams(temperature=0.0)
    assert sample_next(logits, greedy, g, torch.tensor([[3.0, 0.0, 0.0]])).item() == 0  # no penalty set
    presence = SamplingParams(temperature=0.0, presence_penalty=0.2)  # 1.0 - 0.2 < 0.9
    assert sample_next(logits, presence, g, torch.tensor([[3.0, 0.0, 0.0]])).item() == 1
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.03)
    assert sample_next(logits, frequency, g, torch.tensor([[3.0, 0.0, 0.0]])).item() == 0  # 1.0 - 0.09 > 0.9
    assert sample_next(logits, frequency, g, torch.tensor([[4.0, 0.0, 0.0]])).item() == 1  # 1.0 - 0.12 < 0.9


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("max_new_tokens", -1), ("n", 0),
    ("stop", [""]), ("presence_penalty", 3.0), ("frequency_penalty", float("nan")), ("stop_token_ids", [-1]),
    ("logprobs", 21), ("prompt_logprobs", -1),
])
def test_bad_params_name_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        params.validate()
    with pytest.raises(ValueError, match=field):
        Engine(TinyLM(), TOK).generate(["a"], params)


# ---------------------------------------------------------------- Engine.generate
def test_greedy_generation_follows_the_model():
    [c] = scripted("Hello world").generate([""], SamplingParams(temperature=0, max_new_tokens=11))
    assert c.text == "Hello world" and c.finish_reason == "length"
    assert c.token_ids == TOK.encode("Hello world") and c.completion_tokens == 11 and c.prompt_tokens == 1


def test_logprobs_are_the_model_log_softmax():
    model = TinyLM(seed=4)
    [c] = Engine(model, TOK).generate(["ab"], SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=[]))
    prev = [TOK.encode("b")[0]] + c.token_ids[:-1]
    expected = [torch.log_softmax(model.table[p].detach(), -1)[t].item() for p, t in zip(prev, c.token_ids, strict=True)]
    assert c.logprobs == pytest.approx(expected, abs=1e-5)
    assert all(t == model.table[p].argmax().item() for p, t in zip(prev, c.token_ids, strict=True))


def test_stop_string_truncates_text():
    engine = scripted("Hello world. Bye.")
    [c] = engine.generate([""], SamplingParams(temperature=0, stop=["xyz", "world"], max_new_tokens=50))
    assert c.text == "Hello " and c.finish_reason == "stop"
    assert c.token_ids == TOK.encode("Hello world")  # the stop string's tokens were sampled


def test_stop_token_ends_without_being_included():
    engine = Engine(TinyLM(script=TOK.encode("abc") + [0] + TOK.encode("def")), TOK)
    [c] = engine.generate([""], SamplingParams(temperature=0, max_new_tokens=20))
    assert (c.text, c.token_ids, c.finish_reason) == ("abc", TOK.encode("abc"), "stop")
    [c] = engine.generate([""], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[]))
    assert c.text.startswith("abcdef") and c.finish_reason == "length" and c.completion_tokens == 20


def test_max_new_tokens_gives_length():
    [c] = scripted("abcdefghij").generate([""], SamplingParams(temperature=0, max_new_tokens=4))
    assert (c.text, c.finish_reason, c.completion_tokens) == ("abcd", "length", 4)


def test_seed_reproduces_and_prompts_are_independent():
    engine = Engine(TinyLM(seed=1), TOK)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=7, stop_token_ids=[])
    a = engine.generate(["x", "hello"], params)
    b = engine.generate(["hello"], params)
    assert a[1].token_ids == b[0].token_ids  # a prompt's result does not depend on the other prompts
    assert engine.generate(["x"], params)[0].token_ids == a[0].token_ids
    other = engine.generate(["x"], SamplingParams(temperature=1.0, max_new_tokens=30, seed=8, stop_token_ids=[]))
    assert other[0].token_ids != a[0].token_ids


def test_n_samples_finish_at_different_times():
    table = torch.zeros(VOCAB, VOCAB)
    table[:, 0] = 2.6  # end of text has about a 5% chance at every step
    model = TinyLM(table=table)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=0, n=6)
    out = Engine(model, TOK).generate(["ab", "c"], params)
    assert len(out) == 12 and all(c.prompt_tokens == 2 for c in out[:6]) and all(c.prompt_tokens == 1 for c in out[6:])
    for c in out:
        assert 0 not in c.token_ids
        assert (c.finish_reason, c.completion_tokens == 30) in {("stop", False), ("length", True)}
    assert {c.finish_reason for c in out} == {"stop", "length"}
    assert len({tuple(c.token_ids) for c in out[:6]}) == 6  # the n rows sample independently
    assert min(b for b, _ in model.step_shapes) < 6  # finished rows left the batch


def test_sliding_window_reprefill_keeps_generating():
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(9))
    params = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[])
    [free] = Engine(TinyLM(table=table.clone()), TOK).generate(["abc"], params)
    bounded = TinyLM(table=table.clone(), max_len=8)
    [c] = Engine(bounded, TOK).generate(["abc"], params)
    assert c.completion_tokens == 30 and c.finish_reason == "length"
    assert c.token_ids == free.token_ids  # a bigram model needs only the last token, so the window changes nothing
    assert (1, 4) in bounded.step_shapes  # re-prefilled with max_state_len // 2 tokens
    # Sampling with a window: also never fails.
    [s] = Engine(bounded, TOK).generate(["abc"], SamplingParams(temperature=1.0, max_new_tokens=30, seed=3, n=2))[:1]
    assert s.finish_reason in ("stop", "length")


def test_prompt_longer_than_the_state_is_left_truncated():
    engine = Engine(TinyLM(max_len=8), TOK)
    params = SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=[])
    [c] = engine.generate(["0123456789"], params)
    assert c.prompt_truncated and c.prompt_tokens == 7 and c.completion_tokens == 3
    [same] = engine.generate(["3456789"], params)
    assert same.token_ids == c.token_ids and not same.prompt_truncated


def test_engine_sets_eval_mode_and_device():
    model = TinyLM().train()
    engine = Engine(model, TOK, device=None)  # None: stay where the parameters are
    assert engine.device == torch.device("cpu") and not model.training
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("abc", SamplingParams())


def test_token_id_prompts_and_empty_prompt():
    engine = scripted("Hi there")
    params = SamplingParams(temperature=0, max_new_tokens=8)
    by_text, by_ids, empty_ids = engine.generate(["Hi", TOK.encode("Hi"), []], params)
    assert by_text.token_ids == by_ids.token_ids
    assert empty_ids.text == "Hi there" and empty_ids.prompt_tokens == 1  # started from end of text
    with pytest.raises(ValueError, match="prompt 1: token id 300"):
        engine.generate(["ok", [5, 300]], params)


def test_frequency_penalty_reduces_repetition():
    table = 5.0 * torch.eye(VOCAB)  # the model loves repeating its last token
    engine = Engine(TinyLM(table=table), TOK)
    base = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[])
    [plain] = engine.generate(["a"], base)
    assert plain.text == "a" * 20
    penalized = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[], frequency_penalty=2.0)
    [c] = engine.generate(["a"], penalized)
    assert max(c.token_ids.count(t) for t in set(c.token_ids)) == 3  # 5 - 2 * 3 < 0: after three, switch
    mild = Engine(TinyLM(table=1.5 * torch.eye(VOCAB)), TOK)
    assert mild.generate(["a"], base)[0].text == "a" * 20
    present = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[], presence_penalty=2.0)
    [p] = mild.generate(["a"], present)
    assert len(set(p.token_ids)) == 20  # 1.5 - 2 < 0 once a token was used: never repeated


# ------------------------------------------------------------------ Engine.stream
def test_stream_holds_back_partial_utf8_and_matches_generate():
    text = "héllo 😀 wörld 🎉!"
    engine = scripted(text)
    params = SamplingParams(temperature=0, max_new_tokens=len(TOK.encode(text)))
    deltas = list(engine.stream("", params))
    assert "".join(deltas) == engine.generate([""], params)[0].text == text
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas and len(deltas) == len(text)  # one delta per character, none per partial byte


def test_stream_random_bytes_matches_generate():
    engine = Engine(TinyLM(seed=2), TOK)
    params = SamplingParams(temperature=1.0, max_new_tokens=60, seed=11, stop_token_ids=[])
    deltas = list(engine.stream("é", params))
    [c] = engine.generate(["é"], params)
    assert "".join(deltas) == c.text and c.completion_tokens == 60
    assert "\ufffd" in c.text  # random bytes: invalid UTF-8 shows up as replacement characters


def test_stream_never_emits_the_start_of_a_stop_string():
    engine = scripted("a ST b STOP c")
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=["STOP"])
    deltas = list(engine.stream("", params))
    assert "".join(deltas) == engine.generate([""], params)[0].text == "a ST b "
    assert "".join(deltas[:2]) == "a "  # "S" then "ST" were held back until the space proved them harmless
    with pytest.raises(ValueError, match="n must be 1"):
        list(engine.stream("", SamplingParams(n=2)))


def test_stable_length():
    assert _stable_length("abc\ufffd", []) == 3
    # A byte-fallback decoder (the char tokenizer) gives one per byte of an unfinished character: all may complete.
    assert _stable_length("abc\ufffd\ufffd\ufffd", []) == 3
    assert _stable_length("a\ufffdb\ufffd", []) == 3  # one followed by a character is settled
    assert _stable_length("abc ST", ["STOP"]) == 4
    assert _stable_length("abc S", ["STOP", "SX"]) == 4
    assert _stable_length("abcST", ["T"]) == 5  # a one-character stop string is found, never held
