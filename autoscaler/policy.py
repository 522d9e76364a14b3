"""The SLO autoscaler: prefill and decode pools of a model sized together from what each is short of.

Pure function of `(ModelSignals, ModelState, PolicyConfig) -> Decision` (no Ray, no clock of its
own: `signals.now` is the time). Ray Serve's application-level policy (serving/autoscaling.py) and
the simulator (loadtests/sim) call the same `decide`.

For each pool, the replicas it needs are the largest of:

* **demand**: the tokens per second it must process over what one replica does at the SLO
  (`capacity`, from a load test or the simulator's profile) at `target_utilization`: prefill from
  the prompt tokens it computes (plus its backlog drained within the TTFT objective), decode from
  the output tokens, a colocated pool from both (they share the replica's time). With no capacity
  given, demand is the requests in flight over `target_utilization` of `max_ongoing`;
* **KV**: the KV cache in use over `kv_target` of a replica's (decode and colocated);
* **latency**: p90 TTFT over its objective adds to the pool that owns it (prefill in a P/D model,
  else colocated), p90 TPOT to decode (or colocated); requests queued at the ingress past
  `queue_wait_fraction` of the TTFT objective, or rejected for capacity, add to the serving pool.
  The step is proportional to how far over the objective it is (Dynamo's correction factor).
  Replicas still starting count as coming capacity: no latency step is added again within
  `cold_start_s` of a scale-up (the cold-start allowance);
* **forecast** (optional): demand scaled by the arrival rate predicted `cold_start_s` ahead (Holt's
  linear trend), so that a ramp is met by replicas that are ready when it arrives.

Then, in this order: scale-up steps limited to `max_step_up` (a fraction of the pool); scale-down only
when the latencies are under `scale_down_latency_fraction` of their objectives, nothing is queued or
rejected, every recommendation of the last `downscale_stabilization_s` has been below the current
size, `downscale_cooldown_s` has passed since the pool's last change in either direction took effect
(a replica asked for is up, one removed is gone), no replica
asked for within `cold_start_s` is still starting, one replica at a time, and the **N/(N-1) check**
passes: the N-1 replicas left must carry the load of N (demand and KV) within `scale_down_margin` of
their targets (Dynamo PR #9294's fix for 2<->1 flapping; the margin is the hysteresis band under the
scale-up point). A pool at zero with a request waiting, or arriving, scales to one at once; a pool
with `min_replicas: 0` goes to zero only after `idle_to_zero_s` with no arrivals and nothing in
flight. The prefill:decode ratio is kept within `[min_prefill_decode_ratio,
max_prefill_decode_ratio]` by raising the pool that lags. Every pool's decision carries its reasons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from autoscaler.signals import ModelSignals, PoolSignals, ReplicaSample, p90

UP, DOWN, HOLD = "up", "down", "hold"
#: Reasons of a latency-driven scale-up (the load per replica it happened at is remembered).
LATENCY_CODES = frozenset({"ttft", "tpot", "queue", "rejections"})


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    """What one replica of a pool processes at the SLO (None: not known; load is used instead)."""

    input_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy's settings. The defaults and the reason for each live in `serving.config.AutoscalingSpec`
    (`AutoscalingSpec.policy_config()` builds this); tests and the simulator build it the same way."""

    ttft_slo_s: float
    tpot_slo_s: float
    target_utilization: float
    kv_target: float
    kv_high: float
    queue_wait_fraction: float
    scale_down_latency_fraction: float
    scale_down_margin: float
    slo_memory_s: float
    max_step_up: float
    downscale_stabilization_s: float
    downscale_cooldown_s: float
    cold_start_s: float
    warmup_s: float
    stale_after_s: float
    idle_to_zero_s: float
    min_prefill_decode_ratio: float
    max_prefill_decode_ratio: float
    forecast: bool
    forecast_alpha: float
    forecast_beta: float
    capacity: Mapping[str, PoolCapacity] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a pool's target is what it is: `code` is stable (metrics label), `detail` for people."""

    pool: str
    action: str
    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.pool} {self.action} [{self.code}] {self.detail}"


@dataclass(frozen=True, slots=True)
class PoolState:
    """What the policy remembers of one pool between decisions."""

    last_up_s: float | None = None
    last_down_s: float | None = None
    #: Since when every recommendation has been below the pool's size (None: the last was not).
    below_since_s: float | None = None
    #: Since when nothing has arrived or been in flight (None: something has).
    idle_since_s: float | None = None
    #: Last time a replica of the pool was seen still starting: the cooldown runs from when the
    #: pool's last change took effect, not from when it was asked for.
    starting_seen_s: float | None = None
    #: Work per replica (replica-equivalents of `capacity`) at which a latency objective was last
    #: missed and a replica added for it: a scale-down that would bring the replicas back to it is
    #: refused for `slo_memory_s` (what one replica really carries at the SLO, learned; None: never).
    slo_miss_work: float | None = None
    slo_miss_s: float | None = None


