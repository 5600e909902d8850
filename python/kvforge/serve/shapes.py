"""OpenAI response bodies: whole completions, stream chunks (server-sent events) and usage,
for the completions and chat endpoints."""

from __future__ import annotations

import json
import time
from typing import Any

from ..generation import GenerationStats, openai_reason


def reason(why: str | None) -> str | None:
    """OpenAI's finish reason of a chunk (``None`` while it goes on)."""
    return None if why is None else openai_reason(why)


def _body(rid: str, server: Any, obj: str, **fields: Any) -> dict[str, Any]:
    """The fields every response body starts with, then ``fields``."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": server.model_name,
            **fields}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _usage(stats: Any) -> dict[str, int]:
    p, c = stats.prompt_tokens, stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens}}


class CompletionShape:
    """The bodies of ``/v1/completions``."""

    prefix = "cmpl"

    @staticmethod
    def start(rid: str, server: Any) -> dict[str, Any] | None:
        return None

    @staticmethod
    def delta(rid: str, server: Any, text: str, reason: str | None) -> dict[str, Any]:
        return _body(rid, server, "text_completion", choices=[
            {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])

    @staticmethod
    def usage_chunk(rid: str, server: Any, stats: Any) -> dict[str, Any]:
        return _body(rid, server, "text_completion", choices=[], usage=_usage(stats))

    @staticmethod
    def full(rid: str, server: Any, results: list[Any]) -> dict[str, Any]:
        choices = [{"index": i, "text": text, "logprobs": None,
                    "finish_reason": reason(last.finish_reason)}
                   for i, (text, _, last) in enumerate(results)]
        stats = [last.stats for _, _, last in results]
        usage = _usage(GenerationStats(
            prompt_tokens=sum(s.prompt_tokens for s in stats),
            generated_tokens=sum(s.generated_tokens for s in stats),
            cached_prompt_tokens=sum(s.cached_prompt_tokens for s in stats)))
        return _body(rid, server, "text_completion", choices=choices, usage=usage)


class ChatShape:
    """The bodies of ``/v1/chat/completions``."""

    prefix = "chatcmpl"

    @staticmethod
    def start(rid: str, server: Any) -> dict[str, Any] | None:
        return _body(rid, server, "chat.completion.chunk", choices=[
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}])

    @staticmethod
    def delta(rid: str, server: Any, text: str, reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return _body(rid, server, "chat.completion.chunk", choices=[
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])

    @staticmethod
    def usage_chunk(rid: str, server: Any, stats: Any) -> dict[str, Any]:
        return _body(rid, server, "chat.completion.chunk", choices=[], usage=_usage(stats))

    @staticmethod
    def full(rid: str, server: Any, results: list[Any]) -> dict[str, Any]:
        text, _, last = results[0]
        return _body(rid, server, "chat.completion", choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": reason(last.finish_reason)}], usage=_usage(last.stats))
