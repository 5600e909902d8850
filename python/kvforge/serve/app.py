"""The OpenAI-compatible HTTP app: routes, request translation, streaming."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, Error
from ..generation import GenerationChunk
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    _Common,
    check_supported,
    from_kvforge,
    sampling,
    text_of,
)
from .scheduler import Job, Scheduler
from .shapes import ChatShape, CompletionShape, reason, sse

# Drafters a client may ask for: none reads a path the client names.
_NETWORK_DRAFTERS = ("prompt-lookup", "prompt_lookup", "pld", "hierarchy", "hd", "self",
                     "medusa")


class Server:
    """One model behind the app: limits, the scheduler and the metrics."""

    def __init__(self, llm: Any, model_name: str, *, max_running: int = 16,
                 max_queue: int = 64, max_prompt_tokens: int | None = None,
                 prefill_chunk: int = 256, queue_timeout: float = 60.0,
                 prefix_cache: bool = True) -> None:
        most = llm._core_engine().prefill_chunk  # one batched step takes at most this many
        if not 1 <= max_running <= most:
            raise ConfigError(f"max_running={max_running} must be in [1, {most}]")
        self.llm, self.model_name = llm, model_name
        self.max_prompt_tokens = max_prompt_tokens or llm.max_context - 1
        self.metrics = Metrics()
        self.scheduler = Scheduler(llm, max_running=max_running, max_queue=max_queue,
                                   prefill_chunk=prefill_chunk, queue_timeout=queue_timeout,
                                   prefix_cache=prefix_cache, hooks=self.metrics)
        self.created = int(time.time())

    # -- a request into a job -----------------------------------------------------------------
    def job(self, prompt: Any, req: _Common, default_max: int | None, emit: Any,
            param: str) -> Job:
        llm = self.llm
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server has "
                           f"{self.model_name!r}", "model", "model_not_found")
        check_supported(req)
        try:
            ids = llm._prompt_ids(prompt)
        except Error as e:
            raise from_kvforge(e, param) from None
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{self.max_prompt_tokens}", param, "prompt_too_long")
        press, attention = self._press(req.press), self._attention(req.attention)
        bounded = llm._bounded(press)
        room = 2**31 - 1 if bounded else llm.max_context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens, the model's context is "
                           f"{llm.max_context}: no room for a completion", param,
                           "context_length_exceeded")
        wanted = getattr(req, "max_completion_tokens", None)
        wanted = req.max_tokens if wanted is None else wanted
        if wanted is None:
            # Chat's default, the rest of the context, is capped by what the pool can hold,
            # so that a request without max_tokens is not refused as too large for it.
            fits = self.scheduler.tokens_that_fit() - len(ids)
            wanted = max(1, min(room, fits if default_max is None else default_max))
        elif wanted > room:
            raise APIError(400, f"this model's maximum context length is {llm.max_context} "
                           f"tokens; you requested {len(ids) + wanted} ({len(ids)} in the "
                           f"prompt, {wanted} in the completion)", "max_tokens",
                           "context_length_exceeded")
        params = sampling(req, wanted)
        try:
            llm._check_params(params)
        except Error as e:
            raise from_kvforge(e, "stop_token_ids") from None
        spec = self._speculative(req.speculative, params.temperature)
        return Job(ids, params, emit, press, attention, spec,
                   room=llm._room(len(ids), params, press))

    def _press(self, spec: Any) -> Any:
        if spec is None:
            return None
        from ..presses import by_name

        name, kwargs = (spec, {}) if isinstance(spec, str) else (
            spec.get("name"), {k: v for k, v in spec.items() if k != "name"})
        bad = [k for k, v in kwargs.items() if not isinstance(v, (int, float, bool))]
        if bad:
            raise APIError(400, f"press arguments must be numbers or booleans: {bad}", "press",
                           "invalid_value")
        try:
            press = by_name(name, **kwargs)
            press._check(self.llm.max_context)
        except Error as e:
            raise from_kvforge(e, "press") from None
        return press

    @staticmethod
    def _attention(spec: str | None) -> Any:
        if spec is None:
            return None
        from ..attention import parse

        try:
            return parse(spec)
        except Error as e:
            raise from_kvforge(e, "attention") from None

    @staticmethod
    def _speculative(spec: Any, temperature: float) -> Any:
        if spec is None:
            return None
        from .. import spec as kvspec

        options = {"drafter": spec} if isinstance(spec, str) else dict(spec)
        drafter = options.pop("drafter", None)
        if not isinstance(drafter, str):
            raise APIError(400, "speculative needs a drafter name", "speculative",
                           "invalid_value")
        name, _, arg = drafter.partition(":")
        if name.lower() not in _NETWORK_DRAFTERS or (arg and name.lower() != "self"):
            raise APIError(400, f"speculative drafter {drafter!r} is not available over the "
                           f"network; use one of prompt-lookup, hierarchy, self:K, medusa",
                           "speculative", "invalid_value")
        options.setdefault("acceptance", "greedy" if temperature == 0 else "lossless")
        try:
            return replace(kvspec.parse(drafter), **options)
        except (Error, TypeError) as e:
            raise APIError(400, f"speculative: {e}", "speculative", "invalid_value") from None


class _JobStream(StreamingResponse):
    """Server-sent events of one job; the job is cancelled however the response ends (a
    client that went away surfaces as an error of a send, which leaves the body generator
    suspended)."""

    def __init__(self, stream: _Stream, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.job_stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job_stream.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class _Stream:
    """A job's events as an async iterator on the server's event loop."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown): nobody listens
                pass

        self.emit = emit
        self.job: Job | None = None

    async def next(self) -> GenerationChunk:
        event = await self.queue.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def cancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self.server.scheduler.cancel(self.job)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server``; its lifespan starts and stops the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.close()

    app = FastAPI(title="kvforge", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_ReplicaHeader, value=f"{socket.gethostname()}:{os.getpid()}")

    _handlers(app)
    _routes(app, server)
    return app