@dataclass(frozen=True, slots=True)
class Forecast:
    """Holt's linear trend on the arrival rate (prompt tokens per second)."""

    level: float
    trend: float
    t: float

    def step(self, value: float, now: float, alpha: float, beta: float) -> Forecast:
        dt = max(now - self.t, 1e-9)
        predicted = self.level + self.trend * dt
        level = alpha * value + (1 - alpha) * predicted
        trend = beta * (level - self.level) / dt + (1 - beta) * self.trend
        return Forecast(level, trend, now)

    def ahead(self, horizon_s: float) -> float:
        return max(0.0, self.level + self.trend * horizon_s)


@dataclass(frozen=True, slots=True)
class ModelState:
    """The policy's memory for one model (a new one is returned by every decision)."""

    pools: Mapping[str, PoolState] = field(default_factory=dict)
    forecast: Forecast | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Target replicas per pool, the state to pass to the next decision, and the reasons."""

    targets: dict[str, int]
    state: ModelState
    reasons: list[Reason]

    def reasons_for(self, pool: str) -> list[Reason]:
        return [r for r in self.reasons if r.pool == pool]


@dataclass(slots=True)
class _Need:
    """The replicas a pool needs, by what asks for them."""

    demand: int = 0
    kv: int = 0
    latency: int = 0
    reasons: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return max(self.demand, self.kv, self.latency)


def fresh_samples(pool: PoolSignals, cfg: PolicyConfig) -> list[ReplicaSample]:
    """Samples young enough to trust, of replicas past their warm-up."""
    return [s for s in pool.samples if s.age_s <= cfg.stale_after_s and s.uptime_s >= cfg.warmup_s]


def _load(
    pool: PoolSignals, samples: list[ReplicaSample], cfg: PolicyConfig, demand_scale: float
) -> tuple[float, str]:
    """The pool's work in replica-equivalents at 100 % of a replica, and how it was reckoned."""
    cap = cfg.capacity.get(pool.pool) or PoolCapacity()
    inp = sum(s.input_tokens_per_s for s in samples) * demand_scale
    out = sum(s.output_tokens_per_s for s in samples) * demand_scale
    # Queued prompt tokens include the prompts being prefilled (already in `inp`): drained over the cold
    # start, a backlog is work for new replicas only if it outlasts their start-up (a burst the ready
    # replicas clear in seconds starts none; a growing one still does).
    backlog = sum(s.prefill_tokens_queued for s in samples) / max(cfg.ttft_slo_s, cfg.cold_start_s, 1e-3)
    parts: list[str] = []
    work = 0.0
    uses_in = pool.role in ("prefill", "colocated") and cap.input_tokens_per_s
    uses_out = pool.role in ("decode", "colocated") and cap.output_tokens_per_s
    if uses_in:
        work += (inp + backlog) / cap.input_tokens_per_s
        parts.append(f"{inp + backlog:.0f} prompt tok/s over {cap.input_tokens_per_s:.0f}/replica")
    if uses_out:
        work += out / cap.output_tokens_per_s
        parts.append(f"{out:.0f} output tok/s over {cap.output_tokens_per_s:.0f}/replica")
    if not parts:
        inflight = sum(s.running + s.waiting for s in samples) * demand_scale
        work = inflight / pool.max_ongoing
        parts.append(f"{inflight:.0f} requests in flight over {pool.max_ongoing}/replica")
    return work, ", ".join(parts)


