"""The OpenAI-compatible HTTP API (FastAPI), independent of Ray.

`build_api(models, metrics)` returns an ASGI app. Each served model brings a tokenizer and a
`Backend` that streams engine chunks: through Ray Serve handles in production
(`serving.http.ingress`), or an in-process engine in unit tests and benchmarks.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.admission import AdmissionRequest, Rejected, Ticket
from router.contracts import DisaggMode
from router.hashing import BlockHasher, tenant_salt
from router.resilience import ErrorClass, backoff_s, classify
from router.tiers import RequestShape, Resolution, TierError
from serving.backends import Backend
from serving.http.auth import AuthError
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingBody,
    error_body,
    now,
    usage,
)
from serving.http.responses import SessionsFrontend, add_responses_routes
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest
from serving.thinking import ThinkingRun, ThinkTags

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """Tokenizer used at the ingress (see serving.tokenizer.PromptTokenizer)."""

    def encode_chat(self, messages: list[Any]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...


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
    #: Token ids of the reasoning tags (reasoning models); None: a plain model.
    tags: ThinkTags | None = None
    #: Reasoning budget of a request that sets none.
    default_reasoning_budget: int | None = None

    def open_stream(
        self, request: GenerateRequest, budget: int | None, chat: bool = True
    ) -> AsyncIterator[Chunk]:
        """The backend stream; for chat with a reasoning model, through a ThinkingRun: the budget, the
        reasoning token count, and `text` (the answer) split from `reasoning_text`. A text
        completion is raw text: nothing is split or hidden."""
        if self.tags is None or not chat:
            return self.backend.stream(request)
        budget = budget or self.default_reasoning_budget
        # The answer and the reasoning are decoded here from the ids, split at the tags.
        text = getattr(self.tokenizer, "decode_stream", None)
        run = ThinkingRun(
            self.backend.stream, request, request.sampling.max_tokens, budget, self.tags, text=text
        )
        return run.chunks()

    def usage(self, last: Chunk, chat: bool = True) -> dict:
        """The usage block of a finished request (reasoning tokens: chat with a reasoning model)."""
        reasoning = last.reasoning_tokens if self.tags is not None and chat else None
        return usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens, reasoning)


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type_, param, status if code is None else code),
        status_code=status,
        headers=headers,
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
    """Request handlers; one instance per ingress replica."""

    def __init__(self, models: dict[str, ServedModel], metrics: IngressMetrics, gateway: Gateway) -> None:
        self.models = models
        self.metrics = metrics
        self.gateway = gateway

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ApiError(
                404,
                f"The model `{name}` is not served here. Available: {sorted(self.models)}",
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

    async def serve(
        self,
        kind: str,
        body: ChatCompletionRequest | CompletionRequest,
        headers: Any,
        tenant: str,
        encode: Callable[[ServedModel], Awaitable[list[int]]],
        prompt_param: str,
        reasoning_effort: str | None = None,
        tools: bool = False,
        reasoning_budget: int | None = None,
    ) -> Response:
        """Pick the tier, admit, open a stream along the degradation chain, and answer."""
        g = self.gateway
        task = headers.get(TASK_HEADER)
        task_id = headers.get(TASK_ID_HEADER) or None
        rank = self.priority_rank(headers)
        prompts: dict[str, list[int]] = {}

        async def prompt_for(served: ServedModel) -> list[int]:
            ids = prompts.get(served.name)
            if ids is None:
                ids = prompts[served.name] = await encode(served)
            return ids

        try:
            shape = None
            if g.tiers.needs_shape(body.model, task):
                probe_model = self.model(g.tiers.tier(g.tiers.default_tier()).model)
                n = len(await prompt_for(probe_model))
                shape = RequestShape(n, body.requested_max_tokens(), reasoning_effort, tools)
            res = g.tiers.resolve(body.model, task, shape)
        except TierError as e:
            type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
            raise ApiError(e.status, str(e), type_, e.param) from None
        primary = self.model(res.model)
        if reasoning_budget is not None and primary.tags is None:
            raise ApiError(
                400,
                f"max_reasoning_tokens: model `{primary.name}` is not a reasoning model; omit it",
                "invalid_request_error",
                "max_reasoning_tokens",
            )
        prompt_ids = await prompt_for(primary)
        max_tokens = self._max_tokens(primary, body, len(prompt_ids), prompt_param)
        reserved = body.requested_max_tokens() or min(max_tokens, g.default_reserved_tokens)
        try:
            ticket = await g.admission.admit(
                AdmissionRequest(tenant, len(prompt_ids), reserved, task_id, rank)
            )
        except Rejected as e:
            raise self._rejected(e, res.model) from None
        g.budget.on_request()
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        start = time.perf_counter()
        try:
            opened = await self._open(
                rid, body, headers, tenant, res, ticket, prompt_for, max_tokens, reasoning_budget
            )
        except Rejected as e:
            ticket.release(None)
            raise self._rejected(e, res.model) from None
        except BaseException:
            ticket.release(None)
            raise
        served, first, stream, route = opened
        m = self.metrics
        m.in_flight.labels(served.name).inc()
        m.ttft.labels(served.name).observe(time.perf_counter() - start)
        endpoint = "chat" if kind == "chat" else "completions"
        if body.stream:
            closer = _StreamCloser(self, served, stream, first, start, endpoint, ticket)
            gen = self._stream_sse(kind, rid, body, served, first, stream, closer)
            resp: Response = _ClosingStreamingResponse(gen, closer)
        else:
            last = first
            try:
                resp, last = await self._collect(
                    kind, rid, served, first, stream, start, endpoint, _include_reasoning(body)
                )
            finally:
                m.in_flight.labels(served.name).dec()
                ticket.release(last.prompt_tokens + last.completion_tokens)
        resp.headers[ROUTE_HEADER] = route
        return resp

    def priority_rank(self, headers: Any) -> int:
        """The request's priority class (`x-tandem-priority`, capped by the tenant's); 400 if unknown."""
        try:
            return self.gateway.priority_rank(headers.get(PRIORITY_HEADER))
        except ValueError:
            raise ApiError(
                400,
                f"header {PRIORITY_HEADER}: {headers.get(PRIORITY_HEADER)!r} is not one of "
                "interactive, standard, batch",
                "invalid_request_error",
                PRIORITY_HEADER,
            ) from None

    def _rejected(self, e: Rejected, model: str) -> ApiError:
        self.metrics.rejections.labels(e.reason, model).inc()
        headers = {}
        retry = e.retry_after_header()
        if retry is not None:
            headers["retry-after"] = retry
        if e.status == 429:
            type_ = "rate_limit_error"
        elif e.status == 503:
            type_ = "service_unavailable_error"
        else:
            type_ = "invalid_request_error"
        param = "max_tokens" if e.reason == "request_too_large" else None
        return ApiError(e.status, e.message, type_, param, code=e.reason, headers=headers)

    async def _open(
        self,
        rid: str,
        body: ChatCompletionRequest | CompletionRequest,
        headers: Any,
        tenant: str,
        res: Resolution,
        ticket: Ticket,
        prompt_for: Callable[[ServedModel], Awaitable[list[int]]],
        max_tokens: int,
        reasoning_budget: int | None = None,
    ) -> tuple[ServedModel, Chunk, AsyncIterator[Chunk], str]:
        """The first chunk of the first target along the chain that answers (Rejected 503 if none).

        Per target: skip it if its health is terminal or the request does not fit its context;
        otherwise take a pool slot and wait for the first token. Failures are classified
        (router.resilience): 4xx is returned as is; 429 honours Retry-After; 5xx and timeouts are
        retried on the same target with backoff while it is not terminal and the retry budget
        allows, then the next target is tried.
        """
        g = self.gateway
        r = g.resilience
        chain = g.tiers.chain(res)
        skipped: list[str] = []
        session = headers.get(SESSION_HEADER)
        disagg = _disagg_header(headers)
        requested = body.requested_max_tokens()
        for i, target in enumerate(chain):
            served = self.models.get(target.model)
            if served is None:
                skipped.append(f"{target.model}: not served here")
                continue
            health = g.health(target.model)
            if not health.usable:
                skipped.append(f"{target.model}: {health.state.value} ({health.reason})")
                continue
            ids = await prompt_for(served)
            if i == 0:
                out_tokens = max_tokens
            else:
                room = served.max_model_len - len(ids)
                if room < (requested or 1):
                    skipped.append(
                        f"{target.model}: context window {served.max_model_len} cannot hold "
                        f"{len(ids)} prompt + {requested or 1} output tokens"
                    )
                    continue
                out_tokens = requested or room
            tier = g.tiers.tier(target.tier) if target.tier else None
            slo = tier.ttft_slo_s if tier else None
            timeout = (tier.first_token_timeout_s if tier else None) or r.first_token_timeout_s
            salt = tenant_salt(tenant) if served.salt_tenants else None
            keys = await _block_keys(served, ids, salt)
            attempt = 0
            while True:
                attempt += 1
                await ticket.enter_pool(target.model, slo)
                req = GenerateRequest(
                    rid if i == 0 and attempt == 1 else f"{rid}-{i}.{attempt}",
                    ids,
                    body.sampling(out_tokens),
                    disagg=disagg,
                    cache_salt=salt,
                    block_keys=keys,
                    tenant=tenant,
                    session_id=session,
                )
                stream = served.open_stream(req, reasoning_budget, isinstance(body, ChatCompletionRequest))
                err: EngineError | None = None
                timed_out = False
                try:
                    first, why = await _first_chunk(stream, timeout, g.terminal_event(target.model))
                    if first is not None:
                        err = first.error
                    elif why == "timeout":
                        timed_out = True
                    else:
                        err = EngineError(f"pool went down while waiting: {health.reason}", 503, why)
                except BaseException:
                    ticket.leave_pool()
                    await asyncio.shield(stream.aclose())
                    raise
                now = time.monotonic()
                if first is not None and err is None:
                    health.on_success(now)
                    degraded = i > 0
                    self.metrics.tier_requests.labels(
                        target.tier or "", served.name, res.how, str(degraded).lower()
                    ).inc()
                    route = f"tier={target.tier or '-'}; model={served.name}; how={res.how}"
                    if degraded:
                        route += f"; degraded_from={chain[0].tier or chain[0].model}; degraded_reason="
                        route += skipped[0].split(": ", 1)[1].replace(";", ",") if skipped else "unknown"
                    if first.route is not None:
                        route += "; " + first.route.header()
                    return served, first, stream, route
                await stream.aclose()
                ticket.leave_pool()
                cls = classify(err.status if err else None, timed_out)
                self.metrics.attempt_failures.labels(target.model, cls.value).inc()
                if cls is ErrorClass.CLIENT:
                    assert err is not None
                    raise ApiError(err.status, err.message, err.type)
                if cls is ErrorClass.RATE_LIMITED:
                    assert err is not None
                    delay = err.retry_after_s or backoff_s(attempt, r.backoff_base_s, r.backoff_max_s)
                    if attempt < r.max_attempts and g.budget.try_retry():
                        self.metrics.retries.labels(target.model, cls.value).inc()
                        await asyncio.sleep(delay)
                        continue
                    raise Rejected("engine_overloaded", err.message, delay)
                reason = f"timeout after {timeout:g}s" if timed_out else f"{err.status} {err.type}"
                health.on_failure(reason, now)
                if health.usable and attempt < r.max_attempts and g.budget.try_retry():
                    self.metrics.retries.labels(target.model, cls.value).inc()
                    await asyncio.sleep(backoff_s(attempt, r.backoff_base_s, r.backoff_max_s))
                    continue
                skipped.append(f"{target.model}: {reason}")
                break
        raise Rejected(
            "pool_down",
            "no model along the degradation chain could serve this request: " + "; ".join(skipped),
            r.probe_interval_s,
            status=503,
        )

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


#: Request header: the tenant, honoured only when auth is disabled (local use, tests).
TENANT_HEADER = "x-tandem-tenant"
#: Request header: the tier of a `model: auto` request (intent, reasoning, ...).
TASK_HEADER = "x-tandem-task"
#: Request header: the agent task a call belongs to (its fan-out semaphore).
TASK_ID_HEADER = "x-tandem-task-id"
#: Request header: priority class (interactive | standard | batch), at most the tenant's.
PRIORITY_HEADER = "x-tandem-priority"
#: Request header: a conversation's session id (session affinity in the router).
SESSION_HEADER = "x-session-id"
#: Prompts longer than this are hashed in a worker thread (SHA-256 per block).
_INLINE_HASH_TOKENS = 2048
#: Request header: prefill/decode disaggregation for this request (on | off | auto).
DISAGG_HEADER = "x-tandem-disagg"
#: Response header: how the request was served (mode, prefill replica, decode replica).
ROUTE_HEADER = "x-tandem-route"


def _include_reasoning(body: Any) -> bool:
    return bool(getattr(body, "include_reasoning", False))


def _disagg_header(headers: Any) -> DisaggMode:
    """The request's `x-tandem-disagg` value (auto when absent); 400 naming the header otherwise."""
    if headers is None:
        return DisaggMode.AUTO
    value = headers.get(DISAGG_HEADER)
    if value is None:
        return DisaggMode.AUTO
    value = value.strip().lower()
    try:
        return DisaggMode(value)
    except ValueError:
        raise ApiError(
            400,
            f"header {DISAGG_HEADER}: {value!r} is not one of {', '.join(DisaggMode)}",
            "invalid_request_error",
            DISAGG_HEADER,
        ) from None


