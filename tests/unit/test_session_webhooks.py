"""A finished session calls its tenant's webhook, signed, once; other tenants' sessions call nothing.
A repeated end of one session keeps its webhook id; delivery results are bounded.

With a store, deliveries come from its durable outbox (SQLite and a real redis-server, as in
test_session_store.py): a worker that dies before delivering leaves the webhook to another, two
workers polling one outbox deliver each entry once, and delivered or given-up entries leave it."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from router.resilience import RetryPolicy
from serving.backends import EngineBackend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.store import SessionRecord, SQLiteStore, Status
from serving.sessions.webhooks import (
    CompletionNotifier,
    DeliveryResult,
    WebhookSender,
    WebhookTarget,
    completion_event_id,
    verify,
)
from serving.sessions.worker import SessionModel, SessionWorker, WorkerSettings


class _Decoder:
    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


def _record(sid: str, tenant: str) -> SessionRecord:
    return SessionRecord(
        id=sid,
        tenant=tenant,
        model="m",
        request={
            "prompt_ids": [1, 2, 3],
            "sampling": {"temperature": 0.0},
            "max_output_tokens": 12,
            "background": True,
        },
    )


def test_finished_session_calls_its_tenants_webhook_signed(tmp_path) -> None:
    async def main() -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(500 if len(seen) == 1 else 200)  # first attempt fails: retried

        secret = b"s3cret-key"
        sender = WebhookSender(
            client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), retry=RetryPolicy(5, 0.01, 1.0)
        )
        notifier = CompletionNotifier({"acme": WebhookTarget("https://hooks.example/tandem", secret)}, sender)
        store = SQLiteStore(tmp_path / "s.db", 3600, 10, 10**7)
        worker = SessionWorker(
            store,
            {"m": SessionModel("m", EngineBackend(FakeEngine("m")).stream, _Decoder())},
            WorkerSettings(4, 0.05, 5.0, 0.05, 0.05, 4, RetryPolicy(3, 0.5, 10.0)),
            on_finished=notifier,
        )
        worker.start()
        try:
            await asyncio.to_thread(store.create, _record("resp_a", "acme"))
            await asyncio.to_thread(store.create, _record("resp_b", "other"))
            # Submitted here, or claimed by the worker's own sweep first: either way it runs once.
            await worker.submit("resp_a")
            await worker.submit("resp_b")
            for _ in range(200):
                a, b = store.get_any("resp_a"), store.get_any("resp_b")
                if a and b and a.status.finished and b.status.finished:
                    break
                await asyncio.sleep(0.02)
            assert store.get_any("resp_a").status is Status.INCOMPLETE
        finally:
            await worker.close()
            await notifier.aclose()
        assert len(seen) == 2, "one delivery, retried once after the 500"
        assert seen[0].headers["webhook-id"] == seen[1].headers["webhook-id"]
        last = seen[-1]
        verify(secret, last.headers, last.content)
        body = json.loads(last.content)
        assert body["type"] == "response.incomplete" and body["data"]["id"] == "resp_a"
        assert [r.delivered for r in notifier.results] == [True]

    asyncio.run(main())


def _notifier(handler) -> CompletionNotifier:
    sender = WebhookSender(
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), retry=RetryPolicy(1, 0.01, 0.01)
    )
    return CompletionNotifier({"acme": WebhookTarget("https://hooks.example/tandem", b"k")}, sender)


def test_a_session_that_finishes_again_is_reported_under_the_same_webhook_id() -> None:
    async def main() -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        notifier = _notifier(handler)
        rec = _record("resp_rerun", "acme")
        notifier(rec, {"status": "completed"})  # the first run's finish...
        notifier(rec, {"status": "completed"})  # ...lost by the store, and the re-run's
        notifier(rec, {"status": "failed"})
        notifier(_record("resp_other", "acme"), {"status": "completed"})
        await notifier.aclose()
        ids = [r.headers["webhook-id"] for r in seen]
        assert len(ids) == 4 and ids[0] == ids[1]  # receivers deduplicate the re-run's delivery
        assert len(set(ids)) == 3  # another status or another session: another event
        assert all(i.startswith("evt_") for i in ids)
        assert json.loads(seen[1].content)["id"] == ids[0]

    asyncio.run(main())


def test_delivery_results_stay_bounded() -> None:
    async def main() -> None:
        notifier = _notifier(lambda _: httpx.Response(200))

        async def deliver(target, event_id, body) -> DeliveryResult:
            return DeliveryResult(True, 1, 200)

        notifier.sender.deliver = deliver  # type: ignore[method-assign]
        for i in range(10_000):
            notifier(_record(f"resp_{i}", "acme"), {"status": "completed"})
        await notifier.aclose()
        assert len(notifier.results) <= 100
        assert notifier.delivered == 10_000 and notifier.failed == 0

    asyncio.run(main())


def test_a_queued_session_cancelled_at_the_ingress_fires_its_cancelled_webhook(tmp_path) -> None:
    async def main() -> None:
        from serving.sessions.worker import cancel_session_here

        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        notifier = _notifier(handler)
        store = SQLiteStore(tmp_path / "s.db", 3600, 10, 10**7)
        worker = SessionWorker(
            store,
            {"m": SessionModel("m", EngineBackend(FakeEngine("m")).stream, _Decoder())},
            WorkerSettings(4, 0.05, 5.0, 0.05, 0.05, 4, RetryPolicy(3, 0.5, 10.0)),
            on_finished=notifier,
        )
        try:
            store.create(_record("resp_q", "acme"))  # queued; no worker holds it
            rec, here = cancel_session_here(store, "resp_q", "acme")  # what the ingress does
            assert here and rec.status is Status.CANCELLED
            assert await worker.report("resp_q")  # the ingress's on_cancelled → SessionServer.report
            assert not await worker.report("resp_gone")
        finally:
            await worker.close()
            await notifier.aclose()
            store.close()
        assert len(seen) == 1
        body = json.loads(seen[0].content)
        assert body["type"] == "response.cancelled" and body["data"]["id"] == "resp_q"
        assert worker.completed == {"cancelled": 1}

    asyncio.run(main())


# -- the durable outbox (both stores) --------------------------------------------------------------

HOOK_URL = "https://hooks.example/tandem"


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, tmp_path):
    """Opens a store of the backend under test whose outbox records tenant acme's ends (each call a
    new connection to the same data: another worker's); closes them all afterwards."""
    opened: list = []
    bounds = {"ttl_s": 3600, "max_sessions_per_tenant": 100, "max_bytes_per_tenant": 10**7}
    if request.param == "sqlite":

        def one():
            return SQLiteStore(tmp_path / "s.db", **bounds, webhook_tenants=["acme"])

    else:
        import redis

        from serving.sessions.store_redis import RedisStore

        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushdb()

        def one():
            return RedisStore(url, **bounds, webhook_tenants=["acme"])

    def make():
        s = one()
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _outbox_notifier(store, handler, owner: str, retry: RetryPolicy | None = None) -> CompletionNotifier:
    sender = WebhookSender(
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        retry=retry or RetryPolicy(1, 0.01, 0.01),
    )
    targets = {"acme": WebhookTarget(HOOK_URL, b"k")}
    return CompletionNotifier(
        targets, sender, store=store, owner=owner, poll_s=0.02, lease_s=0.5, grace_s=0.0
    )


