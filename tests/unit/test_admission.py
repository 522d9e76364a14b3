"""Admission control (router.admission): token buckets, the fair fan-out semaphore, the pool limiter
with its priority queue, tickets that give everything back exactly once. Pure asyncio; clocks are
injected wherever the code takes one."""

from __future__ import annotations

import asyncio
import math

import pytest

from router import admission as admission_mod
from router.admission import (
    AdmissionController,
    AdmissionRequest,
    FairSemaphore,
    Limits,
    PoolLimiter,
    Rejected,
    TokenBucket,
)
from serving.config import parse_spec
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


DEFAULT_LIMITS = Limits(10.0, 1000.0, 4, 1)


def controller(
    limits: dict[str, Limits] | None = None,
    default: Limits = DEFAULT_LIMITS,
    pools: dict[str, int] | None = None,
    max_queue: int = 8,
    queue_timeout_s: float = 1.0,
    clock: Clock | None = None,
) -> AdmissionController:
    named = limits or {}
    return AdmissionController(
        lambda tenant: named.get(tenant, default),
        pools if pools is not None else {"m": 2},
        max_queue,
        queue_timeout_s,
        clock=clock or Clock(),
    )


async def settle(n: int = 10) -> None:
    """Let ready tasks (and their callback chains) run."""
    for _ in range(n):
        await asyncio.sleep(0)


class LateWaitFor:
    """Stand-in for asyncio.wait_for whose deadline passes in the very instant the slot is handed over:
    it waits normally, then raises TimeoutError anyway."""

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw, timeout):  # noqa: ASYNC109 - asyncio.wait_for's own signature
        await asyncio.wait_for(aw, timeout)
        raise TimeoutError


# -- token bucket ---------------------------------------------------------------------------------


def test_bucket_starts_full_takes_and_refills_up_to_burst() -> None:
    b = TokenBucket(rate=10.0, burst=100.0, now=0.0)
    assert b.level(0.0) == 100.0
    assert b.try_take(30, 0.0) == 0.0
    assert b.level(0.0) == 70.0
    assert b.level(2.0) == pytest.approx(90.0)
    assert b.level(100.0) == 100.0  # capped at burst
    assert b.try_take(100, 100.0) == 0.0
    assert b.level(100.0) == 0.0


def test_bucket_short_returns_exact_wait_and_takes_nothing() -> None:
    b = TokenBucket(rate=10.0, burst=100.0, now=0.0)
    b.try_take(70, 0.0)  # level 30
    assert b.try_take(80, 0.0) == pytest.approx((80 - 30) / 10.0)
    assert b.level(0.0) == 30.0  # nothing taken
    # Half a second later the level is 35: the wait shrinks accordingly.
    assert b.try_take(80, 0.5) == pytest.approx((80 - 35) / 10.0)
    assert b.level(0.5) == pytest.approx(35.0)
    # After the announced wait, it fits.
    assert b.try_take(80, 5.0) == 0.0
    assert b.level(5.0) == pytest.approx(0.0)


def test_bucket_cost_above_burst_is_infinite_and_takes_nothing() -> None:
    b = TokenBucket(rate=10.0, burst=100.0, now=0.0)
    assert math.isinf(b.try_take(101, 0.0))
    assert b.level(0.0) == 100.0


def test_bucket_give_back_is_capped_and_negative_is_debt() -> None:
    b = TokenBucket(rate=10.0, burst=100.0, now=0.0)
    b.try_take(40, 0.0)
    b.give_back(1000, 0.0)
    assert b.level(0.0) == 100.0  # capped at burst
    b.give_back(-150, 0.0)  # used 150 more than reserved: a debt
    assert b.level(0.0) == -50.0
    assert b.level(3.0) == pytest.approx(-20.0)  # refilled from below zero
    assert b.try_take(10, 3.0) == pytest.approx((10 - -20) / 10.0)
    assert b.level(20.0) == 100.0


def test_bucket_rejects_non_positive_settings() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 10, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(1, 0, 0.0)


@pytest.mark.parametrize(
    ("retry", "header"), [(None, None), (math.inf, None), (0.2, "1"), (1.0, "1"), (2.1, "3"), (4.0, "4")]
)
def test_retry_after_header_rounds_up_with_floor(retry: float | None, header: str | None) -> None:
    assert Rejected("r", "m", retry).retry_after_header() == header


# -- tickets reconcile ------------------------------------------------------------------------------


async def test_ticket_release_refunds_unused_reservation() -> None:
    clock = Clock()
    ctl = controller(clock=clock)
    t = await ctl.admit(AdmissionRequest("a", prompt_tokens=100, reserved_tokens=50))
    assert t.request.cost == 150
    assert ctl.bucket("a").level(clock()) == 850
    assert ctl.snapshot()["tenant_in_flight"] == {"a": 1}
    t.release(120)  # used 120 of 150: 30 back
    assert ctl.bucket("a").level(clock()) == 880
    assert ctl.snapshot()["tenant_in_flight"] == {}
    t.release(0)  # a second release is a no-op
    t.release(None)
    assert ctl.bucket("a").level(clock()) == 880
    assert ctl.snapshot()["tenant_in_flight"] == {}


