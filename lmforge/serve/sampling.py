"""Sampling parameters and every way of choosing a token: the only place in lmforge that picks tokens.

:class:`SamplingParams` holds one request's choices (names follow OpenAI's
completions API). Three functions choose, all from next-token logits:

- :func:`pick_tokens`: one token for every row of a running batch, each row under
  its own request's parameters and seeded generator (:class:`RowGroup`), so a
  seeded request draws the same tokens whatever else shares its batch
  (:mod:`lmforge.serve.batch` calls it once per step);
- :func:`greedy_choice` / :func:`greedy_steps`: the argmax and its log-probability,
  and ``n`` model steps each fed the previous argmax (the engine's lookahead; the
  compiled Transformer step of :mod:`lmforge.serve.fast_transformer` traces
  :func:`greedy_choice` into its graph);
- :func:`sample_next`: every row under one request's parameters.

Example::

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1).validate()
    ids = sample_next(logits, params, torch.Generator().manual_seed(1))   # (B, V) -> (B,)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.models.base import DecodeState

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8
MIN_TEMPERATURE = 1e-5  # below this, logits / T overflows float32: treat as greedy
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; names and meanings follow OpenAI's completions API.

    ``temperature`` 0 is greedy decoding. ``top_k`` / ``top_p`` (None = off) restrict
    sampling to the k most likely tokens / the smallest set holding ``top_p`` of the
    probability. ``stop`` strings end a completion (the text is cut before them);
    ``stop_token_ids`` end it when sampled (None = every end token of the model, the
    tokenizer's ``end_ids``: end of text and end of turn; [] = never). Special tokens are
    left out of the text unless ``skip_special_tokens`` is False (their ids stay in ``token_ids``). Penalties subtract ``presence * (count > 0) + frequency * count`` of
    each token already generated from its logit. ``n`` completions per prompt.
    ``max_new_tokens`` 0 only scores the prompt (with ``prompt_logprobs``).
    ``logprobs`` / ``prompt_logprobs``: None = no alternatives; k = also record the k
    most likely tokens at each generated / prompt position (the chosen token's own
    log-probability is always recorded for generated tokens; for prompt tokens only
    when ``prompt_logprobs`` is not None).
    """

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first field out of range; return self for chaining."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def top(v: Any) -> bool:
            return v is None or (is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS)

        checks = [
            ("max_new_tokens", is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", is_num(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", self.top_k is None or (is_int(self.top_k) and self.top_k >= 1), "None or an integer >= 1"),
            ("top_p", self.top_p is None or (is_num(self.top_p) and 0 < self.top_p <= 1), "None or in (0, 1]"),
            ("seed", self.seed is None or is_int(self.seed), "None or an integer"),
            ("stop", isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", self.stop_token_ids is None
             or (isinstance(self.stop_token_ids, (list, tuple)) and all(is_int(t) and t >= 0 for t in self.stop_token_ids)),
             "None or a list of token ids >= 0"),
            ("presence_penalty", is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("n", is_int(self.n) and self.n >= 1, "an integer >= 1"),
            ("logprobs", top(self.logprobs), f"None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("prompt_logprobs", top(self.prompt_logprobs), f"None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("skip_special_tokens", isinstance(self.skip_special_tokens, bool), "True or False"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {expected} (got {getattr(self, name)!r})")
        return self

    @property
    def greedy(self) -> bool:
        """Plain argmax: no temperature and no penalties, so rows of many requests can be picked at once."""
        return self.temperature < MIN_TEMPERATURE and not (self.presence_penalty or self.frequency_penalty)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @classmethod
    def from_config(cls, sample_cfg: Any, **overrides: Any) -> SamplingParams:
        """Build from a :class:`lmforge.config.SampleConfig` (the ``sample`` section), then apply overrides."""
        values = {"max_new_tokens": sample_cfg.max_new_tokens, "temperature": sample_cfg.temperature,
                  "top_k": sample_cfg.top_k, "top_p": sample_cfg.top_p, "stop": list(sample_cfg.stop),
                  "seed": sample_cfg.seed}
        return cls(**{**values, **overrides})


@dataclass
class RowParams:
    """Sampling parameters of each row of a batch, as (B,) tensors, so one call picks every row's token.

    ``top_k`` 0 and ``top_p`` 1 mean off; ``temperature`` below :data:`MIN_TEMPERATURE` means greedy.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    presence: Tensor
    frequency: Tensor

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> RowParams:
        def col(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(col([p.temperature for p in params], torch.float32), col([p.top_k or 0 for p in params], torch.long),
                   col([1.0 if p.top_p is None else p.top_p for p in params], torch.float32),
                   col([p.presence_penalty for p in params], torch.float32),
                   col([p.frequency_penalty for p in params], torch.float32))


def sample_rows(logits: Tensor, rows: RowParams, uniforms: Tensor, counts: Tensor | None = None) -> Tensor:
    """Pick one token per row under each row's own parameters: ``logits`` (B, V) -> token ids (B,) int64.

    Order: penalties (from ``counts`` (B, V), how often each token was generated so
    far), then greedy argmax for rows with temperature 0, else temperature, top-k,
    top-p, and one draw by inverting the row's cumulative distribution at
    ``uniforms`` (B,) in [0, 1) (the caller draws them from each request's own seeded
    generator, so a row's token does not depend on the other rows). The input is not
    modified.
    """
    logits = logits.float()  # (B, V); every op below is out of place so the caller's tensor is untouched
    if counts is not None:
        counts = counts.to(logits.dtype)
        logits = logits - rows.presence[:, None] * (counts > 0).to(logits.dtype) - rows.frequency[:, None] * counts
    best = logits.argmax(dim=-1)  # (B,)
    greedy = rows.temperature < MIN_TEMPERATURE
    if bool(greedy.all()):
        return best
    scaled = logits / torch.where(greedy, 1.0, rows.temperature)[:, None]
    vocab = logits.size(-1)
    if bool(((rows.top_k > 0) & (rows.top_k < vocab)).any() or (rows.top_p < 1.0).any()):
        scaled, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V): ranks, for top-k and top-p
        k = torch.where(rows.top_k > 0, rows.top_k, vocab)
        scaled = scaled.masked_fill(torch.arange(vocab, device=logits.device)[None, :] >= k[:, None], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above
        drop = mass_before >= rows.top_p[:, None]  # the kept set already reaches top_p without this token
        drop[:, 0] = False  # the most likely token always stays
        probs = probs.masked_fill(drop, 0.0)
    else:
        order, probs = None, torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V), unnormalized after top-p: scale the draw instead
    index = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    picked = index.squeeze(-1) if order is None else order.gather(-1, index).squeeze(-1)
    return torch.where(greedy, best, picked)


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator,
                counts: Tensor | None = None) -> Tensor:
    """Pick one token per row of ``logits`` (B, V), every row under ``params``; see :func:`sample_rows`.

    The draws come from ``generator`` (one uniform per row, unless greedy): the same
    generator state gives the same tokens.
    """
    rows = RowParams.of([params] * logits.size(0), logits.device)
    if params.temperature < MIN_TEMPERATURE:
        uniforms = torch.zeros(logits.size(0), device=logits.device)
    else:
        uniforms = torch.rand(logits.size(0), generator=generator, device=logits.device)
    return sample_rows(logits, rows, uniforms, counts if params.penalized else None)


@dataclass
class RowGroup:
    """The batch rows of one request, in sample order, and what choosing their tokens needs."""

    params: SamplingParams
    generator: torch.Generator  # the request's own: one uniform per row and step, in sample order
    rows: list[int]  # positions in the batch
    counts: Tensor | None = None  # (len(rows), V) how often each token was generated, for penalties


def pick_tokens(last: Tensor, groups: Sequence[RowGroup]) -> Tensor:
    """One token per row of ``last`` (B, V) -> (B,) int64, every row under its own request's parameters.

    Each sampling request draws its rows' uniforms from its own generator, in sample
    order and in the order of ``groups``, so its tokens do not depend on what else
    shares the batch. All-greedy rows take the argmax without any draw.
    """
    params: list[SamplingParams] = [SamplingParams()] * last.size(0)
    for g in groups:
        for row in g.rows:
            params[row] = g.params
    if all(g.params.greedy for g in groups):
        return last.argmax(dim=-1)
    uniforms = [0.0] * last.size(0)
    counts = torch.zeros_like(last) if any(g.params.penalized for g in groups) else None  # (B, V)
    for g in groups:
        if g.params.temperature >= MIN_TEMPERATURE:
            for row, u in zip(g.rows, torch.rand(len(g.rows), generator=g.generator).tolist(), strict=True):
                uniforms[row] = u
        if counts is not None and g.counts is not None:
            counts[torch.tensor(g.rows, dtype=torch.long, device=last.device)] = g.counts
    u = torch.tensor(uniforms, device=last.device)
    return sample_rows(last, RowParams.of(params, last.device), u, counts)


def greedy_choice(last: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax token of each row of ``last`` (B, V) and its log-probability: ``((B, 1) int64, (B, 1) float32)``."""
    last = last.float()
    token = last.argmax(dim=-1, keepdim=True)
    return token, torch.log_softmax(last, dim=-1).gather(-1, token)


GreedyRun = tuple[Tensor, Tensor, Tensor, DecodeState]  # picked (B, n-1), their log-probs (B, n-1), last logits (B, V), state
Step = Callable[[Tensor, DecodeState], tuple[Tensor, DecodeState]]


def greedy_steps(step: Step, idx: Tensor, state: DecodeState, n: int) -> GreedyRun:
    """``n`` calls of ``step``, the first fed ``idx`` (B, 1) and each later one the argmax of the last.

    Returns ``(picked, logprobs, last, state)``: ``picked`` (B, n - 1) int64 are the argmax tokens fed
    after ``idx``, ``logprobs`` (B, n - 1) float32 their log-probabilities, and ``last`` (B, V) the
    logits after the final step, for the caller's next choice. The batch's lookahead uses it to spend
    its per-token bookkeeping once per ``n`` tokens.
    """
    picked, logprobs = [], []
    logits, state = step(idx, state)
    last = logits[:, -1, :]
    for _ in range(n - 1):
        token, logprob = greedy_choice(last)
        picked.append(token)
        logprobs.append(logprob)
        logits, state = step(token, state)
        last = logits[:, -1, :]
    if not picked:
        return idx.new_zeros(idx.shape[0], 0), last.new_zeros(idx.shape[0], 0, dtype=torch.float32), last, state
    return torch.cat(picked, dim=1), torch.cat(logprobs, dim=1), last, state


def stable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` is settled: not an unfinished UTF-8 character, not the start of a stop string."""
    # A character cut short by the last tokens decodes to U+FFFD, which the next token may complete: one
    # for a byte-level BPE, one per byte for a byte-fallback decoder (lmforge's char tokenizer), which
    # replaces a whole run of byte tokens while it is not valid UTF-8. So the whole trailing run waits.
    end = len(text.rstrip(REPLACEMENT_CHAR))
    hold = 0
    for stop in stops:
        # The longest proper prefix of `stop` that ends the text could still grow into `stop`.
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold
