"""OpenAI's wire format for the server: request bodies, their checks, and vLLM-style errors.

Requests are validated with pydantic models whose fields follow OpenAI's
completions and chat completions APIs, plus vLLM's extras (``top_k``,
``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``). Every endpoint stops at every
end token of the model (end of text and end of turn) unless ``ignore_eos`` is set. Unknown fields are ignored, as OpenAI-compatible
servers do, so clients that send newer fields keep working; fields lmforge cannot
honour (``logit_bias``, ``tools``, ``suffix``, ``best_of`` other than ``n``, ...) are
refused with 400 rather than silently dropped.

Every error is an :class:`APIError`, rendered as
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as ``code``.

Example::

    req = parse_body(CompletionRequest, raw_bytes)       # APIError(400) on bad JSON or fields
    params = req.sampling_params(max_new_tokens=16, end_ids=tokenizer.end_ids)
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.serve.sampling import MAX_TOP_LOGPROBS, SamplingParams

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error response: HTTP ``status``, a message naming the cause, and the offending ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's id (see GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens (-1/None = off)")
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: token ids that end a completion")
    ignore_eos: bool = Field(False, description="vLLM extra: do not stop at the model's end tokens")
    skip_special_tokens: bool = Field(True, description="vLLM extra: leave special tokens out of the text")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="the range torch generators accept")
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else v or []
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        if len(items) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids are >= 0")
        return v

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling_params(self, max_new_tokens: int, end_ids: list[int], logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters; ``end_ids`` are the model's end tokens (``Tokenizer.end_ids``)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        ends = [] if self.ignore_eos else list(end_ids)
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature,
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=self.top_p if self.top_p < 1.0 else None, seed=self.seed, stop=stops,
            stop_token_ids=sorted(set(ends + list(self.stop_token_ids or []))),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, n=self.n,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(_Body):
    """``POST /v1/completions``: prompt as a string, strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (no server-side ranking)", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo (scoring the prompt)", "max_tokens")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content[{j}]: only text parts are supported",
                               f"messages.{index}.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Body):
    """``POST /v1/chat/completions``: a conversation, rendered with the ChatML template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format type 'text' is supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def message_dicts(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Validate a JSON body into ``model``; APIError(400) names the first bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"{where}: {msg} (got {got})" if where else msg, param) from None
    body.refuse_unsupported()
    return body
