"""The cluster simulator: Tandem's own request path over modelled engines, on a simulated clock.

A call goes through the code the ingress and the replicas run, not a copy of it:

1. `router.tiers.TierRouter` (built by `ServingSpec.tier_router`) picks its tier and model;
2. `router.admission.AdmissionController` (built by `ServingSpec.admission_controller`, on the
   simulated clock; one per ingress replica, each with its share of the limits, the calls dealt
   to them in turn) charges the tenant's bucket, takes a fan-out slot and a pool slot: rejections
   are 429s with the real reasons;
3. block keys: the unit ids' chained hashes (`calls.KeyChain`, `router.hashing`'s scheme), salted
   per tenant when the model's `router.tenant_salt` is on;
4. the model's `router.policy` policy (`make_policy` with the spec's `RouterSpec`) ranks the serving
   pool's replicas from their reported stats (refreshed every `stats_period_s`, as Serve's
   `record_routing_stats`); a replica at `max_ongoing_requests` is skipped as Ray Serve does, and
   with all of them full the call waits for a slot. The block index is fed by the routing
   decisions and, with `kv_events`, by the engines' BlockStored / BlockRemoved events
   (`router.kv_events.apply_event`);
5. on a P/D model `router.pd.decide` picks remote or local prefill from the router's match on the
   chosen decode replica; a remote prefill runs on a prefill replica the prefill pool's policy
   picks, then its KV (the part the decode replica does not hold) crosses the link;
6. `engine.Engine` models each replica's continuous batching.

With `SimOptions.autoscaler` the autoscaled pools change size on simulated time
(`loadtests.sim.autoscale`: the policy's signals from the replicas' and the ingress's meters,
replicas that start after their profile's `startup_s` and drain before they go, a pool at zero that
holds its calls at the ingress); without one every pool keeps its fleet's size, as before.

The client sees the engine's token times plus `Overheads.ttft_s` (ingress, Serve hops, the stream),
and every step runs `Overheads.slowdown` times its profile's time: the two serving-overhead terms
that calibration fits against a real run (`loadtests.sim.calibrate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autoscaler.meters import IngressMeter
from loadtests.plan import Arrival
from loadtests.sim import autoscale
from loadtests.sim.calls import Call, Jobs, KeyChain, none_hash
from loadtests.sim.clock import VirtualTimeLoop
from loadtests.sim.engine import Engine, Sequence
from loadtests.sim.profile import EngineProfile
from loadtests.sim.stats import Recorder
from loadtests.workload import AgentWorkload, FanoutWorkload
from router.admission import AdmissionRequest, Rejected
from router.contracts import Role, ServeMode
from router.hashing import tenant_salt
from router.kv_events import BlockRemoved, BlockStored, apply_event
from router.pd import decide
from router.policy import CacheAwarePolicy, Gate, Policy, ReplicaView, RoutingRequest, Weights, make_policy
from router.tiers import TierError
from serving.config import ModelSpec, RouterSpec, ServingSpec

#: Records kept (an exact summary) up to this many expected requests; above, the summary streams.
KEEP_RECORDS_UP_TO = 200_000
#: Key chains cached (conversations and shared prefixes in use); older ones are rebuilt when needed.
CHAINS = 4096


@dataclass(frozen=True, slots=True)
class Overheads:
    """Serving costs outside the engine.

    Attributes:
        ttft_s: added to every request's first token (and so to its E2E).
        slowdown: a factor on every engine step (the serving stack's CPU beside the engines on a
            shared host: it lengthens queues as well as streams).
        ttft_table: the distribution of a further per-request delay of the first token, as its
            quantile function: (probability, seconds) points, interpolated. Host noise (a GC pause,
            a busy core) is what makes a real run's tail; a calibration measures it.
        tpot_table: likewise, a per-request factor on the time from the first token to the last.
        ttft_per_rps: the first token's further delay per call per second sent in the last
            `RATE_WINDOW_S` (the serving stack's CPU grows with the request rate and, on a shared
            host, so does every request's wait for a core).
        stream_s: the latency every streamed message has, the last token's included. The first
            token's overhead beyond it is paid once: a stream whose tokens were all made before
            its first reached the client delivers the rest at once (measured on the local stack:
            8-token intent answers arrive in one piece, TPOT ~0).
    """

    ttft_s: float = 0.0
    slowdown: float = 1.0
    ttft_table: tuple[tuple[float, float], ...] = ()
    tpot_table: tuple[tuple[float, float], ...] = ()
    stream_s: float = 0.0
    ttft_per_rps: float = 0.0


#: The window over which a request's recent sending rate is counted (for `Overheads.ttft_per_rps`).
RATE_WINDOW_S = 2.0


def quantile(table: tuple[tuple[float, float], ...], u: float) -> float:
    """The value at probability `u` of a quantile table (piecewise linear; clamped at its ends)."""
    if u <= table[0][0]:
        return table[0][1]
    for (p0, v0), (p1, v1) in zip(table, table[1:], strict=False):
        if u <= p1:
            return v0 + (v1 - v0) * (u - p0) / (p1 - p0) if p1 > p0 else v1
    return table[-1][1]


@dataclass(frozen=True, slots=True)
class PoolShape:
    """One pool of a fleet: its profile and replica count."""

    profile: EngineProfile
    replicas: int


@dataclass(slots=True)
class SimOptions:
    """How a simulation runs (everything else comes from the deployment spec)."""

    unit_tokens: int = 128
    overheads: Overheads = field(default_factory=Overheads)
    seed: int = 0
    keep_records: bool | None = None
    window_s: float = 5.0
    policy: str | None = None  # overrides every model's router.policy (a planner sweep)
    #: Sizes the autoscaled pools on simulated time (loadtests.sim.autoscale); None: fixed pools.
    autoscaler: autoscale.Autoscaler | None = None


class Pool:
    """The replicas of one pool, their router and what Ray Serve's router does around it."""

    def __init__(
        self, name: str, role: Role, shape: PoolShape, router: RouterSpec, max_ongoing: int, sim: Simulation,
        policy_name: str,
    ) -> None:  # fmt: skip
        self.name = name
        self.role = role
        self.shape = shape
        self.max_ongoing = max_ongoing
        self.policy: Policy = make_policy(
            policy_name,
            index_budget=router.block_budget,
            weights=Weights(**router.weights.model_dump()),
            gate=Gate(**router.gate.model_dump()),
            stale_after_s=router.stale_after_s,
            sessions=router.sessions,
            rng=random.Random(sim.options.seed),
        )
        self.cache_aware = isinstance(self.policy, CacheAwarePolicy)
        index = getattr(self.policy, "index", None) if router.kv_events else None
        on_stored = on_removed = None
        if index is not None:

            def on_stored(rid: str, keys: list[int]) -> None:
                apply_event(index, rid, BlockStored(keys))

            def on_removed(rid: str, keys: list[int]) -> None:
                apply_event(index, rid, BlockRemoved(keys))

        self.engines: dict[str, Engine] = {}
        self.views: list[ReplicaView] = []
        self.inflight: dict[str, int] = {}
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._sim = sim
        self._on_stored, self._on_removed = on_stored, on_removed
        for i in range(shape.replicas):
            self._add_engine(f"{name}-{i}")
        self._next_id = shape.replicas
        self.kv_moved_bytes = 0
        self.kv_moved_tokens = 0
        #: Calls waiting in `pick` (for a free slot, or for a replica of a pool at zero).
        self.pick_waiting = 0
        #: With an autoscaler: its replica lifecycle (loadtests.sim.autoscale.PoolScaler).
        self.scaler: Any = None
        #: Engines removed by a scale-down (their counters stay in the summary).
        self.retired: list[Engine] = []
        #: With an autoscaler: how long a call waits for a replica of this pool at zero.
        self.hold_s: float | None = None

    def _add_engine(self, rid: str) -> None:
        sim = self._sim
        e = Engine(rid, self.shape.profile, sim.loop, sim.options.unit_tokens, sim.options.overheads.slowdown,
                   self._on_stored, self._on_removed)  # fmt: skip
        e.itl_sink = sim.recorder.itl_sink(self.name.split("/")[0])
        self.engines[rid] = e
        self.views.append(ReplicaView(rid, role=self.role))
        self.inflight[rid] = 0

    # -- autoscaling (loadtests.sim.autoscale) -------------------------------------------------

    def new_replica_id(self) -> str:
        rid = f"{self.name}-{self._next_id}"
        self._next_id += 1
        return rid

    def add_replica(self, rid: str) -> None:
        """A new replica is ready: routable from now on (calls waiting for a slot try again)."""
        self._add_engine(rid)
        waiters, self._slot_waiters = self._slot_waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def stop_routing(self, rid: str) -> None:
        """`rid` drains: no new call is routed to it (it leaves the router's candidates)."""
        self.views = [v for v in self.views if v.replica_id != rid]

    def remove_replica(self, rid: str) -> None:
        """`rid` is idle and goes: its blocks leave the router's index, its engine stops reporting."""
        e = self.engines.pop(rid)
        e._on_stored = e._on_removed = None
        self.retired.append(e)
        del self.inflight[rid]
        self.policy.drop_replica(rid)

    def refresh(self, now: float) -> None:
        """Every replica reports its stats (Serve's `record_routing_stats`)."""
        for v in self.views:
            e = self.engines[v.replica_id]
            v.running, v.waiting, v.kv_usage, v.updated_at = e.running, e.queued, e.kv_usage, now

    async def pick(self, req: RoutingRequest, loop: asyncio.AbstractEventLoop) -> tuple[str, int | None]:
        """The replica for `req` and the router's matched blocks there; waits while all are full (and,
        autoscaled, while the pool has no ready replica: `hold_s` at most, then a queue_timeout)."""
        deadline = None
        while True:
            if not self.views and self.hold_s is not None:
                if deadline is None:
                    deadline = loop.time() + self.hold_s
                await self._hold(loop, deadline)
                continue
            d = self.policy.route(req, self.views, loop.time())
            for group in d.ranked:
                for rid in group:
                    if self.inflight[rid] < self.max_ongoing:
                        self.policy.on_sent(req, rid)
                        self.inflight[rid] += 1
                        matched = d.matched.get(rid, 0) if self.cache_aware else None
                        return rid, matched
            fut = loop.create_future()
            self._slot_waiters.append(fut)
            self.pick_waiting += 1
            try:
                await fut
            finally:
                self.pick_waiting -= 1

    async def _hold(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Wait for a replica of this pool (at zero) until `deadline`; Rejected past it."""
        left = deadline - loop.time()
        if left > 0:
            fut = loop.create_future()
            self._slot_waiters.append(fut)
            self.pick_waiting += 1
            try:
                with contextlib.suppress(TimeoutError):  # timed out: the Rejected below
                    await asyncio.wait_for(fut, left)
                    return
            finally:
                self.pick_waiting -= 1
        raise Rejected(
            "queue_timeout", f"no replica of {self.name} became ready within {self.hold_s:g}s; retry later"
        )

    def done(self, req: RoutingRequest, rid: str) -> None:
        self.inflight[rid] -= 1
        self.policy.on_done(req, rid)
        if self.scaler is not None:
            self.scaler.on_done(rid)
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def utilisation(self, span_s: float) -> float:
        if self.scaler is not None:
            ready = self.scaler.ready_seconds(span_s)
            busy = sum(e.busy_s for e in [*self.engines.values(), *self.retired])
            return busy / ready if ready > 0 else 0.0
        busy = sum(e.busy_s for e in self.engines.values())
        return busy / (span_s * len(self.engines)) if self.engines and span_s > 0 else 0.0


class SimModel:
    """A served model: its serving pool (colocated or decode) and, with P/D, its prefill pool."""

    def __init__(self, spec: ModelSpec, shapes: Mapping[Role, PoolShape], sim: Simulation) -> None:
        self.spec = spec
        self.name = spec.name
        policy = sim.options.policy or spec.router.policy.value
        self.pools: dict[Role, Pool] = {}
        for p in spec.pools:
            shape = shapes[p.role]
            self.pools[p.role] = Pool(f"{spec.name}/{p.pool_name}", p.role, shape, spec.router,
                                      p.max_ongoing_requests, sim, policy)  # fmt: skip
        self.serving = self.pools[spec.serving_pool.role]
        self.prefill = self.pools.get(Role.PREFILL)
        self.salt = spec.router.tenant_salt
        self.unit = sim.options.unit_tokens
        self.min_prefill = spec.disaggregation.min_prefill_tokens
        self.mode = spec.disaggregation.mode
        self.transfers = {ServeMode.DISAGG: 0, ServeMode.COLOCATED: 0}


class Simulation:
    """One simulated deployment (see the module docstring).

    Args:
        spec: the deployment spec (tiers, routing, admission, router and P/D settings).
        fleet: per model, per pool role, the profile and replica count.
        options: unit size, overheads, seed.
    """

    def __init__(
        self,
        spec: ServingSpec,
        fleet: Mapping[str, Mapping[Role, PoolShape]],
        options: SimOptions | None = None,
    ) -> None:
        self.spec = spec
        self.options = options or SimOptions()
        self.loop = VirtualTimeLoop()
        self.recorder = Recorder(True)
        self._fleet = fleet
        self._none_hash = none_hash()
        self._noise = random.Random(self.options.seed + 7)
        self._recent_sends: deque[float] = deque()
        #: Called with (now, simulation) at every stats report (tests sample the fleet with it).
        self.probe: Callable[[float, Simulation], None] | None = None
        self._chains: OrderedDict[tuple[str | None, int], KeyChain] = OrderedDict()

    def _build(self, keep: bool) -> None:
        self.recorder = Recorder(keep, self.options.window_s)
        self._noise = random.Random(self.options.seed + 7)
        self._recent_sends: deque[float] = deque()
        missing = [m.name for m in self.spec.models if m.name not in self._fleet]
        if missing:
            raise ValueError(
                f"fleet: no pools given for model(s) {missing}; give each a profile and replicas"
            )
        self.models = {m.name: SimModel(m, self._fleet[m.name], self) for m in self.spec.models}
        self.tiers = self.spec.tier_router()
        # One controller per ingress replica, each enforcing its share, as the real ingresses do.
        self.admissions = [
            self.spec.admission_controller(clock=self.loop.time)
            for _ in range(self.spec.server.ingress_replicas)
        ]
        self._next_ingress = 0
        self.period = {m.name: m.router.stats_period_s for m in self.spec.models}
        self._tier_of = {t.name: t for t in self.spec.tiers}
        self.jobs_done = 0
        self.calls_in_flight = 0
        self.peak_in_flight = 0
        self._qid = 0
        self.ingress_meter: IngressMeter | None = None
        self.scalers: dict[str, autoscale.ModelScaler] = {}
        if self.options.autoscaler is not None:
            window = max(float(getattr(m.autoscaling, "window_s", 30.0)) for m in self.spec.models)
            self.ingress_meter = IngressMeter(self.loop.time, window)
            self.scalers = autoscale.build(self)
            for name in self.scalers:
                for pool in self.models[name].pools.values():
                    pool.hold_s = self.spec.admission.queue_timeout_s
        empty = [
            p.name
            for m in self.models.values()
            for p in m.pools.values()
            if not p.engines and p.hold_s is None
        ]
        if empty:
            raise ValueError(f"fleet: pool(s) {empty} have no replica and no autoscaler to start one")

    def admission_queued(self, model: str) -> int:
        """Calls of `model` waiting for an admission pool slot, over the ingress replicas."""
        n = 0
        for adm in self.admissions:
            limiter = adm._pools.get(model)
            if limiter is not None:
                n += limiter.queued
        return n

    def _next_qid(self) -> str:
        self._qid += 1
        return f"q{self._qid}"

    # -- keys ----------------------------------------------------------------------------------

    def _keys(self, units: list[int], salt: str | None) -> list[int]:
        """Block keys of prompt units; prompts with the same first unit extend one chain (an LRU
        cache of `CHAINS` chains: memory stays bounded whatever the run's length)."""
        if not units:
            return []
        chains = self._chains
        key = (salt, units[0])
        chain = chains.get(key)
        if chain is None:
            chain = chains[key] = KeyChain(self._none_hash, salt)
            if len(chains) > CHAINS:
                chains.popitem(last=False)
        else:
            chains.move_to_end(key)
        return chain.keys(units)

    # -- one call ------------------------------------------------------------------------------

    async def _call(self, call: Call, due: float, tenant: str) -> dict[str, Any]:
        loop = self.loop
        sent = loop.time()
        recent = self._recent_sends
        recent.append(sent)
        while recent[0] < sent - RATE_WINDOW_S:
            recent.popleft()
        rec: dict[str, Any] = {
            "name": call.name, "type": call.type, "endpoint": call.endpoint, "due": due, "sent": sent,
            "outcome": "ok", "status": 200, "reason": None, "ttft": None, "tpot": None, "e2e": None,
            "itl": None, "input": call.prompt_tokens, "cached": 0, "output": 0, "reasoning": 0,
            "slo_met": False, "overhead": None, "tags": call.tags, "recent_rps": len(recent) / RATE_WINDOW_S,
        }  # fmt: skip
        try:
            res = self.tiers.resolve(call.model, call.task)
        except TierError as e:
            rec.update(outcome="failed", status=e.status, reason=str(e))
            return rec
        self.recorder.model_of.setdefault(call.name, res.model)
        rec["model"] = res.model
        model = self.models[res.model]
        meter = self.ingress_meter
        if meter is not None:
            meter.arrived(res.model, call.prompt_tokens, call.max_tokens)
        try:
            admission = self.admissions[self._next_ingress]
            self._next_ingress = (self._next_ingress + 1) % len(self.admissions)
            ticket = await admission.admit(
                AdmissionRequest(tenant, call.prompt_tokens, call.max_tokens, call.task_id)
            )
        except Rejected as e:
            rec.update(outcome="rejected", status=e.status, reason=e.reason)
            if meter is not None:
                meter.rejected(res.model, e.reason)
            return rec
        used = None
        try:
            tier = self._tier_of.get(res.tier) if res.tier else None
            queued_at = loop.time()
            try:
                await ticket.enter_pool(res.model, tier.ttft_slo_s if tier else None)
            except Rejected as e:
                rec.update(outcome="rejected", status=e.status, reason=e.reason)
                if meter is not None:
                    meter.rejected(res.model, e.reason)
                return rec
            if meter is not None:
                meter.waited(res.model, loop.time() - queued_at)
            self.calls_in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.calls_in_flight)
            try:
                first, done, cached = await self._serve(model, call, tenant)
            except Rejected as e:  # autoscaled: no replica of a pool at zero became ready in time
                rec.update(outcome="rejected", status=e.status, reason=e.reason)
                if meter is not None:
                    meter.rejected(res.model, e.reason)
                return rec
            finally:
                self.calls_in_flight -= 1
            used = call.prompt_tokens + call.output_tokens
        finally:
            ticket.release(used)
        oh = self.options.overheads
        extra = oh.ttft_s + model.serving.shape.profile.request_s
        if oh.ttft_table:
            extra += quantile(oh.ttft_table, self._noise.random())
        if oh.ttft_per_rps:
            extra = max(0.0, extra + oh.ttft_per_rps * rec["recent_rps"])
        factor = quantile(oh.tpot_table, self._noise.random()) if oh.tpot_table else 1.0
        ttft = first - sent + extra
        e2e = max(ttft, (done - sent) + (done - first) * (factor - 1.0) + oh.stream_s)
        n = call.output_tokens
        tpot = (e2e - ttft) / (n - 1) if n > 1 else None
        rec.update(ttft=ttft, e2e=e2e, tpot=tpot, cached=cached, output=n,
                   reasoning=n if call.reasoning else 0)  # fmt: skip
        rec["slo_met"] = (call.slo_ttft_s is None or ttft <= call.slo_ttft_s) and (
            call.slo_tpot_s is None or tpot is None or tpot <= call.slo_tpot_s
        )
        return rec

    async def _serve(self, model: SimModel, call: Call, tenant: str) -> tuple[float, float, int]:
        """Route and run `call` on `model`: (first token time, last token time, cached prompt tokens)."""
        loop = self.loop
        salt = tenant_salt(tenant) if model.salt else None
        keys = self._keys(call.units, salt)
        done_keys = self._keys(call.done_units, salt)[len(keys) :] if call.done_units else []
        pool = model.serving
        req = RoutingRequest("", keys, tenant=tenant, session_id=call.session, role=pool.role)
        rid, matched = await pool.pick(req, loop)
        engine = pool.engines[rid]
        first: asyncio.Future[float] = loop.create_future()
        done: asyncio.Future[float] = loop.create_future()
        on_first, on_done = _setter(first), _setter(done)
        if pool.scaler is not None:  # the replica's meter sees the call from here (DecodeServer.generate)
            on_first, on_done = _metered(pool.scaler.meters[rid], self._next_qid(), call.prompt_tokens,
                                         call.output_tokens, on_first, on_done)  # fmt: skip
        try:
            mode = ServeMode.COLOCATED
            if model.prefill is not None:
                held = matched if matched is not None else engine.cached_prefix(keys)
                decision = decide(model.mode, call.prompt_tokens, min(held * model.unit, call.prompt_tokens),
                                  model.min_prefill)  # fmt: skip
                mode = decision.mode
            model.transfers[mode] += 1
            if mode is ServeMode.DISAGG:
                cached = await self._remote_prefill(model, call, keys, tenant)
                local = engine.cached_prefix(keys) * model.unit
                moved = max(0, call.prompt_tokens - local)
                prof = model.prefill.shape.profile
                model.prefill.kv_moved_tokens += moved
                model.prefill.kv_moved_bytes += moved * prof.kv_bytes_per_token
                await asyncio.sleep(prof.transfer_s(moved))
                seq = Sequence(call.prompt_tokens, call.output_tokens, keys, on_first, on_done,
                               done_keys, preloaded=True)  # fmt: skip
                engine.submit(seq)
                await done
                return first.result(), done.result(), cached
            seq = Sequence(call.prompt_tokens, call.output_tokens, keys, on_first, on_done, done_keys)
            engine.submit(seq)
            await done
            return first.result(), done.result(), seq.cached_tokens
        finally:
            pool.done(req, rid)

    async def _remote_prefill(self, model: SimModel, call: Call, keys: list[int], tenant: str) -> int:
        assert model.prefill is not None
        pool = model.prefill
        req = RoutingRequest("", keys, tenant=tenant, session_id=call.session, role=Role.PREFILL)
        rid, _ = await pool.pick(req, self.loop)
        try:
            done: asyncio.Future[float] = self.loop.create_future()
            on_done = _setter(done)
            if pool.scaler is not None:  # a prefill's TTFT is its whole time here (PrefillServer.prefill)
                _, on_done = _metered(pool.scaler.meters[rid], self._next_qid(), call.prompt_tokens, 0,
                                      _noop, on_done, first_at_done=True)  # fmt: skip
            seq = Sequence(call.prompt_tokens, 1, keys, _noop, on_done)
            pool.engines[rid].submit(seq)
            await done
            return seq.cached_tokens
        finally:
            pool.done(req, rid)

    # -- jobs ----------------------------------------------------------------------------------

    async def _job(self, jobs: Jobs, a: Arrival, tenant: str) -> None:
        w = jobs.wf.workloads[a.workload]
        rec = self.recorder
        if isinstance(w, AgentWorkload):
            session = f"{w.name or w.type}-{a.index}"
            due: float | None = a.due
            for call in jobs.agent(w, a.workload, session):
                r = await self._call(call, due if due is not None else self.loop.time(), tenant)
                due = None
                rec.add(r)
                if r["outcome"] != "ok":
                    break
        elif isinstance(w, FanoutWorkload):
            calls = jobs.fanout(w, f"task-{a.index}")
            for r in await asyncio.gather(*(self._call(c, a.due, tenant) for c in calls)):
                rec.add(r)
        else:
            rec.add(await self._call(jobs.single(w, a.item), a.due, tenant))
        self.jobs_done += 1

    async def _feed(self, jobs: Jobs, arrivals: Iterable[Arrival], tenant: str) -> None:
        loop = self.loop
        tasks: set[asyncio.Task] = set()
        for a in arrivals:
            wait = a.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            t = loop.create_task(self._job(jobs, a, tenant))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))

    async def _stats(self, stop: asyncio.Event) -> None:
        """Replicas report their stats every `stats_period_s` (per model)."""
        loop = self.loop
        period = min(self.period.values())
        while not stop.is_set():
            now = loop.time()
            for m in self.models.values():
                for pool in m.pools.values():
                    pool.refresh(now)
            if self.probe is not None:
                self.probe(now, self)
            await asyncio.sleep(period)

    # -- a run ---------------------------------------------------------------------------------

    def run(
        self,
        jobs: Jobs,
        *,
        rate: float | None = None,
        duration_s: float | None = None,
        arrivals: Iterable[Arrival] | None = None,
        expected_requests: int | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Simulate one run of `jobs` (its file's shape, or `rate` / `duration_s` as a search sets)
        and return its summary (`loadtests.summary` shape, with a `sim` section)."""
        wf = jobs.wf
        duration = duration_s or wf.duration_s
        plan = arrivals if arrivals is not None else jobs.plan(rate, duration)
        if expected_requests is None:
            expected_requests = len(plan) if isinstance(plan, list) else KEEP_RECORDS_UP_TO + 1
        keep = self.options.keep_records
        if keep is None:
            keep = expected_requests <= KEEP_RECORDS_UP_TO
        self._build(keep)
        tenant = wf.tenant or "default"
        loop = self.loop
        stop = asyncio.Event()

        async def main() -> float:
            stats = loop.create_task(self._stats(stop))
            scaling = [loop.create_task(ms.run(stop)) for ms in self.scalers.values()]
            await self._feed(jobs, plan, tenant)
            stop.set()
            end = loop.time()
            for ms in self.scalers.values():
                ms.close()
            for t in scaling:
                t.cancel()
            await asyncio.gather(*scaling, return_exceptions=True)
            await stats
            return end

        asyncio.set_event_loop(loop)
        try:
            end = loop.run_until_complete(main())
        finally:
            asyncio.set_event_loop(None)
        slos = {(w.name or w.type): w.slo.model_dump() for w in wf.workloads}
        offered = rate if rate is not None else (wf.shape.rate if wf.shape.kind != "closed" else None)
        doc = self.recorder.summarize(duration_s=duration, offered_rate=offered, slos=slos, label=label)
        doc["sim"] = self._sim_section(duration, end)
        return doc

    def _sim_section(self, duration: float, end: float) -> dict[str, Any]:
        pools = {}
        gpus = 0
        cost = 0.0
        gpu_hours = 0.0
        for m in self.models.values():
            scaler = self.scalers.get(m.name)
            for pool in m.pools.values():
                prof = pool.shape.profile
                n = len(pool.engines)
                gpus += n * prof.gpus
                cost += n * prof.gpus * prof.gpu_hour_usd
                es = pool.engines.values()
                span = end * n
                auto = None
                if pool.scaler is not None:
                    es = [*es, *pool.retired]
                    span = pool.scaler.ready_seconds(end)
                    cfg = scaler.cfg if scaler is not None else None
                    auto = pool.scaler.section(end, cfg.downscale_cooldown_s if cfg is not None else None)
                hours = auto["gpu_hours"] if auto is not None else n * prof.gpus * end / 3600.0
                gpu_hours += hours
                pools[pool.name] = {
                    "role": pool.role.value,
                    "profile": prof.name,
                    "replicas": n,
                    "gpus": n * prof.gpus,
                    "gpu_hours": hours,
                    "utilisation": pool.utilisation(end),
                    "mean_batch": sum(e.seq_s for e in es) / span if span > 0 else 0.0,
                    "mean_kv_usage": sum(e.kv_s for e in es) / span if span > 0 else 0.0,
                    "prefill_tokens": sum(e.prefill_tokens for e in es),
                    "cached_hit_tokens": sum(e.cached_hit_tokens for e in es),
                    "decode_tokens": sum(e.decode_tokens for e in es),
                    "kv_moved_tokens": pool.kv_moved_tokens,
                    "kv_moved_bytes": pool.kv_moved_bytes,
                    "policy": type(pool.policy).__name__,
                }
                if auto is not None:
                    pools[pool.name]["autoscaling"] = auto
            if m.prefill is not None:
                pools[m.serving.name]["disagg"] = m.transfers[ServeMode.DISAGG]
                pools[m.serving.name]["colocated"] = m.transfers[ServeMode.COLOCATED]
        return {
            "simulated_s": end,
            "duration_s": duration,
            "unit_tokens": self.options.unit_tokens,
            "overheads": {
                "ttft_s": self.options.overheads.ttft_s,
                "slowdown": self.options.overheads.slowdown,
            },
            "gpus": gpus,
            "gpu_hour_usd": cost,
            "gpu_hours": gpu_hours,
            "peak_calls_in_flight": self.peak_in_flight,
            "pools": pools,
            "by_model": self.recorder.by_model_doc(duration),
        }


def _setter(fut: asyncio.Future[float]):
    def set_(now: float) -> None:
        if not fut.done():
            fut.set_result(now)

    return set_


def _noop(now: float) -> None:
    return None


def _metered(meter: Any, qid: str, prompt_tokens: int, output_tokens: int, on_first: Callable[[float], None],
             on_done: Callable[[float], None], first_at_done: bool = False):  # fmt: skip
    """`on_first` / `on_done` that also tell the replica's meter (autoscaler.meters.ReplicaMeter)."""
    meter.started(qid, prompt_tokens)

    def first(now: float) -> None:
        meter.first_token(qid)
        on_first(now)

    def done(now: float) -> None:
        if first_at_done:
            meter.first_token(qid)
        meter.finished(qid, output_tokens)
        on_done(now)

    return first, done
