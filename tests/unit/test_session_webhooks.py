"""A finished session calls its tenant's webhook, signed, once; other tenants' sessions call nothing.
A repeated end of one session keeps its webhook id; delivery results are bounded."""

from __future__ import annotations

import asyncio
import json

import httpx

from router.resilience import RetryPolicy
from serving.backends import EngineBackend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.store import SessionRecord, SQLiteStore, Status
from serving.sessions.webhooks import (
    CompletionNotifier,
    DeliveryResult,
    WebhookSender,
    WebhookTarget,
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