async def test_ticket_release_none_refunds_everything_and_overuse_is_a_debt() -> None:
    clock = Clock()
    ctl = controller(clock=clock)
    t1 = await ctl.admit(AdmissionRequest("a", 100, 50))
    t2 = await ctl.admit(AdmissionRequest("a", 10, 10))
    assert ctl.snapshot()["tenant_in_flight"] == {"a": 2}
    t1.release(None)
    assert ctl.bucket("a").level(clock()) == 1000 - 20
    assert ctl.snapshot()["tenant_in_flight"] == {"a": 1}
    t2.release(500)  # used 500 though it reserved 20
    assert ctl.bucket("a").level(clock()) == 1000 - 500
    assert ctl.snapshot()["tenant_in_flight"] == {}


# -- the controller's bucket checks ----------------------------------------------------------------


async def test_rate_limited_tenant_gets_the_computed_wait() -> None:
    clock = Clock()
    ctl = controller(default=Limits(10.0, 100.0, 4, 1), clock=clock)
    await ctl.admit(AdmissionRequest("a", 60, 20))  # level 20
    clock.t += 0.25  # level 22.5
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 40, 10))
    e = err.value
    assert e.reason == "tenant_rate_limited" and e.status == 429
    assert e.retry_after_s == pytest.approx((50 - 22.5) / 10.0)
    assert e.retry_after_header() == "3"
    assert ctl.bucket("a").level(clock()) == pytest.approx(22.5)  # nothing taken
    assert ctl.snapshot()["tenant_in_flight"] == {"a": 1}  # only the first one
    clock.t += 0.1  # level 23.5: 1.5 tokens short, 0.15 s
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 25, 0))
    assert err.value.retry_after_s == pytest.approx(0.15)
    assert err.value.retry_after_header() == "1"  # at least one second


async def test_request_larger_than_the_bucket_is_a_400() -> None:
    clock = Clock()
    ctl = controller(default=Limits(10.0, 100.0, 4, 1), clock=clock)
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 60, 41))
    assert err.value.reason == "request_too_large"
    assert err.value.status == 400
    assert err.value.retry_after_header() is None
    assert "lower max_tokens" in err.value.message
    assert ctl.bucket("a").level(clock()) == 100.0
    assert ctl.snapshot()["tenant_in_flight"] == {}


async def test_tenants_have_separate_buckets() -> None:
    clock = Clock()
    ctl = controller(default=Limits(1.0, 100.0, 4, 1), clock=clock)
    await ctl.admit(AdmissionRequest("a", 90, 10))
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 1, 0))
    assert err.value.reason == "tenant_rate_limited"
    t = await ctl.admit(AdmissionRequest("b", 90, 10))  # b's bucket is untouched by a
    assert t.request.tenant == "b"
    snap = ctl.snapshot()
    assert snap["buckets"] == {"a": 0.0, "b": 0.0}
    assert snap["tenant_in_flight"] == {"a": 1, "b": 1}


def _gateway(admission: dict, ingress_replicas: int = 1) -> Gateway:
    spec = parse_spec(
        {
            "server": {"ingress_replicas": ingress_replicas},
            "models": [
                {"name": "m", "source": "fake", "pools": [{"engine": "fake", "replicas": {"max": 3}}]},
                {"name": "n", "source": "fake", "pools": [{"engine": "fake", "max_ongoing_requests": 5}]},
            ],
            "auth": {"enabled": False},
            "admission": admission,
        }
    )
    return Gateway.from_spec(spec, IngressMetrics())


async def test_named_tenant_limits_override_the_default_and_scale_by_share() -> None:
    gw = _gateway(
        {
            "default_tenant": {
                "tokens_per_s": 100,
                "burst_tokens": 1000,
                "fanout_width": 3,
                "priority": "batch",
            },
            "tenants": [
                {
                    "name": "gold",
                    "tokens_per_s": 500,
                    "burst_tokens": 5000,
                    "fanout_width": 16,
                    "priority": "interactive",
                }
            ],
            "pool_limits": [{"model": "n", "max_concurrency": 9}],
        },
        ingress_replicas=2,
    )
    ctl = gw.admission
    assert (ctl.bucket("gold").rate, ctl.bucket("gold").burst) == (250.0, 2500.0)
    assert (ctl.bucket("anyone").rate, ctl.bucket("anyone").burst) == (50.0, 500.0)
    gold = await ctl.admit(AdmissionRequest("gold", 2000, 400, task_id="t"))
    assert gold.priority_rank == 0
    with pytest.raises(Rejected) as err:  # 2400 fits gold's bucket but not the default's 500
        await ctl.admit(AdmissionRequest("anyone", 2000, 400))
    assert err.value.reason == "request_too_large"
    other = await ctl.admit(AdmissionRequest("anyone", 100, 100, task_id="t"))
    assert other.priority_rank == 2
    # Fan-out widths come from each tenant's limits.
    assert {k: s.width for k, s in ctl._fanouts.items()} == {("gold", "t"): 16, ("anyone", "t"): 3}
    # Pool limits: explicit 9 -> ceil(4.5); implicit replicas.max 3 x 64 ongoing -> 96.
    assert ctl.pool("n").limit == 5
    assert ctl.pool("m").limit == 96
    with pytest.raises(KeyError):
        ctl.pool("unknown")


