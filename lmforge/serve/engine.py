"""The one generator: sampling and incremental decoding for every lmforge model.

Everything that turns a model into text goes through this module: the ``sample``
stage, ``lmforge generate``, evaluation tasks that generate, chat and the HTTP API.
It uses only the decoding contract of :mod:`lmforge.models.base` (``new_state``,
``step``, ``reorder_state``, ``max_state_len``): it never looks inside a state and
never branches on the architecture.

Example::

    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=100, temperature=0.8, top_p=0.95, seed=1, stop=["\\n\\n"])
    [completion] = engine.generate(["ROMEO:"], params)
    print(completion.text, completion.finish_reason)     # '...', 'stop' or 'length'
    for delta in engine.stream("ROMEO:", params):        # same text, piece by piece
        print(delta, end="", flush=True)

How decoding runs: each prompt is prefilled once into a state of batch size ``n``
(its ``n`` samples share the prompt), then every running row gets one token per
step; rows that finish leave the batch through ``reorder_state``. When a bounded
state (a Transformer's KV cache) is full, a fresh state is prefilled with the last
half of the window, so generation never fails because of the context length.
Each prompt is an independent request: with a seed, its completions do not depend
on the other prompts of the call, and ``stream`` reproduces ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8
_MIN_TEMPERATURE = 1e-5  # below this, logits / T overflows float32: treat as greedy


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (lmforge.data.tokenizer provides it)."""

    eot_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; names and meanings follow OpenAI's completions API.

    ``temperature`` 0 is greedy decoding. ``top_k`` / ``top_p`` (None = off) restrict
    sampling to the k most likely tokens / the smallest set holding ``top_p`` of the
    probability. ``stop`` strings end a completion (the text is cut before them);
    ``stop_token_ids`` end it when sampled (None = the tokenizer's end-of-text id,
    [] = never). Penalties subtract ``presence * (count > 0) + frequency * count`` of
    each token already generated from its logit. ``n`` completions per prompt.
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

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first field out of range; return self for chaining."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = [
            ("max_new_tokens", is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
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
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {expected} (got {getattr(self, name)!r})")
        return self

    @classmethod
    def from_config(cls, sample_cfg: Any, **overrides: Any) -> SamplingParams:
        """Build from a :class:`lmforge.config.SampleConfig` (the ``sample`` section), then apply overrides."""
        values = {"max_new_tokens": sample_cfg.max_new_tokens, "temperature": sample_cfg.temperature,
                  "top_k": sample_cfg.top_k, "top_p": sample_cfg.top_p, "stop": list(sample_cfg.stop),
                  "seed": sample_cfg.seed}
        return cls(**{**values, **overrides})


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator,
                counts: Tensor | None = None) -> Tensor:
    """Pick one token per row: ``logits`` (B, V) -> token ids (B,) int64.

    Order: penalties (from ``counts`` (B, V), how often each token was generated so
    far), then greedy argmax if ``temperature`` is 0, else temperature, top-k, top-p
    and one draw from ``generator``. The input is not modified; the same generator
    state gives the same tokens.
    """
    logits = logits.float()  # (B, V); every op below is out of place so the caller's tensor is untouched
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        counts = counts.to(logits.dtype)
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype) - params.frequency_penalty * counts
    if params.temperature < _MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    vocab = logits.size(-1)
    if params.top_k is not None and params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above
        drop = mass_before >= params.top_p  # the kept set already reaches top_p without this token
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class Completion:
    """One generated continuation.

    ``token_ids`` are the sampled tokens (a stop token id is not included; the
    tokens of a stop string are, while ``text`` is cut before it). ``logprobs``
    holds, for each of ``token_ids``, its log-probability under the model
    (log-softmax of the raw logits, before penalties, temperature, top-k, top-p).
    ``prompt_tokens`` counts the prompt tokens the model saw (after truncation).
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float]
    prompt_truncated: bool = False


@dataclass
class _Sample:
    """A completion under construction (one batch row while it runs)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None


