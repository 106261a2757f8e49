"""Continuous batching: requests join a running decode batch, step together, and leave when done.

A :class:`Request` is one prompt to complete ``params.n`` times. :class:`DecodeBatch`
holds the running rows (one per sample) in one merged model state:

- ``add(request)`` prefills the prompt alone (batch 1), copies that state to ``n``
  rows (:func:`select_rows` with repeats) and appends them (:func:`concat_rows`);
  the new rows may be at other lengths than the running ones.
- ``step()`` picks one token for every row (:func:`~lmforge.serve.sampling.pick_tokens`:
  each request with its own sampling parameters and seeded generator), records it,
  finishes rows that hit a stop token, a stop string or ``max_new_tokens``, drops
  finished rows from the state (:func:`select_rows`) and runs one model step for the
  rest; while every row is greedy, up to ``lookahead`` steps in one call
  (:meth:`~lmforge.serve.decoder.Decoder.greedy`).
- ``remove(request)`` drops a cancelled request's rows at once.

Rows join and leave through the generic :class:`~lmforge.models.base.DecodeState`
(``index_select`` / ``cat`` on its batch dimension), the same for every
architecture. When a row's bounded state (a Transformer's KV cache, ``capacity``)
is full, that row alone is re-prefilled from the last half of its window and joins
again, so generation never fails because of the context length.

Example (the engine and the server's scheduler drive it this way)::

    batch = DecodeBatch(Decoder(model), tokenizer, device)
    batch.add(Request(prompt_ids, params, end_ids=tok.end_ids))
    while batch.rows:
        for req in batch.step():
            for delta in req.take_deltas(tok): ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as replace_fields
from typing import Literal, Protocol

import torch
from torch import Tensor

from lmforge.models.base import DecodeState
from lmforge.serve.decoder import Decoder
from lmforge.serve.sampling import RowGroup, SamplingParams, pick_tokens, stable_length

FinishReason = Literal["stop", "length"]
TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first
_SETTLE_EVERY = 16  # tokens decoded again per step at most, before the text is settled and cached
_BURST_SECONDS = 0.01  # greedy tokens decoded in one model call take about this long at most


class Detokenizer(Protocol):
    """What the batch needs from a tokenizer (lmforge.data.tokenizer.Tokenizer provides it)."""

    eot_id: int
    vocab_size: int

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class Completion:
    """One finished continuation.

    ``token_ids`` are the sampled tokens (a stop token id is not included; the
    tokens of a stop string are, while ``text`` is cut before it); ``text`` leaves special
    tokens out unless ``params.skip_special_tokens`` is False. ``logprobs``
    holds, for each of ``token_ids``, its log-probability under the model
    (log-softmax of the raw logits, before penalties, temperature, top-k, top-p);
    ``top_logprobs`` the most likely alternatives when ``params.logprobs`` asked.
    ``prompt_ids`` are the prompt tokens the model saw (after truncation);
    ``prompt_logprobs`` their log-probabilities (None for the first) when
    ``params.prompt_logprobs`` is set.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float]
    prompt_truncated: bool = False
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


@dataclass
class Delta:
    """New output of one sample since the last :meth:`Request.take_deltas`: settled text and its tokens."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs]
    finish_reason: FinishReason | None = None


@dataclass
class _Sample:
    """One completion under construction (one batch row while it runs)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    text: str = ""  # the final text, set when finished
    finish_reason: FinishReason | None = None
    held: int = 0  # tokens the row's state has seen since its last (re)prefill
    settled_ids: int = 0  # token_ids[:settled_ids] decode to settled_text and end on a whole character
    settled_text: str = ""
    sent_chars: int = 0  # text already handed out as deltas
    sent_tokens: int = 0
    closed: bool = False  # the final delta was handed out
    skip_special: bool = True  # leave special tokens out of the text (SamplingParams.skip_special_tokens)

    def current_text(self, tok: Detokenizer) -> str:
        """The text so far, decoding only the tokens after the settled prefix."""
        tail = tok.decode(self.token_ids[self.settled_ids:], skip_special_tokens=self.skip_special)
        if len(self.token_ids) - self.settled_ids >= _SETTLE_EVERY and not tail.endswith("\ufffd"):
            # Token boundaries on whole characters are safe cut points for byte-level decoders.
            self.settled_ids, self.settled_text = len(self.token_ids), self.settled_text + tail
            return self.settled_text
        return self.settled_text + tail


