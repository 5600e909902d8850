"""OpenAI request bodies (pydantic models, which also give the OpenAPI schema), their
translation into kvforge settings, and the error shape.

Strict types: a string where a number belongs is a 400, never coerced. Unknown fields are
refused (a misspelt ``max_token`` must not be ignored silently). OpenAI fields kvforge does
not implement (``n > 1``, ``logprobs``, penalties, ``logit_bias``, tools) are accepted only
at their neutral values, so that a client that sends defaults keeps working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import SamplingParams
from ..errors import Error


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def from_kvforge(e: Error, param: str | None = None) -> APIError:
    """A kvforge validation error (its message names the parameter and the limit) as a 400."""
    return APIError(400, str(e), param, "invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="default 1.0, as OpenAI; 0 = greedy")
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kvforge's extensions (vLLM names for the sampling ones).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    press: str | dict[str, Any] | None = Field(
        None, description="a kvforge press: a name, or {name, compression_ratio, ...}")
    attention: str | None = Field(None, description="attention spec, e.g. 'quest:token_budget=512'")
    speculative: str | dict[str, Any] | None = Field(
        None, description="a drafter spec ('prompt-lookup', ...) or {drafter, acceptance}")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


# Fields that must stay at their neutral value: (name, neutral values).
_NEUTRAL: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("n", (None, 1)), ("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
    ("logit_bias", (None, {})), ("echo", (None, False)), ("logprobs", (None, False)),
    ("top_logprobs", (None,)), ("suffix", (None, "")), ("best_of", (None, 1)),
    ("tools", (None, [])), ("tool_choice", (None, "none")), ("response_format", (None,)),
)


def check_supported(req: _Common) -> None:
    for name, neutral in _NEUTRAL:
        value = getattr(req, name, None)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise APIError(400, f"{name}={value!r} is not supported by this server", name,
                           "unsupported_parameter")


def sampling(req: _Common, max_tokens: int) -> SamplingParams:
    """The request's sampling parameters; kvforge's validation names any bad value."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens,
                              "temperature": 1.0 if req.temperature is None else req.temperature}
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if req.stop is not None:
        kwargs["stop"] = req.stop
    if req.stop_token_ids is not None:
        kwargs["stop_token_ids"] = tuple(req.stop_token_ids)
    try:
        return SamplingParams(**kwargs)
    except Error as e:
        raise from_kvforge(e, _param_of(str(e), kwargs)) from None


def _param_of(message: str, kwargs: dict[str, Any]) -> str | None:
    """The parameter a kvforge message starts with, in the request's own name."""
    for name in kwargs:
        if message.startswith(name):
            return "max_tokens" if name == "max_new_tokens" else name
    return None


def text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)
