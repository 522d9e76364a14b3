"""A finished session calls its tenant's webhook, signed, once; other tenants' sessions call nothing."""

from __future__ import annotations

import asyncio
import json

import httpx

from router.resilience import RetryPolicy
from serving.backends import EngineBackend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.store import SessionRecord, SQLiteStore, Status
from serving.sessions.webhooks import CompletionNotifier, WebhookSender, WebhookTarget, verify
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
