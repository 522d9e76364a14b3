"""`/v1/responses` over an in-process session worker, a SQLite store and the FakeEngine: background,
streamed and waiting creation, polling and resumable event streams, disconnects, validation,
conversation chaining, tenant isolation, cancel and delete; and chat completions' reasoning budget."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from benchmarks.asgi import StreamingASGITransport
from serving.backends import EngineBackend
from serving.config import SessionsSpec, parse_spec
from serving.http.api import build_api
from serving.http.auth import hash_key
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.pipeline import ServedModel
from serving.http.responses import SessionsFrontend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.events import TERMINAL_EVENTS
from serving.sessions.store import SQLiteStore, Status
from serving.sessions.worker import SessionModel, SessionWorker
from tests.unit.sessions_harness import (
    EOS,
    START,
    TAGS,
    TOK,
    Recorder,
    StopAt,
    check_event_log,
    close_store,
    new_store,
    settings,
    split_ids,
    wait_until,
)

CONTEXT = 512


@dataclass
class Rig:
    client: httpx.AsyncClient
    store: SQLiteStore
    worker: SessionWorker
    engine: FakeEngine
    legs: Recorder
    front: SessionsFrontend

    async def post(self, tenant: str = "a", **body: Any) -> httpx.Response:
        body.setdefault("model", "r")
        body.setdefault("input", "why is the sky blue")
        return await self.client.post("/v1/responses", json=body, headers={"x-tandem-tenant": tenant})

    async def get(self, rid: str, tenant: str = "a", **params: Any) -> httpx.Response:
        return await self.client.get(
            f"/v1/responses/{rid}", params=params, headers={"x-tandem-tenant": tenant}
        )

    async def events(self, rid: str, tenant: str = "a", after: int | None = None) -> list[dict]:
        params: dict[str, Any] = {"stream": "true"}
        if after is not None:
            params["starting_after"] = after
        r = await asyncio.wait_for(self.get(rid, tenant, **params), 5)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(r.text)

    async def until_finished(self, rid: str, tenant: str = "a") -> dict:
        async def poll() -> dict:
            while True:
                r = await self.get(rid, tenant)
                assert r.status_code == 200, r.text
                if Status(r.json()["status"]).finished:
                    return r.json()
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(poll(), 5)


#: The rig's session limits: fast polls (the spec's defaults otherwise).
FAST = {"stream_poll_s": 0.01, "stream_poll_max_s": 0.05}


@asynccontextmanager
async def rig(
    tmp_path: Any,
    token_delay_s: float = 0.0,
    workers: bool = True,
    wrap: Callable[[SQLiteStore], Any] | None = None,
    gateway: Gateway | None = None,
    context: int = CONTEXT,
    on_cancelled: Callable[[str], Any] | None = None,
    **spec: Any,
):
    """Model "r" (reasoning, its sessions stop at EOS) and "plain" (no tags), one worker (none and a
    notify that hands nothing over if not `workers`). `wrap`: the store the ingress sees (the worker
    uses the store itself); `spec`: SessionsSpec fields over FAST."""
    store = new_store(tmp_path)
    engine = FakeEngine("r", token_delay_s=token_delay_s, max_model_len=context)
    backend = EngineBackend(engine)
    plain = EngineBackend(FakeEngine("plain", max_model_len=context))
    legs = Recorder(StopAt(backend.stream))
    worker = SessionWorker(
        store,
        {"r": SessionModel("r", legs, TOK, TAGS), "plain": SessionModel("plain", plain.stream, TOK)},
        settings(),
    )

    async def nobody(_: str) -> bool:
        return False

    if workers:
        worker.start()
    models = {
        "r": ServedModel("r", context, TOK, backend, tags=TAGS),
        "plain": ServedModel("plain", context, TOK, plain),
    }
    front = SessionsFrontend(
        wrap(store) if wrap else store,
        worker.submit if workers else nobody,
        spec=SessionsSpec(**{**FAST, **spec}),
        on_cancelled=on_cancelled,
    )
    app = build_api(models, gateway=gateway, sessions=front)
    try:
        async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://t") as c:
            yield Rig(c, store, worker, engine, legs, front)
    finally:
        await worker.close()
        front.close()
        close_store(store)


def parse_sse(text: str) -> list[dict]:
    """`event: <type>` / `data: <json>` blocks; the data's type is the event's."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):  # a comment (keepalive)
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == lines[0].removeprefix("event: ")
        out.append(data)
    return out


