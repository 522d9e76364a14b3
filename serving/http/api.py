"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray: routes, SSE framing, middlewares.

`build_api(models, metrics, gateway, sessions, http)` returns an ASGI app. Each served model brings a
tokenizer and a `Backend` that streams engine chunks (serving.backends): through Ray Serve handles in
production (`serving.http.ingress`), or an in-process engine in unit tests and benchmarks.

Path of a request: body limit middleware (413 past `http.max_body_bytes`, 408 past
`http.body_timeout_s`) → auth middleware (401, tenant; Tandem's request headers checked, 400) → parse
the JSON body (400 on a lone surrogate or deep nesting, naming the field) → validate it (400 naming
the field) → the shared pipeline (serving.http.pipeline: plan → admit → open the stream along the
tier's degradation chain) → SSE or one JSON body. A client that disconnects cancels the backend
stream, which aborts the engine request, and its admission ticket is released exactly once
(`_StreamCloser`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.admission import Ticket
from router.contracts import DisaggMode
from serving.config import HttpSpec, KeyScope
from serving.http.auth import AuthError, Caller
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.migration import MIGRATIONS_FIELD, MigratingStream
from serving.http.pipeline import PlanInput, RequestPipeline, ServedModel
from serving.http.protocol import (
    DISAGG_HEADER,
    MAX_JSON_DEPTH,
    PRIORITY_HEADER,
    ROUTE_HEADER,
    SESSION_HEADER,
    TASK_HEADER,
    TASK_ID_HEADER,
    TENANT_HEADER,
    TRUNCATED_HEADER,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingBody,
    body_problem,
    check_headers,
    error_body,
    max_tokens_clamp,
    now,
    truncation_header,
)
from serving.http.responses import SessionsFrontend, add_responses_routes
from serving.replicas.engines.base import Chunk

logger = logging.getLogger(__name__)


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _ErrorJSON(JSONResponse):
    """An error body as ASCII JSON: whatever an error message quotes from the request (a model name,
    a header), it renders (a lone surrogate would make UTF-8 encoding, hence the answer, fail)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return _ErrorJSON(
        error_body(message, type_, param, status if code is None else code),
        status_code=status,
        headers=headers,
    )


class _EdgeError(StarletteHTTPException):
    """A request refused while its body is read or parsed (413, 408, 400), in the OpenAI shape.

    An HTTPException because FastAPI passes those through from reading the body (any other error
    becomes a 400 that names nothing)."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, close: bool = False
    ) -> None:
        super().__init__(status, message)
        self.message, self.code, self.param = message, code, param
        #: The connection is closed after the answer (the rest of the body is never read).
        self.close = close

    def response(self) -> JSONResponse:
        headers = {"connection": "close"} if self.close else None
        return _error_response(
            self.status_code, self.message, "invalid_request_error", self.param, self.code, headers
        )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic puts the union branch / validator name in the location; keep field names only.
    parts = [p for p in parts if not p.startswith(("function-", "str", "list[", "int"))]
    return ".".join(parts) or None


def _sse(obj: Any) -> bytes:
    return f"data: {_json(obj)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


class OpenAIApi:
    """Request handlers; one instance per ingress replica. The front half of every request is the
    shared pipeline (serving.http.pipeline); this class answers: SSE or one JSON body."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        metrics: IngressMetrics,
        gateway: Gateway,
        http: HttpSpec | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.gateway = gateway
        self.pipeline = RequestPipeline(models, gateway, metrics, http)

    def plan_input(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        headers: Any,
        caller: Caller,
        encode: Callable[[ServedModel], Awaitable[list[int]]] | None,
        prompt_param: str,
        **extra: Any,
    ) -> PlanInput:
        """The pipeline's input for a chat or text completion (headers parsed: 400 naming the header)."""
        completion = getattr(body, "max_completion_tokens", None)
        asked_field = "max_completion_tokens" if completion else "max_tokens"
        return PlanInput(
            clamp=max_tokens_clamp(headers),
            sampling_set=frozenset(body.model_fields_set),
            model=body.model,
            tenant=caller.tenant,
            allowed_models=caller.models,
            route_detail=caller.debug,
            encode=encode,
            requested_max_tokens=body.requested_max_tokens(),
            prompt_param=prompt_param,
            max_tokens_param=asked_field,
            task=headers.get(TASK_HEADER),
            task_id=headers.get(TASK_ID_HEADER) or None,
            rank=self.pipeline.priority_rank(headers.get(PRIORITY_HEADER)),
            session_id=headers.get(SESSION_HEADER),
            disagg=_disagg_header(headers, caller),
            **extra,
        )

    async def serve(
        self, kind: str, body: ChatCompletionRequest | CompletionRequest, inp: PlanInput
    ) -> Response:
        """Plan, admit, open a stream along the degradation chain (serving.http.pipeline), and answer."""
        pipeline = self.pipeline
        plan = await pipeline.plan(inp)
        ticket = await pipeline.admit(plan)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        start = time.perf_counter()
        chat = isinstance(body, ChatCompletionRequest)
        try:
            opened = await pipeline.open(plan, ticket, rid, body.sampling, chat)
        except BaseException:
            ticket.release(None)
            raise
        served, first, stream = opened.served, opened.first, opened.stream
        m = self.metrics
        m.in_flight.labels(served.name).inc()
        m.ttft.labels(served.name).observe(time.perf_counter() - start)
        endpoint = "chat" if kind == "chat" else "completions"
        if body.stream:
            closer = _StreamCloser(self, served, stream, first, start, endpoint, ticket)
            gen = self._stream_sse(kind, rid, body, served, first, stream, closer, opened.migration)
            resp: Response = _ClosingStreamingResponse(gen, closer)
        else:
            last = first
            try:
                reasoning = _include_reasoning(body)
                resp, last = await self._collect(
                    kind, rid, served, first, stream, start, endpoint, reasoning, opened.migration
                )
            finally:
                m.in_flight.labels(served.name).dec()
                ticket.release(last.prompt_tokens + last.completion_tokens)
        # A stream's headers are sent before it could migrate: its migrations are in its final chunk.
        migrated = opened.migration.report() if opened.migration is not None and not body.stream else ""
        resp.headers[ROUTE_HEADER] = opened.route + migrated
        truncated = plan.truncation_header()
        if truncated:
            resp.headers[TRUNCATED_HEADER] = truncated
        return resp

    def _account(self, served: ServedModel, last: Chunk, start: float, endpoint: str, status: int) -> None:
        m = self.metrics
        m.prompt_tokens.labels(served.name).inc(last.prompt_tokens)
        m.cached_tokens.labels(served.name).inc(last.cached_tokens)
        m.completion_tokens.labels(served.name).inc(last.completion_tokens)
        if served.tags is not None:
            m.reasoning_tokens.labels(served.name).inc(last.reasoning_tokens)
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
        include_reasoning: bool = False,
        migration: MigratingStream | None = None,
    ) -> tuple[Response, Chunk]:
        """The whole answer as one JSON body, and the last chunk (its token counts)."""
        parts = [first.text]
        thoughts = [first.reasoning_text]
        last = first
        try:
            async for chunk in stream:
                if chunk.error is not None:
                    self.metrics.requests.labels(served.name, endpoint, str(chunk.error.status)).inc()
                    err = chunk.error
                    return _error_response(err.status, err.message, err.type), last
                parts.append(chunk.text)
                thoughts.append(chunk.reasoning_text)
                last = chunk
        finally:
            await stream.aclose()
        text = "".join(parts)
        finish = last.finish_reason or "length"
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if include_reasoning and served.tags is not None:
                message["reasoning_content"] = "".join(thoughts)
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        self._account(served, last, start, endpoint, 200)
        body = {
            "id": rid,
            "object": obj,
            "created": now(),
            "model": served.name,
            "choices": [choice],
            "usage": served.usage(last, kind == "chat"),
        }
        if migration is not None and migration.migrations:
            body[MIGRATIONS_FIELD] = [x.as_dict() for x in migration.migrations]
        return JSONResponse(body), last

    async def _stream_sse(
        self,
        kind: str,
        rid: str,
        body: _SamplingBody,
        served: ServedModel,
        first: Chunk,
        stream: AsyncIterator[Chunk],
        closer: _StreamCloser,
        migration: MigratingStream | None = None,
    ) -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        m = self.metrics

        show_reasoning = _include_reasoning(body) and served.tags is not None

        def frame(chunk: Chunk, first_frame: bool) -> dict:
            if kind == "chat":
                delta: dict[str, Any] = {"content": chunk.text}
                if show_reasoning and chunk.reasoning_text:
                    delta["reasoning_content"] = chunk.reasoning_text
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
            if chunk.finish_reason is not None and migration is not None and migration.migrations:
                out[MIGRATIONS_FIELD] = [x.as_dict() for x in migration.migrations]
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
                    closer.seen(chunk)
                    yield _sse(frame(chunk, False))
            if include_usage and status == 200:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": served.name,
                        "choices": [],
                        "usage": served.usage(last, kind == "chat"),
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
        ticket: Ticket,
    ) -> None:
        self._api, self._served, self._stream = api, served, stream
        self._last, self._start, self._endpoint = last, start, endpoint
        self._ticket = ticket
        self._status: int | None = None
        self._closed = False

    def seen(self, chunk: Chunk) -> None:
        """The latest chunk sent (its token counts are what a disconnect used)."""
        self._last = chunk

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
        last = self._last
        # Give the admission ticket back first (tokens not generated, fan-out and pool slots): a
        # disconnected client's resources are free before the engine abort completes.
        self._ticket.release(last.prompt_tokens + last.completion_tokens)
        # Closing the backend stream cancels the engine request if it is still running.
        await asyncio.shield(self._stream.aclose())
        self._api._account(self._served, last, self._start, self._endpoint, status)


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


