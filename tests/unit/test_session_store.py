"""The durable session log: records, idempotent appends, tenant isolation, TTL and per-tenant bounds,
and ownership by workers (claims, leases, orphans, cancellation, owner-checked checkpoints)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from serving.session_store import (
    Event,
    LeaseLost,
    QuotaExceeded,
    SessionRecord,
    SQLiteStore,
    Status,
    StoreError,
)

T0 = 1_000_000.0  # the lease clock in ownership tests (passed as now=)


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


# -- ownership ------------------------------------------------------------------------------------


def _ev(seq: int, text: str = "") -> Event:
    return Event(seq, "response.output_text.delta", {"delta": text or f"t{seq}"})


def test_new_session_is_unowned_and_get_any_ignores_the_tenant(store) -> None:
    store.create(_rec("s1", "a"))
    got = store.get("s1", "a")
    assert (got.owner, got.lease_until, got.cancel_requested, got.claims) == (None, 0.0, False, 0)
    assert store.get_any("s1") == got
    assert store.get_any("nope") is None
    assert store.last_seq("s1") == -1
    store.append_events("s1", [_ev(0), _ev(1)])
    assert store.last_seq("s1") == 1 and store.last_seq("other") == -1


def test_claim_takes_a_queued_session_and_a_second_owner_is_refused(store) -> None:
    store.create(_rec("s1"))
    rec = store.claim("s1", "w1", lease_s=30, now=T0)
    assert rec is not None and rec.owner == "w1" and rec.lease_until == T0 + 30
    assert rec.status is Status.IN_PROGRESS and rec.claims == 1
    assert store.claim("s1", "w2", lease_s=30, now=T0 + 29) is None
    assert store.claim("s1", "w2", lease_s=30, now=T0 + 30) is None  # the lease holds up to its end
    got = store.get_any("s1")
    assert (
        got.owner == "w1" and got.lease_until == T0 + 30 and got.claims == 1
    )  # the refusals changed nothing
    assert store.claim("missing", "w1", lease_s=30, now=T0) is None


def test_reclaim_by_the_holder_extends_the_lease_without_counting_a_claim(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    rec = store.claim("s1", "w1", lease_s=30, now=T0 + 20)
    assert rec.owner == "w1" and rec.lease_until == T0 + 50 and rec.claims == 1
    rec = store.claim("s1", "w1", lease_s=30, now=T0 + 100)  # its own lease had run out: a new claim
    assert rec.owner == "w1" and rec.lease_until == T0 + 130 and rec.claims == 2


def test_expired_lease_is_taken_over_and_counts_a_claim(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    assert store.orphans(now=T0 + 30) == []
    assert store.orphans(now=T0 + 31) == ["s1"]
    rec = store.claim("s1", "w2", lease_s=30, now=T0 + 31)
    assert rec is not None and rec.owner == "w2" and rec.lease_until == T0 + 61 and rec.claims == 2
    assert store.orphans(now=T0 + 31) == []
    assert store.claim("s1", "w1", lease_s=30, now=T0 + 32) is None  # the old owner cannot take it back


def test_claim_race_between_threads_has_one_winner(store) -> None:
    store.create(_rec("s1"))
    barrier = threading.Barrier(8)
    won: list[str] = []

    def grab(owner: str) -> None:
        barrier.wait()
        if store.claim("s1", owner, lease_s=30, now=T0) is not None:
            won.append(owner)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    got = store.get_any("s1")
    assert got.owner == won[0] and got.claims == 1


def test_two_store_connections_to_one_file_do_not_both_claim(tmp_path) -> None:
    path = tmp_path / "shared.db"
    s1 = SQLiteStore(path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    s2 = SQLiteStore(path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    s1.create(_rec("s1"))
    assert s1.claim("s1", "w1", lease_s=30, now=T0) is not None
    assert s2.claim("s1", "w2", lease_s=30, now=T0 + 1) is None
    assert s2.claim("s1", "w2", lease_s=30, now=T0 + 31).owner == "w2"
    with pytest.raises(LeaseLost):
        s1.checkpoint("s1", "w1", 0, [1], [])
    s1.close()
    s2.close()


def test_finished_sessions_cannot_be_claimed_and_are_no_orphans(store) -> None:
    store.create(_rec("s1"))
    store.set_status("s1", Status.FAILED)
    assert store.claim("s1", "w1", lease_s=30, now=T0) is None
    assert store.orphans(now=T0) == []
    assert store.get_any("s1").owner is None


def test_renew_extends_held_leases_and_reports_the_lost_ones(store) -> None:
    for sid in ("s1", "s2", "s3", "s4"):
        store.create(_rec(sid, "a" if sid != "s4" else "b"))
        store.claim(sid, "w1", lease_s=30, now=T0)
    store.claim("s2", "w2", lease_s=30, now=T0 + 31)  # lost to w2
    store.claim("s3", "w1", lease_s=30, now=T0 + 31)
    store.finish("s3", "w1", Status.COMPLETED, {"output_text": "x"}, [])  # finished: not held any more
    held = store.renew("w1", ["s1", "s2", "s3", "s4", "missing"], lease_s=60, now=T0 + 40)
    assert held == {"s1", "s4"}
    assert store.get_any("s1").lease_until == T0 + 100 and store.get_any("s4").lease_until == T0 + 100
    assert store.get_any("s2").owner == "w2" and store.get_any("s2").lease_until == T0 + 61  # untouched
    assert store.renew("w1", [], lease_s=60, now=T0) == set()
    assert store.orphans(now=T0 + 99) == ["s2"]  # w1's renewed leases hold past the old ones' end


def test_renew_handles_more_ids_than_one_statement_binds(tmp_path) -> None:
    s = SQLiteStore(tmp_path / "s.db", ttl_s=60, max_sessions_per_tenant=2000, max_bytes_per_tenant=10**8)
    ids = [f"s{i}" for i in range(1200)]
    for sid in ids:
        s.create(_rec(sid))
        s.claim(sid, "w1", lease_s=30, now=T0)
    assert s.renew("w1", [*ids, "x"], lease_s=60, now=T0 + 10) == set(ids)
    assert s.get_any(ids[-1]).lease_until == T0 + 70
    s.close()


def test_orphans_are_unheld_unfinished_sessions_oldest_first(store) -> None:
    store.create(_rec("new", created=T0 + 2))
    store.create(_rec("old", created=T0))
    store.create(_rec("mid", created=T0 + 1))
    assert store.orphans(now=T0) == ["old", "mid", "new"]
    assert store.orphans(now=T0, limit=2) == ["old", "mid"]
    store.claim("mid", "w1", lease_s=30, now=T0)
    assert store.orphans(now=T0 + 10) == ["old", "new"]
    assert store.orphans(now=T0 + 31) == ["old", "mid", "new"]


def test_checkpoint_appends_tokens_and_events_for_the_holder(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.checkpoint("s1", "w1", 0, [5, 6, 7], [_ev(0), _ev(1)])
    store.checkpoint("s1", "w1", 0, [5, 6, 7], [_ev(0), _ev(1)])  # a retry: harmless
    store.checkpoint("s1", "w1", 3, [], [_ev(2)])  # events only
    store.checkpoint("s1", "w1", 3, [8], [])  # tokens only
    assert store.tokens("s1") == [5, 6, 7, 8]
    assert store.events("s1") == [_ev(0), _ev(1), _ev(2)]


def test_checkpoint_by_a_non_holder_raises_lease_lost_and_writes_nothing(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.checkpoint("s1", "w1", 0, [1, 2], [_ev(0)])
    store.claim("s1", "w2", lease_s=30, now=T0 + 31)  # w1 stalled; w2 took over
    with pytest.raises(LeaseLost):
        store.checkpoint("s1", "w1", 2, [3], [_ev(1)])
    with pytest.raises(LeaseLost):
        store.checkpoint("s1", "nobody", 2, [3], [_ev(1)])
    with pytest.raises(LeaseLost, match="no session"):
        store.checkpoint("missing", "w1", 0, [1], [_ev(0)])
    assert store.tokens("s1") == [1, 2] and store.events("s1") == [_ev(0)]
    store.checkpoint("s1", "w2", 2, [3], [_ev(1, "from w2")])
    assert store.tokens("s1") == [1, 2, 3] and store.events("s1")[-1] == _ev(1, "from w2")


def test_checkpoint_of_an_unclaimed_session_raises_lease_lost(store) -> None:
    store.create(_rec("s1"))
    with pytest.raises(LeaseLost):
        store.checkpoint("s1", "w1", 0, [1], [_ev(0)])
    assert store.tokens("s1") == [] and store.events("s1") == []


def test_checkpoint_is_one_transaction(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.checkpoint("s1", "w1", 0, [1, 2], [_ev(0)])
    with pytest.raises(StoreError, match="gap"):  # good tokens, bad events: neither is stored
        store.checkpoint("s1", "w1", 2, [3], [_ev(5)])
    with pytest.raises(StoreError, match="gap"):  # bad tokens, good events: neither is stored
        store.checkpoint("s1", "w1", 9, [3], [_ev(1)])
    assert store.tokens("s1") == [1, 2] and store.events("s1") == [_ev(0)]


def test_finish_ends_the_session_releases_it_and_blocks_later_writes(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.checkpoint("s1", "w1", 0, [1], [_ev(0)])
    store.finish(
        "s1", "w1", Status.COMPLETED, {"output_text": "42"}, [_ev(1), Event(2, "response.completed", {})]
    )
    got = store.get("s1", "a")
    assert got.status is Status.COMPLETED and got.result == {"output_text": "42"}
    assert got.owner is None and got.claims == 1
    assert store.last_seq("s1") == 2 and store.events("s1")[-1].type == "response.completed"
    with pytest.raises(LeaseLost):
        store.checkpoint("s1", "w1", 1, [2], [_ev(3)])
    with pytest.raises(LeaseLost):
        store.finish("s1", "w1", Status.FAILED, None, [])
    assert store.claim("s1", "w2", lease_s=30, now=T0) is None
    assert store.orphans(now=T0 + 1000) == []
    assert (
        store.tokens("s1") == [1]
        and store.last_seq("s1") == 2
        and store.get("s1", "a").status is Status.COMPLETED
    )


def test_finish_checks_ownership_and_status_and_writes_nothing_when_refused(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    with pytest.raises(ValueError, match="finished status"):
        store.finish("s1", "w1", Status.IN_PROGRESS, None, [_ev(0)])
    with pytest.raises(LeaseLost):
        store.finish("s1", "w2", Status.COMPLETED, {"output_text": "no"}, [_ev(0)])
    with pytest.raises(StoreError, match="gap"):  # a bad event: the status is not set either
        store.finish("s1", "w1", Status.COMPLETED, {"output_text": "no"}, [_ev(4)])
    got = store.get_any("s1")
    assert got.status is Status.IN_PROGRESS and got.owner == "w1" and got.result is None
    assert store.events("s1") == []
    store.finish("s1", "w1", Status.INCOMPLETE, None, [])
    got = store.get_any("s1")
    assert got.status is Status.INCOMPLETE and got.result is None and got.owner is None


def test_request_cancel_of_a_queued_unowned_session_cancels_it_there(store) -> None:
    store.create(_rec("s1"))
    rec = store.request_cancel("s1", "a", now=T0)
    assert rec.status is Status.CANCELLED and rec.cancel_requested and rec.owner is None
    assert store.get("s1", "a").status is Status.CANCELLED
    assert store.orphans(now=T0) == [] and store.claim("s1", "w1", lease_s=30, now=T0) is None


def test_request_cancel_of_a_held_session_raises_the_flag_for_its_holder(store) -> None:
    store.create(_rec("s1"))
    store.create(_rec("s2"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.claim("s2", "w1", lease_s=30, now=T0)
    assert store.cancels("w1") == set()
    rec = store.request_cancel("s1", "a", now=T0 + 10)
    assert rec.status is Status.IN_PROGRESS and rec.cancel_requested and rec.owner == "w1"
    assert store.cancels("w1") == {"s1"} and store.cancels("w2") == set()
    store.checkpoint("s1", "w1", 0, [1], [_ev(0)])  # the holder may still write its last checkpoint
    store.finish("s1", "w1", Status.CANCELLED, None, [Event(1, "response.cancelled", {})])
    assert store.cancels("w1") == set()  # finished: nothing left to cancel
    assert store.get("s1", "a").status is Status.CANCELLED and store.get("s1", "a").cancel_requested


def test_request_cancel_of_a_session_whose_lease_ran_out_cancels_it_there(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    rec = store.request_cancel("s1", "a", now=T0 + 31)
    assert rec.status is Status.CANCELLED and rec.owner is None and rec.cancel_requested
    with pytest.raises(LeaseLost):  # the stalled holder comes back too late
        store.checkpoint("s1", "w1", 0, [1], [_ev(0)])
    assert store.tokens("s1") == [] and store.orphans(now=T0 + 31) == []


def test_request_cancel_is_tenant_isolated(store) -> None:
    store.create(_rec("q", "a"))
    store.create(_rec("h", "a"))
    store.claim("h", "w1", lease_s=30, now=T0)
    assert store.request_cancel("q", "b", now=T0) is None
    assert store.request_cancel("h", "b", now=T0) is None
    assert store.request_cancel("missing", "a", now=T0) is None
    q, h = store.get_any("q"), store.get_any("h")
    assert q.status is Status.QUEUED and not q.cancel_requested
    assert h.status is Status.IN_PROGRESS and not h.cancel_requested and store.cancels("w1") == set()


def test_request_cancel_leaves_a_finished_session_as_it_is(store) -> None:
    store.create(_rec("s1"))
    store.set_status("s1", Status.COMPLETED, {"output_text": "done"})
    rec = store.request_cancel("s1", "a", now=T0)
    assert rec.status is Status.COMPLETED and not rec.cancel_requested
    assert store.get("s1", "a").status is Status.COMPLETED


def test_an_expired_cancelled_holder_is_reclaimed_with_its_flag(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.request_cancel("s1", "a", now=T0 + 10)  # held: only the flag
    rec = store.claim("s1", "w2", lease_s=30, now=T0 + 31)  # w1 died before it saw it
    assert rec.cancel_requested and store.cancels("w2") == {"s1"} and store.cancels("w1") == set()


def test_ownership_columns_are_added_to_an_older_file(tmp_path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
            created REAL NOT NULL, updated REAL NOT NULL, expires REAL NOT NULL,
            request TEXT NOT NULL, result TEXT, bytes INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO sessions VALUES ('s0', 'a', 'm', 'queued', 1, 1, 99999999999, '{}', NULL, 2);
        """
    )
    db.commit()
    db.close()
    s = SQLiteStore(path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6)
    got = s.get("s0", "a")
    assert got.owner is None and got.claims == 0 and not got.cancel_requested
    assert s.orphans(now=T0) == ["s0"]
    assert s.claim("s0", "w1", lease_s=30, now=T0).owner == "w1"
    s.close()
    s = SQLiteStore(
        path, ttl_s=60, max_sessions_per_tenant=10, max_bytes_per_tenant=10**6
    )  # reopening: no-op
    assert s.get_any("s0").owner == "w1"
    s.close()


def test_a_session_finished_by_set_status_is_no_longer_held_by_its_owner(store) -> None:
    store.create(_rec("s1"))
    store.claim("s1", "w1", lease_s=30, now=T0)
    store.request_cancel("s1", "a", now=T0)
    store.set_status("s1", Status.FAILED, {"error": "engine gone"})  # another code path ends it
    assert store.get_any("s1").owner == "w1"  # set_status leaves the owner as it was
    with pytest.raises(LeaseLost):
        store.checkpoint("s1", "w1", 0, [1], [_ev(0)])
    with pytest.raises(LeaseLost):
        store.finish("s1", "w1", Status.COMPLETED, {"output_text": "late"}, [])
    assert store.tokens("s1") == [] and store.events("s1") == []
    assert store.renew("w1", ["s1"], lease_s=30, now=T0 + 1) == set()
    assert store.cancels("w1") == set() and store.orphans(now=T0 + 100) == []
    assert store.get("s1", "a").status is Status.FAILED and store.get("s1", "a").result == {
        "error": "engine gone"
    }