class Request:
    """One prompt to complete ``params.n`` times; its results accumulate here as the batch steps."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, end_ids: Sequence[int],
                 truncated: bool = False) -> None:
        params.validate()
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.truncated = truncated
        # By default every end token of the model ends a completion (end of text and end of turn).
        self.stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else end_ids)
        seed = params.seed
        if seed is None:  # draw one from torch's global RNG so torch.manual_seed still fixes the result
            seed = int(torch.randint(0, 2**62, (1,)).item())
        # On the CPU whatever the model's device: it only draws one uniform per row and step.
        self.generator = torch.Generator().manual_seed(seed)
        self.samples = [_Sample(skip_special=params.skip_special_tokens) for _ in range(params.n)]
        self.counts: Tensor | None = None  # (n, V) generated-token counts, for penalties
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[TopLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    def finish(self, s: _Sample, reason: FinishReason, tok: Detokenizer, text: str | None = None) -> None:
        s.finish_reason = reason
        s.text = s.current_text(tok) if text is None else text

    def take_deltas(self, tok: Detokenizer) -> list[Delta]:
        """What each sample produced since the last call; text that may still change is held back.

        Text that could still turn into a stop string, or that ends in an incomplete
        UTF-8 character, waits until it is settled, so the pieces joined equal the
        final text. A sample's last delta carries its ``finish_reason``.
        """
        out = []
        for i, s in enumerate(self.samples):
            if s.closed:
                continue
            if s.finish_reason is not None:
                text, s.closed = s.text[s.sent_chars:], True
            else:
                current = s.current_text(tok)
                stable = stable_length(current, self.params.stop)
                if stable <= s.sent_chars:
                    continue  # nothing settled yet: its tokens ride along with the next delta
                text = current[s.sent_chars:stable]
            k = s.sent_tokens
            out.append(Delta(i, text, s.token_ids[k:], s.logprobs[k:], s.top_logprobs[k:], s.finish_reason))
            s.sent_chars += len(text)
            s.sent_tokens = len(s.token_ids)
        return out

    def completions(self) -> list[Completion]:
        out = []
        for s in self.samples:
            assert s.finish_reason is not None, "completions() is called once every sample has finished"
            out.append(Completion(
                text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason, prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(s.token_ids), logprobs=s.logprobs, prompt_truncated=self.truncated,
                top_logprobs=s.top_logprobs, prompt_ids=self.prompt_ids, prompt_logprobs=self.prompt_logprobs,
                prompt_top_logprobs=self.prompt_top_logprobs))
        return out


def select_rows(state: DecodeState, index: Tensor) -> DecodeState:
    """A state holding only the rows ``index`` (int64, any order, repeats allowed) of ``state``, as copies."""
    tensors = tuple(t.index_select(state.batch_dim, index.to(t.device)) for t in state.tensors)
    return replace_fields(state, tensors=tensors, lens=state.lens.index_select(0, index.cpu()))


def concat_rows(states: Sequence[DecodeState]) -> DecodeState:
    """One state holding the rows of ``states`` in order (rows may have seen different numbers of tokens)."""
    if not states:
        raise ValueError("concat_rows needs at least one state")
    first = states[0]
    tensors = tuple(torch.cat(parts, dim=first.batch_dim) for parts in zip(*(s.tensors for s in states), strict=True))
    return replace_fields(first, tensors=tensors, lens=torch.cat([s.lens for s in states]))


def _top(logp: Tensor, k: int) -> list[TopLogprobs]:
    """The k most likely tokens of each row of ``logp`` (N, V)."""
    values, ids = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


class DecodeBatch:
    """The running rows of every admitted request, in one model state; see the module docstring."""

    def __init__(self, decoder: Decoder, tokenizer: Detokenizer, device: torch.device, lookahead: int = 1) -> None:
        self.decoder, self.model, self.tokenizer, self.device = decoder, decoder.model, tokenizer, device
        self.lookahead = lookahead  # greedy tokens per model call at most (Decoder.greedy); 1 = one per step
        self.token_seconds = 0.0  # running mean of a model step's wall time per token, for the lookahead
        self.tokens_per_row = 1  # tokens each running row received in the last step (more with the lookahead)
        self.limit: int | None = None  # the state's capacity (tokens a row can hold); None = unbounded
        self.rows: list[tuple[Request, int]] = []  # batch row -> (request, sample index)
        self.state: DecodeState | None = None
        self.last: Tensor | None = None  # (rows, V): next-token logits of each row

    @property
    def requests(self) -> list[Request]:
        return list({id(r): r for r, _ in self.rows}.values())

    def clear(self) -> None:
        self.rows, self.state, self.last = [], None, None

    # ---------------------------------------------------------------- joining
    def _prefill(self, ids: list[int]) -> tuple[Tensor, DecodeState]:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.decoder.step(idx, self.model.new_state(1))  # logits (1, T, V)

    def _append(self, rows: list[tuple[Request, int]], state: DecodeState, last: Tensor) -> None:
        if self.rows and self.state is not None and self.last is not None:
            self.state = concat_rows([self.state, state])
            self.last = torch.cat([self.last, last])
        else:
            self.state, self.last = state, last
        self.limit = state.capacity
        self.rows += rows

    @torch.inference_mode()
    def add(self, req: Request) -> None:
        """Prefill ``req`` and add its ``n`` rows (none when it only scores its prompt)."""
        logits, state = self._prefill(req.prompt_ids)
        k = req.params.prompt_logprobs
        if k is not None:
            ids = torch.tensor(req.prompt_ids[1:], device=self.device)
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): position i predicts token i+1
            req.prompt_logprobs = [None, *logp.gather(-1, ids[:, None]).squeeze(-1).tolist()]
            req.prompt_top_logprobs = [None, *(_top(logp, k) if k else [[] for _ in ids.tolist()])]
        n = req.params.n
        if req.params.max_new_tokens == 0:
            for s in req.samples:
                req.finish(s, "length", self.tokenizer, "")
            return
        if req.params.penalized:
            req.counts = torch.zeros(n, logits.size(-1), device=self.device)
        for s in req.samples:
            s.held = len(req.prompt_ids)
        replicas = torch.zeros(n, dtype=torch.long, device=self.device)  # the n samples share the prompt
        state = select_rows(state, replicas) if n > 1 else state
        self._append([(req, i) for i in range(n)], state, logits[:, -1, :].expand(n, -1))

    def remove(self, req: Request) -> None:
        """Drop ``req``'s rows from the batch (a cancelled request frees its slots at once)."""
        keep = [i for i, (r, _) in enumerate(self.rows) if r is not req]
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self.state is not None and self.last is not None
        self.state = select_rows(self.state, index)
        self.last = self.last.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    # ---------------------------------------------------------------- stepping
    def _groups(self) -> list[RowGroup]:
        """The rows of each request in sample order, requests in the order of their first row (for pick_tokens)."""
        groups: dict[int, tuple[Request, list[int]]] = {}
        for row, (req, _) in enumerate(self.rows):
            groups.setdefault(id(req), (req, []))[1].append(row)
        out = []
        for req, rows in groups.values():
            rows.sort(key=lambda r: self.rows[r][1])
            counts = None
            if req.counts is not None:
                counts = req.counts[torch.tensor([self.rows[r][1] for r in rows], device=self.device)]
            out.append(RowGroup(req.params, req.generator, rows, counts))
        return out

    def _check_stop_strings(self, req: Request, s: _Sample) -> bool:
        """Finish ``s`` if its text now contains a stop string; the text is cut before the earliest one."""
        text = s.current_text(self.tokenizer)
        hits = [i for i in (text.find(x) for x in req.params.stop) if i >= 0]
        if hits:
            req.finish(s, "stop", self.tokenizer, text[: min(hits)])
        return bool(hits)

    def _accept(self, rows: Sequence[int], tokens: list[int], chosen: list[float],
                top: list[TopLogprobs] | None) -> tuple[list[int], list[int]]:
        """Record token ``tokens[row]`` for each of ``rows``; returns the rows that go on and those to refill."""
        keep, refill = [], []
        for row in rows:
            req, i = self.rows[row]
            tok, s, p = tokens[row], req.samples[i], req.params
            if tok in req.stop_ids:
                req.finish(s, "stop", self.tokenizer)
                continue
            s.token_ids.append(tok)
            s.logprobs.append(chosen[row])
            if p.logprobs is not None:
                s.top_logprobs.append(top[row][: p.logprobs] if top is not None else [])
            if req.counts is not None:
                req.counts[i, tok] += 1
            if p.stop and self._check_stop_strings(req, s):
                continue
            if len(s.token_ids) >= p.max_new_tokens:
                req.finish(s, "length", self.tokenizer)
                continue
            (refill if self.limit is not None and s.held + 1 > self.limit else keep).append(row)
        return keep, refill

    def _tokens_per_call(self) -> int:
        """How many steps the next model call may take at once (``Decoder.greedy``), 1 unless all rows are greedy.

        Never past a row's ``max_new_tokens`` or its state's room, and no more tokens than about
        ``_BURST_SECONDS`` of decoding, so a stream still arrives in small pieces on a slow model.
        """
        n = min(self.lookahead, max(1, int(_BURST_SECONDS / self.token_seconds)) if self.token_seconds else 1)
        for req, i in self.rows:
            if n <= 1 or not req.params.greedy or req.params.logprobs:
                return 1
            s = req.samples[i]
            n = min(n, req.params.max_new_tokens - len(s.token_ids))
            if self.limit is not None:
                n = min(n, self.limit - s.held)
        return max(1, n)

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One token for every running row, or several for all-greedy rows (see :meth:`_tokens_per_call`).

        Returns the requests that took part (some may have finished).
        """
        if not self.rows:
            return []
        assert self.last is not None
        touched = self.requests
        tokens = pick_tokens(self.last, self._groups())  # (B,)
        logp = torch.log_softmax(self.last.float(), dim=-1)  # (B, V)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        k_top = max(r.params.logprobs or 0 for r in touched)
        top = _top(logp, k_top) if k_top else None
        rows = self.rows
        keep, refill = self._accept(range(len(rows)), tokens.tolist(), chosen, top)
        if len(keep) < len(rows):
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=self.device)]
            self._keep(keep)
        if keep:
            n = self.tokens_per_row = self._tokens_per_call()
            start = time.perf_counter()
            if n == 1:
                logits, self.state = self.decoder.step(tokens[:, None], self.state)  # (B, 1) -> (B, 1, V)
                self.last = logits[:, -1, :]
                for req, i in self.rows:
                    req.samples[i].held += 1
            else:  # n steps in one call, each row fed its own argmax; the rows then take the n - 1 tokens in turn
                picked, logps, self.last, self.state = self.decoder.greedy(tokens[:, None], self.state, n)
                alive: Sequence[int] = range(len(self.rows))
                for col, col_logp in zip(picked.t().tolist(), logps.t().tolist(), strict=True):
                    alive, _ = self._accept(alive, col, col_logp, None)  # no refill: n fits every row's state
                for req, i in self.rows:  # after the checks above, which ask whether one more token fits
                    req.samples[i].held += n
                self._keep(list(alive))
            seconds = (time.perf_counter() - start) / n
            self.token_seconds = seconds if not self.token_seconds else 0.8 * self.token_seconds + 0.2 * seconds
        for row in refill:
            # The state is full: this row starts over from the last half window and joins again.
            req, i = rows[row]
            s = req.samples[i]
            assert self.limit is not None  # only bounded states are refilled
            window = (req.prompt_ids + s.token_ids)[-max(1, self.limit // 2):]
            logits, state = self._prefill(window)
            s.held = len(window)
            self._append([(req, i)], state, logits[:, -1, :])
        return touched