def _end(store, sid: str, status: Status = Status.COMPLETED) -> None:
    """A worker's terminal write (claim, then finish) of a new session of acme."""
    store.create(_record(sid, "acme"))
    assert store.claim(sid, "w-gone", 30.0) is not None
    store.finish(sid, "w-gone", status, {"id": sid, "status": status.value}, [])


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await asyncio.to_thread(cond):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_worker_that_dies_before_delivering_leaves_its_webhook_to_the_next_one(open_store) -> None:
    async def main() -> None:
        store = open_store()
        posted, seen_a, seen_b = asyncio.Event(), [], []

        async def hung(request: httpx.Request) -> httpx.Response:
            seen_a.append(request)
            posted.set()
            await asyncio.Event().wait()  # the worker dies while its POST is in flight
            raise AssertionError("unreachable")

        def receiver(request: httpx.Request) -> httpx.Response:
            seen_b.append(request)
            return httpx.Response(204)

        a = _outbox_notifier(store, hung, "worker-a")
        worker = SessionWorker(
            store,
            {"m": SessionModel("m", EngineBackend(FakeEngine("m")).stream, _Decoder())},
            WorkerSettings(4, 0.05, 5.0, 0.05, 0.05, 4, RetryPolicy(3, 0.5, 10.0)),
            on_finished=a,
        )
        worker.start()
        await asyncio.to_thread(store.create, _record("resp_d", "acme"))
        await worker.submit("resp_d")
        await asyncio.wait_for(posted.wait(), 10)
        await worker.close()
        await a.aclose(wait_s=0)  # killed: no answer, nothing removed
        assert store.get_any("resp_d").status is Status.INCOMPLETE
        [left] = store.outbox()
        assert (left.response_id, left.claimed_by, left.attempts) == ("resp_d", "worker-a", 1)

        b = _outbox_notifier(open_store(), receiver, "worker-b")  # another worker, started later
        b.start()
        try:
            await _until(lambda: not store.outbox())
            await asyncio.sleep(0.2)  # a few more polls: nothing is delivered twice
        finally:
            await b.aclose()
        assert len(seen_b) == 1 and b.delivered == 1 and b.failed == 0
        assert seen_b[0].headers["webhook-id"] == seen_a[0].headers["webhook-id"] == left.event_id
        assert seen_b[0].content == seen_a[0].content  # the same event, created_at included
        verify(b"k", seen_b[0].headers, seen_b[0].content)
        body = json.loads(seen_b[0].content)
        assert body["type"] == "response.incomplete" and body["data"]["id"] == "resp_d"

    asyncio.run(main())


