"""Admission control: what the cluster can serve on time is admitted, the rest gets a 429 at once.

Pure asyncio, no Ray and no HTTP: the ingress builds one `AdmissionController` per replica and
calls `admit()` for every request. The checks, in order:

0. **In-flight cap per tenant** (`Limits.max_in_flight`): a tenant with that many admitted requests
   not yet finished gets a 429 `tenant_concurrency` (its cheap requests cannot hold every slot).
1. **Token bucket per tenant.** A request costs its prompt tokens plus the output tokens it
   reserves (its max_tokens, or a default). The cost is taken at admission and reconciled when the
   request ends: unused reserved tokens go back to the bucket. A request that does not fit gets a
   429 whose Retry-After is when the bucket will have refilled enough.
2. **Fan-out semaphore per agent task** (`x-tandem-task-id`): at most the tenant's width of calls of
   one task are in flight; the rest wait their turn (first come, first served) up to a deadline.
3. **Pool concurrency** per model: at most `limit` requests in flight; the rest wait in a bounded
   queue ordered by priority class, then fairly between tenants (round-robin, the tenant holding
   the fewest slots first), then arrival; a tenant holding the most queue places makes room for
   another (see `PoolLimiter`). A request whose predicted wait already exceeds its tier's TTFT
   objective is rejected at once instead of queueing to miss it.

`Ticket` holds what was taken and gives every piece back exactly once (`release`), whatever
happens to the request. Limits are per ingress replica: the controller is built with the cluster
figures scaled by its `share` (1 / ingress replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: Floor of a Retry-After value (seconds): clients should not come back in a tight loop.
MIN_RETRY_AFTER_S = 1.0


class Rejected(Exception):
    """A request that is not admitted. `status` is 429 (come back later) or 503 (pool down)."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None, status: int = 429):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s
        self.status = status

    def retry_after_header(self) -> str | None:
        """The Retry-After header value (whole seconds, rounded up, at least MIN_RETRY_AFTER_S)."""
        if self.retry_after_s is None or math.isinf(self.retry_after_s):
            return None
        return str(math.ceil(max(self.retry_after_s, MIN_RETRY_AFTER_S)))


class TokenBucket:
    """A token bucket: `burst` tokens at most, refilled at `rate` tokens per second.

    The level may go below zero when a request used more than it reserved (a debt repaid by refill).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._level = float(burst)
        self._t = now

    def level(self, now: float) -> float:
        """Tokens available at `now`."""
        if now > self._t:
            self._level = min(self.burst, self._level + (now - self._t) * self.rate)
            self._t = now
        return self._level

    def try_take(self, cost: float, now: float) -> float:
        """Take `cost` tokens if available and return 0; else take nothing and return the seconds until
        they will be (inf when `cost` exceeds the bucket's size)."""
        if cost > self.burst:
            return math.inf
        level = self.level(now)
        if level >= cost:
            self._level = level - cost
            return 0.0
        return (cost - level) / self.rate

    def give_back(self, tokens: float, now: float) -> None:
        """Return `tokens` (capped at the bucket's size); a negative amount charges more."""
        self._level = min(self.burst, self.level(now) + tokens)


class FairSemaphore:
    """A semaphore that hands slots out in arrival order, with a deadline on each wait."""

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError("width must be >= 1")
        self.width = width
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot."""
        return sum(1 for w in self._waiters if not w.done())

    @property
    def idle(self) -> bool:
        """No slot taken and nobody waiting."""
        return self.in_use == 0 and not self._waiters

    async def acquire(self, max_wait_s: float | None) -> None:
        """Take a slot, waiting at most `max_wait_s` seconds (TimeoutError) behind earlier callers."""
        if self.in_use < self.width and not self._waiters:
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), max_wait_s)
        except BaseException:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us as we gave up: pass it on.
                self.release()
            else:
                fut.cancel()
            self._discard(fut)
            raise
        self._discard(fut)

    def _discard(self, fut: asyncio.Future[None]) -> None:
        # release() may already have popped it (handing it the slot).
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self) -> None:
        """Give a slot back: to the longest waiter if any, else to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; in_use is unchanged
                return
        if self.in_use <= 0:
            raise RuntimeError("release() without acquire()")
        self.in_use -= 1


@dataclass(eq=False, slots=True)
class _Waiter:
    rank: int
    tenant: str | None
    fut: asyncio.Future[None]


class PoolLimiter:
    """Concurrency limit of one pool with a bounded wait queue, fair between tenants.

    NOTE(fairness): one tenant's cheap requests must not take every slot and queue place from the
    others (the token bucket bounds tokens, not requests):

    1. Order: a freed slot goes to the best priority class waiting; within it, to the waiting tenant
       that holds the fewest of this pool's slots, ties in round-robin order (a tenant served goes to
       the back); first come, first served within a tenant. A lone tenant is plain FIFO.
    2. Space: a full queue is not full for a tenant that holds fewer places than another. The
       tenant with the most places loses its newest waiter of the newcomer's class or worse (a 429
       `queue_full`, as if it had come last) when it holds at least two more than the newcomer, so
       a lone tenant may use the whole queue and a second one still gets in (longest queue drop).

    The mean time a slot is held (EWMA over releases) predicts how long a newcomer would wait:
    (requests served before it + 1) x mean hold / limit, counting the other tenants' waiters of its
    class as round-robin serves them.
    """

    def __init__(self, limit: int, max_queue: int, ewma_alpha: float = 0.2) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.max_queue = max_queue
        self.in_use = 0
        self.mean_hold_s = 0.0
        self._alpha = ewma_alpha
        #: rank -> tenant -> its waiters (oldest first); a rank's tenants in round-robin order. Only
        #: waiters still waiting are here: served, evicted and gone ones are taken out at once.
        self._ranks: dict[int, dict[str | None, deque[_Waiter]]] = {}
        #: Slots held per tenant (None: callers that name no tenant).
        self._held: dict[str | None, int] = {}

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return sum(len(q) for tenants in self._ranks.values() for q in tenants.values())

    @property
    def busy(self) -> bool:
        """Every slot is taken or someone waits for one: the pool is saturated (at this ingress)."""
        return self.in_use >= self.limit or bool(self._ranks)

    def held(self, tenant: str | None) -> int:
        """Slots `tenant` holds."""
        return self._held.get(tenant, 0)

    def queued_of(self, tenant: str | None) -> int:
        """Requests of `tenant` waiting for a slot."""
        return sum(len(tenants.get(tenant, ())) for tenants in self._ranks.values())

    def _ahead(self, rank: int, tenant: str | None) -> int:
        """Waiters served before a request of `tenant` at `rank` arriving now (round-robin estimate)."""
        ahead = 0
        for r, tenants in self._ranks.items():
            if r < rank:
                ahead += sum(len(q) for q in tenants.values())
            elif r == rank:
                own = len(tenants.get(tenant, ()))
                ahead += own + sum(min(len(q), own + 1) for t, q in tenants.items() if t != tenant)
        return ahead

    def predicted_wait_s(self, rank: int, tenant: str | None = None) -> float:
        """Seconds a request of `tenant` at priority `rank` arriving now would wait for a slot."""
        if self.in_use < self.limit and not self._ranks:
            return 0.0
        return (self._ahead(rank, tenant) + 1) * self.mean_hold_s / self.limit

    def _take(self, tenant: str | None) -> None:
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def _drop(self, tenant: str | None) -> None:
        n = self._held.get(tenant, 0) - 1
        if n > 0:
            self._held[tenant] = n
        else:
            self._held.pop(tenant, None)

    async def acquire(
        self, rank: int, max_wait_s: float, slo_s: float | None = None, tenant: str | None = None
    ) -> None:
        """Take a slot for `tenant`; Rejected when the queue is full (for it), the predicted wait
        exceeds `slo_s`, no slot came within `max_wait_s`, or a tenant with fewer places took its."""
        if self.in_use < self.limit and not self._ranks:
            self.in_use += 1
            self._take(tenant)
            return
        wait = self.predicted_wait_s(rank, tenant)
        if self.queued >= self.max_queue and not self._push_out(rank, tenant, wait):
            raise Rejected(
                "queue_full",
                f"the model's wait queue is full ({self.max_queue} requests); retry later",
                max(wait, MIN_RETRY_AFTER_S),
            )
        ahead = self._ahead(rank, tenant)
        if slo_s is not None and self.mean_hold_s == 0.0 and ahead >= self.limit:
            # No slot has been released yet, so no wait estimate: queue one wave at most.
            raise Rejected(
                "predicted_wait",
                f"{ahead} requests would be served before this one by {self.limit} slots and no wait "
                "estimate exists yet; retry later",
                MIN_RETRY_AFTER_S,
            )
        if slo_s is not None and wait > slo_s:
            raise Rejected(
                "predicted_wait",
                f"predicted queue wait {wait:.2f}s exceeds the tier's TTFT objective of {slo_s:g}s",
                wait,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(rank, tenant, fut)
        self._ranks.setdefault(rank, {}).setdefault(tenant, deque()).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(fut), max_wait_s)
        except TimeoutError:
            self._give_up(waiter)
            raise Rejected(
                "queue_timeout",
                f"no slot for this model within {max_wait_s:g}s; retry later",
                max(self.predicted_wait_s(rank, tenant), MIN_RETRY_AFTER_S),
            ) from None
        except BaseException:
            self._give_up(waiter)
            raise

    def _push_out(self, rank: int, tenant: str | None, wait: float) -> bool:
        """Make room in a full queue for `tenant` by evicting the newest waiter (of class `rank` or
        worse) of the tenant with the most places, if it holds at least two more (NOTE(fairness))."""
        counts: dict[str | None, int] = {}
        for tenants in self._ranks.values():
            for t, q in tenants.items():
                counts[t] = counts.get(t, 0) + len(q)
        own = counts.pop(tenant, 0)
        if not counts:
            return False
        victim = max(counts, key=lambda t: counts[t])
        if counts[victim] < own + 2:
            return False
        for r in sorted(self._ranks, reverse=True):
            if r < rank:
                break
            q = self._ranks[r].get(victim)
            if q:
                w = q.pop()
                self._forget(w)
                w.fut.set_exception(
                    Rejected(
                        "queue_full",
                        f"the model's wait queue is full ({self.max_queue} requests) and this tenant "
                        "holds the most of it; its newest waiter made room for another tenant's; "
                        "retry later",
                        max(wait, MIN_RETRY_AFTER_S),
                    )
                )
                return True
        return False

    def _forget(self, waiter: _Waiter) -> None:
        """Take `waiter` out of the queue (if still there) and drop empty tenants and ranks."""
        tenants = self._ranks.get(waiter.rank)
        if tenants is None:
            return
        q = tenants.get(waiter.tenant)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(waiter)
            if not q:
                del tenants[waiter.tenant]
        if not tenants:
            del self._ranks[waiter.rank]

    def _give_up(self, waiter: _Waiter) -> None:
        fut = waiter.fut
        self._forget(waiter)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(None, waiter.tenant)  # handed a slot as we gave up: pass it on
        else:
            fut.cancel()

    def _next(self) -> _Waiter | None:
        """The waiter a freed slot goes to (NOTE(fairness), 1), taken out of the queue."""
        if not self._ranks:
            return None
        rank = min(self._ranks)
        tenants = self._ranks[rank]
        tenant = min(tenants, key=self.held)  # the first of the least served, in round-robin order
        q = tenants.pop(tenant)
        waiter = q.popleft()
        if q:
            tenants[tenant] = q  # to the back of the round
        if not tenants:
            del self._ranks[rank]
        return waiter

    def release(self, held_s: float | None, tenant: str | None = None) -> None:
        """Give `tenant`'s slot back (held for `held_s`, which feeds the wait prediction)."""
        if held_s is not None:
            self.mean_hold_s = (
                held_s
                if self.mean_hold_s == 0.0
                else (1 - self._alpha) * self.mean_hold_s + self._alpha * held_s
            )
        if self.in_use <= 0:
            raise RuntimeError("release() without acquire()")
        self._drop(tenant)
        while (w := self._next()) is not None:
            if not w.fut.done():
                self._take(w.tenant)
                w.fut.set_result(None)  # the slot passes on; in_use is unchanged
                return
        self.in_use -= 1


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits, already scaled to this ingress replica's share."""

    tokens_per_s: float
    burst_tokens: float
    fanout_width: int
    priority_rank: int
    #: Requests admitted at once (holding a ticket); None: no cap.
    max_in_flight: int | None = None


@dataclass(slots=True)
class AdmissionRequest:
    """What admission needs to know about a request."""

    tenant: str
    prompt_tokens: int
    reserved_tokens: int
    task_id: str | None = None
    #: Priority class rank asked for (0 first); None: the tenant's. It cannot be raised above it.
    priority_rank: int | None = None

    @property
    def cost(self) -> int:
        """Tokens taken from the bucket at admission."""
        return self.prompt_tokens + self.reserved_tokens


class Ticket:
    """What an admitted request holds. `release()` gives it all back once; safe to call again."""

    def __init__(
        self, ctl: AdmissionController, req: AdmissionRequest, rank: int, fanout: tuple | None
    ) -> None:
        self._ctl = ctl
        self.request = req
        self.priority_rank = rank
        self._fanout = fanout
        self._pool: tuple[str, float] | None = None
        self._released = False

    @property
    def pool(self) -> str | None:
        """The pool (model) whose slot this ticket holds."""
        return self._pool[0] if self._pool else None

    async def enter_pool(self, model: str, slo_s: float | None) -> None:
        """Take a slot of `model`'s pool (leaving any pool held before); Rejected if none in time."""
        self.leave_pool()
        limiter = self._ctl.pool(model)
        await limiter.acquire(self.priority_rank, self._ctl.queue_timeout_s, slo_s, self.request.tenant)
        self._pool = (model, self._ctl.clock())

    def leave_pool(self) -> None:
        """Give the pool slot back (after a failed attempt, or at the end)."""
        if self._pool is not None:
            model, since = self._pool
            self._pool = None
            self._ctl.pool(model).release(self._ctl.clock() - since, self.request.tenant)

    def release(self, used_tokens: int | None) -> None:
        """Give everything back. `used_tokens`: prompt + generated tokens the request really used (the
        rest of the reservation is refunded); None: it never reached an engine, refund it all."""
        if self._released:
            return
        self._released = True
        self.leave_pool()
        if self._fanout is not None:
            self._ctl._release_fanout(self._fanout)
        used = 0 if used_tokens is None else used_tokens
        self._ctl._finish(self.request.tenant, self.request.cost - used)


class AdmissionController:
    """Token buckets, fan-out semaphores and pool limiters of one ingress replica.

    Args:
        limits_for: tenant name -> its (scaled) limits.
        pool_limits: model name -> (scaled) concurrency limit.
        max_queue: wait queue bound per pool.
        queue_timeout_s: most time spent waiting for a fan-out or pool slot.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        limits_for: Callable[[str], Limits],
        pool_limits: dict[str, int],
        max_queue: int,
        queue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits_for = limits_for
        self._pool_limits = pool_limits
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._fanouts: dict[tuple[str, str], FairSemaphore] = {}
        self._pools: dict[str, PoolLimiter] = {}
        self._tenant_in_flight: dict[str, int] = {}
        #: Buckets kept before full idle ones are forgotten (bounds memory with many tenants).
        self.max_buckets = 10_000

    # -- state, for metrics and tests -----------------------------------------------------------

    def bucket(self, tenant: str) -> TokenBucket:
        """The tenant's bucket (created full on first use)."""
        b = self._buckets.get(tenant)
        if b is None:
            if len(self._buckets) >= self.max_buckets:
                self._prune_buckets()
            lim = self._limits_for(tenant)
            b = self._buckets[tenant] = TokenBucket(lim.tokens_per_s, lim.burst_tokens, self.clock())
        return b

    def _prune_buckets(self) -> None:
        """Forget buckets that are full again and idle: a new one would start full anyway."""
        now = self.clock()
        for tenant in [t for t, b in self._buckets.items() if b.level(now) >= b.burst]:
            if tenant not in self._tenant_in_flight:
                del self._buckets[tenant]

    def pool(self, model: str) -> PoolLimiter:
        """The model's pool limiter."""
        p = self._pools.get(model)
        if p is None:
            if model not in self._pool_limits:
                raise KeyError(model)
            p = self._pools[model] = PoolLimiter(self._pool_limits[model], self.max_queue)
        return p

    def snapshot(self) -> dict:
        """Levels and counts now: buckets, fan-out slots in use, pool slots and queues."""
        now = self.clock()
        fanout: dict[str, int] = {}
        for (tenant, _), sem in self._fanouts.items():
            fanout[tenant] = fanout.get(tenant, 0) + sem.in_use
        return {
            "buckets": {t: b.level(now) for t, b in self._buckets.items()},
            "tenant_in_flight": dict(self._tenant_in_flight),
            "fanout_in_use": fanout,
            "fanout_tasks": len(self._fanouts),
            "pools": {m: {"in_use": p.in_use, "queued": p.queued} for m, p in self._pools.items()},
        }

    # -- admission ------------------------------------------------------------------------------

    async def admit(self, req: AdmissionRequest) -> Ticket:
        """Count the request against its tenant's in-flight cap, charge the bucket and take a fan-out
        slot; Rejected (nothing held) if any fails.

        The pool slot is taken afterwards with `Ticket.enter_pool`, once the target model is known.
        """
        lim = self._limits_for(req.tenant)
        rank = lim.priority_rank if req.priority_rank is None else max(req.priority_rank, lim.priority_rank)
        in_flight = self._tenant_in_flight.get(req.tenant, 0)
        if lim.max_in_flight is not None and in_flight >= lim.max_in_flight:
            raise Rejected(
                "tenant_concurrency",
                f"tenant {req.tenant!r} already has {in_flight} requests in flight, its limit here "
                f"({lim.max_in_flight}); retry when one has finished",
                MIN_RETRY_AFTER_S,
            )
        bucket = self.bucket(req.tenant)
        wait = bucket.try_take(req.cost, self.clock())
        if math.isinf(wait):
            raise Rejected(
                "request_too_large",
                f"the request needs {req.cost} tokens (prompt {req.prompt_tokens} + max_tokens "
                f"{req.reserved_tokens}) but tenant {req.tenant!r} may spend at most {bucket.burst:g} "
                "at once; lower max_tokens",
                None,
                status=400,
            )
        if wait > 0:
            raise Rejected(
                "tenant_rate_limited",
                f"tenant {req.tenant!r} is over its token rate ({bucket.rate:g} tokens/s); "
                f"this request needs {req.cost} tokens",
                wait,
            )
        # Counted before the fan-out wait, so admissions waiting at once cannot overshoot the cap.
        self._tenant_in_flight[req.tenant] = in_flight + 1
        key = None
        if req.task_id:
            key = (req.tenant, req.task_id)
            sem = self._fanouts.get(key)
            if sem is None:
                sem = self._fanouts[key] = FairSemaphore(lim.fanout_width)
            try:
                await sem.acquire(self.queue_timeout_s)
            except BaseException as e:
                if sem.idle:
                    self._fanouts.pop(key, None)
                self._finish(req.tenant, req.cost)  # not in flight after all; the charge goes back
                if isinstance(e, TimeoutError):
                    raise Rejected(
                        "fanout_timeout",
                        f"task {req.task_id!r} already has {sem.width} calls in flight (its fan-out width) "
                        f"and none finished within {self.queue_timeout_s:g}s",
                        MIN_RETRY_AFTER_S,
                    ) from None
                raise
        return Ticket(self, req, rank, key)

    def _release_fanout(self, key: tuple[str, str]) -> None:
        sem = self._fanouts.get(key)
        if sem is None:
            return
        sem.release()
        if sem.idle:
            del self._fanouts[key]

    def _finish(self, tenant: str, tokens: int) -> None:
        """A ticket of `tenant` ended: one fewer in flight, and `tokens` back to its bucket."""
        n = self._tenant_in_flight.get(tenant, 0) - 1
        if n > 0:
            self._tenant_in_flight[tenant] = n
        else:
            self._tenant_in_flight.pop(tenant, None)
        if tokens:
            self.bucket(tenant).give_back(tokens, self.clock())