class _BodyLimit:
    """ASGI middleware, outermost: a request body may have at most `max_bytes` bytes (413
    `body_too_large`, from Content-Length before anything is read, else by counting a chunked body,
    which is not read further) and must arrive within `timeout_s` of the request (408
    `body_timeout`)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> _EdgeError:
        return _EdgeError(
            413,
            f"The request body is larger than this server's limit of {self.max_bytes} bytes "
            "(http.max_body_bytes); send a smaller request",
            "body_too_large",
            close=True,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            error = None
            if length < 0:
                error = _EdgeError(
                    400, "content-length: not a byte count", "invalid_header", "content-length", close=True
                )
            elif length > self.max_bytes:
                error = self._too_large()
            if error is not None:
                await error.response()(scope, receive, send)
                return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        done = False
        started = False

        async def limited_receive() -> Any:
            nonlocal received, done
            if done:
                return await receive()
            error: _EdgeError | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                error = _EdgeError(
                    408,
                    f"The request body did not arrive within {self.timeout_s:g} s (http.body_timeout_s)",
                    "body_timeout",
                    close=True,
                )
            else:
                if message["type"] != "http.request":
                    done = True
                    return message
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    error = self._too_large()
                done = not message.get("more_body", False)
                if error is None:
                    return message
            if started:
                # An answer already under way (an endpoint that streams without reading its body)
                # cannot become a 413/408: the client is treated as gone.
                done = True
                return {"type": "http.disconnect"}
            raise error

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _EdgeError as e:  # read outside a FastAPI route (which answers it itself)
            if started:
                raise
            await e.response()(scope, receive, send)


class _CheckedRequest(Request):
    """A request whose JSON body is checked once parsed: a lone surrogate anywhere (a value or a key)
    or nesting past MAX_JSON_DEPTH is a 400 naming the field; invalid UTF-8 and a nesting too deep
    to parse are 400s that say so."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                parsed = json.loads(body)
            except json.JSONDecodeError:
                raise  # FastAPI answers it (400 "not valid JSON")
            except UnicodeDecodeError:
                raise _EdgeError(400, "The request body is not valid UTF-8.", "invalid_body") from None
            except RecursionError:
                msg = f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)."
                raise _EdgeError(400, msg, "invalid_body") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise _EdgeError(400, f"The request body is not valid JSON: {e}", "invalid_body") from None
            problem = body_problem(parsed, body)
            if problem is not None:
                field, msg = problem
                text = f"{field}: {msg}" if field else f"The request body {msg}"
                raise _EdgeError(400, text, "invalid_body", field)
            self._json = parsed
        return self._json