async def _first_chunk(
    stream: AsyncIterator[Chunk], max_wait_s: float, down: asyncio.Event
) -> tuple[Chunk | None, str]:
    """The stream's first chunk, or None and why not: "timeout", "pool_down" (the target went terminal
    while waiting, e.g. its last replica died), or "empty" (the stream ended without a chunk)."""
    first = asyncio.ensure_future(anext(stream))
    went_down = asyncio.ensure_future(down.wait())
    try:
        done, _ = await asyncio.wait(
            {first, went_down}, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        went_down.cancel()
        if not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
    if first in done:
        try:
            return first.result(), "ok"
        except StopAsyncIteration:
            return Chunk(error=EngineError("the engine ended the stream without output", 502, "empty")), "ok"
        except Exception as e:  # a backend that raises instead of yielding an error chunk: a 5xx
            logger.warning("backend stream raised %s: %s", type(e).__name__, e)
            return Chunk(error=EngineError(f"backend error: {type(e).__name__}", 502, "backend_error")), "ok"
    return None, "pool_down" if went_down in done else "timeout"


async def _block_keys(served: ServedModel, ids: list[int], salt: str | None) -> list[int]:
    """The prompt's chained block hashes for the router (long prompts hashed in a thread)."""
    if served.hasher is None:
        return []
    if len(ids) > _INLINE_HASH_TOKENS:
        return await asyncio.to_thread(served.hasher.keys, ids, salt)
    return served.hasher.keys(ids, salt)


def _route_path(scope: Any) -> str:
    """The path the app routes on: `path` less the `root_path` the app is mounted at (Ray Serve puts
    a route_prefix other than "/" in both), as Starlette's router does."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class _Authenticate:
    """ASGI middleware: `/v1/*` requests need a valid API key (401 otherwise, before the body is read).

    The tenant goes into the request's state (`request.state.tenant`).
    """

    def __init__(self, app: Any, api: OpenAIApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _route_path(scope).startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                tenant = self.api.gateway.auth.tenant(
                    headers.get("authorization"), headers.get(TENANT_HEADER)
                )
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
            scope.setdefault("state", {})["tenant"] = tenant
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
) -> FastAPI:
    """The FastAPI app serving `models` (`gateway`: auth, tiers, admission; default: none of them;
    `sessions`: /v1/responses, only when given)."""
    metrics = metrics or IngressMetrics()
    api = OpenAIApi(models, metrics, gateway or Gateway.open(list(models), metrics))
    app = FastAPI(
        title="Tandem",
        description="OpenAI-compatible API of a Tandem deployment.",
        version="0.1.0",
    )
    for name, served in models.items():
        # The recovery probe of a terminal target: its backend's (backends without one never recover
        # by probe, only by a later success).
        probe = getattr(served.backend, "probe", None)
        if probe is not None:
            api.gateway.register_probe(name, probe)
    app.state.api = api
    app.add_middleware(_JSONBodyByDefault)
    app.add_middleware(_Authenticate, api=api)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

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
            ]
            + (
                [
                    {
                        "id": api.gateway.tiers.auto_model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tandem",
                        "tiers": api.gateway.tiers.tiers,
                    }
                ]
                if api.gateway.tiers.tiers
                else []
            ),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion (streaming with `stream: true`). `model: auto` picks a tier."""
        _disagg_header(request.headers)

        async def encode(served: ServedModel) -> list[int]:
            _check_token_ids(served, body.stop_token_ids or [], "stop_token_ids")
            return await asyncio.to_thread(served.tokenizer.encode_chat, body.messages)

        return await api.serve(
            "chat",
            body,
            request.headers,
            request.state.tenant,
            encode,
            "messages",
            reasoning_effort=body.reasoning_effort,
            tools=bool(body.tools),
            reasoning_budget=body.max_reasoning_tokens,
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of one prompt (string or token ids). `model: auto` picks a tier."""
        _disagg_header(request.headers)

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

        return await api.serve("completion", body, request.headers, request.state.tenant, encode, "prompt")

    if sessions is not None:
        add_responses_routes(app, api, sessions)

    return app