class _ReplicaHeader:
    """Names the answering process in ``x-kvforge-replica`` (replicas behind one proxy are
    told apart by it). Plain ASGI: a ``BaseHTTPMiddleware`` would hide client disconnects
    from the endpoints."""

    def __init__(self, app: Any, value: str) -> None:
        self.app, self.header = app, (b"x-kvforge-replica", value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the body is not valid JSON: {first.get('ctx')}",
                                         None, "invalid_json").body(), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
            f"{err.get('msg')}" for err in errors[:5])
        return JSONResponse(APIError(400, message, ".".join(loc) or None,
                                     "invalid_request").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail), None, None).body(),
                            status_code=e.status_code)


def _routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.created, "owned_by": "kvforge"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await asyncio.to_thread(server.scheduler.stats)
        return Response(server.metrics.render(stats),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        prompts = _prompts(req.prompt)
        if req.stream and len(prompts) != 1:
            raise APIError(400, "stream=true takes one prompt", "prompt", "invalid_value")
        return await _respond(server, request, req, prompts, 16, "prompt", CompletionShape)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": text_of(m)} for m in req.messages]
        try:
            prompt = server.llm.apply_chat_template(messages)
        except Error as e:
            raise from_kvforge(e, "messages") from None
        return await _respond(server, request, req, [prompt], None, "messages", ChatShape)


def _prompts(prompt: Any) -> list[Any]:
    """OpenAI's prompt forms: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    return list(prompt)


async def _respond(server: Server, request: Request, req: _Common, prompts: list[Any],
                   default_max: int | None, param: str, shape: Any) -> Any:
    streams = []
    for prompt in prompts:
        s = _Stream(server)
        s.job = server.job(prompt, req, default_max, s.emit, param)
        streams.append(s)
    try:
        for s in streams:
            server.scheduler.submit(s.job)  # type: ignore[arg-type]
        rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            # Errors before any token keep their status; a client gone meanwhile cancels.
            (first,) = await _watch(request, [streams[0].next()])
            return _JobStream(streams[0], _sse_events(streams[0], first, rid, server, req,
                                                      shape))
        results = await _watch(request, [_collect(s) for s in streams])
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return shape.full(rid, server, results)


async def _watch(request: Request, tasks: list[Any]) -> list[Any]:
    """Awaits every collection, or raises CancelledError when the client disconnects."""
    gather = asyncio.ensure_future(asyncio.gather(*tasks))
    while True:
        done, _ = await asyncio.wait({gather}, timeout=0.25)
        if done:
            return gather.result()
        if await request.is_disconnected():
            gather.cancel()
            raise asyncio.CancelledError("client disconnected")


async def _collect(s: _Stream) -> tuple[str, list[int], GenerationChunk]:
    texts, ids = [], []
    while True:
        chunk = await s.next()
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            return "".join(texts), ids, chunk


async def _sse_events(s: _Stream, first: GenerationChunk, rid: str, server: Server,
                      req: _Common, shape: Any) -> AsyncIterator[bytes]:
    try:
        start = shape.start(rid, server)
        if start is not None:
            yield sse(start)
        chunk = first
        while True:
            if chunk.text or chunk.finish_reason is not None:
                yield sse(shape.delta(rid, server, chunk.text, reason(chunk.finish_reason)))
            if chunk.finish_reason is not None:
                break
            chunk = await s.next()
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(shape.usage_chunk(rid, server, chunk.stats))
        yield b"data: [DONE]\n\n"
    except APIError as e:  # failed mid-stream: the status is sent; report in the stream
        yield sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        s.cancel()
