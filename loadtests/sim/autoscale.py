"""Autoscaling in the simulator: a policy called on simulated time, replicas that start and drain.

`Autoscaler` (given as `SimOptions.autoscaler`) names a policy with the call shape of
`autoscaler.policy.decide`: `(ModelSignals, state, PolicyConfig) -> Decision`. Every `interval_s`
of simulated time each autoscaled model's policy gets a `ModelSignals` built from the engines and
the ingress the way the real deployment builds it:

* every replica keeps an `autoscaler.meters.ReplicaMeter` (the meter the Serve replicas keep: start,
  first token and end of each request it serves; a decode replica of a P/D model sees the request
  from its arrival, remote prefill included, as `DecodeServer.generate` does) and pushes its
  snapshot every `autoscaling.metrics_interval_s`; a sample's `age_s` is the time since its push;
* the ingress keeps one `autoscaler.meters.IngressMeter` (arrivals, capacity rejections, the wait
  for an admission pool slot, as `serving/http/pipeline.py` records them); `queued` is the
  admission pool's queue plus the calls waiting for a replica of the serving pool (Serve's
  `total_queued_requests` at the handles, which `serving/autoscaling.py` adds);
* a pool's `current` is its target (ready plus starting replicas), `running` the ready ones; a pool
  whose spec has `replicas.min == replicas.max` keeps its size (min = max = its fleet count).

`PoolScaler` applies a target: a scale-up requests replicas that become routable `startup_s` (the
profile's) later, charged GPU-time from the request (the GPUs are held while the engine loads); a
scale-down first cancels replicas still starting (newest first), then drains the ready replica with
the fewest requests in flight: it leaves the router's candidates at once, finishes what it holds and
is removed (its blocks leave the router's index, as a replica's do when it goes) once idle; nothing
fails. A pool at zero holds its calls at the ingress until a replica is ready (bounded by
`admission.queue_timeout_s`, then a `queue_timeout` rejection).

The summary's `sim.pools[*].autoscaling` holds GPU-hours, the (t, target, running) timeline, scale
events by direction and the reversals within `downscale_cooldown_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoscaler.meters import ReplicaMeter
from autoscaler.policy import Decision, ModelState, PolicyConfig, decide
from autoscaler.signals import IngressSample, ModelSignals, PoolSignals, ReplicaSample

if TYPE_CHECKING:
    from loadtests.sim.cluster import Pool, SimModel, Simulation

#: What an autoscaling policy is: `decide`'s call shape.
PolicyFn = Callable[[ModelSignals, Any, PolicyConfig], Decision]
#: Timeline entries kept per pool (a change of target or of ready replicas each).
MAX_TIMELINE = 20_000
#: Scale events kept per pool with their reasons (all are counted).
MAX_EVENTS = 2_000


@dataclass(slots=True)
class Autoscaler:
    """An autoscaler for the simulation (`SimOptions.autoscaler`).

    Attributes:
        policy: `(ModelSignals, state, PolicyConfig) -> Decision` (autoscaler.policy.decide, or one of
            autoscaler.baselines).
        interval_s: simulated seconds between decisions (Ray Serve's controller decides more often, but
            the replicas' metrics arrive every `autoscaling.metrics_interval_s`).
        configs: per model, the policy's settings; default `spec.autoscaling_policy_config(model)`.
        initial_state: the state the first decision gets (a fresh one per model).
        models: the models it sizes; default those with an autoscaled pool (`spec.autoscaled`).
    """

    policy: PolicyFn = decide
    interval_s: float = 5.0
    configs: Mapping[str, PolicyConfig] | None = None
    initial_state: Callable[[], Any] = ModelState
    models: frozenset[str] | None = None


@dataclass(slots=True)
class Life:
    """One replica's lifetime (seconds of simulated time; None: not yet)."""

    rid: str
    requested_s: float
    ready_s: float | None = None
    drain_s: float | None = None
    gone_s: float | None = None
    cancelled: bool = False


@dataclass(slots=True)
class ScaleEvent:
    t: float
    direction: str
    old: int
    new: int
    reasons: list[str] = field(default_factory=list)


class PoolScaler:
    """The replica lifecycle of one pool (see the module docstring)."""

    def __init__(self, pool: Pool, sim: Simulation, min_replicas: int, max_replicas: int, window_s: float,
                 drain_timeout_s: float) -> None:  # fmt: skip
        self.pool = pool
        self.sim = sim
        self.loop = sim.loop
        self.min = min_replicas
        self.max = max_replicas
        self.window_s = window_s
        self.drain_timeout_s = drain_timeout_s
        self.startup_s = pool.shape.profile.startup_s
        now = self.loop.time()
        self.lives: dict[str, Life] = {}
        self.meters: dict[str, ReplicaMeter] = {}
        self.pushed: dict[str, tuple[float, dict[str, float]]] = {}
        self.starting: dict[str, asyncio.TimerHandle] = {}  # rid -> its ready timer, oldest first
        self.draining: set[str] = set()
        for rid in pool.engines:
            self.lives[rid] = Life(rid, now, now)
            self.meters[rid] = ReplicaMeter(self.loop.time, window_s)
        self.timeline: list[tuple[float, int, int]] = []
        self.events: list[ScaleEvent] = []
        self.ups = self.downs = 0
        self.cancelled_starts = 0
        self.drain_max_s = 0.0
        self.drains_over_timeout = 0
        self._mark()

    # -- counts ----------------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        """Replicas routable now."""
        return len(self.pool.views)

    @property
    def target(self) -> int:
        """Replicas the pool is meant to have: ready (not draining) plus starting."""
        return self.ready + len(self.starting)

    def _mark(self) -> None:
        entry = (self.loop.time(), self.target, self.ready)
        tl = self.timeline
        if tl and tl[-1][1:] == entry[1:]:
            return
        if tl and tl[-1][0] == entry[0]:  # several changes at one instant: the last counts
            tl[-1] = entry
            if len(tl) > 1 and tl[-2][1:] == entry[1:]:
                tl.pop()
        elif len(tl) < MAX_TIMELINE:
            tl.append(entry)

    # -- scaling ---------------------------------------------------------------------------------

    def set_target(self, n: int, reasons: list[str]) -> None:
        n = max(self.min, min(self.max, n))
        old = self.target
        if n == old:
            return
        now = self.loop.time()
        direction = "up" if n > old else "down"
        if direction == "up":
            self.ups += 1
            for _ in range(n - old):
                self._start(now)
        else:
            self.downs += 1
            for _ in range(old - n):
                self._stop(now)
        if len(self.events) < MAX_EVENTS:
            self.events.append(ScaleEvent(now, direction, old, n, reasons))
        self._mark()

    def _start(self, now: float) -> None:
        rid = self.pool.new_replica_id()
        self.lives[rid] = Life(rid, now)
        self.starting[rid] = self.loop.call_at(now + self.startup_s, self._ready, rid)

    def _ready(self, rid: str) -> None:
        self.starting.pop(rid, None)
        now = self.loop.time()
        self.lives[rid].ready_s = now
        self.meters[rid] = ReplicaMeter(self.loop.time, self.window_s)
        self.pool.add_replica(rid)
        self._mark()

    def _stop(self, now: float) -> None:
        if self.starting:
            rid, handle = self.starting.popitem()  # the newest start goes first
            handle.cancel()
            life = self.lives[rid]
            life.gone_s = now
            life.cancelled = True
            self.cancelled_starts += 1
            return
        pool = self.pool
        # The replica with the fewest requests in flight (ties: the newest, whose cache is coldest).
        rid = min(reversed([v.replica_id for v in pool.views]), key=lambda r: pool.inflight[r])
        pool.stop_routing(rid)
        self.draining.add(rid)
        self.lives[rid].drain_s = now
        self.pushed.pop(rid, None)
        if pool.inflight[rid] == 0:
            self._gone(rid)

    def on_done(self, rid: str) -> None:
        """A request left `rid` (Pool.done)."""
        if rid in self.draining and self.pool.inflight[rid] == 0:
            self._gone(rid)

    def _gone(self, rid: str) -> None:
        now = self.loop.time()
        self.draining.discard(rid)
        life = self.lives[rid]
        life.gone_s = now
        took = now - (life.drain_s if life.drain_s is not None else now)
        self.drain_max_s = max(self.drain_max_s, took)
        if took > self.drain_timeout_s:
            self.drains_over_timeout += 1
        self.meters.pop(rid, None)
        self.pool.remove_replica(rid)
        self._mark()

    def close(self) -> None:
        """The run is over: cancel the starts still pending."""
        for handle in self.starting.values():
            handle.cancel()

    # -- signals ---------------------------------------------------------------------------------

    def push(self, now: float) -> None:
        """Every routable replica publishes its meter's snapshot (`record_autoscaling_stats`)."""
        for v in self.pool.views:
            rid = v.replica_id
            e = self.pool.engines[rid]
            self.pushed[rid] = (
                now,
                self.meters[rid].snapshot(e.running, e.queued, e.kv_usage, e.prefill_tokens),
            )

    def samples(self, now: float) -> tuple[ReplicaSample, ...]:
        return tuple(
            ReplicaSample.from_metrics(rid, max(0.0, now - t), m)
            for rid, (t, m) in self.pushed.items()
            if rid not in self.draining
        )

    # -- accounting ------------------------------------------------------------------------------

    def replica_seconds(self, end: float) -> float:
        """Seconds of replicas held (from the request to the removal, or to `end`)."""
        return sum(max(0.0, min(end, life.gone_s if life.gone_s is not None else end) - life.requested_s)
                   for life in self.lives.values())  # fmt: skip

    def ready_seconds(self, end: float) -> float:
        """Seconds of replicas ready (draining included): the span their engines could work."""
        out = 0.0
        for life in self.lives.values():
            if life.ready_s is None or life.ready_s > end:
                continue
            out += min(end, life.gone_s if life.gone_s is not None else end) - life.ready_s
        return out

    def section(self, end: float, cooldown_s: float | None) -> dict[str, Any]:
        prof = self.pool.shape.profile
        rs = self.replica_seconds(end)
        return {
            "min_replicas": self.min,
            "max_replicas": self.max,
            "startup_s": self.startup_s,
            "replica_seconds": rs,
            "gpu_hours": rs * prof.gpus / 3600.0,
            "mean_replicas": rs / end if end > 0 else 0.0,
            "peak_target": max((t for _, t, _ in self.timeline), default=0),
            "scale_events": {"up": self.ups, "down": self.downs},
            "reversals_within_cooldown": reversals(self.events, cooldown_s)
            if cooldown_s is not None
            else None,
            "cooldown_s": cooldown_s,
            "cancelled_starts": self.cancelled_starts,
            "drain_max_s": self.drain_max_s,
            "drains_over_timeout": self.drains_over_timeout,
            "timeline": [list(x) for x in self.timeline],
            "events": [
                {"t": e.t, "direction": e.direction, "from": e.old, "to": e.new, "reasons": e.reasons}
                for e in self.events
            ],
        }


def reversals(events: list[ScaleEvent], cooldown_s: float) -> int:
    """Scale events that reverse the pool's previous opposite one within `cooldown_s` (a scale-down
    within the cooldown after a scale-up, or a scale-up within it after a scale-down)."""
    n = 0
    last: dict[str, float] = {}
    for e in events:
        other = "down" if e.direction == "up" else "up"
        if other in last and e.t - last[other] < cooldown_s:
            n += 1
        last[e.direction] = e.t
    return n


class ModelScaler:
    """One autoscaled model: its pools' scalers, the policy's state, its signals and its decisions."""

    def __init__(self, model: SimModel, sim: Simulation, auto: Autoscaler, cfg: PolicyConfig) -> None:
        self.model = model
        self.sim = sim
        self.auto = auto
        self.cfg = cfg
        spec = model.spec
        a = spec.autoscaling
        self.window_s = float(getattr(a, "window_s", 30.0))
        self.metrics_interval_s = float(getattr(a, "metrics_interval_s", 2.0))
        drain = float(getattr(a, "drain_timeout_s", 600.0))
        self.names: dict[str, Pool] = {}  # spec pool name -> sim pool
        self.scalers: dict[str, PoolScaler] = {}
        for p in spec.pools:
            pool = model.pools[p.role]
            n = len(pool.engines)
            lo, hi = (p.replicas.min, p.replicas.max) if p.replicas.min < p.replicas.max else (n, n)
            self.names[p.pool_name] = pool
            self.scalers[p.pool_name] = pool.scaler = PoolScaler(pool, sim, lo, hi, self.window_s, drain)
        self.serving_name = spec.serving_pool.pool_name
        self.state = auto.initial_state()
        self.ingress_pushed: tuple[float, dict[str, float]] | None = None

    def push(self, now: float) -> None:
        for s in self.scalers.values():
            s.push(now)
        name = self.model.name
        queued = self.sim.admission_queued(name) + self.model.serving.pick_waiting
        self.ingress_pushed = (now, self.sim.ingress_meter.snapshot({name: queued}))

    def signals(self, now: float) -> ModelSignals:
        pools = {}
        for name, s in self.scalers.items():
            pool = self.names[name]
            pools[name] = PoolSignals(
                name, pool.role.value, s.target, s.ready, s.min, s.max, pool.max_ongoing, s.samples(now)
            )
        ingress = None
        if self.ingress_pushed is not None:
            t, m = self.ingress_pushed
            prefix = f"{self.model.name}:"
            fields = {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)}
            ingress = IngressSample.merge([(max(0.0, now - t), fields)])
        return ModelSignals(self.model.name, now, pools, ingress)

    def tick(self, now: float) -> Decision:
        d = self.auto.policy(self.signals(now), self.state, self.cfg)
        self.state = d.state
        for name, target in d.targets.items():
            s = self.scalers.get(name)
            if s is not None and s.min < s.max:
                s.set_target(int(target), [str(r) for r in d.reasons_for(name)])
        return d

    async def run(self, stop: asyncio.Event) -> None:
        """Metrics pushes every `metrics_interval_s`, decisions every `interval_s`."""
        loop = self.sim.loop
        step = self.metrics_interval_s
        next_push = 0.0
        next_tick = self.auto.interval_s
        while not stop.is_set():
            wake = min(next_push, next_tick)
            wait = wake - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if stop.is_set():
                break
            now = loop.time()
            if now >= next_push - 1e-9:
                self.push(now)
                next_push += step
            if now >= next_tick - 1e-9:
                self.tick(now)
                next_tick += self.auto.interval_s

    def close(self) -> None:
        for s in self.scalers.values():
            s.close()


def build(sim: Simulation) -> dict[str, ModelScaler]:
    """The model scalers of `sim` (its options' autoscaler)."""
    auto = sim.options.autoscaler
    assert auto is not None
    out = {}
    for name, m in sim.models.items():
        spec = m.spec
        wanted = name in auto.models if auto.models is not None else bool(sim.spec.autoscaled(spec))
        if not wanted:
            continue
        cfg = (auto.configs or {}).get(name) or sim.spec.autoscaling_policy_config(name)
        out[name] = ModelScaler(m, sim, auto, cfg)
    return out