def test_an_end_no_notifier_saw_is_delivered_by_a_worker_started_later(open_store) -> None:
    async def main() -> None:
        store = open_store()
        await asyncio.to_thread(_end, store, "resp_x", Status.FAILED)  # its worker died right after
        seen: list[httpx.Request] = []

        def receiver(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        later = _outbox_notifier(open_store(), receiver, "worker-late")
        later.start()  # the first poll runs on start
        try:
            await _until(lambda: len(seen) == 1 and not store.outbox())
        finally:
            await later.aclose()
        assert seen[0].headers["webhook-id"] == completion_event_id("resp_x", "failed")
        assert json.loads(seen[0].content)["type"] == "response.failed"
        assert [r.delivered for r in later.results] == [True]

    asyncio.run(main())


def test_two_workers_polling_one_outbox_deliver_each_entry_once(open_store) -> None:
    async def main() -> None:
        store = open_store()
        ids = [f"resp_{i}" for i in range(30)]
        for sid in ids:
            await asyncio.to_thread(_end, store, sid)
        seen: list[str] = []

        async def receiver(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0.01)  # deliveries overlap the other worker's polls
            seen.append(request.headers["webhook-id"])
            return httpx.Response(200)

        a = _outbox_notifier(open_store(), receiver, "worker-a")
        b = _outbox_notifier(open_store(), receiver, "worker-b")
        a.max_in_flight = b.max_in_flight = 4  # many polls, each claiming a few
        a.start()
        b.start()
        try:
            await _until(lambda: not store.outbox())
            await asyncio.sleep(0.2)
        finally:
            await asyncio.gather(a.aclose(), b.aclose())
        assert sorted(seen) == sorted(completion_event_id(sid, "completed") for sid in ids)  # each once
        assert a.delivered + b.delivered == 30 and a.failed == b.failed == 0

    asyncio.run(main())


def test_a_permanently_failed_delivery_leaves_the_outbox_and_is_counted(open_store, caplog) -> None:
    async def main() -> None:
        store = open_store()
        for sid in ("resp_ok", "resp_bad", "resp_down"):
            await asyncio.to_thread(_end, store, sid)
        seen: list[str] = []

        def receiver(request: httpx.Request) -> httpx.Response:
            rid = json.loads(request.content)["data"]["id"]
            seen.append(rid)
            return httpx.Response({"resp_ok": 200, "resp_bad": 400, "resp_down": 503}[rid])

        notifier = _outbox_notifier(store, receiver, "worker-a", retry=RetryPolicy(2, 0.01, 0.01))
        notifier.start()
        try:
            await _until(lambda: not store.outbox())
            await notifier.join(5)
        finally:
            await notifier.aclose()
        # 400: final at once; 503: retried, then given up; both removed rather than retried forever.
        assert sorted(seen) == ["resp_bad", "resp_down", "resp_down", "resp_ok"]
        assert notifier.delivered == 1 and notifier.failed == 2
        assert sorted((r.delivered, r.last_status) for r in notifier.results) == [
            (False, 400), (False, 503), (True, 200)
        ]  # fmt: skip

    with caplog.at_level("INFO", logger="serving.sessions.webhooks"):
        asyncio.run(main())
    removed = [r.getMessage() for r in caplog.records if "removed from the outbox" in r.getMessage()]
    assert sum("delivered" in m for m in removed) == 1 and sum("given up" in m for m in removed) == 2


def test_an_entry_whose_deliverers_keep_dying_is_given_up_after_max_claims(open_store, caplog) -> None:
    async def main() -> None:
        store = open_store()
        await asyncio.to_thread(_end, store, "resp_poison")
        eid = completion_event_id("resp_poison", "completed")
        t = time.time() - 1000  # each claim's lease lapsed before the next, and all before now
        for i in range(3):  # three deliverers claimed it and died holding it
            (entry,) = store.outbox_claim(f"dead-{i}", 1.0, event_ids=[eid], now=t + 10 * i)
            assert entry.attempts == i + 1
        seen: list[httpx.Request] = []

        def receiver(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        notifier = _outbox_notifier(store, receiver, "worker-a")
        notifier.max_claims = 3
        notifier.start()  # its claim is the 4th: over the limit
        try:
            await _until(lambda: not store.outbox())
            await notifier.join(5)
        finally:
            await notifier.aclose()
        assert seen == [] and notifier.delivered == 0 and notifier.failed == 1
        assert "over webhook_max_claims 3" in notifier.results[-1].last_error

    with caplog.at_level("WARNING", logger="serving.sessions.webhooks"):
        asyncio.run(main())
    assert any("claimed 4 times" in r.getMessage() for r in caplog.records)


def test_an_ingress_cancel_is_delivered_from_the_outbox_without_a_report(open_store) -> None:
    async def main() -> None:
        from serving.sessions.worker import cancel_session_here

        store = open_store()
        seen: list[httpx.Request] = []

        def receiver(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        await asyncio.to_thread(store.create, _record("resp_q", "acme"))  # queued; no worker holds it
        ingress = open_store()  # the ingress's own connection
        rec, here = await asyncio.to_thread(cancel_session_here, ingress, "resp_q", "acme")
        assert here and rec.status is Status.CANCELLED  # ...and its report to a worker is lost
        notifier = _outbox_notifier(store, receiver, "worker-a")
        notifier.start()
        try:
            await _until(lambda: len(seen) == 1 and not store.outbox())
        finally:
            await notifier.aclose()
        body = json.loads(seen[0].content)
        assert body["type"] == "response.cancelled" and body["data"]["id"] == "resp_q"
        assert seen[0].headers["webhook-id"] == completion_event_id("resp_q", "cancelled")

    asyncio.run(main())


def test_a_notifier_refuses_a_store_that_records_none_of_its_tenants(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "s.db", 3600, 10, 10**7)  # no webhook_tenants
    with pytest.raises(ValueError, match="acme"):
        _outbox_notifier(store, lambda _: httpx.Response(200), "worker-a")
    store.close()
