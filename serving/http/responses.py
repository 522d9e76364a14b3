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
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.admission import AdmissionRequest, Rejected
from router.hashing import tenant_salt
from router.tiers import RequestShape, TierError
from serving.http.protocol import ChatMessage, ResponsesRequest
from serving.sessions.events import TERMINAL_EVENTS, new_response_id, response_object
from serving.sessions.store import QuotaExceeded, SessionRecord, SessionStore
from serving.sessions.worker import cancel_session

if TYPE_CHECKING:
    from serving.http.api import OpenAIApi, ServedModel

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


def _not_found(rid: str) -> Any:
    from serving.http.api import ApiError

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


def add_responses_routes(app: FastAPI, api: OpenAIApi, sessions: SessionsFrontend) -> None:
    """Register the /v1/responses routes on `app`."""
    from serving.http.api import (
        TASK_HEADER,
        TASK_ID_HEADER,
        ApiError,
        _block_keys,
    )

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

    def pick_target(res: Any) -> ServedModel:
        """The first model along the tier's chain that is usable and can hold the request."""
        g = api.gateway
        skipped = []
        for target in g.tiers.chain(res):
            served = api.models.get(target.model)
            if served is None:
                continue
            if not g.health(target.model).usable:
                skipped.append(f"{target.model}: {g.health(target.model).state.value}")
                continue
            return served
        raise ApiError(
            503,
            "no model along the tier's degradation chain is available: " + "; ".join(skipped),
            "service_unavailable_error",
            code="pool_down",
        )

    @app.post("/v1/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        """Create a response: a stored session run by a worker (see `background` and `stream`)."""
        tenant: str = request.state.tenant
        headers = request.headers
        g = api.gateway
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
            messages += [ChatMessage(**m) for m in prev.request.get("messages", [])]
            answer = _answer_text(prev.result)
            messages.append(ChatMessage(role="assistant", content=answer))
        if isinstance(body.input, str):
            messages.append(ChatMessage(role="user", content=body.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in body.input]
        system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        full = system + messages
        effort = body.reasoning.effort if body.reasoning else None
        asked = body.max_output_tokens
        task = headers.get(TASK_HEADER)
        rank = api.priority_rank(headers)
        try:
            shape = None
            if g.tiers.needs_shape(body.model, task):
                probe = api.model(g.tiers.tier(g.tiers.default_tier()).model)
                n = len(await asyncio.to_thread(probe.tokenizer.encode_chat, full))
                shape = RequestShape(n, asked, effort, False)
            res = g.tiers.resolve(body.model, task, shape)
        except TierError as e:
            type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
            raise ApiError(e.status, str(e), type_, e.param) from None
        api.model(res.model)  # 404 for a model not served here
        served = pick_target(res)
        prompt_ids = await asyncio.to_thread(served.tokenizer.encode_chat, full)
        room = served.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ApiError(
                400,
                f"input: the prompt is {len(prompt_ids)} tokens; model `{served.name}` has a context of "
                f"{served.max_model_len} tokens",
                "invalid_request_error",
                "input",
            )
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"max_output_tokens is {asked} but only {room} tokens fit after the "
                f"{len(prompt_ids)}-token prompt in model `{served.name}`'s context",
                "invalid_request_error",
                "max_output_tokens",
            )
        budget = body.reasoning.max_tokens if body.reasoning else None
        if budget is not None and served.tags is None:
            raise ApiError(
                400,
                f"reasoning.max_tokens: model `{served.name}` is not a reasoning model; omit it",
                "invalid_request_error",
                "reasoning.max_tokens",
            )
        budget = budget or (served.default_reasoning_budget if served.tags is not None else None)
        max_out = asked or room
        reserved = asked or min(room, g.default_reserved_tokens)
        try:
            ticket = await g.admission.admit(
                AdmissionRequest(tenant, len(prompt_ids), reserved, headers.get(TASK_ID_HEADER), rank)
            )
        except Rejected as e:
            raise api._rejected(e, served.name) from None
        # A session holds no fan-out or pool slot (it runs detached); its tokens are charged up front.
        ticket.release(len(prompt_ids) + reserved)
        rid = new_response_id()
        salt = tenant_salt(tenant) if served.salt_tenants else None
        keys = await _block_keys(served, prompt_ids, salt)
        summary = body.reasoning.summary if body.reasoning and served.tags is not None else None
        rec = SessionRecord(
            id=rid,
            tenant=tenant,
            model=served.name,
            request={
                "prompt_ids": prompt_ids,
                "sampling": {
                    "temperature": body.temperature,
                    "top_p": body.top_p,
                    "seed": body.seed,
                },
                "max_output_tokens": max_out,
                "max_output_tokens_asked": asked,
                "reasoning_budget": budget,
                "summary": summary,
                "cache_salt": salt,
                "block_keys": keys,
                "background": body.background,
                "instructions": body.instructions,
                "metadata": body.metadata or {},
                "previous_response_id": body.previous_response_id,
                "reasoning": {
                    "effort": effort,
                    "summary": body.reasoning.summary if body.reasoning else None,
                    "max_tokens": budget,
                },
                "messages": [m.model_dump(exclude_none=True) for m in messages],
            },
        )
        try:
            await asyncio.to_thread(store.create, rec)
        except QuotaExceeded as e:
            api.metrics.rejections.labels("session_quota", served.name).inc()
            raise ApiError(429, str(e), "rate_limit_error", code="session_quota") from None
        api.metrics.sessions.labels(served.name).inc()
        try:
            await sessions.notify(rid)
        except Exception as e:  # a worker's sweep claims it anyway
            logger.warning("could not hand %s to a session worker (%s); the sweep will", rid, e)
        if body.stream:
            return event_stream(rid, tenant, -1, cancel_on_leave=not body.background)
        if body.background:
            return JSONResponse(response_object(rec))
        try:
            done = await wait_finished(rid, tenant)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(cancel_session, store, rid, tenant))
            raise
        return JSONResponse(response_object(done) if done is not None else response_object(rec))

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