async def test_admission_disabled_admits_anything() -> None:
    gw = _gateway({"enabled": False, "default_tenant": {"tokens_per_s": 1, "burst_tokens": 1}})
    ctl = gw.admission
    for _ in range(5):
        t = await ctl.admit(AdmissionRequest("x", 10**6, 10**6))
        t.release(3 * 10**6)
    assert ctl.bucket("x").level(ctl.clock()) == math.inf


async def test_a_request_cannot_raise_its_priority_above_the_tenants() -> None:
    ctl = controller(default=Limits(10.0, 1000.0, 4, 1), limits={"vip": Limits(10.0, 1000.0, 4, 0)})
    asks = {None: 1, 0: 1, 1: 1, 2: 2}
    for asked, rank in asks.items():
        t = await ctl.admit(AdmissionRequest("a", 1, 1, priority_rank=asked))
        assert t.priority_rank == rank, asked
        t.release(None)
    vip = await ctl.admit(AdmissionRequest("vip", 1, 1))
    assert vip.priority_rank == 0
    vip.release(None)


async def test_raised_priority_does_not_jump_the_pool_queue() -> None:
    ctl = controller(
        default=Limits(10.0, 1000.0, 4, 1), limits={"vip": Limits(10.0, 1000.0, 4, 0)}, pools={"m": 1}
    )
    holder = await ctl.admit(AdmissionRequest("a", 1, 1))
    await holder.enter_pool("m", None)
    cheeky = await ctl.admit(AdmissionRequest("a", 1, 1, priority_rank=0))  # asks interactive
    vip = await ctl.admit(AdmissionRequest("vip", 1, 1))
    order: list[str] = []

    async def enter(name: str, t) -> None:
        await t.enter_pool("m", None)
        order.append(name)
        t.release(None)

    tasks = [asyncio.create_task(enter("cheeky", cheeky))]
    await settle()
    tasks.append(asyncio.create_task(enter("vip", vip)))
    await settle()
    assert ctl.snapshot()["pools"]["m"] == {"in_use": 1, "queued": 2}
    holder.release(None)
    await asyncio.gather(*tasks)
    assert order == ["vip", "cheeky"]
    assert ctl.snapshot()["pools"]["m"] == {"in_use": 0, "queued": 0}


# -- fair semaphore --------------------------------------------------------------------------------


async def test_semaphore_width_is_respected() -> None:
    sem = FairSemaphore(3)
    inside = 0
    peak = 0
    done = 0

    async def worker() -> None:
        nonlocal inside, peak, done
        await sem.acquire(None)
        inside += 1
        peak = max(peak, inside)
        assert sem.in_use <= 3
        await asyncio.sleep(0.001)
        inside -= 1
        done += 1
        sem.release()

    await asyncio.gather(*(worker() for _ in range(25)))
    assert peak == 3
    assert done == 25
    assert sem.in_use == 0 and sem.idle


async def test_semaphore_is_fifo_and_newcomers_do_not_barge() -> None:
    sem = FairSemaphore(1)
    await sem.acquire(None)
    order: list[str] = []

    async def worker(name: str) -> None:
        await sem.acquire(None)
        order.append(name)
        await asyncio.sleep(0)
        sem.release()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(worker(f"w{i}")))
        await settle(2)
    assert sem.waiting == 5
    sem.release()  # handed straight to w0: in_use stays 1
    assert sem.in_use == 1
    tasks.append(asyncio.create_task(worker("late")))  # arrives while the slot is in transit
    await asyncio.gather(*tasks)
    assert order == ["w0", "w1", "w2", "w3", "w4", "late"]
    assert sem.in_use == 0 and sem.idle


async def test_semaphore_timeout_frees_the_waiters_place() -> None:
    sem = FairSemaphore(1)
    await sem.acquire(None)
    got: list[str] = []

    async def patient() -> None:
        await sem.acquire(None)
        got.append("patient")

    with pytest.raises(TimeoutError):
        await sem.acquire(0.05)
    assert sem.in_use == 1 and sem.waiting == 0 and not sem._waiters
    # A waiter that timed out in the middle of the queue is skipped.
    short = asyncio.create_task(sem.acquire(0.05))
    await settle()
    task = asyncio.create_task(patient())
    await settle()
    with pytest.raises(TimeoutError):
        await short
    assert sem.waiting == 1
    sem.release()
    await task
    assert got == ["patient"] and sem.in_use == 1
    sem.release()
    assert sem.in_use == 0 and sem.idle


async def test_semaphore_cancelled_waiter_does_not_leak() -> None:
    sem = FairSemaphore(1)
    await sem.acquire(None)
    waiter = asyncio.create_task(sem.acquire(None))
    await settle()
    assert sem.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sem.waiting == 0 and sem.in_use == 1
    sem.release()
    assert sem.in_use == 0 and sem.idle


async def test_semaphore_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    sem = FairSemaphore(1)
    await sem.acquire(None)
    first = asyncio.create_task(sem.acquire(None))
    await settle()
    second = asyncio.create_task(sem.acquire(None))
    await settle()
    first.cancel()
    sem.release()  # hands the slot to `first` in the same instant it is cancelled
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)  # the slot went on to `second`
    assert sem.in_use == 1 and sem.waiting == 0
    sem.release()
    assert sem.in_use == 0 and sem.idle


async def test_semaphore_slot_handed_as_the_wait_times_out_is_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission_mod, "asyncio", LateWaitFor())
    sem = FairSemaphore(1)
    await sem.acquire(None)
    waiter = asyncio.create_task(sem.acquire(5.0))
    await settle()
    sem.release()  # handed to the waiter, whose deadline passes at the same time
    with pytest.raises(TimeoutError):
        await waiter
    assert sem.in_use == 0 and sem.idle  # not leaked to the waiter that gave up


def test_semaphore_misuse() -> None:
    with pytest.raises(ValueError):
        FairSemaphore(0)
    with pytest.raises(RuntimeError):
        FairSemaphore(1).release()


# -- fan-out through the controller ----------------------------------------------------------------


async def test_fanout_width_bounds_tickets_of_one_task() -> None:
    ctl = controller(default=Limits(10.0, 10_000.0, 4, 1), queue_timeout_s=5.0)
    alive: list = []
    peak = 0
    admitted = 0

    async def call() -> None:
        nonlocal peak, admitted
        t = await ctl.admit(AdmissionRequest("a", 5, 5, task_id="task-1"))
        admitted += 1
        alive.append(t)
        peak = max(peak, len(alive))
        # Slots handed to a waiter that has not run yet count as in use too.
        assert len(alive) <= ctl.snapshot()["fanout_in_use"]["a"] <= 4
        await asyncio.sleep(0.002)
        alive.remove(t)
        t.release(10)

    await asyncio.gather(*(call() for _ in range(20)))
    assert peak == 4
    assert admitted == 20
    snap = ctl.snapshot()
    assert snap["fanout_tasks"] == 0
    assert snap["tenant_in_flight"] == {}
    assert snap["fanout_in_use"] == {}


async def test_fanout_other_task_is_not_blocked() -> None:
    ctl = controller(default=Limits(10.0, 10_000.0, 4, 1), queue_timeout_s=5.0)
    held = [await ctl.admit(AdmissionRequest("a", 1, 1, task_id="t1")) for _ in range(4)]
    fifth = asyncio.create_task(ctl.admit(AdmissionRequest("a", 1, 1, task_id="t1")))
    await settle()
    assert not fifth.done()
    other = await asyncio.wait_for(ctl.admit(AdmissionRequest("a", 1, 1, task_id="t2")), 0.5)
    same_id_other_tenant = await asyncio.wait_for(ctl.admit(AdmissionRequest("b", 1, 1, task_id="t1")), 0.5)
    no_task = await asyncio.wait_for(ctl.admit(AdmissionRequest("a", 1, 1)), 0.5)
    assert ctl.snapshot()["fanout_tasks"] == 3
    held[0].release(2)
    t5 = await asyncio.wait_for(fifth, 1.0)
    for t in [*held[1:], t5, other, same_id_other_tenant, no_task]:
        t.release(2)
    snap = ctl.snapshot()
    assert snap["fanout_tasks"] == 0 and snap["tenant_in_flight"] == {}


async def test_fanout_timeout_rejects_and_refunds_the_bucket() -> None:
    clock = Clock()
    ctl = controller(default=Limits(10.0, 1000.0, 2, 1), queue_timeout_s=0.05, clock=clock)
    held = [await ctl.admit(AdmissionRequest("a", 10, 10, task_id="t")) for _ in range(2)]
    before = ctl.bucket("a").level(clock())
    assert before == 960
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 100, 100, task_id="t"))
    assert err.value.reason == "fanout_timeout" and err.value.status == 429
    assert err.value.retry_after_header() == "1"
    assert ctl.bucket("a").level(clock()) == before  # charge refunded
    snap = ctl.snapshot()
    assert snap["tenant_in_flight"] == {"a": 2}
    assert snap["fanout_in_use"] == {"a": 2}
    assert snap["fanout_tasks"] == 1  # still held by the two
    for t in held:
        t.release(5)  # 15 of each 20 unused
    snap = ctl.snapshot()
    assert snap["fanout_tasks"] == 0  # dropped once idle
    assert ctl.bucket("a").level(clock()) == 990


async def test_fanout_cancelled_admission_holds_nothing() -> None:
    clock = Clock()
    ctl = controller(default=Limits(10.0, 1000.0, 1, 1), queue_timeout_s=5.0, clock=clock)
    held = await ctl.admit(AdmissionRequest("a", 10, 10, task_id="t"))
    waiting = asyncio.create_task(ctl.admit(AdmissionRequest("a", 100, 100, task_id="t")))
    await settle()
    assert ctl.bucket("a").level(clock()) == 780
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ctl.bucket("a").level(clock()) == 980
    held.release(None)
    snap = ctl.snapshot()
    assert snap["fanout_tasks"] == 0 and snap["tenant_in_flight"] == {}
    assert ctl.bucket("a").level(clock()) == 1000


# -- pool limiter ----------------------------------------------------------------------------------


async def test_pool_limit_is_respected() -> None:
    pool = PoolLimiter(limit=2, max_queue=8)
    await pool.acquire(1, 1.0)
    await pool.acquire(1, 1.0)
    third = asyncio.create_task(pool.acquire(1, 1.0))
    await settle()
    assert not third.done()
    assert pool.in_use == 2 and pool.queued == 1
    pool.release(None)
    await asyncio.wait_for(third, 1.0)
    assert pool.in_use == 2 and pool.queued == 0
    pool.release(None)
    pool.release(None)
    assert pool.in_use == 0
    with pytest.raises(RuntimeError):
        pool.release(None)


async def test_pool_serves_by_priority_then_arrival() -> None:
    pool = PoolLimiter(limit=1, max_queue=8)
    await pool.acquire(1, 1.0)
    order: list[str] = []

    async def waiter(name: str, rank: int) -> None:
        await pool.acquire(rank, 5.0)
        order.append(name)
        await asyncio.sleep(0)
        pool.release(None)

    tasks = []
    for name, rank in [("batch-1", 2), ("inter-1", 0), ("std-1", 1), ("inter-2", 0), ("batch-2", 2)]:
        tasks.append(asyncio.create_task(waiter(name, rank)))
        await settle(2)
    assert pool.queued == 5
    pool.release(None)
    await asyncio.gather(*tasks)
    assert order == ["inter-1", "inter-2", "std-1", "batch-1", "batch-2"]
    assert pool.in_use == 0 and pool.queued == 0


async def test_pool_queue_full_is_rejected_at_once() -> None:
    pool = PoolLimiter(limit=1, max_queue=1)
    await pool.acquire(1, 1.0)
    queued = asyncio.create_task(pool.acquire(1, 5.0))
    await settle()
    with pytest.raises(Rejected) as err:
        await asyncio.wait_for(pool.acquire(0, 5.0), 0.5)
    assert err.value.reason == "queue_full" and err.value.status == 429
    assert err.value.retry_after_s >= 1.0
    assert pool.queued == 1 and pool.in_use == 1
    pool.release(None)
    await queued
    pool.release(None)
    assert pool.in_use == 0


async def test_pool_predicted_wait_counts_only_requests_ahead() -> None:
    pool = PoolLimiter(limit=2, max_queue=8)
    pool.mean_hold_s = 1.0
    assert pool.predicted_wait_s(1) == 0.0  # a free slot
    await pool.acquire(1, 1.0)
    await pool.acquire(1, 1.0)
    tasks = [asyncio.create_task(pool.acquire(1, 5.0)) for _ in range(3)]
    await settle()
    assert pool.predicted_wait_s(1) == pytest.approx((3 + 1) * 1.0 / 2)
    assert pool.predicted_wait_s(2) == pytest.approx((3 + 1) * 1.0 / 2)
    assert pool.predicted_wait_s(0) == pytest.approx((0 + 1) * 1.0 / 2)  # served before the standard ones
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert pool.queued == 0 and pool.in_use == 2


async def test_pool_rejects_when_predicted_wait_exceeds_the_slo() -> None:
    pool = PoolLimiter(limit=1, max_queue=8)
    await pool.acquire(1, 1.0)
    pool.release(4.0)  # mean hold 4 s
    assert pool.mean_hold_s == 4.0
    await pool.acquire(1, 1.0)
    with pytest.raises(Rejected) as err:
        await pool.acquire(1, 1.0, slo_s=3.0)  # would wait (0 + 1) x 4 / 1 = 4 s > 3 s
    assert err.value.reason == "predicted_wait"
    assert err.value.retry_after_s == pytest.approx(4.0)
    assert pool.queued == 0
    # Under a looser objective it queues instead.
    waiter = asyncio.create_task(pool.acquire(1, 1.0, slo_s=5.0))
    await settle()
    assert pool.queued == 1 and not waiter.done()
    pool.release(None)
    await waiter
    pool.release(None)
    assert pool.in_use == 0


async def test_pool_queue_timeout_is_rejected_and_leaves_the_queue() -> None:
    pool = PoolLimiter(limit=1, max_queue=8)
    await pool.acquire(1, 1.0)
    with pytest.raises(Rejected) as err:
        await pool.acquire(1, 0.05)
    assert err.value.reason == "queue_timeout" and err.value.status == 429
    assert err.value.retry_after_s >= 1.0
    assert pool.queued == 0 and pool.in_use == 1 and not pool._ranks
    pool.release(None)
    assert pool.in_use == 0
    await pool.acquire(1, 0.05)  # the fast path works again
    assert pool.in_use == 1


async def test_pool_cancelled_waiter_does_not_leak() -> None:
    pool = PoolLimiter(limit=1, max_queue=8)
    await pool.acquire(1, 1.0)
    waiter = asyncio.create_task(pool.acquire(1, 5.0))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.queued == 0
    pool.release(None)
    assert pool.in_use == 0


async def test_pool_slot_handed_as_the_wait_times_out_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_mod, "asyncio", LateWaitFor())
    pool = PoolLimiter(limit=1, max_queue=8)
    await pool.acquire(1, 1.0)
    waiter = asyncio.create_task(pool.acquire(1, 5.0))
    await settle()
    pool.release(None)
    with pytest.raises(Rejected) as err:
        await waiter
    assert err.value.reason == "queue_timeout"
    assert pool.in_use == 0 and pool.queued == 0


def test_pool_release_feeds_the_ewma_of_hold_times() -> None:
    pool = PoolLimiter(limit=4, max_queue=8, ewma_alpha=0.5)
    pool.in_use = 4
    pool.release(2.0)
    assert pool.mean_hold_s == 2.0  # the first sample sets it
    pool.release(4.0)
    assert pool.mean_hold_s == pytest.approx(3.0)
    pool.release(None)  # no sample
    assert pool.mean_hold_s == pytest.approx(3.0)
    pool.release(1.0)
    assert pool.mean_hold_s == pytest.approx(2.0)
    assert pool.in_use == 0


# -- tickets and pools -----------------------------------------------------------------------------


async def test_ticket_moves_between_pools_and_release_frees_the_slot() -> None:
    clock = Clock(10.0)
    ctl = controller(pools={"a": 1, "b": 1}, clock=clock)
    t = await ctl.admit(AdmissionRequest("x", 1, 1))
    assert t.pool is None
    await t.enter_pool("a", None)
    assert t.pool == "a"
    assert ctl.snapshot()["pools"] == {"a": {"in_use": 1, "queued": 0}}
    clock.t = 12.5
    await t.enter_pool("b", None)  # leaves a first
    assert t.pool == "b"
    assert ctl.pool("a").in_use == 0 and ctl.pool("b").in_use == 1
    assert ctl.pool("a").mean_hold_s == pytest.approx(2.5)
    clock.t = 13.0
    t.leave_pool()
    t.leave_pool()  # no-op
    assert t.pool is None and ctl.pool("b").in_use == 0
    assert ctl.pool("b").mean_hold_s == pytest.approx(0.5)
    await t.enter_pool("b", None)
    t.release(2)
    assert ctl.pool("b").in_use == 0
    t.release(2)
    assert ctl.pool("b").in_use == 0  # released once
    assert ctl.snapshot()["tenant_in_flight"] == {}


async def test_ticket_enter_pool_rejected_holds_no_slot() -> None:
    ctl = controller(pools={"a": 1}, queue_timeout_s=0.05)
    first = await ctl.admit(AdmissionRequest("x", 1, 1))
    await first.enter_pool("a", None)
    second = await ctl.admit(AdmissionRequest("x", 1, 1))
    with pytest.raises(Rejected) as err:
        await second.enter_pool("a", None)
    assert err.value.reason == "queue_timeout"
    assert second.pool is None
    second.release(None)
    assert ctl.pool("a").in_use == 1
    first.release(None)
    assert ctl.snapshot()["pools"] == {"a": {"in_use": 0, "queued": 0}}


async def test_pool_without_a_wait_estimate_queues_one_wave_at_most() -> None:
    pool = PoolLimiter(limit=2, max_queue=100)
    await pool.acquire(0, 1.0, slo_s=0.5)
    await pool.acquire(0, 1.0, slo_s=0.5)
    waiters = [asyncio.ensure_future(pool.acquire(0, 5.0, slo_s=0.5)) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.queued == 2 and pool.mean_hold_s == 0.0
    with pytest.raises(Rejected) as e:
        await pool.acquire(0, 5.0, slo_s=0.5)
    assert e.value.reason == "predicted_wait"
    # Without an objective there is no early rejection: it queues.
    extra = asyncio.ensure_future(pool.acquire(0, 5.0))
    await asyncio.sleep(0)
    assert pool.queued == 3
    for _ in range(3):
        pool.release(0.1)
    await asyncio.gather(*waiters, extra)
    assert pool.in_use == 2 and pool.mean_hold_s > 0


# -- per-tenant in-flight cap and fairness in the pool queue (M6) ---------------------------------


async def test_tenant_in_flight_cap_rejects_with_its_reason_and_is_released_once() -> None:
    capped = Limits(10.0, 1000.0, 4, 1, max_in_flight=2)
    ctl = controller(default=capped)
    a1 = await ctl.admit(AdmissionRequest("a", 5, 5))
    a2 = await ctl.admit(AdmissionRequest("a", 5, 5))
    level = ctl.bucket("a").level(ctl.clock())
    with pytest.raises(Rejected) as err:
        await ctl.admit(AdmissionRequest("a", 5, 5))
    e = err.value
    assert e.reason == "tenant_concurrency" and e.status == 429
    assert e.retry_after_header() == "1" and "2 requests in flight" in e.message
    assert ctl.bucket("a").level(ctl.clock()) == level  # the rejected one took nothing
    # Another tenant has a count of its own.
    b = await ctl.admit(AdmissionRequest("b", 5, 5))
    assert ctl.snapshot()["tenant_in_flight"] == {"a": 2, "b": 1}
    # The count enforced is `_tenant_in_flight`, and a ticket released twice frees one place only.
    a1.release(None)
    a1.release(None)
    assert ctl._tenant_in_flight == {"a": 1, "b": 1}
    a3 = await ctl.admit(AdmissionRequest("a", 5, 5))
    with pytest.raises(Rejected):
        await ctl.admit(AdmissionRequest("a", 5, 5))
    for t in (a2, a3, b):
        t.release(None)
    assert ctl.snapshot()["tenant_in_flight"] == {}


async def test_admissions_waiting_for_a_fanout_slot_count_against_the_cap() -> None:
    ctl = controller(default=Limits(10.0, 1000.0, 1, 1, max_in_flight=2), queue_timeout_s=0.05)
    first = await ctl.admit(AdmissionRequest("a", 5, 5, task_id="t"))
    waiting = asyncio.create_task(ctl.admit(AdmissionRequest("a", 5, 5, task_id="t")))
    await settle()
    assert not waiting.done() and ctl._tenant_in_flight == {"a": 2}
    with pytest.raises(Rejected) as err:  # no overshoot while the other waits
        await ctl.admit(AdmissionRequest("a", 5, 5))
    assert err.value.reason == "tenant_concurrency"
    with pytest.raises(Rejected) as err:
        await waiting
    assert err.value.reason == "fanout_timeout"
    # The timed-out admission gave its place and its tokens back.
    assert ctl._tenant_in_flight == {"a": 1}
    assert ctl.bucket("a").level(ctl.clock()) == pytest.approx(1000 - 10)
    first.release(None)
    assert ctl._tenant_in_flight == {}


async def test_tenant_in_flight_cap_comes_from_the_spec_and_scales_by_share() -> None:
    gw = _gateway(
        {"default_tenant": {"max_in_flight": 5}, "tenants": [{"name": "free", "max_in_flight": None}]},
        ingress_replicas=2,
    )
    limits = gw.admission._limits_for
    assert limits("anyone").max_in_flight == 3  # ceil(5 / 2)
    assert limits("free").max_in_flight is None
    assert _gateway({}).admission._limits_for("x").max_in_flight == 512  # the default
    assert _gateway({"enabled": False}).admission._limits_for("x").max_in_flight is None


async def test_one_tenants_flood_does_not_fill_the_queue_for_another() -> None:
    # Pool limit 4, max_queue 8: tenant a fires 20 requests (slow: each holds its slot until told to
    # finish), then b fires one.
    ctl = controller(pools={"m": 4}, max_queue=8, queue_timeout_s=5.0)
    entered: list[str] = []
    finish: dict[str, asyncio.Event] = {}

    async def request(name: str) -> Rejected | None:
        t = await ctl.admit(AdmissionRequest(name[0], 1, 1))
        try:
            await t.enter_pool("m", None)
            entered.append(name)
            await finish.setdefault(name, asyncio.Event()).wait()
        except Rejected as e:
            return e
        finally:
            t.release(None)
        return None

    flood = []
    for n in range(20):
        flood.append(asyncio.create_task(request(f"a{n}")))
        await settle(2)
    await settle()
    pool = ctl.pool("m")
    assert pool.in_use == 4 and pool.queued == 8 and entered == ["a0", "a1", "a2", "a3"]
    assert [t.result().reason for t in flood if t.done()] == ["queue_full"] * 8
    b = asyncio.create_task(request("b0"))
    await settle()
    # b is queued, not rejected: a's newest waiter (a11) made room for it.
    assert not b.done() and pool.queued == 8 and pool.queued_of("b") == 1
    evicted = flood[11].result()
    assert evicted.reason == "queue_full" and evicted.retry_after_header() is not None
    # A slot frees: it goes to b (holding none) before a's earlier waiters.
    finish["a0"].set()
    await settle()
    assert entered[4:] == ["b0"]
    # The next ones go to a's waiters in their order.
    finish["a1"].set()
    await settle()
    assert entered[5:] == ["a4"]
    # Everything is given back exactly once.
    while not all(t.done() for t in [*flood, b]):
        for name in entered:
            finish.setdefault(name, asyncio.Event()).set()
        await settle()
    assert [t.result() for t in flood[4:11]] == [None] * 7 and b.result() is None
    assert entered == ["a0", "a1", "a2", "a3", "b0", *(f"a{n}" for n in range(4, 11))]
    assert ctl.snapshot()["pools"]["m"] == {"in_use": 0, "queued": 0}
    assert ctl.snapshot()["tenant_in_flight"] == {} and not pool._held


async def test_freed_slots_go_round_robin_between_tenants_of_one_class() -> None:
    pool = PoolLimiter(limit=1, max_queue=16)
    await pool.acquire(1, 1.0, tenant="h")
    order: list[str] = []

    async def waiter(name: str) -> None:
        await pool.acquire(1, 5.0, tenant=name[0])
        order.append(name)
        await asyncio.sleep(0)
        pool.release(None, name[0])

    tasks = []
    for name in ["a1", "a2", "a3", "b1", "b2", "c1"]:
        tasks.append(asyncio.create_task(waiter(name)))
        await settle(2)
    assert pool.queued == 6
    pool.release(None, "h")
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]  # not a1 a2 a3 b1 b2 c1
    assert pool.in_use == 0 and pool.queued == 0 and not pool._held


async def test_a_full_queue_is_not_freed_at_the_expense_of_more_urgent_waiters() -> None:
    pool = PoolLimiter(limit=1, max_queue=2)
    await pool.acquire(0, 1.0, tenant="a")
    urgent = [asyncio.create_task(pool.acquire(0, 5.0, tenant="a")) for _ in range(2)]
    await settle()
    with pytest.raises(Rejected) as err:  # b's batch request does not push a's interactive ones out
        await pool.acquire(2, 5.0, tenant="b")
    assert err.value.reason == "queue_full"
    assert pool.queued == 2 and not any(t.done() for t in urgent)
    # Nor does a tenant that already holds as many places as the others.
    late = asyncio.create_task(pool.acquire(0, 5.0, tenant="b"))  # pushes a's newest out
    await settle()
    assert urgent[1].done() and isinstance(urgent[1].exception(), Rejected)
    with pytest.raises(Rejected):
        await pool.acquire(0, 5.0, tenant="b")  # b 1 vs a 1: no more room for b
    pool.release(None, "a")
    await urgent[0]
    pool.release(None, "a")
    await late
    pool.release(None, "b")
    assert pool.in_use == 0 and pool.queued == 0


async def test_wait_prediction_counts_what_round_robin_serves_first() -> None:
    pool = PoolLimiter(limit=2, max_queue=100)
    await pool.acquire(1, 1.0, tenant="a")
    await pool.acquire(1, 1.0, tenant="a")
    flood = [asyncio.create_task(pool.acquire(1, 5.0, slo_s=100.0, tenant="a")) for _ in range(2)]
    await settle()
    assert pool.queued == 2 and pool.mean_hold_s == 0.0
    # a itself is held to one wave without an estimate; b, whom round-robin serves next, is not.
    with pytest.raises(Rejected) as err:
        await pool.acquire(1, 5.0, slo_s=0.5, tenant="a")
    assert err.value.reason == "predicted_wait"
    b = asyncio.create_task(pool.acquire(1, 5.0, slo_s=0.5, tenant="b"))
    await settle()
    assert not b.done() and pool.queued_of("b") == 1
    pool.mean_hold_s = 1.0
    assert pool.predicted_wait_s(1, "a") == pytest.approx((2 + 1 + 1) * 1.0 / 2)  # its 2, b's 1
    assert pool.predicted_wait_s(1, "c") == pytest.approx((1 + 1 + 1) * 1.0 / 2)  # a's first, b's
    pool.release(None, "a")
    await b
    for t in flood:
        t.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert pool.queued == 0 and pool.busy
    pool.release(None, "a")
    assert not pool.busy
    pool.release(None, "b")
    assert pool.in_use == 0
