"""The one generator: batched sampling and incremental decoding for every lmforge model.

Everything that turns a model into text goes through this module: the ``sample``
stage, ``lmforge generate``, evaluation tasks that generate, chat and the HTTP API
(whose :mod:`lmforge.serve.scheduler` runs the same :class:`DecodeBatch` in a
background thread). It uses only the decoding contract of
:mod:`lmforge.models.base` (``new_state``, ``step`` and the generic
:class:`~lmforge.models.base.DecodeState`) and never branches on the architecture;
the one architecture-specific speed-up, the fused Transformer step
(:mod:`lmforge.serve.fast_transformer`), is applied here from outside the model when
it fits (``compile=True`` adds its compiled graph: ``--serve.compile``).

Example::

    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=100, temperature=0.8, top_p=0.95, seed=1, stop=["\\n\\n"])
    [completion] = engine.generate(["ROMEO:"], params)
    print(completion.text, completion.finish_reason)     # '...', 'stop' or 'length'
    for delta in engine.stream("ROMEO:", params):        # same text, piece by piece
        print(delta, end="", flush=True)

How decoding runs (continuous batching, :mod:`lmforge.serve.batch`): each prompt is
prefilled alone, its ``n`` samples become rows of one running batch, every row gets
one token per step, and rows leave as they finish while waiting prompts join, up to
``max_batch`` rows. While every row decodes greedily, a step runs up to ``lookahead``
model steps in one call (about 10 ms of tokens at most), as vLLM's multi-step
scheduling does, so the per-token bookkeeping is paid once per call. When a bounded state (a Transformer's KV cache) is full, that
row is re-prefilled from the last half of its window, so generation never fails
because of the context length. Each prompt is an independent request with its own
generator: with a seed, its completions do not depend on the other prompts of the
call, and ``stream`` reproduces ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from lmforge.serve.batch import Completion, DecodeBatch, Delta, Request
from lmforge.serve.decoder import Decoder
from lmforge.serve.fast_transformer import accelerate
from lmforge.serve.sampling import REPLACEMENT_CHAR, SamplingParams, sample_next, stable_length

# Kept under their former names for callers of the single-module engine.
_stable_length = stable_length

__all__ = ["REPLACEMENT_CHAR", "Completion", "DecodeBatch", "Delta", "Engine", "Request", "SamplingParams",
           "Tokenizer", "sample_next", "stable_length"]


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (lmforge.data.tokenizer provides it)."""

    eot_id: int
    end_ids: list[int]  # every token that ends a generation by default (end of text, end of turn)
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def with_bos(self, ids: Sequence[int]) -> list[int]: ...  # a prompt as the start of a document

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class Engine:
    """Generates text from any lmforge model with its tokenizer; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: str | torch.device | None = "cpu",
                 max_batch: int = 64, compile: bool = False, lookahead: int = 8) -> None:
        # device None = wherever the model's parameters already are (no copy).
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1 (got {lookahead})")
        # lookahead: when every running row decodes greedily, up to this many tokens per model call
        # (Decoder.greedy), so the per-token bookkeeping runs once per call; 1 turns it off.
        self.lookahead = lookahead
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # The fused Transformer step changes no token and runs 2.2x the module path (docs/benchmarks.md),
        # so the engine always takes it where it fits; compile adds the compiled batch-1 graph, compiled
        # here (a short generation) so that the first request does not wait for it.
        fast = accelerate(self.model, compile=bool(compile))
        self.decoder: Decoder = fast or Decoder(self.model)
        self.compiled = fast is not None and fast.compiled is not None
        # The longest sequence a decode state holds (the Transformer's context); None = unbounded.
        self.max_state_len: int | None = self.model.new_state(0).capacity
        if self.compiled:
            self.generate([[tokenizer.eot_id]], SamplingParams(temperature=0, max_new_tokens=2, stop_token_ids=[]))

    # ------------------------------------------------------------------ public
    def prepare(self, prompt: str | Sequence[int], index: int = 0) -> tuple[list[int], bool]:
        """Token ids of one prompt (never empty) and whether its start was cut to fit the state.

        A prompt starts a new document: the tokenizer's begin token goes first
        (:meth:`~lmforge.data.tokenizer.Tokenizer.with_bos`, never doubled), as in scoring and in the
        exports, so transformers and llama.cpp see the same ids for the same text. An empty prompt is
        the begin token alone. Raises ValueError naming prompt ``index`` for a token id outside the vocabulary.
        """
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            vocab = self.tokenizer.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        ids = self.tokenizer.with_bos(ids) or [self.tokenizer.eot_id]
        limit = self.max_state_len
        if limit is not None and len(ids) > limit:
            # Keep the end of the prompt, with room for at least one generated token before a re-prefill.
            return ids[-max(1, limit - 1):], True
        return ids, False

    def request(self, prompt: str | Sequence[int], params: SamplingParams, index: int = 0) -> Request:
        """A :class:`Request` for one prompt, ready for a :class:`DecodeBatch` (params are validated)."""
        params.validate()
        ids, truncated = self.prepare(prompt, index)
        return Request(ids, params, end_ids=self.tokenizer.end_ids, truncated=truncated)

    def batch(self) -> DecodeBatch:
        return DecodeBatch(self.decoder, self.tokenizer, self.device, self.lookahead)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Complete every prompt (text or token ids) ``params.n`` times, batching the prompts together.

        Returns ``len(prompts) * n`` completions, prompt by prompt: those of prompt
        ``i`` are at ``[i * n, (i + 1) * n)``.
        """
        params.validate()
        if isinstance(prompts, (str, bytes)):
            raise TypeError("Engine.generate takes a list of prompts; wrap a single prompt in a list")
        requests = [self.request(p, params, i) for i, p in enumerate(prompts)]  # all checked before any work
        waiting = list(requests)
        batch = self.batch()
        while waiting or batch.rows:
            # Admit in order while the rows fit (a request larger than max_batch runs alone).
            while waiting and (not batch.rows or len(batch.rows) + waiting[0].params.n <= self.max_batch):
                batch.add(waiting.pop(0))
            batch.step()
        return [c for r in requests for c in r.completions()]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Yield the completion's text in pieces as tokens arrive (``params.n`` must be 1).

        Text that could still turn into a stop string, or that ends in an incomplete
        UTF-8 character, is held back until it is settled, so the pieces joined
        equal ``generate([prompt], params)[0].text`` for the same seed.
        """
        params.validate()
        if params.n != 1:
            raise ValueError(f"SamplingParams.n must be 1 for Engine.stream (got {params.n!r}); use generate()")
        req = self.request(prompt, params)
        batch = DecodeBatch(self.decoder, self.tokenizer, self.device)  # no lookahead: every token as it comes
        batch.add(req)
        while True:
            for delta in req.take_deltas(self.tokenizer):
                if delta.text:
                    yield delta.text
            if req.finished:
                return
            batch.step()
