"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray.

`build_api(models, metrics)` returns an ASGI app. Each served model brings a tokenizer and a
`Backend` that streams engine chunks: through Ray Serve handles in production
(`serving.ingress`), or an in-process engine in unit tests and benchmarks.

Path of a request: validate body (400 naming the field) → find model (404) → tokenize once
(chat template applied here) → check context (400) → stream chunks from the backend → SSE or
one JSON body. A client that disconnects cancels the backend stream, which aborts the engine
request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.hashing import BlockHasher, tenant_salt
from serving.engines.base import Chunk, GenerateRequest
from serving.metrics import IngressMetrics
from serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingBody,
    error_body,
    now,
    usage,
)

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where a model's requests go."""

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Engine chunks for `request`; closing the iterator aborts the request."""


class Tokenizer(Protocol):
    """Tokenizer used at the ingress (see serving.tokenizer.PromptTokenizer)."""

    def encode_chat(self, messages: list[Any]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...


class EngineBackend:
    """A backend that calls an in-process `Engine` directly (benchmarks, unit tests)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        done = False
        try:
            async for chunk in self._engine.generate(request):
                yield chunk
            done = True
        finally:
            if not done:
                await self._engine.abort(request.request_id)


@dataclass(slots=True)
class ServedModel:
    """A model as the API sees it."""

    name: str
    max_model_len: int
    tokenizer: Tokenizer
    backend: Backend
    created: int = 0
    #: Block hasher with the engine's block size (router.hashing); None: no routing keys.
    hasher: BlockHasher | None = None
    #: Salt prefix-cache blocks per tenant (engine and router alike).
    salt_tenants: bool = True


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic puts the union branch / validator name in the location; keep field names only.
    parts = [p for p in parts if not p.startswith(("function-", "str", "list[", "int"))]
    return ".".join(parts) or None


def _sse(obj: Any) -> bytes:
    return f"data: {_json(obj)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


class OpenAIApi:
    """Request handlers; one instance per ingress replica."""

    def __init__(self, models: dict[str, ServedModel], metrics: IngressMetrics) -> None:
        self.models = models
        self.metrics = metrics

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ApiError(
                404,
                f"The model `{name}` does not exist. Available: {sorted(self.models)}",
                "not_found_error",
                "model",
            )
        return served

    @staticmethod
    def _max_tokens(served: ServedModel, body: _SamplingBody, prompt_len: int, prompt_param: str) -> int:
        room = served.max_model_len - prompt_len
        if room <= 0:
            raise ApiError(
                400,
                f"The prompt is {prompt_len} tokens; model `{served.name}` has a context of "
                f"{served.max_model_len} tokens. Shorten the prompt.",
                "invalid_request_error",
                prompt_param,
            )
        asked = body.requested_max_tokens()
        if asked is None:
            return room
        if asked > room:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(
                400,
                f"{field} is {asked} but the prompt is {prompt_len} tokens and model "
                f"`{served.name}` has a context of {served.max_model_len} tokens: at most "
                f"{room} tokens can be generated. Lower {field} or shorten the prompt.",
                "invalid_request_error",
                field,
            )
        return asked

    async def handle(
        self,
        kind: str,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        served: ServedModel,
        prompt_param: str,
        headers: Any = None,
    ) -> Response:
        max_tokens = self._max_tokens(served, body, len(prompt_ids), prompt_param)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        tenant = (headers.get(TENANT_HEADER) if headers is not None else None) or DEFAULT_TENANT
        session = headers.get(SESSION_HEADER) if headers is not None else None
        salt = tenant_salt(tenant) if served.salt_tenants else None
        keys: list[int] = []
        if served.hasher is not None:
            if len(prompt_ids) > _INLINE_HASH_TOKENS:
                keys = await asyncio.to_thread(served.hasher.keys, prompt_ids, salt)
            else:
                keys = served.hasher.keys(prompt_ids, salt)
        req = GenerateRequest(
            rid,
            prompt_ids,
            body.sampling(max_tokens),
            disagg=_disagg_header(headers),
            cache_salt=salt,
            block_keys=keys,
            tenant=tenant,
            session_id=session,
        )
        start = time.perf_counter()
        m = self.metrics
        m.in_flight.labels(served.name).inc()
        stream = served.backend.stream(req)
        try:
            first = await anext(stream)
        except BaseException:
            m.in_flight.labels(served.name).dec()
            await stream.aclose()
            raise
        if first.error is not None:
            m.in_flight.labels(served.name).dec()
            await stream.aclose()
            err = first.error
            raise ApiError(err.status, err.message, err.type)
        m.ttft.labels(served.name).observe(time.perf_counter() - start)
        endpoint = "chat" if kind == "chat" else "completions"
        route = {ROUTE_HEADER: first.route.header()} if first.route is not None else {}
        if body.stream:
            closer = _StreamCloser(self, served, stream, first, start, endpoint)
            gen = self._stream_sse(kind, rid, body, served, first, stream, closer)
            resp: Response = _ClosingStreamingResponse(gen, closer)
        else:
            try:
                resp = await self._collect(kind, rid, served, first, stream, start, endpoint)
            finally:
                m.in_flight.labels(served.name).dec()
        resp.headers.update(route)
        return resp

    def _account(self, served: ServedModel, last: Chunk, start: float, endpoint: str, status: int) -> None:
        m = self.metrics
        m.prompt_tokens.labels(served.name).inc(last.prompt_tokens)
        m.cached_tokens.labels(served.name).inc(last.cached_tokens)
        m.completion_tokens.labels(served.name).inc(last.completion_tokens)
        m.e2e.labels(served.name).observe(time.perf_counter() - start)
        m.requests.labels(served.name, endpoint, str(status)).inc()

    async def _collect(
        self,
        kind: str,
        rid: str,
        served: ServedModel,
        first: Chunk,
        stream: AsyncIterator[Chunk],
        start: float,
        endpoint: str,
    ) -> Response:
        parts = [first.text]
        last = first
        try:
            async for chunk in stream:
                if chunk.error is not None:
                    self.metrics.requests.labels(served.name, endpoint, str(chunk.error.status)).inc()
                    return _error_response(chunk.error.status, chunk.error.message, chunk.error.type)
                parts.append(chunk.text)
                last = chunk
        finally:
            await stream.aclose()
        text = "".join(parts)
        finish = last.finish_reason or "length"
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        self._account(served, last, start, endpoint, 200)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": now(),
                "model": served.name,
                "choices": [choice],
                "usage": usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
            }
        )

    async def _stream_sse(
        self,
        kind: str,
        rid: str,
        body: _SamplingBody,
        served: ServedModel,
        first: Chunk,
        stream: AsyncIterator[Chunk],
        closer: _StreamCloser,
    ) -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        m = self.metrics

        def frame(chunk: Chunk, first_frame: bool) -> dict:
            if kind == "chat":
                delta: dict[str, Any] = {"content": chunk.text}
                if first_frame:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": chunk.finish_reason, "logprobs": None}
            else:
                choice = {
                    "index": 0,
                    "text": chunk.text,
                    "finish_reason": chunk.finish_reason,
                    "logprobs": None,
                }
            out = {"id": rid, "object": obj, "created": created, "model": served.name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        last = first
        status = 200
        prev = time.perf_counter()
        try:
            yield _sse(frame(first, True))
            if first.finish_reason is None:
                async for chunk in stream:
                    if chunk.error is not None:
                        status = chunk.error.status
                        yield _sse(error_body(chunk.error.message, chunk.error.type, None, status))
                        break
                    t = time.perf_counter()
                    m.itl.labels(served.name).observe(t - prev)
                    prev = t
                    last = chunk
                    yield _sse(frame(chunk, False))
            if include_usage and status == 200:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": served.name,
                        "choices": [],
                        "usage": usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
                    }
                )
            yield _DONE
            closer.finished(last, status)
        finally:
            await closer.close()


class _StreamCloser:
    """Releases a stream's resources exactly once, whether it finished or the client left.

    NOTE: Starlette does not close a response's body iterator when the client disconnects, and
    an iterator that never started runs no `finally`; so the response calls `close()` too.
    """

    def __init__(
        self,
        api: OpenAIApi,
        served: ServedModel,
        stream: AsyncIterator[Chunk],
        last: Chunk,
        start: float,
        endpoint: str,
    ) -> None:
        self._api, self._served, self._stream = api, served, stream
        self._last, self._start, self._endpoint = last, start, endpoint
        self._status: int | None = None
        self._closed = False

    def finished(self, last: Chunk, status: int) -> None:
        self._last, self._status = last, status

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        m, name = self._api.metrics, self._served.name
        m.in_flight.labels(name).dec()
        status = self._status
        if status is None:
            m.disconnects.labels(name).inc()
            status = 499
        # Closing the backend stream cancels the engine request if it is still running.
        await asyncio.shield(self._stream.aclose())
        self._api._account(self._served, self._last, self._start, self._endpoint, status)