class _CheckedRoute(APIRoute):
    """An API route whose handler reads the body through `_CheckedRequest`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(_CheckedRequest(request.scope, request.receive))

        return checked


def _include_reasoning(body: Any) -> bool:
    return bool(getattr(body, "include_reasoning", False))


def _disagg_header(headers: Any, caller: Caller) -> DisaggMode:
    """The request's `x-tandem-disagg` value (auto when absent); 400 naming the header otherwise, and
    403 for a value other than auto from a key without the `debug` scope: forcing a remote prefill
    would put any client's load on the prefill pool past the router's own P/D decision."""
    if headers is None:
        return DisaggMode.AUTO
    value = headers.get(DISAGG_HEADER)
    if value is None:
        return DisaggMode.AUTO
    value = value.strip().lower()
    try:
        mode = DisaggMode(value)
    except ValueError:
        raise ApiError(
            400,
            f"header {DISAGG_HEADER}: {value!r} is not one of {', '.join(DisaggMode)}",
            "invalid_request_error",
            DISAGG_HEADER,
        ) from None
    if mode is not DisaggMode.AUTO and not caller.debug:
        raise ApiError(
            403,
            f"header {DISAGG_HEADER}: {value!r} overrides the router's prefill/decode decision, which "
            "needs an API key with the `debug` scope; omit the header (or send auto)",
            "permission_error",
            DISAGG_HEADER,
            code="insufficient_scope",
        )
    return mode


def _route_path(scope: Any) -> str:
    """The path the app routes on: `path` less the `root_path` the app is mounted at (Ray Serve puts
    a route_prefix other than "/" in both), as Starlette's router does."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


