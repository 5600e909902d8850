"""OpenAI response bodies: whole completions, stream chunks (server-sent events) and usage,
for the completions and chat endpoints."""

from __future__ import annotations

import json
import time
from typing import Any


def reason(why: str | None) -> str | None:
    return None if why is None else ("length" if why == "length" else "stop")


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
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    @staticmethod
    def usage_chunk(rid: str, server: Any, stats: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": [], "usage": _usage(stats)}

    @staticmethod
    def full(rid: str, server: Any, results: list[Any]) -> dict[str, Any]:
        choices = [{"index": i, "text": text, "logprobs": None,
                    "finish_reason": reason(last.finish_reason)}
                   for i, (text, _, last) in enumerate(results)]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        for _, _, last in results:
            u = _usage(last.stats)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[k] += u[k]
            usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"][
                "cached_tokens"]
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": choices, "usage": usage}


class ChatShape:
    """The bodies of ``/v1/chat/completions``."""

    prefix = "chatcmpl"

    @staticmethod
    def start(rid: str, server: Any) -> dict[str, Any] | None:
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": server.model_name, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}]}

    @staticmethod
    def delta(rid: str, server: Any, text: str, reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": server.model_name, "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    @staticmethod
    def usage_chunk(rid: str, server: Any, stats: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": server.model_name, "choices": [], "usage": _usage(stats)}

    @staticmethod
    def full(rid: str, server: Any, results: list[Any]) -> dict[str, Any]:
        text, _, last = results[0]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": server.model_name, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": reason(last.finish_reason)}],
                "usage": _usage(last.stats)}