def answer_of(obj: dict) -> str:
    msgs = [item for item in obj["output"] if item["type"] == "message"]
    return msgs[0]["content"][0]["text"] if msgs else ""


# -- create and read ----------------------------------------------------------------------------------


async def test_background_is_queued_then_completes(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(
            background=True, max_output_tokens=40, reasoning={"max_tokens": 5}, metadata={"k": "v"}
        )
        assert r.status_code == 200, r.text
        queued = r.json()
        assert queued["status"] == "queued" and queued["background"] is True
        assert queued["id"].startswith("resp_") and queued["object"] == "response"
        assert queued["output"] == [] and queued["usage"] is None
        assert queued["metadata"] == {"k": "v"} and queued["max_output_tokens"] == 40
        assert queued["reasoning"]["max_tokens"] == 5
        done = await s.until_finished(queued["id"])
        assert done["status"] == "completed" and done["id"] == queued["id"]
        ids = s.store.tokens(queued["id"])
        assert ids[-1] == EOS
        reasoning_ids, answer_ids = split_ids(s.store.get(queued["id"], "a").request["prompt_ids"], ids)
        assert len(reasoning_ids) == 5
        assert [item["type"] for item in done["output"]] == ["reasoning", "message"]
        assert answer_of(done) == TOK.decode(answer_ids)
        assert done["usage"]["output_tokens"] == len(ids)
        assert done["usage"]["output_tokens_details"]["reasoning_tokens"] == 5
        assert done["metadata"] == {"k": "v"}
        check_event_log(await s.events(queued["id"]), done)


async def test_stream_resumes_after_any_event_number(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(
            background=True, max_output_tokens=40, reasoning={"max_tokens": 6, "summary": "full"}
        )
        rid = r.json()["id"]
        done = await s.until_finished(rid)
        full = await s.events(rid)
        check_event_log(full, done)
        assert len(full) > 8
        for n in (0, 3, len(full) // 2, len(full) - 2):
            after = await s.events(rid, after=n)
            assert [e["sequence_number"] for e in after] == list(range(n + 1, len(full)))
            head = (await s.events(rid))[: n + 1]
            assert head + after == full
        assert await s.events(rid, after=-1) == full


async def test_stream_after_the_last_event_of_a_finished_session_ends(tmp_path) -> None:
    async with rig(tmp_path) as s:
        rid = (await s.post(background=True, max_output_tokens=20, reasoning={"max_tokens": 3})).json()["id"]
        await s.until_finished(rid)
        last = len(s.store.events(rid)) - 1
        r = await asyncio.wait_for(s.get(rid, stream="true", starting_after=last), 1.0)
        assert r.status_code == 200 and parse_sse(r.text) == []


async def test_a_stream_read_while_it_runs_ends_with_the_terminal_event(tmp_path) -> None:
    async with rig(tmp_path, token_delay_s=0.005) as s:
        r = await s.post(
            background=True, max_output_tokens=60, reasoning={"max_tokens": 20, "summary": "full"}
        )
        rid = r.json()["id"]
        events = await s.events(rid)  # opened while the session runs: follows it to its end
        assert events[-1]["type"] in TERMINAL_EVENTS
        assert sum(e["type"] in TERMINAL_EVENTS for e in events) == 1
        done = (await s.get(rid)).json()
        deltas = check_event_log(events, done)
        assert events == [e.data for e in s.store.events(rid)]
        ids = s.store.tokens(rid)
        reasoning_ids, answer_ids = split_ids(s.store.get(rid, "a").request["prompt_ids"], ids)
        assert deltas["reasoning"] == TOK.decode(reasoning_ids) and len(reasoning_ids) == 20
        assert deltas["answer"] == answer_of(done) == TOK.decode(answer_ids)


async def test_post_stream_sends_server_sent_events(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(stream=True, max_output_tokens=40, reasoning={"max_tokens": 4})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        rid = events[0]["response"]["id"]
        done = (await s.get(rid)).json()
        deltas = check_event_log(events, done)
        assert deltas["reasoning"] == ""  # hidden
        assert deltas["answer"] == answer_of(done) != ""


async def _leave_stream_early(s: Rig, **body: Any) -> str:
    async with s.client.stream(
        "POST",
        "/v1/responses",
        json={"model": "r", "input": "go on", **body},
        headers={"x-tandem-tenant": "a"},
    ) as r:
        assert r.status_code == 200
        seen: list[dict] = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
            if len(seen) == 3:
                break
    assert seen[0]["type"] == "response.created"
    return seen[0]["response"]["id"]


async def test_leaving_a_foreground_stream_cancels_the_session(tmp_path) -> None:
    async with rig(tmp_path, token_delay_s=0.02) as s:
        rid = await _leave_stream_early(s, stream=True, max_output_tokens=60, reasoning={"max_tokens": 20})
        done = await s.until_finished(rid)
        assert done["status"] == "cancelled"
        await wait_until(lambda: s.engine.stats().running == 0, within_s=1)
        assert f"{rid}-1" in s.engine.aborted
        events = await s.events(rid)
        assert events[-1]["type"] == "response.cancelled"
        check_event_log(events, done)


async def test_leaving_a_background_stream_does_not_cancel(tmp_path) -> None:
    async with rig(tmp_path, token_delay_s=0.02) as s:
        rid = await _leave_stream_early(
            s, stream=True, background=True, max_output_tokens=60, reasoning={"max_tokens": 20}
        )
        rec = s.store.get(rid, "a")
        assert rec.status is Status.IN_PROGRESS and not rec.cancel_requested
        done = await s.until_finished(rid)
        assert done["status"] == "completed"
        assert not s.store.get(rid, "a").cancel_requested


async def test_post_without_background_or_stream_waits_for_the_result(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(
            max_output_tokens=40, reasoning={"max_tokens": 5, "summary": "auto"}, instructions="be brief"
        )
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["status"] == "completed" and done["background"] is False
        assert done["instructions"] == "be brief"
        assert done["output"][0]["summary"][0]["type"] == "summary_text"
        assert done == (await s.get(done["id"])).json()
        plain = (await s.post(model="plain", max_output_tokens=6)).json()
        assert plain["status"] == "incomplete" and plain["incomplete_details"] == {
            "reason": "max_output_tokens"
        }
        assert [item["type"] for item in plain["output"]] == ["message"]
        assert plain["usage"]["output_tokens"] == 6


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": []}, 400, "input"),
        ({"max_output_tokens": CONTEXT}, 400, "max_output_tokens"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"model": "plain", "reasoning": {"max_tokens": 10}}, 400, "reasoning.max_tokens"),
        ({"reasoning": {"summary": "everything"}}, 400, "reasoning.summary"),
        ({"store": False}, 400, "store"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
        ({"metadata": {"k": 1}}, 400, "metadata.k"),
        ({"model": "nope"}, 404, "model"),
        ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ],
)
async def test_bad_requests_name_the_field(tmp_path, body: dict, status: int, param: str) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(**body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"]
        assert s.store.orphans() == [] and s.legs.requests == []  # nothing stored, nothing run


async def test_store_false_is_rejected(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.post(store=False)
        assert r.status_code == 400 and "store" in r.json()["error"]["message"]


async def test_starting_after_needs_stream(tmp_path) -> None:
    async with rig(tmp_path) as s:
        rid = (await s.post(max_output_tokens=20, reasoning={"max_tokens": 3})).json()["id"]
        r = await s.get(rid, starting_after=2)
        assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"
        r = await s.get(rid, stream="true", starting_after=-5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"


async def test_previous_response_still_running_is_a_400(tmp_path) -> None:
    async with rig(tmp_path, token_delay_s=0.02) as s:
        rid = (await s.post(background=True, max_output_tokens=200, reasoning={"max_tokens": 150})).json()[
            "id"
        ]
        r = await s.post(previous_response_id=rid)
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
        assert (await s.client.post(f"/v1/responses/{rid}/cancel", headers={"x-tandem-tenant": "a"})).json()[
            "status"
        ] == "cancelled"


async def test_previous_response_id_puts_the_answer_into_the_next_prompt(tmp_path) -> None:
    async with rig(tmp_path) as s:
        first = (await s.post(input="hello there", max_output_tokens=40, reasoning={"max_tokens": 4})).json()
        answer = answer_of(first)
        assert first["status"] == "completed" and answer
        r = await s.post(
            input="and then",
            previous_response_id=first["id"],
            instructions="be brief",
            max_output_tokens=40,
            reasoning={"max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["previous_response_id"] == first["id"] and second["status"] == "completed"
        stored = s.store.get(second["id"], "a").request
        assert stored["messages"] == [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and then"},
        ]
        leg = next(req for req in s.legs.requests if req.request_id == f"{second['id']}-1")
        expected = [
            1,
            *[4, *TOK.encode("be brief"), 3],
            *[6, *TOK.encode("hello there"), 3],
            *[7, *TOK.encode(answer), 3],
            *[6, *TOK.encode("and then"), 3],
            START,
        ]
        assert leg.prompt_token_ids == expected == stored["prompt_ids"]
        assert (
            TOK.encode(answer)
            == split_ids(s.store.get(first["id"], "a").request["prompt_ids"], s.store.tokens(first["id"]))[1]
        )


# -- tenants, cancel, delete --------------------------------------------------------------------------


async def test_another_tenant_gets_404_for_everything(tmp_path) -> None:
    async with rig(tmp_path) as s:
        rid = (await s.post(max_output_tokens=20, reasoning={"max_tokens": 3})).json()["id"]
        b = {"x-tandem-tenant": "b"}
        c = s.client
        for r in (
            await c.get(f"/v1/responses/{rid}", headers=b),
            await c.get(f"/v1/responses/{rid}", params={"stream": "true"}, headers=b),
            await c.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 1}, headers=b),
            await c.post(f"/v1/responses/{rid}/cancel", headers=b),
            await c.delete(f"/v1/responses/{rid}", headers=b),
            await s.post(tenant="b", previous_response_id=rid),
        ):
            assert r.status_code == 404, r.text
            assert r.json()["error"]["type"] == "not_found_error"
        assert (await s.get(rid)).json()["status"] == "completed"  # untouched for its tenant
        r = await c.delete(f"/v1/responses/{rid}", headers={"x-tandem-tenant": "a"})
        assert r.status_code == 200 and r.json() == {"id": rid, "object": "response.deleted", "deleted": True}
        assert (await s.get(rid)).status_code == 404
        assert (await s.get(rid, stream="true")).status_code == 404
        assert (await c.delete(f"/v1/responses/{rid}", headers={"x-tandem-tenant": "a"})).status_code == 404
        assert s.store.events(rid) == [] and s.store.tokens(rid) == []


async def test_cancel_endpoint(tmp_path) -> None:
    reported: list[str] = []

    async def report(rid: str) -> None:
        reported.append(rid)

    async with rig(tmp_path, token_delay_s=0.01, on_cancelled=report) as s:
        rid = (await s.post(background=True, max_output_tokens=300, reasoning={"max_tokens": 250})).json()[
            "id"
        ]
        await wait_until(lambda: len(s.store.tokens(rid)) >= 4)
        url = f"/v1/responses/{rid}/cancel"
        r = await s.client.post(url, headers={"x-tandem-tenant": "a"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert r.json() == (await s.get(rid)).json()
        again = await s.client.post(url, headers={"x-tandem-tenant": "a"})
        assert again.status_code == 200 and again.json() == r.json()
        assert (await s.events(rid))[-1]["type"] == "response.cancelled"
        # A finished response is left as it is.
        done = (await s.post(max_output_tokens=20, reasoning={"max_tokens": 3})).json()
        r = await s.client.post(f"/v1/responses/{done['id']}/cancel", headers={"x-tandem-tenant": "a"})
        assert r.status_code == 200 and r.json() == done and done["status"] == "completed"
        assert (await s.client.post("/v1/responses/resp_nope/cancel")).status_code == 404
        assert reported == []  # the worker that ran it reported it itself


async def test_cancel_endpoint_on_a_queued_session_nobody_runs(tmp_path) -> None:
    reported: list[str] = []

    async def report(rid: str) -> None:
        reported.append(rid)

    async with rig(tmp_path, workers=False, on_cancelled=report) as s:
        rid = (await s.post(background=True, max_output_tokens=20)).json()["id"]
        assert s.store.get(rid, "a").status is Status.QUEUED
        r = await s.client.post(f"/v1/responses/{rid}/cancel", headers={"x-tandem-tenant": "a"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert [e["type"] for e in await s.events(rid)] == ["response.cancelled"]
        assert reported == [rid]  # no worker ran it: a worker is asked to report it (its webhook)
        again = await s.client.post(f"/v1/responses/{rid}/cancel", headers={"x-tandem-tenant": "a"})
        assert again.json()["status"] == "cancelled" and reported == [rid]  # ended once, told once


async def test_delete_a_running_session_stops_it(tmp_path) -> None:
    async with rig(tmp_path, token_delay_s=0.01) as s:
        rid = (await s.post(background=True, max_output_tokens=300, reasoning={"max_tokens": 250})).json()[
            "id"
        ]
        await wait_until(lambda: s.worker.active == [rid])
        r = await s.client.delete(f"/v1/responses/{rid}", headers={"x-tandem-tenant": "a"})
        assert r.status_code == 200
        assert (await s.get(rid)).status_code == 404
        await wait_until(lambda: not s.worker.active, within_s=2)
        await wait_until(lambda: s.engine.stats().running == 0, within_s=1)
        assert s.store.events(rid) == [] and s.store.tokens(rid) == []


# -- chat completions with a reasoning budget ---------------------------------------------------------


async def test_chat_reasoning_budget_and_usage(tmp_path) -> None:
    async with rig(tmp_path) as s:
        msgs = [{"role": "user", "content": "think"}]
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "r", "messages": msgs, "max_tokens": 30, "max_reasoning_tokens": 7},
        )
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert u["completion_tokens"] == 30
        assert u["completion_tokens_details"] == {"reasoning_tokens": 7}
        r = await s.client.post(
            "/v1/chat/completions",
            json={
                "model": "r",
                "messages": msgs,
                "max_tokens": 30,
                "max_reasoning_tokens": 7,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        frames = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
        assert frames[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 7}
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "plain", "messages": msgs, "max_tokens": 5, "max_reasoning_tokens": 7},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_reasoning_tokens"
        r = await s.client.post(
            "/v1/chat/completions", json={"model": "plain", "messages": msgs, "max_tokens": 5}
        )
        assert "completion_tokens_details" not in r.json()["usage"]


# -- limits: streams, waits, store outages, what a session is charged ---------------------------------


class CountingStore:
    """The store with every call counted (by method name); `fail` methods raise `error`; `block`
    methods wait for `release` (a store that stopped answering)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.fail: set[str] = set()
        self.error: Exception = ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        self.block: set[str] = set()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            if name in self.fail:
                raise self.error
            if name in self.block:
                self.release.wait(30)
            return attr(*args, **kw)

        call.__name__ = name
        return call


async def _open_streams(s: Rig, rid: str, n: int) -> tuple[list[asyncio.Task], asyncio.Event]:
    """`n` GET streams on `rid`, held open (reading) until the returned event is set."""
    leave = asyncio.Event()
    opened: list[int] = []

    async def one() -> None:
        async with s.client.stream(
            "GET", f"/v1/responses/{rid}", params={"stream": "true"}, headers={"x-tandem-tenant": "a"}
        ) as r:
            opened.append(r.status_code)
            reading = asyncio.ensure_future(r.aread())
            await leave.wait()
            reading.cancel()

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await wait_until(lambda: len(opened) == n)
    assert opened == [200] * n
    return tasks, leave


async def test_a_tenant_holds_at_most_max_streams_and_the_store_is_read_sparingly(tmp_path) -> None:
    async with rig(tmp_path, workers=False, wrap=CountingStore, stream_poll_max_s=0.2) as s:
        store: CountingStore = s.front.store  # type: ignore[assignment]
        rid = (await s.post(background=True, max_output_tokens=20)).json()["id"]  # queued: no worker
        tasks, leave = await _open_streams(s, rid, 50)
        try:
            assert s.front.open_streams("a") == 50
            r = await s.get(rid, stream="true")
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["code"] == "too_many_streams" and err["type"] == "rate_limit_error"
            assert "max_streams_per_tenant" in err["message"] and int(r.headers["retry-after"]) >= 1
            assert (await s.post(max_output_tokens=20)).status_code == 429  # a waiting create too
            assert (await s.get(rid)).status_code == 200  # polling is not a stream
            await asyncio.sleep(1.0)  # the streams' polls back off to stream_poll_max_s
            store.calls.clear()
            await asyncio.sleep(1.0)
            # 50 streams x 1/0.2 s reads, and a status read every tenth; never the whole record.
            # (Polling every stream_poll_s = 10 ms, as before, is ~5000 reads a second.)
            assert sum(store.calls.values()) <= 50 * 5 * 1.1 + 50, store.calls
            assert store.calls["get"] == 0 and store.calls["get_any"] == 0
        finally:
            leave.set()
            await asyncio.gather(*tasks)
        await wait_until(lambda: s.front.open_streams("a") == 0)  # every stream gave its slot back


async def test_an_idle_stream_sends_keepalive_comments(tmp_path) -> None:
    async with rig(tmp_path, workers=False, stream_heartbeat_s=0.1) as s:
        rid = (await s.post(background=True, max_output_tokens=20)).json()["id"]
        lines: list[str] = []

        async def read() -> None:
            async with s.client.stream(
                "GET", f"/v1/responses/{rid}", params={"stream": "true"}, headers={"x-tandem-tenant": "a"}
            ) as r:
                async for line in r.aiter_lines():
                    lines.append(line)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read(), 0.55)
        assert lines.count(": keepalive") >= 2, lines


async def test_a_waiting_create_answers_after_wait_max_s(tmp_path) -> None:
    async with rig(tmp_path, workers=False, wait_max_s=0.3) as s:
        t0 = time.monotonic()
        r = await asyncio.wait_for(s.post(max_output_tokens=20), 3)
        assert r.status_code == 200 and r.json()["status"] == "queued"  # as it stands: poll it by id
        assert 0.3 <= time.monotonic() - t0 < 2
        assert s.front.open_streams("a") == 0


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Connection refused"), sqlite3.OperationalError("database is locked")],
    ids=["connection", "locked"],
)
async def test_a_store_that_does_not_answer_is_a_503_with_retry_after(tmp_path, error) -> None:
    async with rig(tmp_path, wrap=CountingStore) as s:
        store: CountingStore = s.front.store  # type: ignore[assignment]
        rid = (await s.post(max_output_tokens=20, reasoning={"max_tokens": 3})).json()["id"]
        store.error = error
        store.fail = {"create", "get", "head", "events", "request_cancel", "delete"}
        for r in (
            await s.post(background=True, max_output_tokens=20),
            await s.get(rid),
            await s.get(rid, stream="true"),
            await s.client.post(f"/v1/responses/{rid}/cancel", headers={"x-tandem-tenant": "a"}),
            await s.client.delete(f"/v1/responses/{rid}", headers={"x-tandem-tenant": "a"}),
        ):
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert err["code"] == "store_unavailable" and err["type"] == "service_unavailable_error"
            assert r.headers["retry-after"] == "2"
        store.fail = set()
        assert (await s.get(rid)).json()["status"] == "completed"
        assert s.front.open_streams("a") == 0


async def test_a_store_outage_mid_stream_ends_it_with_an_error_event(tmp_path) -> None:
    async with rig(tmp_path, workers=False, wrap=CountingStore) as s:
        store: CountingStore = s.front.store  # type: ignore[assignment]
        rid = (await s.post(background=True, max_output_tokens=20)).json()["id"]
        async with s.client.stream(
            "GET", f"/v1/responses/{rid}", params={"stream": "true"}, headers={"x-tandem-tenant": "a"}
        ) as r:
            assert r.status_code == 200
            store.fail = {"events", "head"}
            text = (await asyncio.wait_for(r.aread(), 2)).decode()
        events = parse_sse(text)
        assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "store_unavailable"


async def test_a_store_that_hangs_does_not_stall_chat_completions(tmp_path) -> None:
    async with rig(tmp_path, workers=False, wrap=CountingStore) as s:
        store: CountingStore = s.front.store  # type: ignore[assignment]
        rid = (await s.post(background=True, max_output_tokens=20)).json()["id"]
        store.block = {"events"}
        streams = [asyncio.create_task(s.get(rid, stream="true")) for _ in range(40)]
        try:
            # 40 stuck reads: more than the default thread pool's at most 32 threads.
            await wait_until(lambda: store.calls["events"] >= 5)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            r = await asyncio.wait_for(
                s.client.post(
                    "/v1/chat/completions",
                    json={"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                ),
                5,
            )
            assert r.status_code == 200 and time.monotonic() - t0 < 1.0
        finally:
            store.release.set()
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)


def _charging_gateway(burst: int) -> Gateway:
    spec = parse_spec(
        {
            "models": [{"name": n, "source": "fake", "pools": [{"engine": "fake"}]} for n in ("r", "plain")],
            "auth": {"enabled": False},
            "admission": {"default_tenant": {"tokens_per_s": 0.001, "burst_tokens": burst}},
        }
    )
    return Gateway.from_spec(spec, IngressMetrics())


async def test_a_session_without_max_output_tokens_is_charged_for_all_it_may_generate(tmp_path) -> None:
    gateway = _charging_gateway(50_000)
    async with rig(tmp_path, gateway=gateway, context=65536, default_max_output_tokens=300) as s:
        r = await s.post(model="plain", background=True)  # no max_output_tokens, a 64k context
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        charged = 50_000 - gateway.admission.snapshot()["buckets"]["a"]
        stored = s.store.get(rid, "a").request
        may_generate = len(stored["prompt_ids"]) + stored["max_output_tokens"]
        assert may_generate <= charged + 1  # (the bucket refills 0.001 tokens/s)
        done = await s.until_finished(rid)
        assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 300
        assert done["usage"]["total_tokens"] <= charged + 1
        assert done["max_output_tokens"] is None  # the client set none; the limit is the spec's


async def test_a_session_that_may_generate_more_than_the_burst_is_a_400_naming_max_output_tokens(
    tmp_path,
) -> None:
    gateway = _charging_gateway(5000)
    async with rig(tmp_path, gateway=gateway, context=65536, default_max_output_tokens=8192) as s:
        r = await s.post(model="plain", background=True)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and err["param"] == "max_output_tokens"
        assert "sessions.default_max_output_tokens" in err["message"]
        assert s.store.orphans() == []
        r = await s.post(model="plain", background=True, max_output_tokens=100)
        assert r.status_code == 200, r.text


def test_stream_poll_max_below_stream_poll_names_both_fields() -> None:
    with pytest.raises(
        ValueError, match="stream_poll_max_s .* raise stream_poll_max_s or lower stream_poll_s"
    ):
        SessionsSpec(stream_poll_s=0.5, stream_poll_max_s=0.1)


async def test_a_response_on_a_model_off_the_keys_list_is_a_403_and_stores_nothing(tmp_path) -> None:
    """A key's `models` allow-list holds on /v1/responses too (review L6), before anything is stored."""
    key = "tdm-plain-only"
    spec = parse_spec(
        {
            "models": [{"name": n, "source": "fake", "pools": [{"engine": "fake"}]} for n in ("r", "plain")],
            "auth": {
                "enabled": True,
                "keys": [{"tenant": "a", "sha256": hash_key(key), "models": ["plain"]}],
            },
        }
    )
    gateway = Gateway.from_spec(spec, IngressMetrics())
    async with rig(tmp_path, gateway=gateway) as s:
        h = {"authorization": f"Bearer {key}"}
        body = {"model": "r", "input": "why", "background": True}
        r = await s.client.post("/v1/responses", json=body, headers=h)
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_allowed" and err["param"] == "model"
        assert s.store._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
        r = await s.client.post("/v1/responses", json={**body, "model": "plain"}, headers=h)
        assert r.status_code == 200, r.text
