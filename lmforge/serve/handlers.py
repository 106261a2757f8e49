"""The generation endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Each call is checked (fields, model id, prompt plus ``max_tokens`` against the
context: never truncated silently), turned into engine requests (one per
prompt, each with ``n`` samples) and submitted to the scheduler as one ticket.
The answer is either one JSON body, or server-sent events (``data: {chunk}``
lines ending with ``data: [DONE]``) when ``stream`` is true. An error after a
stream began is sent as an ``{"error": ...}`` event, then ``[DONE]``. A client
that goes away cancels its ticket, which frees its batch rows at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmforge.data.chat import render_chat
from lmforge.serve import responses as R
from lmforge.serve.batch import Completion, Delta
from lmforge.serve.engine import Engine
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from lmforge.serve.scheduler import Event, QueueFull, Scheduler, Ticket
from lmforge.serve.telemetry import ServerMetrics

CLIENT_CLOSED = 499  # the status nginx made common for "the client closed the connection first"


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class _Call:
    """One API call in flight: its ticket, its event queue and what it needs to render chunks."""

    ticket: Ticket
    queue: asyncio.Queue
    n: int
    prompt_tokens: int
    id: str
    created: int


def _merge(events: list[Event]) -> list[tuple[int, Delta]]:
    """Join the deltas that piled up for each (request, sample) into one, so a slow reader gets fewer chunks."""
    merged: dict[tuple[int, int], Delta] = {}
    for ev in events:
        for d in ev.deltas:
            key = (ev.request, d.index)
            if key not in merged:
                merged[key] = Delta(d.index, d.text, list(d.token_ids), list(d.logprobs), list(d.top_logprobs),
                                    d.finish_reason)
                continue
            m = merged[key]
            m.text += d.text
            m.token_ids += d.token_ids
            m.logprobs += d.logprobs
            m.top_logprobs += d.top_logprobs
            m.finish_reason = d.finish_reason
    return [(request, d) for (request, _), d in merged.items()]


class Generation:
    """Serves the generation endpoints of one model through one scheduler."""

    def __init__(self, engine: Engine, scheduler: Scheduler, metrics: ServerMetrics, model_name: str,
                 default_max_tokens: int) -> None:
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.model_name, self.default_max_tokens = model_name, default_max_tokens
        self.tokenizer = engine.tokenizer
        self.texts = R.TokenTexts(engine.tokenizer)

    # ---------------------------------------------------------------- checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model")

    def _ids(self, prompt: str | list[int], index: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.tokenizer.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                               "prompt")
            ids = list(prompt)
        return ids

    def _max_tokens(self, requested: int | None, prompt_len: int, what: str) -> int:
        """``requested`` checked against the context (400 with the counts), or what is left of it."""
        limit = self.engine.max_state_len
        if limit is None:
            return self.default_max_tokens if requested is None else requested
        if requested is None:
            requested = max(0, limit - prompt_len)
        if prompt_len + requested > limit or prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} for the "
                                f"completion). Please reduce the length of the {what} or max_tokens.",
                           "max_tokens" if prompt_len < limit else what)
        return requested

    # ------------------------------------------------------------- scheduling
    def _submit(self, requests: list, n: int, prompt_tokens: int, prefix: str) -> _Call:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the scheduler thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            ticket = self.scheduler.submit(requests, sink)
        except QueueFull as e:
            raise APIError(429, str(e), None, {"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:
            raise APIError(400, str(e), "n") from None
        return _Call(ticket, queue, n, prompt_tokens, R.new_id(prefix), R.now())

    async def _events(self, call: _Call) -> list[Event]:
        """The next event and any others already queued."""
        events = [await call.queue.get()]
        while not call.queue.empty():
            events.append(call.queue.get_nowait())
        return events

    async def _gather(self, request: Request, call: _Call) -> list[list[Completion]] | None:
        """Every request's completions, or None when the client disconnected first (the ticket is cancelled)."""
        results: list[list[Completion] | None] = [None] * len(call.ticket.requests)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        try:
            while any(r is None for r in results):
                nxt = asyncio.ensure_future(self._events(call))
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return None
                for ev in nxt.result():
                    if ev.kind == "error":
                        raise APIError(500, ev.error)
                    if ev.kind == "done":
                        results[ev.request] = ev.completions
            return results  # type: ignore[return-value]
        finally:
            gone.cancel()
            self.scheduler.cancel(call.ticket)  # a no-op once every request has finished

    async def _stream(self, call: _Call, preamble: list[str], opening: Callable[[int], list[str]] | None,
                      chunk: Callable[[int, Delta], dict], include_usage: bool) -> AsyncIterator[str]:
        """SSE lines: the preamble, then per request its opening chunks (once its prompt is prefilled) and
        one chunk per merged delta, then usage and [DONE]; an error is sent as an event."""
        completion_tokens, remaining, opened = 0, len(call.ticket.requests), set()
        try:
            for line in preamble:
                yield line
            while remaining:
                events = await self._events(call)
                error = next((ev for ev in events if ev.kind == "error"), None)
                for request, d in _merge(events):
                    if opening is not None and request not in opened:
                        opened.add(request)
                        for line in opening(request):
                            yield line
                    completion_tokens += len(d.token_ids)
                    yield sse(chunk(request * call.n + d.index, d))
                if error is not None:
                    self.metrics.stream_error()
                    yield sse(APIError(500, error.error).body())
                    break
                remaining -= sum(ev.kind == "done" for ev in events)
            else:
                if include_usage:
                    yield sse({"id": call.id, "object": "", "created": call.created, "model": self.model_name,
                               "choices": [], "usage": R.usage(call.prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        finally:
            self.scheduler.cancel(call.ticket)  # the client went away (or we finished): free the rows

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request, raw: bytes) -> Response:
        body: CompletionRequest = parse_body(CompletionRequest, raw)
        self.check_model(body.model)
        prompts = [self._ids(p, i) for i, p in enumerate(body.prompts())]
        top = body.logprobs
        scoring = top if body.echo and top is not None else None
        # A prompt starts a new document, as in lmforge's own scoring, lm-eval's adapter and the exports: the
        # begin token goes first (Tokenizer.with_bos; the engine applies the same rule). It is not echoed, so
        # the logprobs line up with the prompt sent.
        id_lists = [self.tokenizer.with_bos(ids) or [self.tokenizer.eot_id] for ids in prompts]
        leads = [len(a) - len(b) for a, b in zip(id_lists, prompts, strict=True)]
        max_tokens = [self._max_tokens(body.max_tokens, len(ids), "prompt") for ids in id_lists]
        try:
            reqs = [self.engine.request(ids, body.sampling_params(m, self.tokenizer.end_ids, logprobs=top,
                                                                  prompt_logprobs=scoring), i)
                    for i, (ids, m) in enumerate(zip(id_lists, max_tokens, strict=True))]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        call = self._submit(reqs, body.n, sum(len(ids) for ids in id_lists), "cmpl")
        base = {"id": call.id, "object": "text_completion", "created": call.created, "model": self.model_name}
        echo_text = [self.tokenizer.decode(ids) if body.echo else "" for ids in prompts]

        if body.stream:
            offsets = {i * body.n + j: len(echo_text[i]) for i in range(len(reqs)) for j in range(body.n)}

            def chunk(index: int, d: Delta) -> dict:
                lp = None
                if top is not None:
                    lp = R.completion_logprobs(self.texts, d.token_ids, d.logprobs, d.top_logprobs, offsets[index])
                    offsets[index] = lp["text_offset"][-1] + len(self.tokenizer.decode(d.token_ids[-1:])) \
                        if d.token_ids else offsets[index]
                extra = {"usage": None} if body.include_usage else {}
                return {**base, "choices": [{"index": index, "text": d.text, "logprobs": lp,
                                             "finish_reason": d.finish_reason}], **extra}

            def opening(i: int) -> list[str]:
                """The echoed prompt of request i, sent once it is prefilled (its log-probabilities exist then)."""
                req, lines, lead = reqs[i], [], leads[i]
                for j in range(body.n):
                    lp = None
                    if top is not None:
                        tops = None if req.prompt_top_logprobs is None else req.prompt_top_logprobs[lead:]
                        lp = R.completion_logprobs(self.texts, req.prompt_ids[lead:],
                                                   (req.prompt_logprobs or [])[lead:], tops)
                    extra = {"usage": None} if body.include_usage else {}
                    lines.append(sse({**base, "choices": [{"index": i * body.n + j, "text": echo_text[i],
                                                           "logprobs": lp, "finish_reason": None}], **extra}))
                return lines

            return StreamingResponse(self._stream(call, [], opening if body.echo else None, chunk, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await self._gather(request, call)
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        choices, completion_tokens = [], 0
        for i, comps in enumerate(results):
            for j, c in enumerate(comps):
                completion_tokens += c.completion_tokens
                lp = None
                if top is not None:
                    lp = R.completion_logprobs(self.texts, c.token_ids, c.logprobs,
                                               c.top_logprobs, len(echo_text[i]))
                    if body.echo:
                        lp = R.merge_logprobs(R.prompt_part(self.texts, c, top=True, lead=leads[i])[1], lp)
                choices.append({"index": i * body.n + j, "text": echo_text[i] + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return JSONResponse({**base, "choices": choices, "usage": R.usage(call.prompt_tokens, completion_tokens)})

    # ------------------------------------------------------------------- chat
    async def chat(self, request: Request, raw: bytes) -> Response:
        body: ChatCompletionRequest = parse_body(ChatCompletionRequest, raw)
        self.check_model(body.model)
        try:
            ids = self.tokenizer.with_bos(render_chat(self.tokenizer, body.message_dicts()))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = self._max_tokens(body.requested_max_tokens, len(ids), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, self.tokenizer.end_ids, logprobs=top)
        call = self._submit([self.engine.request(ids, params)], body.n, len(ids), "chatcmpl")
        base = {"id": call.id, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": call.created, "model": self.model_name}

        if body.stream:
            def chunk(index: int, d: Delta) -> dict:
                lp = R.chat_logprobs(self.texts, d.token_ids, d.logprobs, d.top_logprobs) if top is not None else None
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                extra = {"usage": None} if body.include_usage else {}
                return {**base, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                             "finish_reason": d.finish_reason}], **extra}

            extra = {"usage": None} if body.include_usage else {}
            opening = [sse({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
                       for j in range(body.n)]
            return StreamingResponse(self._stream(call, opening, None, chunk, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await self._gather(request, call)
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for j, c in enumerate(results[0]):
            lp = R.chat_logprobs(self.texts, c.token_ids, c.logprobs, c.top_logprobs) if top is not None else None
            choices.append({"index": j, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        completion_tokens = sum(c.completion_tokens for c in results[0])
        return JSONResponse({**base, "choices": choices, "usage": R.usage(len(ids), completion_tokens)})