def _pool_need(
    pool: PoolSignals, signals: ModelSignals, ps: PoolState, cfg: PolicyConfig, demand_scale: float, p_d: bool
) -> tuple[_Need, list[ReplicaSample], float]:
    samples = fresh_samples(pool, cfg)
    need = _Need()
    now = signals.now
    n = pool.current
    if not samples:
        need.demand = n
        return need, samples, 0.0
    work, how = _load(pool, samples, cfg, demand_scale)
    need.demand = math.ceil(work / cfg.target_utilization - 1e-9)
    need.reasons.append(("demand", f"{how}: {need.demand} at {cfg.target_utilization:.0%}"))
    # Replicas asked for and not yet ready: their capacity is on its way (the cold-start allowance).
    settling = ps.last_up_s is not None and now - ps.last_up_s < cfg.cold_start_s and pool.running < n
    if pool.role in ("decode", "colocated"):
        kv = sum(s.kv_usage for s in samples)  # replicas' worth of KV in use
        need.kv = math.ceil(kv / cfg.kv_target - 1e-9)
        if need.kv > n or (max(s.kv_usage for s in samples) > cfg.kv_high and not settling):
            need.kv = max(need.kv, n + 1)
            need.reasons.append(
                ("kv", f"KV in use {kv / len(samples):.0%} per replica > target {cfg.kv_target:.0%}")
            )
    # Latency: TTFT belongs to prefill (P/D) or colocated; TPOT to decode or colocated.
    ratios: list[tuple[str, float, str]] = []
    owns_ttft = pool.role == "prefill" or (pool.role == "colocated") or (pool.role == "decode" and not p_d)
    if owns_ttft:
        ttft = p90([s.ttft_s for s in samples if s.ttft_s is not None])
        if ttft is not None and ttft > cfg.ttft_slo_s:
            ratios.append(
                ("ttft", ttft / cfg.ttft_slo_s, f"TTFT p90 {ttft:.2f}s > SLO {cfg.ttft_slo_s:.2f}s")
            )
    if pool.role in ("decode", "colocated"):
        tpot = p90([s.tpot_s for s in samples if s.tpot_s is not None])
        if tpot is not None and tpot > cfg.tpot_slo_s:
            ratios.append(
                (
                    "tpot",
                    tpot / cfg.tpot_slo_s,
                    f"TPOT p90 {tpot * 1e3:.0f}ms > SLO {cfg.tpot_slo_s * 1e3:.0f}ms",
                )
            )
    serving = pool.role in ("decode", "colocated")
    ing = signals.ingress
    if serving and ing is not None and ing.age_s <= cfg.stale_after_s:
        if ing.queued > 0 and ing.queue_wait_s > cfg.queue_wait_fraction * cfg.ttft_slo_s:
            ratios.append(
                (
                    "queue",
                    1.0 + ing.queue_wait_s / cfg.ttft_slo_s,
                    f"{ing.queued:.0f} queued at the ingress, wait p90 {ing.queue_wait_s:.2f}s",
                )
            )
        if ing.rejected_per_s > 0:
            ratios.append(
                (
                    "rejections",
                    1.0 + ing.rejected_per_s / max(ing.arrivals_per_s, 1e-9),
                    f"{ing.rejected_per_s:.2f}/s rejected for capacity",
                )
            )
    if ratios:
        code, ratio, detail = max(ratios, key=lambda r: r[1])
        if settling:
            need.reasons.append(("cold_start", f"{detail}; {n - pool.running} replica(s) still starting"))
            need.latency = n
        else:
            # Proportional to how far over the objective only when the demand or the KV confirms a
            # shortage; else one replica (a p90 of a few requests after one burst is not a trend).
            confirmed = max(need.demand, need.kv) > n
            step = math.ceil(n * min(ratio, 1.0 + cfg.max_step_up)) if confirmed else n + 1
            need.latency = max(n + 1, step)
            need.reasons.append((code, detail))
    return need, samples, work


def _down_blockers(
    pool: PoolSignals,
    samples: list[ReplicaSample],
    work: float,
    signals: ModelSignals,
    cfg: PolicyConfig,
    p_d: bool,
    ps: PoolState,
) -> list[str]:
    """Why `pool` may not lose a replica now (empty: it may)."""
    n = pool.current
    out: list[str] = []
    lat_max = cfg.scale_down_latency_fraction
    owns_ttft = pool.role in ("prefill", "colocated") or not p_d
    ttft = p90([s.ttft_s for s in samples if s.ttft_s is not None])
    if owns_ttft and ttft is not None and ttft > lat_max * cfg.ttft_slo_s:
        out.append(f"TTFT p90 {ttft:.2f}s > {lat_max:.0%} of SLO")
    tpot = p90([s.tpot_s for s in samples if s.tpot_s is not None])
    if pool.role != "prefill" and tpot is not None and tpot > lat_max * cfg.tpot_slo_s:
        out.append(f"TPOT p90 {tpot * 1e3:.0f}ms > {lat_max:.0%} of SLO")
    ing = signals.ingress
    if pool.role != "prefill" and ing is not None and (ing.queued > 0 or ing.rejected_per_s > 0):
        out.append(f"{ing.queued:.0f} queued / {ing.rejected_per_s:.2f} rejected per s at the ingress")
    if n > 1:
        grow = n / (n - 1)
        missed = ps.slo_miss_work
        recent = ps.slo_miss_s is not None and signals.now - ps.slo_miss_s < cfg.slo_memory_s
        if missed is not None and recent and work / (n - 1) > missed * cfg.scale_down_margin:
            out.append(
                f"N/(N-1): {n - 1} replica(s) would each carry {work / (n - 1):.0%}; its latency objective "
                f"was missed at {missed:.0%}"
            )
        busy_max = cfg.target_utilization * cfg.scale_down_margin
        if work / (n - 1) > busy_max + 1e-9:
            out.append(f"N/(N-1): {n - 1} replica(s) would run at {work / (n - 1):.0%} > {busy_max:.0%}")
        if pool.role != "prefill" and samples:
            kv = sum(s.kv_usage for s in samples) / len(samples)
            kv_max = cfg.kv_target * cfg.scale_down_margin
            if kv * grow > kv_max:
                out.append(f"N/(N-1): KV would be {kv * grow:.0%} > {kv_max:.0%}")
    return out


