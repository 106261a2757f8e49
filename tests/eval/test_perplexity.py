"""Held-out metrics: exact loss/bpb on known models, sliding windows predicting every target once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lmforge.eval.perplexity import _windows, bits_per_byte, evaluate_text, evaluate_tokens


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/V, so the loss is ln V whatever the text."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.modes: list[bool] = []

    def forward(self, idx, targets=None):
        self.modes.append(self.training)
        return torch.zeros(*idx.shape, self.vocab), None  # (B, T, V)


class Bigram(nn.Module):
    """Logits depend only on the previous token: loss per target is a table lookup."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, idx, targets=None):
        return self.table(idx), None  # (B, T, V)


class CumMean(nn.Module):
    """Causal and context-hungry: position t sees the mean embedding of tokens 0..t of its window."""

    def __init__(self, vocab: int, d: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, targets=None):
        x = self.emb(idx).cumsum(1)  # (B, T, d)
        x = x / torch.arange(1, idx.shape[1] + 1)[None, :, None]
        return self.head(x), None


class Oracle(nn.Module):
    """Always right on the sequence 0, 1, 2, ... (mod V): predicts (token + 1) % V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return 10.0 * F.one_hot((idx + 1) % self.vocab, self.vocab).float(), None


class ByteTokenizer:
    eot_id = bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_uniform_model_gives_ln_v_and_exact_bits_per_byte():
    model = Uniform(257)
    text = "héllo, wörld\n"
    r = evaluate_text(model, ByteTokenizer(), text, context=4)
    n_bytes = len(text.encode("utf-8"))
    assert (r["tokens"], r["bytes"]) == (n_bytes, n_bytes)  # with the end-of-text id in front, every byte counts
    assert r["loss"] == pytest.approx(math.log(257), rel=1e-6)
    assert r["nats"] == pytest.approx(n_bytes * math.log(257), rel=1e-6)
    assert r["ppl"] == pytest.approx(257, rel=1e-5)
    assert r["bpb"] == pytest.approx(n_bytes * math.log(257) / math.log(2) / n_bytes, rel=1e-6)
    assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)


@pytest.mark.parametrize(("n", "context", "stride"), [
    (1, 4, None), (4, 4, None), (5, 4, None), (17, 4, None), (17, 4, 1), (17, 4, 3), (30, 8, 5), (9, 16, 2),
])
def test_windows_cover_every_target_once(n, context, stride):
    stride = stride or context
    seen = []
    for start, end, done in _windows(n, context, stride):
        assert 0 <= start <= done < end and end - start <= context
        seen += list(range(done + 1, end + 1))
    assert seen == list(range(1, n + 1))


@pytest.mark.parametrize(("n", "context", "stride", "batch", "bos"), [
    (2, 8, None, 4, None), (9, 4, None, 1, None), (9, 4, None, 16, 0), (23, 5, 2, 3, None), (23, 5, 1, 4, 7),
    (40, 6, 4, 2, None),
])
def test_every_target_scored_exactly_once(n, context, stride, batch, bos):
    torch.manual_seed(0)
    model = Bigram(11)
    ids = torch.randint(0, 11, (n,))
    r = evaluate_tokens(model, ids, context=context, stride=stride, batch_size=batch, bos_id=bos)
    seq = ids if bos is None else torch.cat([torch.tensor([bos]), ids])
    with torch.no_grad():
        logp = F.log_softmax(model.table.weight, -1)
        nats = -sum(logp[a, b].item() for a, b in zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True))
    assert r["tokens"] == len(seq) - 1
    assert r["nats"] == pytest.approx(nats, rel=1e-5)
    assert r["loss"] == pytest.approx(nats / (len(seq) - 1), rel=1e-5)


def _brute_force(model: nn.Module, seq: torch.Tensor, contexts: list[int]) -> float:
    """Sum of -log p(seq[i] | the contexts[i-1] tokens before it), one forward pass per target."""
    total = 0.0
    with torch.no_grad():
        for i, c in enumerate(contexts, start=1):
            logits, _ = model(seq[i - c:i][None])
            total -= F.log_softmax(logits[0, -1], -1)[seq[i]].item()
    return total


def test_stride_gives_each_token_the_context_of_its_window():
    torch.manual_seed(1)
    model = CumMean(13)
    seq = torch.randint(0, 13, (9,))
    # context 4, stride 2: windows [0,4) scores 1..4, [2,6) scores 5..6, [4,8) scores 7..8.
    r = evaluate_tokens(model, seq, context=4, stride=2, batch_size=2)
    assert r["nats"] == pytest.approx(_brute_force(model, seq, [1, 2, 3, 4, 3, 4, 3, 4]), rel=1e-5)
    # Stride 1: every token sees min(i, context) tokens, the most any window of this size can give.
    r1 = evaluate_tokens(model, seq, context=4, stride=1)
    assert r1["nats"] == pytest.approx(_brute_force(model, seq, [1, 2, 3, 4, 4, 4, 4, 4]), rel=1e-5)
    # Non-overlapping windows; a short tail window is aligned to the end of the text to keep more context.
    r4 = evaluate_tokens(model, seq, context=4)
    assert r4["nats"] == pytest.approx(_brute_force(model, seq, [1, 2, 3, 4, 1, 2, 3, 4]), rel=1e-5)
    r_tail = evaluate_tokens(model, seq[:7], context=4)
    assert r_tail["nats"] == pytest.approx(_brute_force(model, seq[:7], [1, 2, 3, 4, 3, 4]), rel=1e-5)


def test_oracle_accuracy_and_mode_restored():
    ids = np.arange(30) % 7
    r = evaluate_tokens(Oracle(7), ids, context=8, stride=3, bos_id=6)  # (6 + 1) % 7 predicts the first 0
    assert (r["acc"], r["tokens"]) == (1.0, 30)
    model = Uniform(5)
    model.train()
    r = evaluate_tokens(model, np.arange(10) % 5, context=4, max_tokens=6, bos_id=0)
    assert r["tokens"] == 6
    assert r["acc"] == pytest.approx(2 / 6)  # argmax of a tie is token 0: right where the target is 0
    assert set(model.modes) == {False} and model.training


def test_max_tokens_counts_only_the_bytes_scored():
    r = evaluate_text(Uniform(257), ByteTokenizer(), "abcdefgh", context=4, max_tokens=5)
    assert (r["tokens"], r["bytes"]) == (5, 5)
    assert r["bpb"] == pytest.approx(math.log(257) / math.log(2), rel=1e-6)


def test_user_errors_are_clear():
    with pytest.raises(ValueError, match="nothing to evaluate: the text is empty"):
        evaluate_text(Uniform(257), ByteTokenizer(), "", context=4)
    with pytest.raises(ValueError, match="leave no target"):
        evaluate_tokens(Uniform(5), [3], context=4)
    with pytest.raises(ValueError, match="stride"):
        evaluate_tokens(Uniform(5), [1, 2, 3], context=2, stride=3)
    with pytest.raises(ValueError, match="1-D"):
        evaluate_tokens(Uniform(5), np.zeros((2, 3), dtype=np.int64), context=2)
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate_tokens(Bigram(5), [1, 2, 9], context=2)
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_evaluating_files_without_text_names_them(tmp_path):
    from types import SimpleNamespace

    from lmforge.config import RunConfig
    from lmforge.data.sources import DataError
    from lmforge.eval.heldout import evaluate_files

    tm = SimpleNamespace(model=Uniform(257), tokenizer=ByteTokenizer(), cfg=SimpleNamespace(model=SimpleNamespace(
        context=4)), path=tmp_path / "ckpt", step=3)
    cfg = RunConfig.model_validate({"train": {"progress": False}})
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=f"nothing to evaluate: no text in {tmp_path / 'empty.txt'}$"):
        evaluate_files(tm, [str(tmp_path / "empty.txt")], cfg)
    (tmp_path / "notes.txt").write_text("abc", encoding="utf-8")  # an empty file beside text: the text is scored
    result = evaluate_files(tm, [str(tmp_path)], cfg)
    assert (result["docs"], result["tokens"], result["bytes"]) == (1, 3, 3)
    assert result["bpb"] == pytest.approx(math.log2(257), rel=1e-6)