#: Paths answered without a key (liveness probes).
_OPEN_PATHS = frozenset({"/health"})
#: The API docs pages (served only with `http.docs`); with auth on, any valid key opens them.
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _scope_needed(path: str) -> KeyScope | None:
    """The key scope a path needs with auth on (None: any valid key)."""
    if path == "/metrics":
        return "metrics"
    if path in _DOCS_PATHS:
        return None
    return "inference"


class _Authenticate:
    """ASGI middleware: with auth on, every path but /health needs a valid API key, before the body is
    read (401 otherwise): `/metrics` a key with the `metrics` scope, the docs pages any key, the rest
    (`/v1/*`) a key with the `inference` scope. With auth off, everything is open.

    On `/v1/*`, Tandem's request headers are checked (400 naming the header) and the tenant goes into
    the request's state (`request.state.tenant`), with the key's scopes and models
    (`request.state.caller`, a `Caller`)
    """

    def __init__(self, app: Any, api: OpenAIApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = _route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = self.api.gateway.auth
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            await auth.refresh()  # a key revoked in the keys file stops working
            needed = _scope_needed(path)
            if path.startswith("/v1/"):
                caller = auth.caller(headers.get("authorization"), headers.get(TENANT_HEADER), "inference")
                check_headers(headers, tenant_header=not auth.enabled)
                state = scope.setdefault("state", {})
                state["tenant"], state["caller"] = caller.tenant, caller
            elif needed is None:
                auth.check_key(headers.get("authorization"))
            else:
                auth.tenant(headers.get("authorization"), None, needed)
        except AuthError as e:
            self.api.metrics.auth_failures.labels(e.reason).inc()
            resp = _error_response(
                401,
                e.message,
                "authentication_error",
                None,
                "invalid_api_key",
                {"www-authenticate": "Bearer"},
            )
            await resp(scope, receive, send)
            return
        except ApiError as e:
            await _error_response(e.status, e.message, e.type, e.param, e.code)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
    vocab = getattr(served.tokenizer, "vocab_size", None)
    if ids and vocab is not None and max(ids) >= vocab:
        raise ApiError(
            400,
            f"{param}: token id {max(ids)} is out of range (model `{served.name}` has {vocab} tokens)",
            "invalid_request_error",
            param,
        )


def build_api(
    models: dict[str, ServedModel],
    metrics: IngressMetrics | None = None,
    gateway: Gateway | None = None,
    sessions: SessionsFrontend | None = None,
    http: HttpSpec | None = None,
) -> FastAPI:
    """The FastAPI app serving `models` (`gateway`: auth, tiers, admission; default: none of them;
    `sessions`: /v1/responses, only when given; `http`: body limits and the docs pages, the spec's
    `http`)."""
    metrics = metrics or IngressMetrics()
    http = http or HttpSpec()
    api = OpenAIApi(models, metrics, gateway or Gateway.open(list(models), metrics), http)
    app = FastAPI(
        title="Tandem",
        description="OpenAI-compatible API of a Tandem deployment.",
        version="0.1.0",
        docs_url="/docs" if http.docs else None,
        redoc_url="/redoc" if http.docs else None,
        openapi_url="/openapi.json" if http.docs else None,
    )
    # Every route added from here on (responses.py's too) parses its body through _CheckedRequest.
    app.router.route_class = _CheckedRoute
    for name, served in models.items():
        # The recovery probe of a terminal target: its backend's (backends without one never recover
        # by probe, only by a later success).
        probe = getattr(served.backend, "probe", None)
        if probe is not None:
            api.gateway.register_probe(name, probe)
    app.state.api = api
    app.add_middleware(_JSONBodyByDefault)
    app.add_middleware(_Authenticate, api=api)
    # Outermost: a body past the limit is refused before a key is looked at or a byte is parsed.
    app.add_middleware(_BodyLimit, max_bytes=http.max_body_bytes, timeout_s=http.body_timeout_s)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(_EdgeError)
    async def _edge_error(_: Request, exc: _EdgeError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # A union field (`prompt`: a string or token ids) fails once per branch: the deepest error is
        # the branch the client meant (`prompt.0: ... less than or equal to`, not "a valid string").
        field = tuple(first.get("loc", ()))[:2]
        same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
        first = max(same or [first], key=lambda e: len(e.get("loc", ())))
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
    async def list_models(request: Request) -> dict:
        """The served models this key may call (and `auto` with the tiers it may use)."""
        allowed = request.state.caller.models
        tiers = api.gateway.tiers
        visible = set(tiers.allowed_models(allowed)) if allowed is not None else None
        tier_names = tiers.allowed_tiers(allowed)
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
                if visible is None or m.name in visible
            ]
            + (
                [
                    {
                        "id": tiers.auto_model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tandem",
                        "tiers": tier_names,
                    }
                ]
                if tier_names
                else []
            ),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (streaming with `stream: true`). `model: auto` picks a tier."""

        def check(served: ServedModel) -> None:
            _check_token_ids(served, body.stop_token_ids or [], "stop_token_ids")

        inp = api.plan_input(
            body,
            request.headers,
            request.state.caller,
            None,
            "messages",
            messages=body.messages,
            check=check,
            truncate=truncation_header(request.headers),
            reasoning_effort=body.reasoning_effort,
            tools=bool(body.tools),
            reasoning_budget=body.max_reasoning_tokens,
        )
        return await api.serve("chat", body, inp)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of one prompt (string or token ids). `model: auto` picks a tier."""

        async def encode(served: ServedModel) -> list[int]:
            _check_token_ids(served, body.stop_token_ids or [], "stop_token_ids")
            if isinstance(body.prompt, str):
                ids = await asyncio.to_thread(served.tokenizer.encode, body.prompt)
            else:
                ids = list(body.prompt)
                _check_token_ids(served, ids, "prompt")
            if not ids:
                raise ApiError(400, "prompt: must not be empty", "invalid_request_error", "prompt")
            return ids

        inp = api.plan_input(
            body, request.headers, request.state.caller, encode, "prompt", prompt=body.prompt
        )
        return await api.serve("completion", body, inp)

    if sessions is not None:
        add_responses_routes(app, api.pipeline, sessions)

    return app
