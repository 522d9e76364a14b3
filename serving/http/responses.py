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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

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
from serving.sessions.store import QuotaExceeded, SessionRecord, SessionStore
from serving.sessions.worker import cancel_session

logger = logging.getLogger(__name__)

#: How long `POST /v1/responses/{id}/cancel` waits for the worker to confirm before answering.
CANCEL_WAIT_S = 2.0


@dataclass
class SessionsFrontend:
    """What the HTTP side of sessions needs.

    Args:
        store: the durable session store (shared with the workers).
        notify: hands a new session id to a worker (best effort: workers also sweep the store).
        poll_s: how often a reader checks the store for new events.
    """

    store: SessionStore
    notify: Callable[[str], Awaitable[Any]]
    poll_s: float = 0.05


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

    def event_stream(rid: str, tenant: str, after: int, cancel_on_leave: bool) -> Response:
        state = {"ended": False}

        async def events() -> AsyncIterator[bytes]:
            nonlocal after
            idle = 0
            while True:
                evs = await asyncio.to_thread(store.events, rid, after)
                for ev in evs:
                    after = ev.seq
                    yield _sse_event(ev.data)
                    if ev.type in TERMINAL_EVENTS:
                        state["ended"] = True
                        return
                idle = 0 if evs else idle + 1
                if idle == 1 or idle and idle % 20 == 0:
                    # Nothing new: is the session gone, or over (a reader already past its end)?
                    rec = await asyncio.to_thread(store.get, rid, tenant)
                    if rec is None:
                        state["ended"] = True
                        yield _sse_event(
                            {"type": "error", "code": "not_found", "message": f"{rid} was deleted"}
                        )
                        return
                    if rec.status.finished and not await asyncio.to_thread(store.events, rid, after):
                        state["ended"] = True
                        return
                await asyncio.sleep(sessions.poll_s)

        async def on_close() -> None:
            if cancel_on_leave and not state["ended"]:
                logger.info("client left the stream of %s: cancelling it", rid)
                await asyncio.to_thread(cancel_session, store, rid, tenant)

        return _EventStream(events(), on_close)

    async def wait_finished(rid: str, tenant: str) -> SessionRecord | None:
        while True:
            rec = await asyncio.to_thread(store.get, rid, tenant)
            if rec is None or rec.status.finished:
                return rec
            await asyncio.sleep(sessions.poll_s * 4)

    @app.post("/v1/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        """Create a response: a stored session run by a worker (see `background` and `stream`)."""
        tenant: str = request.state.tenant
        headers = request.headers
        messages: list[ChatMessage] = []
        if body.previous_response_id:
            prev = await asyncio.to_thread(store.get, body.previous_response_id, tenant)
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
            )
        )
        ticket = await pipeline.admit(plan)
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
            await asyncio.to_thread(store.create, rec)
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
            resp = event_stream(rid, tenant, -1, cancel_on_leave=not body.background)
        elif body.background:
            resp = JSONResponse(response_object(rec))
        else:
            try:
                done = await wait_finished(rid, tenant)
            except asyncio.CancelledError:
                await asyncio.shield(asyncio.to_thread(cancel_session, store, rid, tenant))
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
        rec = await asyncio.to_thread(store.get, response_id, tenant)
        if rec is None:
            raise _not_found(response_id)
        if stream:
            after = -1 if starting_after is None else starting_after
            if after < -1:
                raise ApiError(400, "starting_after: must be >= 0", "invalid_request_error", "starting_after")
            return event_stream(response_id, tenant, after, cancel_on_leave=False)
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
        rec = await asyncio.to_thread(cancel_session, store, response_id, tenant)
        if rec is None:
            raise _not_found(response_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not rec.status.finished and time.monotonic() < deadline:
            await asyncio.sleep(sessions.poll_s)
            rec = await asyncio.to_thread(store.get, response_id, tenant) or rec
        return JSONResponse(response_object(rec))

    @app.delete("/v1/responses/{response_id}", response_model=None)
    async def delete_response(response_id: str, request: Request) -> Response:
        """Delete a response and its log (a running one is cancelled first)."""
        tenant = request.state.tenant
        rec = await asyncio.to_thread(store.get, response_id, tenant)
        if rec is None:
            raise _not_found(response_id)
        if not rec.status.finished:
            await asyncio.to_thread(cancel_session, store, response_id, tenant)
        if not await asyncio.to_thread(store.delete, response_id, tenant):
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _answer_text(result: dict[str, Any]) -> str:
    for item in result.get("output", []):
        if item.get("type") == "message":
            return "".join(p.get("text", "") for p in item.get("content", []))
    return ""