class Engine:
    """Generates text from any lmforge model with its tokenizer; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: str | torch.device | None = "cpu") -> None:
        # device None = wherever the model's parameters already are (no copy).
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Complete every prompt (text or token ids) ``params.n`` times.

        Returns ``len(prompts) * n`` completions, prompt by prompt: those of prompt
        ``i`` are at ``[i * n, (i + 1) * n)``.
        """
        params.validate()
        if isinstance(prompts, (str, bytes)):
            raise TypeError("Engine.generate takes a list of prompts; wrap a single prompt in a list")
        prepared = [self._prepare_prompt(p, i) for i, p in enumerate(prompts)]  # all checked before any work
        out: list[Completion] = []
        for ids, truncated in prepared:
            samples: list[_Sample] = []
            for step_samples in self._decode(ids, params, self._generator(params.seed)):
                samples = step_samples  # run to the end; the last yield holds every finished sample
            for s in samples:
                assert s.finish_reason is not None  # _decode only stops once every row has finished
                out.append(Completion(text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason,
                                      prompt_tokens=len(ids), completion_tokens=len(s.token_ids),
                                      logprobs=s.logprobs, prompt_truncated=truncated))
        return out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Yield the completion's text in pieces as tokens arrive (``params.n`` must be 1).

        Text that could still turn into a stop string, or that ends in an incomplete
        UTF-8 character, is held back until it is settled, so the pieces joined
        equal ``generate([prompt], params)[0].text`` for the same seed.
        """
        params.validate()
        if params.n != 1:
            raise ValueError(f"SamplingParams.n must be 1 for Engine.stream (got {params.n!r}); use generate()")
        ids, _ = self._prepare_prompt(prompt, 0)
        emitted = 0  # characters of text already yielded
        for samples in self._decode(ids, params, self._generator(params.seed)):
            s = samples[0]
            if s.finish_reason is not None:
                if len(s.text) > emitted:
                    yield s.text[emitted:]
                return
            text = self.tokenizer.decode(s.token_ids)
            stable = _stable_length(text, params.stop)
            if stable > emitted:
                yield text[emitted:stable]
                emitted = stable

    # ---------------------------------------------------------------- internals
    @property
    def _max_state_len(self) -> int | None:
        return getattr(self.model, "max_state_len", None)

    def _generator(self, seed: int | None) -> torch.Generator:
        # Without a seed, draw one from torch's global RNG so torch.manual_seed still fixes the result.
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def _prepare_prompt(self, prompt: str | Sequence[int], index: int) -> tuple[list[int], bool]:
        """Token ids of one prompt (never empty) and whether it was cut to fit the state."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            vocab = self.tokenizer.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not ids:
            ids = [self.tokenizer.eot_id]  # an empty prompt starts a new document
        limit = self._max_state_len
        if limit is not None and len(ids) > limit:
            # Keep the end of the prompt, with room for at least one generated token before a re-prefill.
            return ids[-max(1, limit - 1):], True
        return ids, False

    def _finish(self, s: _Sample, reason: Literal["stop", "length"], text: str | None = None) -> None:
        s.finish_reason = reason
        s.text = self.tokenizer.decode(s.token_ids) if text is None else text

    def _check_stop_strings(self, s: _Sample, stops: Sequence[str]) -> bool:
        """Finish ``s`` if its text now contains a stop string; the text is cut before the earliest one."""
        text = self.tokenizer.decode(s.token_ids)
        hits = [i for i in (text.find(x) for x in stops) if i >= 0]
        if hits:
            self._finish(s, "stop", text[:min(hits)])
        return bool(hits)

    @torch.inference_mode()
    def _decode(self, prompt_ids: list[int], params: SamplingParams,
                generator: torch.Generator) -> Iterator[list[_Sample]]:
        """Run the ``params.n`` samples of one prompt, yielding all of them after every step."""
        model, n = self.model, params.n
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else [self.tokenizer.eot_id])
        limit = self._max_state_len
        samples = [_Sample() for _ in range(n)]
        active = list(range(n))  # active[row] = index in samples of batch row `row`

        # Prefill: the n rows share the prompt, so they start from identical states.
        state = model.new_state(n)
        logits, state = model.step(torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.device), state)
        last = logits[:, -1, :]  # (B, V): next-token logits of each running row
        held = len(prompt_ids)  # tokens the state has seen since its last (re)prefill
        penalized = bool(params.presence_penalty or params.frequency_penalty)
        counts = torch.zeros(n, last.size(-1), device=self.device) if penalized else None  # (B, V)

        for _ in range(params.max_new_tokens):
            tokens = sample_next(last, params, generator, counts)  # (B,)
            logprobs = torch.log_softmax(last.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
            keep: list[int] = []  # batch rows that go on
            for row, (tok, lp) in enumerate(zip(tokens.tolist(), logprobs.tolist(), strict=True)):
                s = samples[active[row]]
                if tok in stop_ids:
                    self._finish(s, "stop")
                    continue
                s.token_ids.append(tok)
                s.logprobs.append(lp)
                if params.stop and self._check_stop_strings(s, params.stop):
                    continue
                if len(s.token_ids) >= params.max_new_tokens:
                    self._finish(s, "length")
                    continue
                keep.append(row)
            yield samples
            if not keep:
                return

            if len(keep) < len(active):  # drop finished rows from the batch
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                state = model.reorder_state(state, index)
                tokens = tokens[index]
                counts = counts[index] if counts is not None else None
                active = [active[r] for r in keep]
            if counts is not None:
                counts[torch.arange(len(active), device=self.device), tokens] += 1

            if limit is not None and held + 1 > limit:
                # The state is full: start a fresh one from the last half window (rows are all equally long).
                window = max(1, limit // 2)
                rows = [(prompt_ids + samples[i].token_ids)[-window:] for i in active]
                state = model.new_state(len(active))
                logits, state = model.step(torch.tensor(rows, dtype=torch.long, device=self.device), state)
                held = window
            else:
                logits, state = model.step(tokens[:, None], state)  # (B, 1) -> logits (B, 1, V)
                held += 1
            last = logits[:, -1, :]


def _stable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` is settled: not an unfinished UTF-8 character, not the start of a stop string."""
    end = len(text.rstrip(REPLACEMENT_CHAR))  # a trailing U+FFFD may still become a real character
    hold = 0
    for stop in stops:
        # The longest proper prefix of `stop` that ends the text could still grow into `stop`.
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold
