"""The durable session log: records, idempotent appends, tenant isolation, TTL and per-tenant bounds."""

from __future__ import annotations

import threading
import time

import pytest

from serving.session_store import Event, QuotaExceeded, SessionRecord, SQLiteStore, Status, StoreError


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(
        tmp_path / "sessions.db", ttl_s=3600, max_sessions_per_tenant=3, max_bytes_per_tenant=10**6
    )
    yield s
    s.close()


def _rec(sid: str, tenant: str = "a", created: float | None = None) -> SessionRecord:
    rec = SessionRecord(sid, tenant, "tiny-reasoning", {"input": "why?", "background": True})
    if created is not None:
        rec.created = created
    return rec


def test_record_round_trip_and_status_lifecycle(store) -> None:
    store.create(_rec("s1"))
    got = store.get("s1", "a")
    assert got is not None and got.status is Status.QUEUED and got.request["input"] == "why?"
    assert got.expires == pytest.approx(got.created + 3600)
    store.set_status("s1", Status.IN_PROGRESS)
    store.set_status("s1", Status.COMPLETED, {"output_text": "42"})
    got = store.get("s1", "a")
    assert got.status is Status.COMPLETED and got.result == {"output_text": "42"}
    store.set_status("s1", Status.COMPLETED)  # the same finished state again: harmless
    with pytest.raises(StoreError, match="already completed"):
        store.set_status("s1", Status.CANCELLED)
    with pytest.raises(StoreError, match="no session"):
        store.set_status("nope", Status.FAILED)


def test_another_tenant_sees_nothing_and_cannot_delete(store) -> None:
    store.create(_rec("s1", "a"))
    assert store.get("s1", "b") is None
    assert store.delete("s1", "b") is False
    assert store.get("s1", "a") is not None
    assert store.delete("s1", "a") is True and store.get("s1", "a") is None


def test_events_append_in_order_idempotently_and_resume_after_a_number(store) -> None:
    store.create(_rec("s1"))
    evs = [Event(i, "response.output_text.delta", {"delta": f"t{i}"}) for i in range(5)]
    store.append_events("s1", evs[:3])
    store.append_events("s1", evs[1:5])  # a retried write overlapping the stored ones
    assert store.events("s1") == evs
    assert [e.seq for e in store.events("s1", after=2)] == [3, 4]
    with pytest.raises(StoreError, match="gap"):
        store.append_events("s1", [Event(7, "x", {})])
    with pytest.raises(StoreError, match="differs"):
        store.append_events("s1", [Event(2, "response.output_text.delta", {"delta": "other"})])
    assert store.events("s1") == evs  # a failed append wrote nothing


def test_token_checkpoints_concatenate_without_loss_or_duplicates(store) -> None:
    store.create(_rec("s1"))
    store.append_tokens("s1", 0, [5, 6, 7])
    store.append_tokens("s1", 3, [8, 9])
    store.append_tokens("s1", 3, [8, 9])  # the same checkpoint again after a crash
    assert store.tokens("s1") == [5, 6, 7, 8, 9]
    with pytest.raises(StoreError, match="gap"):
        store.append_tokens("s1", 7, [1])
    with pytest.raises(StoreError, match="differ"):
        store.append_tokens("s1", 3, [8, 10])
    store.append_tokens("s1", 5, [2**40, 0])
    assert store.tokens("s1") == [5, 6, 7, 8, 9, 2**40, 0]


def test_survives_reopening_the_file(tmp_path) -> None:
    path = tmp_path / "s.db"
    s = SQLiteStore(path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    s.create(_rec("s1"))
    s.append_tokens("s1", 0, [1, 2])
    s.append_events("s1", [Event(0, "response.created", {})])
    s.close()
    s = SQLiteStore(path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    assert s.get("s1", "a").status is Status.QUEUED and s.tokens("s1") == [1, 2] and len(s.events("s1")) == 1
    s.close()


def test_ttl_purges_only_finished_expired_sessions(tmp_path) -> None:
    s = SQLiteStore(tmp_path / "s.db", ttl_s=10, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    old = time.time() - 100
    s.create(_rec("done", created=old))
    s.create(_rec("running", created=old))
    s.create(_rec("fresh"))
    s.append_tokens("done", 0, [1])
    s.set_status("done", Status.COMPLETED)
    s.set_status("running", Status.IN_PROGRESS)
    s.set_status("fresh", Status.COMPLETED)
    assert s.purge_expired() == 1
    assert s.get("done", "a") is None and s.tokens("done") == []
    assert s.get("running", "a") is not None and s.get("fresh", "a") is not None
    s.close()


def test_per_tenant_bound_evicts_oldest_finished_then_refuses(store) -> None:
    for i in range(3):
        store.create(_rec(f"s{i}", created=time.time() + i))
    store.set_status("s1", Status.COMPLETED)
    store.create(_rec("s3", created=time.time() + 3))  # makes room by dropping s1
    assert store.get("s1", "a") is None and store.get("s0", "a") is not None
    store.create(_rec("b0", "b"))  # another tenant has its own bound
    with pytest.raises(QuotaExceeded, match="unfinished"):
        store.create(_rec("s4"))


def test_byte_bound(tmp_path) -> None:
    s = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_sessions_per_tenant=100, max_bytes_per_tenant=380)
    s.create(_rec("s0"))
    s.append_tokens("s0", 0, list(range(40)))  # 320 bytes + the request's 37
    with pytest.raises(QuotaExceeded, match="bytes"):
        s.create(_rec("s1"))
    s.set_status("s0", Status.COMPLETED)
    s.create(_rec("s1"))  # the finished one is evicted
    assert s.get("s0", "a") is None
    s.close()


def test_concurrent_writers_from_threads(store) -> None:
    store.create(_rec("s1"))
    errors: list[BaseException] = []

    def write(start: int) -> None:
        try:
            for k in range(start, 200, 4):
                store.append_events("s1", [Event(i, "d", {"i": i}) for i in range(k + 1)])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [e.seq for e in store.events("s1")] == list(range(200))