class _ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], closer: _StreamCloser) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._closer = closer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._closer.close()


class _JSONBodyByDefault:
    """ASGI middleware: a POST without a JSON content type (e.g. `curl -d`) is read as JSON.

    OpenAI clients always send JSON; without this, FastAPI reads such a body as form data and
    answers with an error that names no field.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if b"json" not in ctype:
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


#: Request header: the tenant (until API keys map keys to tenants, issue 5).
TENANT_HEADER = "x-tandem-tenant"
DEFAULT_TENANT = "default"
#: Request header: a conversation's session id (session affinity in the router).
SESSION_HEADER = "x-session-id"
#: Prompts longer than this are hashed in a worker thread (SHA-256 per block).
_INLINE_HASH_TOKENS = 2048
#: Request header: prefill/decode disaggregation for this request (on | off | auto).
DISAGG_HEADER = "x-tandem-disagg"
#: Response header: how the request was served (mode, prefill replica, decode replica).
ROUTE_HEADER = "x-tandem-route"
_DISAGG_VALUES = ("on", "off", "auto")


def _disagg_header(headers: Any) -> str:
    """The request's `x-tandem-disagg` value (auto when absent); 400 naming the header otherwise."""
    if headers is None:
        return "auto"
    value = headers.get(DISAGG_HEADER)
    if value is None:
        return "auto"
    value = value.strip().lower()
    if value not in _DISAGG_VALUES:
        raise ApiError(
            400,
            f"header {DISAGG_HEADER}: {value!r} is not one of {', '.join(_DISAGG_VALUES)}",
            "invalid_request_error",
            DISAGG_HEADER,
        )
    return value


def _check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
    vocab = getattr(served.tokenizer, "vocab_size", None)
    if ids and vocab is not None and max(ids) >= vocab:
        raise ApiError(
            400,
            f"{param}: token id {max(ids)} is out of range (model `{served.name}` has {vocab} tokens)",
            "invalid_request_error",
            param,
        )


def build_api(models: dict[str, ServedModel], metrics: IngressMetrics | None = None) -> FastAPI:
    """The FastAPI app serving `models`."""
    api = OpenAIApi(models, metrics or IngressMetrics())
    app = FastAPI(
        title="Tandem",
        description="OpenAI-compatible API of a Tandem deployment.",
        version="0.1.0",
    )
    app.state.api = api
    app.add_middleware(_JSONBodyByDefault)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "The request body is not valid JSON.", None
        elif param is None:
            msg = f"The request body must be a JSON object: {msg}"
        elif first.get("type") == "missing":
            msg = "required field is missing"
        text = f"{param}: {msg}" if param else msg
        return _error_response(400, text, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), type_)

    @app.get("/health")
    async def health() -> dict:
        """Liveness of the ingress and the models it serves."""
        return {"status": "ok", "models": sorted(api.models)}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics of this ingress replica."""
        return Response(api.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict:
        """Served models."""
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": m.created,
                    "owned_by": "tandem",
                    "max_model_len": m.max_model_len,
                }
                for m in api.models.values()
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (streaming with `stream: true`)."""
        served = api.model(body.model)
        _disagg_header(request.headers)
        _check_token_ids(served, body.stop_token_ids or [], "stop_token_ids")
        prompt_ids = await asyncio.to_thread(served.tokenizer.encode_chat, body.messages)
        return await api.handle("chat", body, prompt_ids, served, "messages", request.headers)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of one prompt (string or token ids)."""
        served = api.model(body.model)
        _disagg_header(request.headers)
        _check_token_ids(served, body.stop_token_ids or [], "stop_token_ids")
        if isinstance(body.prompt, str):
            prompt_ids = await asyncio.to_thread(served.tokenizer.encode, body.prompt)
        else:
            prompt_ids = list(body.prompt)
            _check_token_ids(served, prompt_ids, "prompt")
        if not prompt_ids:
            raise ApiError(400, "prompt: must not be empty", "invalid_request_error", "prompt")
        return await api.handle("completion", body, prompt_ids, served, "prompt", request.headers)

    return app
