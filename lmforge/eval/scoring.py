"""Log-likelihood of text under any lmforge model: continuations given contexts, and whole texts.

This is the scoring core shared by the multiple-choice tasks (:mod:`lmforge.eval.tasks`) and the
lm-evaluation-harness adapter (:mod:`lmforge.eval.harness`), so both give the same numbers for the
same requests. Conventions:

- Every request starts a new document: the begin token goes in front of the context
  (:meth:`~lmforge.data.tokenizer.Tokenizer.with_bos`; lmforge's is the end-of-text id, which the
  packed training data puts between documents). An empty context is therefore allowed. The server's
  echo + logprobs and the Hugging Face export follow the same rule, so lm-eval's
  ``local-completions`` scores the same ids as this adapter.
- A context's trailing whitespace is moved to the front of the continuation, and the continuation's
  ids are the tail of ``encode(context + continuation)`` (a byte-level BPE joins a space with the
  word after it), falling back to ``encode(continuation)`` when the joint encoding does not start
  with the context's ids.
- A request longer than the model's context window is scored in windows: each continuation token is
  predicted from up to ``context`` tokens before it, and each exactly once (the last window ends at
  the text's end, so it keeps a full context), the same scheme as lm-eval's rolling log-likelihood.

Requests are batched by length; right padding is harmless because every model is causal::

    scorer = Scorer(model, tokenizer, context=cfg.model.context)
    [(logprob, greedy)] = scorer.loglikelihood([("To be, or not to be:", " that is the question")])
    [total] = scorer.rolling(["whole text, conditioned only on the begin token"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Window:
    """One forward row: ``inputs`` predict ``targets`` (same length); positions from ``first`` on count."""

    request: int
    inputs: list[int]
    targets: list[int]
    first: int


class Scorer:
    """Scores text with ``model`` (any :class:`~lmforge.models.LanguageModel`) and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, context: int, batch_size: int = 16,
                 device: str | torch.device | None = None) -> None:
        if context < 1 or batch_size < 1:
            raise ValueError(f"context ({context}) and batch_size ({batch_size}) must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.batch_size = batch_size
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)

    # ------------------------------------------------------------------ encoding
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``([bos] + context ids, continuation ids)`` by the rules in the module docstring."""
        stripped = context.rstrip()
        if len(stripped) < len(context):
            continuation = context[len(stripped):] + continuation
            context = stripped
        ctx = list(self.tokenizer.encode(context)) if context else []
        whole = list(self.tokenizer.encode(context + continuation))
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else list(self.tokenizer.encode(continuation))
        return self.tokenizer.with_bos(ctx), cont

    # ------------------------------------------------------------------- scoring
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each ``(context, continuation)``: ``(log P(continuation | context), greedy)``, where
        ``greedy`` says every continuation token is the model's most likely next token."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    def rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (natural log), every token predicted once."""
        requests = [(self.tokenizer.with_bos([]), list(self.tokenizer.encode(t))) for t in texts]
        return [lp for lp, _ in self.loglikelihood_tokens(requests)]

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(log P(cont | ctx), greedy)`` for token-id pairs; ``ctx`` must not be empty (put bos first)."""
        windows: list[_Window] = []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise ValueError(f"request {i}: the context holds no token (start it with the begin token)")
            windows += self._windows(i, list(ctx) + list(cont), len(ctx))
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        # Longest first, so each batch pads its rows to nearly the same length.
        windows.sort(key=lambda w: len(w.inputs), reverse=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size]
                for w, (lp, hit) in zip(batch, self._score_batch(batch), strict=True):
                    totals[w.request] += lp
                    greedy[w.request] = greedy[w.request] and hit
        finally:
            self.model.train(was_training)
        return list(zip(totals, greedy, strict=True))

    # ----------------------------------------------------------------- internals
    def _windows(self, request: int, seq: list[int], n_ctx: int) -> list[_Window]:
        """Windows predicting ``seq[n_ctx:]``, each target from at most ``context`` tokens before it."""
        out = []
        pos = n_ctx  # next target to score
        while pos < len(seq):
            end = min(len(seq), pos + self.context)  # this window scores targets pos .. end-1
            a = max(0, end - 1 - self.context)  # inputs seq[a:end-1] predict seq[a+1:end]
            out.append(_Window(request, seq[a:end - 1], seq[a + 1:end], pos - a - 1))
            pos = end
        return out

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Window]) -> list[tuple[float, bool]]:
        length = max(len(w.inputs) for w in batch)
        pad = self.tokenizer.eot_id
        x = torch.tensor([w.inputs + [pad] * (length - len(w.inputs)) for w in batch],
                         dtype=torch.long, device=self.device)  # (B, L)
        y = torch.tensor([w.targets + [pad] * (length - len(w.targets)) for w in batch],
                         dtype=torch.long, device=self.device)  # (B, L)
        logits, _ = self.model(x)  # (B, L, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, y[..., None]).squeeze(-1)  # (B, L): log P(target)
        hits = logprobs.argmax(-1) == y  # (B, L)
        out = []
        for row, w in enumerate(batch):
            span = slice(w.first, len(w.inputs))  # the targets this window scores; padding is past the end
            out.append((float(picked[row, span].sum().item()), bool(hits[row, span].all().item())))
        return out