def decide(signals: ModelSignals, state: ModelState, cfg: PolicyConfig) -> Decision:
    """Targets for every pool of one model (see the module docstring)."""
    now = signals.now
    p_d = any(p.role == "prefill" for p in signals.pools.values())
    reasons: list[Reason] = []
    forecast, scale = _forecast(signals, state, cfg)
    targets: dict[str, int] = {}
    new_pools: dict[str, PoolState] = {}
    slo_work: dict[str, float] = {}
    for name, pool in signals.pools.items():
        ps = state.pools.get(name, PoolState())
        n = pool.current
        if name in signals.missing:
            targets[name] = n
            new_pools[name] = ps
            reasons.append(Reason(name, HOLD, "no_signals", signals.missing[name]))
            continue
        need, samples, work = _pool_need(pool, signals, ps, cfg, scale, p_d)
        ing = signals.ingress
        arriving = ing is not None and (ing.arrivals_per_s > 0 or ing.queued > 0)
        busy = arriving or any(s.running + s.waiting > 0 for s in samples)
        idle_since = None if busy else (ps.idle_since_s if ps.idle_since_s is not None else now)
        rec = need.total
        if n == 0:
            target = max(1, pool.min_replicas) if arriving else pool.min_replicas
            if target > 0:
                reasons.append(
                    Reason(
                        name,
                        UP,
                        "from_zero",
                        f"{ing.queued:.0f} waiting, {ing.arrivals_per_s:.2f} req/s arriving",
                    )
                )
        elif rec > n:
            step = max(1, math.ceil(n * cfg.max_step_up))
            target = min(rec, n + step)
            code, detail = _main_reason(need, rec)
            if code in LATENCY_CODES and samples:
                slo_work[name] = work / len(samples)
            reasons.append(
                Reason(name, UP, code, detail + (f" (step limited to +{step})" if target < rec else ""))
            )
        else:
            target = n
            # The stabilization window holds the N/(N-1) check and the latency / queue blockers at every
            # decision, not only at the last: one low sample of a noisy 30 s window removes no replica
            # that the next sample asks back.
            blockers = _down_blockers(pool, samples, work, signals, cfg, p_d, ps) if rec < n else []
            low = rec < n and not blockers
            below = ps.below_since_s if low and ps.below_since_s is not None else (now if low else None)
            ps = replace(ps, below_since_s=below)
            to_zero = (
                pool.min_replicas == 0
                and n == 1
                and idle_since is not None
                and now - idle_since >= cfg.idle_to_zero_s
            )
            if to_zero:
                target = 0
                reasons.append(Reason(name, DOWN, "idle", f"nothing arrived for {now - idle_since:.0f}s"))
            elif blockers and n > max(pool.min_replicas, 1):
                code = "n_minus_1" if blockers[-1].startswith("N/(N-1)") else "latency"
                reasons.append(
                    Reason(name, HOLD, code, f"{rec} needed by demand, but " + "; ".join(blockers))
                )
            elif below is not None and n > max(pool.min_replicas, 1):
                cooldown = _cooldown_left(ps, now, cfg)
                # A replica asked for and not yet up has not had its chance to help: not removed
                # before it is (or before cold_start_s, after which it is presumed unplaceable).
                starting = (
                    pool.running < n and ps.last_up_s is not None and now - ps.last_up_s < cfg.cold_start_s
                )
                if now - below < cfg.downscale_stabilization_s:
                    reasons.append(
                        Reason(
                            name,
                            HOLD,
                            "stabilizing",
                            f"{rec} recommended for {now - below:.0f}s"
                            f" of {cfg.downscale_stabilization_s:.0f}s",
                        )
                    )
                elif cooldown > 0:
                    reasons.append(Reason(name, HOLD, "cooldown", f"{cooldown:.0f}s of cooldown left"))
                elif starting:
                    reasons.append(
                        Reason(
                            name,
                            HOLD,
                            "starting",
                            f"{n - pool.running} replica(s) asked for are still starting",
                        )
                    )
                else:
                    target = n - 1
                    reasons.append(
                        Reason(name, DOWN, "surplus", f"fewer than {n} needed for {now - below:.0f}s")
                    )
            elif need.reasons and any(c == "cold_start" for c, _ in need.reasons):
                reasons.append(
                    Reason(name, HOLD, "cold_start", next(d for c, d in need.reasons if c == "cold_start"))
                )
        targets[name] = target
        seen = now if pool.running < n else ps.starting_seen_s
        new_pools[name] = replace(ps, idle_since_s=idle_since, starting_seen_s=seen)
    _hold_ratio(signals, targets, reasons, cfg)
    for name, pool in signals.pools.items():
        t = min(max(targets[name], pool.min_replicas), pool.max_replicas)
        if t != targets[name]:
            reasons.append(
                Reason(
                    name,
                    HOLD,
                    "bounds",
                    f"{targets[name]} clamped to [{pool.min_replicas}, {pool.max_replicas}]",
                )
            )
        targets[name] = t
        ps = new_pools[name]
        if t > pool.current:
            ps = replace(ps, last_up_s=now, below_since_s=None)
            if name in slo_work:
                ps = replace(ps, slo_miss_work=slo_work[name], slo_miss_s=now)
        elif t < pool.current:
            ps = replace(ps, last_down_s=now, below_since_s=None)
        new_pools[name] = ps
    return Decision(targets, ModelState(new_pools, forecast), reasons)


