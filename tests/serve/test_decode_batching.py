"""Decode states of different lengths batched together (``lmforge.serve.batch.concat_rows`` / ``select_rows``).

Run: ``.venv/bin/pytest tests/serve/test_decode_batching.py``. This is the state side of the
serving engine's continuous batching, for every registry model through the generic
``DecodeState``: requests prefilled alone at different prompt lengths join one batch,
step together, leave it, and each row's logits stay those of a full ``forward`` over
its own sequence.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import REGISTRY, build_model
from lmforge.serve.batch import concat_rows, select_rows
from tests.hf_families import tiny_hf_config

V, CONTEXT = 53, 24


# The GPT-2 style transformer (learned positions, per-row in a ragged batch) is checked like an architecture.
GPT2 = {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True}
ARCHS = [*sorted(REGISTRY), "transformer-gpt2"]


def make(arch: str):
    torch.manual_seed(0)
    options = GPT2 if arch == "transformer-gpt2" else {}
    cfg = ModelConfig(arch=arch.split("-")[0], vocab_size=V, context=CONTEXT, d_model=32, n_layers=2,
                      transformer={"n_heads": 4, "n_kv_heads": 2, **options},
                      cnn={"kernel_size": 3, "dilation_growth": 2},
                      hf_config=tiny_hf_config(V, context=CONTEXT) if arch == "hf" else None)
    return build_model(cfg).eval()


def sequences(lengths: list[int], extra: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, V, (1, n + extra), generator=g) for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_different_lengths_step_like_forward(arch):
    model = make(arch)
    lengths, extra = [7, 2, 11], 5
    seqs = sequences(lengths, extra)
    with torch.inference_mode():
        full = [model(s)[0] for s in seqs]  # each (1, n + extra, V)
        states = []
        for s, n in zip(seqs, lengths, strict=True):
            logits, st = model.step(s[:, :n], model.new_state(1))
            torch.testing.assert_close(logits, full[len(states)][:, :n], atol=1e-5, rtol=0)
            states.append(st)
        state = concat_rows(states)
        for i in range(extra):
            idx = torch.cat([s[:, n + i : n + i + 1] for s, n in zip(seqs, lengths, strict=True)])  # (3, 1)
            logits, state = model.step(idx, state)
            for row, n in enumerate(lengths):
                torch.testing.assert_close(logits[row, -1], full[row][0, n + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_join_and_leave_mid_decode(arch):
    """A row leaves (select_rows), a new one joins (concat_rows): the others are unaffected."""
    model = make(arch)
    a, b, c = sequences([5, 9, 3], extra=6)
    with torch.inference_mode():
        ref = {name: model(s)[0][0] for name, s in (("a", a), ("b", b), ("c", c))}
        _, sa = model.step(a[:, :5], model.new_state(1))
        _, sb = model.step(b[:, :9], model.new_state(1))
        state = concat_rows([sa, sb])
        logits, state = model.step(torch.cat([a[:, 5:6], b[:, 9:10]]), state)
        torch.testing.assert_close(logits[:, 0], torch.stack([ref["a"][5], ref["b"][9]]), atol=1e-5, rtol=0)
        state = select_rows(state, torch.tensor([1]))  # a leaves
        _, sc = model.step(c[:, :3], model.new_state(1))
        state = concat_rows([state, sc])  # c joins: rows are now b (11 seen) and c (3 seen)
        for i in range(3):
            logits, state = model.step(torch.cat([b[:, 10 + i : 11 + i], c[:, 3 + i : 4 + i]]), state)
            torch.testing.assert_close(logits[:, 0], torch.stack([ref["b"][10 + i], ref["c"][3 + i]]),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_concat_leaves_inputs_usable(arch):
    model = make(arch)
    (s,) = sequences([6], extra=2)
    with torch.inference_mode():
        _, alone = model.step(s[:, :6], model.new_state(1))
        both = concat_rows([alone, alone])  # repeats are allowed, like select_rows'
        pair, _ = model.step(s[:, 6:7].repeat(2, 1), both)
        single, _ = model.step(s[:, 6:7], alone)
    torch.testing.assert_close(pair[0], single[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pair[1], single[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        concat_rows([])


@pytest.mark.parametrize("arch", ARCHS)
def test_select_rows_keeps_the_right_rows(arch):
    model = make(arch)
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    index = torch.tensor([2, 0, 2])
    with torch.inference_mode():
        full, _ = model(idx[index])
        _, state = model.step(idx[:, :8], model.new_state(3))
        state = select_rows(state, index)
        assert state.lens.tolist() == [8, 8, 8]
        out = []
        for i in range(8, 16):
            logits, state = model.step(idx[index][:, i : i + 1], state)
            out.append(logits)
    torch.testing.assert_close(torch.cat(out, dim=1), full[:, 8:], atol=1e-5, rtol=0)


def test_transformer_ragged_rows_can_take_several_tokens_and_respect_the_context():
    model = make("transformer")
    a, b = sequences([4, 10], extra=4)
    with torch.inference_mode():
        _, sa = model.step(a[:, :4], model.new_state(1))
        _, sb = model.step(b[:, :10], model.new_state(1))
        logits, state = model.step(torch.cat([a[:, 4:8], b[:, 10:14]]), concat_rows([sa, sb]))
        torch.testing.assert_close(logits[0], model(a)[0][0, 4:8], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], model(b)[0][0, 10:14], atol=1e-5, rtol=0)
        assert state.lens.tolist() == [8, 14]
        with pytest.raises(ValueError, match="past model.context"):
            model.step(torch.zeros(2, CONTEXT - 13, dtype=torch.long), state)  # 14 + 11 > 24 for row b
