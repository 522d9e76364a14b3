"""`/v1/responses`: the OpenAI Responses API (a subset) over background sessions.

The ingress validates, picks the tier, admits and tokenizes, then stores the request as a session
(serving.sessions.store) and tells a session worker (serving.sessions.worker). Everything it answers
afterwards is read from the store, so polling, streaming, resuming from an event number
(`?stream=true&starting_after=N`), cancelling and deleting work whichever ingress replica is asked,
and after an ingress or worker restart.

- `background: true`: answered at once with the queued response; the session runs regardless.
- `stream: true`: the session's events as server-sent events (`event: <type>` / `data: <json>`), until
  the terminal event. Without `background`, a client that leaves cancels the session, as OpenAI does.
- neither: the request waits for the session to end and answers with the response object.

Another tenant's id is answered with 404, exactly like an id that does not exist.

Limits (config.SessionsSpec):

- a session is charged to its tenant's token bucket up front, for all it may generate: the client's
  max_output_tokens, else `default_max_output_tokens` (at most the context's rest);
- streams and waiting creates cost no tokens, so a tenant holds at most `max_streams_per_tenant` of
  them open on a replica (429 `too_many_streams` past it). A stream reads the session's new events by
  number and, now and then, its status (never the whole record); its pause between reads doubles
  while nothing happens, up to `stream_poll_max_s`; an idle stream gets `: keepalive` comments every
  `stream_heartbeat_s`; a waiting create answers after `wait_max_s` at the latest;
- store calls run on the frontend's own threads (`store.io_threads`), not the default pool that
  tokenizes chat requests. A store that does not answer is a 503 `store_unavailable` with
  Retry-After, or an `error` event on a stream that is open already.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.config import SessionsSpec
from serving.http.pipeline import PlanInput, RequestPipeline
from serving.http.protocol import (
    PRIORITY_HEADER,
    ROUTE_HEADER,
    TASK_HEADER,
    TASK_ID_HEADER,
    TRUNCATED_HEADER,
    ApiError,
    ChatMessage,
    ResponsesRequest,
    max_tokens_clamp,
)
from serving.sessions.events import TERMINAL_EVENTS, new_response_id, response_object
from serving.sessions.request import SessionRequest
from serving.sessions.store import (
    QuotaExceeded,
    SessionHead,
    SessionRecord,
    SessionStore,
    head_of,
    store_unavailable,
)
from serving.sessions.worker import cancel_session_here

logger = logging.getLogger(__name__)

#: How long `POST /v1/responses/{id}/cancel` waits for the worker to confirm before answering.
CANCEL_WAIT_S = 2.0
#: A stream reads its session's status every this many reads that found no new event.
_STATUS_EVERY = 10

_T = TypeVar("_T")


@dataclass
class SessionsFrontend:
    """What the HTTP side of sessions needs.

    Args:
        store: the durable session store (shared with the workers).
        notify: hands a new session id to a worker (best effort: workers also sweep the store).
        poll_s: the shortest pause between a reader's store reads (None: spec.stream_poll_s).
        spec: the sessions' limits (streams per tenant, poll backoff, heartbeat, wait bound, the
            default output limit) and the store's threads and Retry-After.
        on_cancelled: told the id of a queued session this ingress cancelled itself (no worker ran
            it, so none reports it: a worker's `report` fires its webhook); best effort.
    """

    store: SessionStore
    notify: Callable[[str], Awaitable[Any]]
    poll_s: float | None = None
    spec: SessionsSpec = field(default_factory=SessionsSpec)
    on_cancelled: Callable[[str], Awaitable[Any]] | None = None

    def __post_init__(self) -> None:
        if self.poll_s is None:
            self.poll_s = self.spec.stream_poll_s
        self._poll_max_s = max(self.poll_s, self.spec.stream_poll_max_s)
        self._pool = ThreadPoolExecutor(self.spec.store.io_threads, thread_name_prefix="session-store")
        self._streams: dict[str, int] = {}

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` (a blocking store call) on the store's threads; a store that does not answer
        is an ApiError 503 `store_unavailable` with Retry-After."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except Exception as e:
            if not store_unavailable(e):
                raise
            name = getattr(fn, "__name__", "call")
            logger.warning("session store unavailable (%s: %s: %s)", name, type(e).__name__, e)
            retry = self.spec.store.retry_after_s
            raise ApiError(
                503,
                f"The response store is not answering ({type(e).__name__}); retry in {retry} s.",
                "service_unavailable_error",
                code="store_unavailable",
                headers={"retry-after": str(retry)},
            ) from None

    def open_stream(self, tenant: str) -> Callable[[], None]:
        """Count a stream (or a waiting create) of `tenant`; returns what ends it (idempotent).
        ApiError 429 `too_many_streams` when the tenant holds `max_streams_per_tenant` already."""
        held = self._streams.get(tenant, 0)
        most = self.spec.max_streams_per_tenant
        if held >= most:
            retry = self.spec.stream_retry_after_s
            raise ApiError(
                429,
                f"tenant {tenant!r} holds {held} open response streams and waiting requests on this "
                f"replica, the most it may (sessions.max_streams_per_tenant = {most}). Close one, or "
                "poll GET /v1/responses/{id} instead.",
                "rate_limit_error",
                code="too_many_streams",
                headers={"retry-after": str(retry)},
            )
        self._streams[tenant] = held + 1
        done = False

        def close() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self._streams[tenant] - 1
            if left:
                self._streams[tenant] = left
            else:
                del self._streams[tenant]

        return close

    def open_streams(self, tenant: str) -> int:
        """Streams and waiting creates `tenant` holds open here."""
        return self._streams.get(tenant, 0)

    def backoff(self, delay: float) -> float:
        """The next pause of a reader that found nothing new after pausing `delay`."""
        return min(delay * 2, self._poll_max_s)

    def close(self) -> None:
        """Stop the store threads (calls still queued are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _not_found(rid: str) -> ApiError:
    return ApiError(404, f"No response found with id '{rid}'.", "not_found_error", "response_id")


def _sse_event(data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {data['type']}\ndata: {body}\n\n".encode()


class _EventStream(StreamingResponse):
    """Server-sent events of one session read from the store; `on_close` runs however it ends
    (Starlette does not close a body iterator when the client leaves)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._on_close())


def add_responses_routes(app: FastAPI, pipeline: RequestPipeline, sessions: SessionsFrontend) -> None:
    """Register the /v1/responses routes on `app` (requests planned and admitted by `pipeline`)."""
    store = sessions.store
    spec = sessions.spec
    poll_s: float = sessions.poll_s  # type: ignore[assignment]  # set by __post_init__

    async def head(rid: str, tenant: str) -> SessionHead | None:
        """The tenant's session's status, without reading its record (None: none by that id)."""
        h = await sessions.call(head_of, store, rid)
        return h if h is not None and h.tenant == tenant else None

    async def cancel(rid: str, tenant: str) -> SessionRecord | None:
        """Cancel the tenant's session (the record after it; None: none by that id)."""
        rec, here = await sessions.call(cancel_session_here, store, rid, tenant)
        if here and sessions.on_cancelled is not None:
            try:
                await sessions.on_cancelled(rid)
            except Exception as e:  # the cancel stands; a worker's outbox poll delivers its webhook
                logger.warning(
                    "could not report the cancel of %s to a session worker (%s); its webhook goes out "
                    "on a worker's next outbox poll",
                    rid,
                    e,
                )
        return rec

    async def cancel_quietly(rid: str, tenant: str) -> None:
        try:
            await cancel(rid, tenant)
        except Exception as e:  # a store that does not answer: the session runs on, as if background
            logger.warning("could not cancel %s (%s)", rid, e)

    def event_stream(
        rid: str, tenant: str, after: int, cancel_on_leave: bool, close_slot: Callable[[], None]
    ) -> Response:
        state = {"ended": False}

        async def events() -> AsyncIterator[bytes]:
            nonlocal after
            idle, delay = 0, poll_s
            quiet_since = time.monotonic()
            try:
                while True:
                    evs = await sessions.call(store.events, rid, after)
                    for ev in evs:
                        after = ev.seq
                        yield _sse_event(ev.data)
                        if ev.type in TERMINAL_EVENTS:
                            state["ended"] = True
                            return
                    if evs:
                        idle, delay, quiet_since = 0, poll_s, time.monotonic()
                    else:
                        idle += 1
                        if idle % _STATUS_EVERY == 1:
                            # Nothing new: is the session gone, or over (a reader already past its end)?
                            h = await head(rid, tenant)
                            if h is None:
                                state["ended"] = True
                                yield _sse_event(
                                    {"type": "error", "code": "not_found", "message": f"{rid} was deleted"}
                                )
                                return
                            if h.status.finished and not await sessions.call(store.events, rid, after):
                                state["ended"] = True
                                return
                        if time.monotonic() - quiet_since >= spec.stream_heartbeat_s:
                            yield b": keepalive\n\n"
                            quiet_since = time.monotonic()
                        delay = sessions.backoff(delay)
                    await asyncio.sleep(delay)
            except ApiError as e:  # the store stopped answering: say so, and end the stream
                yield _sse_event({"type": "error", "code": e.code, "message": e.message})

        async def on_close() -> None:
            close_slot()
            if cancel_on_leave and not state["ended"]:
                logger.info("the stream of %s ended before the session: cancelling it", rid)
                await cancel_quietly(rid, tenant)

        return _EventStream(events(), on_close)

    async def wait_finished(rid: str, tenant: str) -> SessionRecord | None:
        """The finished record (None: deleted meanwhile), or the record as it stands after
        `wait_max_s`. Polls the status only, with backoff."""
        deadline = time.monotonic() + spec.wait_max_s
        delay = poll_s
        while True:
            h = await head(rid, tenant)
            if h is None:
                return None
            left = deadline - time.monotonic()
            if h.status.finished or left <= 0:
                return await sessions.call(store.get, rid, tenant)
            await asyncio.sleep(min(delay, left))
            delay = sessions.backoff(delay)

    @app.post("/v1/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        """Create a response: a stored session run by a worker (see `background` and `stream`)."""
        tenant: str = request.state.tenant
        # A stream or a wait holds a slot of the tenant's streams, taken before any work is done.
        holds = body.stream or not body.background
        close_slot = sessions.open_stream(tenant) if holds else _nothing
        handed = [False]  # the slot went to a stream, which ends it
        try:
            return await create(body, request, tenant, close_slot, handed)
        finally:
            if not handed[0]:
                close_slot()

    async def create(
        body: ResponsesRequest,
        request: Request,
        tenant: str,
        close_slot: Callable[[], None],
        handed: list[bool],
    ) -> Response:
        headers = request.headers
        messages: list[ChatMessage] = []
        if body.previous_response_id:
            prev = await sessions.call(store.get, body.previous_response_id, tenant)
            if prev is None:
                raise ApiError(
                    404,
                    f"previous_response_id: no response found with id '{body.previous_response_id}'",
                    "not_found_error",
                    "previous_response_id",
                )
            if not prev.status.finished or prev.result is None:
                raise ApiError(
                    400,
                    f"previous_response_id: response '{prev.id}' is still {prev.status.value}",
                    "invalid_request_error",
                    "previous_response_id",
                )
            messages += [ChatMessage(**m) for m in SessionRequest.from_dict(prev.request).messages]
            answer = _answer_text(prev.result)
            messages.append(ChatMessage(role="assistant", content=answer))
        if isinstance(body.input, str):
            messages.append(ChatMessage(role="user", content=body.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in body.input]
        system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        full = system + messages
        effort = body.reasoning.effort if body.reasoning else None
        plan = await pipeline.plan(
            PlanInput(
                model=body.model,
                tenant=tenant,
                encode=None,
                messages=full,
                truncate=body.truncation == "auto",
                clamp=max_tokens_clamp(headers),
                sampling_set=frozenset(body.model_fields_set),
                requested_max_tokens=body.max_output_tokens,
                prompt_param="input",
                max_tokens_param="max_output_tokens",
                task=headers.get(TASK_HEADER),
                task_id=headers.get(TASK_ID_HEADER),
                rank=pipeline.priority_rank(headers.get(PRIORITY_HEADER)),
                reasoning_effort=effort,
                reasoning_budget=body.reasoning.max_tokens if body.reasoning else None,
                budget_param="reasoning.max_tokens",
                first_usable=True,  # a session is opened by a worker, on this model
                allowed_models=request.state.caller.models,
            )
        )
        # A session is charged up front for all it may generate (its usage is never reconciled: it
        # runs on a worker after this answers), so without max_output_tokens it may generate
        # sessions.default_max_output_tokens, not the whole rest of the context.
        if plan.requested is None:
            plan.max_tokens = min(plan.max_tokens, spec.default_max_output_tokens)
        plan.reserved = plan.max_tokens
        try:
            ticket = await pipeline.admit(plan)
        except ApiError as e:
            if e.code != "request_too_large":
                raise
            hint = (
                ""
                if plan.requested is not None
                else f" (a response without max_output_tokens may generate up to "
                f"{plan.max_tokens}, sessions.default_max_output_tokens, and is charged for them)"
            )
            raise ApiError(
                e.status,
                e.message.replace("max_tokens", "max_output_tokens") + hint,
                e.type,
                "max_output_tokens",
                e.code,
                e.headers,
            ) from None
        # A session holds no fan-out or pool slot (it runs detached); its tokens are charged up front.
        ticket.release(len(plan.prompt_ids) + plan.reserved)
        served = plan.served
        rid = new_response_id()
        summary = body.reasoning.summary if body.reasoning and served.tags is not None else None
        opts = plan.sampling(body.sampling(plan.max_tokens))
        request = SessionRequest(
            prompt_ids=plan.prompt_ids,
            sampling={
                "temperature": opts.temperature,
                "top_p": opts.top_p,
                "seed": opts.seed,
                "stop": opts.stop,
            },
            max_output_tokens=plan.max_tokens,
            reasoning_budget=plan.reasoning_budget,
            summary=summary,
            cache_salt=plan.salt,
            block_keys=plan.block_keys,
            max_output_tokens_asked=body.max_output_tokens,
            background=body.background,
            instructions=body.instructions,
            metadata=body.metadata or {},
            previous_response_id=body.previous_response_id,
            reasoning={
                "effort": effort,
                "summary": body.reasoning.summary if body.reasoning else None,
                "max_tokens": plan.reasoning_budget,
            },
            messages=[m.model_dump(exclude_none=True) for m in messages],
            template=plan.template_ref,
            template_tokens=plan.template_tokens,
            truncation={
                "mode": body.truncation,
                "dropped_items": plan.dropped_items,
                "dropped_tokens": plan.dropped_tokens,
            },
            max_output_tokens_clamped_from=plan.clamped_from,
        )
        rec = SessionRecord(id=rid, tenant=tenant, model=served.name, request=request.to_dict())
        try:
            await sessions.call(store.create, rec)
        except QuotaExceeded as e:
            pipeline.metrics.rejections.labels("session_quota", served.name).inc()
            raise ApiError(429, str(e), "rate_limit_error", code="session_quota") from None
        pipeline.metrics.sessions.labels(served.name).inc()
        try:
            await sessions.notify(rid)
        except Exception as e:  # a worker's sweep claims it anyway
            logger.warning("could not hand %s to a session worker (%s); the sweep will", rid, e)
        resp: Response
        if body.stream:
            resp = event_stream(rid, tenant, -1, not body.background, close_slot)
            handed[0] = True
        elif body.background:
            resp = JSONResponse(response_object(rec))
        else:
            try:
                done = await wait_finished(rid, tenant)
            except (asyncio.CancelledError, ApiError):  # the client left, or the store stopped answering
                await asyncio.shield(cancel_quietly(rid, tenant))
                raise
            resp = JSONResponse(response_object(done) if done is not None else response_object(rec))
        route = pipeline.session_route(plan)
        resp.headers[ROUTE_HEADER] = route
        truncated = plan.truncation_header()
        if truncated:
            resp.headers[TRUNCATED_HEADER] = truncated
        return resp

    @app.get("/v1/responses/{response_id}", response_model=None)
    async def get_response(
        response_id: str, request: Request, stream: bool = False, starting_after: int | None = None
    ) -> Response:
        """The response object; with `stream=true`, its events after `starting_after` (resume)."""
        tenant = request.state.tenant
        if stream:
            after = -1 if starting_after is None else starting_after
            if after < -1:
                raise ApiError(400, "starting_after: must be >= 0", "invalid_request_error", "starting_after")
            if await head(response_id, tenant) is None:  # the status only: the record is not needed
                raise _not_found(response_id)
            return event_stream(response_id, tenant, after, False, sessions.open_stream(tenant))
        rec = await sessions.call(store.get, response_id, tenant)
        if rec is None:
            raise _not_found(response_id)
        if starting_after is not None:
            raise ApiError(
                400,
                "starting_after: only with stream=true",
                "invalid_request_error",
                "starting_after",
            )
        return JSONResponse(response_object(rec))

    @app.post("/v1/responses/{response_id}/cancel", response_model=None)
    async def cancel_response(response_id: str, request: Request) -> Response:
        """Cancel a queued or running response (its engine request is aborted); idempotent."""
        tenant = request.state.tenant
        rec = await cancel(response_id, tenant)
        if rec is None:
            raise _not_found(response_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        finished = rec.status.finished
        while not finished and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
            h = await head(response_id, tenant)
            finished = h is None or h.status.finished
        if not rec.status.finished:
            rec = await sessions.call(store.get, response_id, tenant) or rec
        return JSONResponse(response_object(rec))

    @app.delete("/v1/responses/{response_id}", response_model=None)
    async def delete_response(response_id: str, request: Request) -> Response:
        """Delete a response and its log (a running one is cancelled first)."""
        tenant = request.state.tenant
        h = await head(response_id, tenant)
        if h is None:
            raise _not_found(response_id)
        if not h.status.finished:
            await cancel(response_id, tenant)
        if not await sessions.call(store.delete, response_id, tenant):
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _nothing() -> None:
    """The slot of a request that holds none."""


def _answer_text(result: dict[str, Any]) -> str:
    for item in result.get("output", []):
        if item.get("type") == "message":
            return "".join(p.get("text", "") for p in item.get("content", []))
    return ""