def _main_reason(need: _Need, rec: int) -> tuple[str, str]:
    """The reason behind the largest of a pool's needs (latency, then KV, then demand)."""
    by_code = dict(need.reasons)
    if need.latency == rec:
        for code in ("ttft", "tpot", "queue", "rejections"):
            if code in by_code:
                return code, by_code[code]
    if need.kv == rec and "kv" in by_code:
        return "kv", by_code["kv"]
    return "demand", by_code.get("demand", "")


def _cooldown_left(ps: PoolState, now: float, cfg: PolicyConfig) -> float:
    last = max((t for t in (ps.last_up_s, ps.last_down_s, ps.starting_seen_s) if t is not None), default=None)
    return 0.0 if last is None else max(0.0, cfg.downscale_cooldown_s - (now - last))


def _forecast(signals: ModelSignals, state: ModelState, cfg: PolicyConfig) -> tuple[Forecast | None, float]:
    """The updated forecaster and the factor to scale measured demand by (>= 1; 1 without forecasting)."""
    ing = signals.ingress
    if not cfg.forecast or ing is None or ing.age_s > cfg.stale_after_s:
        return state.forecast, 1.0
    value = ing.input_tokens_per_s
    f = state.forecast
    f = (
        Forecast(value, 0.0, signals.now)
        if f is None
        else f.step(value, signals.now, cfg.forecast_alpha, cfg.forecast_beta)
    )
    if value <= 0:
        return f, 1.0
    return f, max(1.0, f.ahead(cfg.cold_start_s) / value)


def _hold_ratio(
    signals: ModelSignals, targets: dict[str, int], reasons: list[Reason], cfg: PolicyConfig
) -> None:
    """Raise the lagging pool of a P/D model so that prefill:decode stays within its bounds."""
    pre = [p for p in signals.pools.values() if p.role == "prefill"]
    dec = [p for p in signals.pools.values() if p.role == "decode"]
    if not pre or not dec:
        return
    p, d = pre[0], dec[0]
    tp, td = targets[p.pool], targets[d.pool]
    if tp == 0 or td == 0:
        return
    if tp / td < cfg.min_prefill_decode_ratio:
        new = min(p.max_replicas, math.ceil(td * cfg.min_prefill_decode_ratio - 1e-9))
        if new > tp:
            targets[p.pool] = new
            reasons.append(
                Reason(p.pool, UP, "ratio", f"prefill:decode {tp}:{td} < {cfg.min_prefill_decode_ratio:g}")
            )
    elif tp / td > cfg.max_prefill_decode_ratio:
        new = min(d.max_replicas, math.ceil(tp / cfg.max_prefill_decode_ratio - 1e-9))
        if new > td:
            targets[d.pool] = new
            reasons.append(
                Reason(d.pool, UP, "ratio", f"prefill:decode {tp}:{td} > {cfg.max_prefill_decode_ratio:g}")
            )
