"""The fused, chunked head + cross-entropy (lmforge/models/head_loss.py) against the plain computation.

Run: ``pytest tests/models/test_head_loss.py``. Loss and every gradient must match
``causal_lm_loss(F.linear(h, W, b), targets)`` across chunk boundaries, ignored targets and
frozen inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.head_loss import chunk_rows, head_cross_entropy
from lmforge.models.layers import causal_lm_loss


def inputs(n: int, d: int, vocab: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


def reference(h, w, b, t):
    return causal_lm_loss(F.linear(h, w, b)[None], t[None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab", [50, 5000])  # 5000: chunks of 26 rows, so 3 and a bit for 100 rows
def test_loss_and_gradients_match(bias, vocab):
    h, w, b, t = inputs(100, 24, vocab, bias)
    t[::7] = -100  # some ignored targets, spread over the chunks
    fused = head_cross_entropy(h, w, b, t)
    fused.backward(torch.tensor(2.5))  # a non-unit upstream gradient
    got = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    plain = reference(h, w, b, t)
    plain.backward(torch.tensor(2.5))
    want = [h.grad, w.grad] + ([b.grad] if bias else [])
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    assert chunk_rows(vocab) < 100 or vocab == 50


def test_frozen_head_and_all_ignored():
    h, w, b, t = inputs(40, 16, 30, bias=False)
    w.requires_grad_(False)
    head_cross_entropy(h, w, None, t).backward()
    assert h.grad is not None and w.grad is None
    h.grad = None
    empty = head_cross_entropy(h, w, None, torch.full_like(t, -100))
    empty.backward()
    assert empty.item() == 0.0 and not h.grad.any()


def test_bad_shapes_are_named():
    h, w, _, t = inputs(10, 8, 20, bias=False)
    with pytest.raises(ValueError, match=r"h \(N, d\) and targets \(N,\)"):
        head_cross_entropy(h[None], w, None, t)
