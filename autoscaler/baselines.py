"""Baseline autoscaling policies with `autoscaler.policy.decide`'s call shape (pure, no Ray).

Each is called as `policy(signals: ModelSignals, state, cfg: PolicyConfig) -> Decision` and returns
its own state in the `Decision` (a state it does not recognise, e.g. a fresh `ModelState()`, counts
as "no history"). The simulator (`loadtests.sim.autoscale`) and `benchmarks/autoscale.py` compare
them with Tandem's policy.

* `ray_default` (`RayDefault`): Ray Serve's default request-based policy, per pool, as Tandem
  configures it today (serving/app.py: `target_ongoing_requests = max(1, max_ongoing_requests // 2)`,
  Ray's defaults otherwise). Transcribed from ray/serve/autoscaling_policy.py (Ray 2.x in this venv):
  `_core_replica_queue_length_policy` (desired = running replicas x total requests / (target x
  running) = total / target), `_apply_scaling_factors` (upscaling / downscaling factor 1.0; a
  downscale stuck by the factor still drops one), `_get_cold_start_scale_up_replicas` (a pool at zero
  with a request goes to max(1, target) at once), `_apply_delay_logic` (a scale-up only once every
  decision for `upscale_delay_s` = 30 s wanted more; a scale-down once every decision for
  `downscale_delay_s` = 600 s wanted fewer; the direction's clock restarts when the wish changes
  direction or goes away), then the pool's bounds. Total requests: running + waiting on the pool's
  replicas, plus the requests queued at the ingress for the serving pool (Serve counts those held at
  the handles), averaged over `look_back_period_s` = 30 s (AutoscalingConfig's MEAN aggregation).
* `throughput_planner` (`ThroughputPlanner`): NVIDIA Dynamo's SLA planner in throughput mode. Based on
  ai-dynamo/dynamo `components/src/dynamo/planner/utils/prefill_planner.py` and
  `decode_planner.py` (`_compute_replica_requirements`, `_update_correction_factor`),
  `planner_core.py` (`_throughput_loop`: one adjustment every `adjustment_interval`) and
  `defaults.py` (`adjustment_interval = 180` s; later `throughput_adjustment_interval`), and
  docs/architecture/sla_planner.md. Every `adjustment_interval_s` it predicts the next interval's
  prompt and output token rates with Dynamo's constant predictor (the next interval = the last
  interval's mean, here the mean of the ingress's arrival rates sampled at each call), then
    prefill = ceil(prompt tok/s x clamp(TTFT correction) / prefill capacity per replica),
    decode  = ceil(output tok/s x clamp(ITL correction) / decode capacity per replica),
  (a colocated pool: the sum of both terms), capacities from `PolicyConfig.capacity` (Dynamo reads
  them from its pre-deployment profile), corrections = measured / expected over the interval
  (Dynamo: average TTFT / ITL from the frontend; here the mean of the replicas' p90s; expected from
  `expected_ttft_s(isl)` / `expected_itl_s(concurrency, context)`, the profile's idle TTFT and decode
  step as Dynamo's interpolators give them, 1.0 when not given). The prefill correction is clamped
  at <= 1 as Dynamo does (`min(1, p_correction_factor)`: cache hits make TTFT short, queueing does
  not add prefill replicas); the decode correction to [0.5, 2] (Dynamo leaves it unclamped; one odd
  interval should not double the pool). A scale-down passes the N/(N-1) check: the replicas left must
  carry the load arriving now (the ingress's latest rate, not the interval's mean) within their
  capacity, else it stops at the fewest that do. At least one replica (Dynamo's `min_endpoint`).
  Between adjustments it holds.
* `fixed`: keeps every pool's current size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from autoscaler.policy import DOWN, HOLD, UP, Decision, PolicyConfig, PoolCapacity, Reason
from autoscaler.signals import ModelSignals, PoolSignals, p90

SERVING_ROLES = ("decode", "colocated")


def _clamp(n: int, pool: PoolSignals) -> int:
    return min(max(n, pool.min_replicas), pool.max_replicas)


def _action(target: int, current: int) -> str:
    return UP if target > current else DOWN if target < current else HOLD


# -- fixed ---------------------------------------------------------------------------------------


def fixed(signals: ModelSignals, state: object, cfg: PolicyConfig) -> Decision:
    """Every pool keeps its current size."""
    targets = {name: p.current for name, p in signals.pools.items()}
    reasons = [Reason(name, HOLD, "fixed", f"{p.current} replicas") for name, p in signals.pools.items()]
    return Decision(targets, state, reasons)  # type: ignore[arg-type]


# -- Ray Serve's default -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RayPoolState:
    """Ray's per-deployment policy state: the decision counter and since when it has pointed one way,
    and the recent total requests (for the look-back mean)."""

    counter: int = 0
    since_s: float | None = None
    history: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class RayState:
    pools: Mapping[str, RayPoolState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RayDefault:
    """Ray Serve's default autoscaling policy per pool (see the module docstring).

    Attributes:
        upscale_delay_s, downscale_delay_s, downscale_to_zero_delay_s, look_back_period_s,
        upscaling_factor, downscaling_factor: Ray's AutoscalingConfig fields, at Ray's defaults.
        target_ongoing: target requests per replica from max_ongoing_requests (Tandem: half of it).
    """

    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    look_back_period_s: float = 30.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    target_ongoing: Callable[[int], float] = lambda max_ongoing: max(1, max_ongoing // 2)

    def __call__(self, signals: ModelSignals, state: object, cfg: PolicyConfig) -> Decision:
        st = state if isinstance(state, RayState) else RayState()
        now = signals.now
        targets: dict[str, int] = {}
        pools: dict[str, RayPoolState] = {}
        reasons: list[Reason] = []
        ing = signals.ingress
        for name, pool in signals.pools.items():
            ps = st.pools.get(name, RayPoolState())
            ongoing = sum(s.running + s.waiting for s in pool.samples if s.age_s <= self.look_back_period_s)
            if pool.role in SERVING_ROLES and ing is not None:
                ongoing += ing.queued
            hist = tuple((t, v) for t, v in ps.history if now - t < self.look_back_period_s) + (
                (now, ongoing),
            )
            total = sum(v for _, v in hist) / len(hist)
            ps = replace(ps, history=hist)
            target_ongoing = float(self.target_ongoing(pool.max_ongoing))
            running, current = pool.running, pool.current
            if running == 0 and total > 0:  # _get_cold_start_scale_up_replicas
                t = max(math.ceil(1 * self.upscaling_factor), current)
                why = f"cold start: {total:.1f} requests, no replica running"
            else:
                desired = current if running == 0 else total / target_ongoing
                desired = self._scaling_factors(desired, running)
                if running == 0 and desired > 0:
                    t, why = desired, "from zero"
                else:
                    t, ps, why = self._delay(max(0, desired), current, ps, now)
                why = f"{total:.1f} requests / target {target_ongoing:g} per replica = {desired}; {why}"
            t = _clamp(t, pool)
            targets[name] = t
            pools[name] = ps
            reasons.append(Reason(name, _action(t, current), "ray_default", why))
        return Decision(targets, RayState(pools), reasons)  # type: ignore[arg-type]

    def _scaling_factors(self, desired: float, running: int) -> int:
        """ray.serve.autoscaling_policy._apply_scaling_factors."""
        if running == 0:
            return math.ceil(desired)
        delta = desired - running
        factor = self.upscaling_factor if delta > 0 else self.downscaling_factor
        scaled = math.ceil(running + factor * delta)
        if math.ceil(float(desired)) < running and scaled == running:
            scaled -= 1
        return scaled

    def _delay(
        self, desired: int, current: int, ps: RayPoolState, now: float
    ) -> tuple[int, RayPoolState, str]:
        """ray.serve.autoscaling_policy._apply_delay_logic (on simulated time)."""
        eps = 1e-6
        counter, since = ps.counter, ps.since_s
        decision = current
        why = "hold"
        if desired > current:
            if counter < 0:
                counter, since = 0, None
            counter += 1
            since = now if since is None else since
            if now - since + eps >= self.upscale_delay_s:
                counter, since, decision = 0, None, desired
                why = f"wanted more for {self.upscale_delay_s:g}s"
            else:
                why = f"upscale delay {now - since:.0f}s of {self.upscale_delay_s:g}s"
        elif desired < current:
            if counter > 0:
                counter, since = 0, None
            counter -= 1
            to_zero = current == 1
            delay = (
                self.downscale_to_zero_delay_s
                if to_zero and self.downscale_to_zero_delay_s is not None
                else self.downscale_delay_s
            )
            if not to_zero:
                desired = max(1, desired)
            since = now if since is None else since
            if now - since + eps >= delay:
                counter, since, decision = 0, None, desired
                why = f"wanted fewer for {delay:g}s"
            else:
                why = f"downscale delay {now - since:.0f}s of {delay:g}s"
        else:
            counter, since = 0, None
        return decision, replace(ps, counter=counter, since_s=since), why


ray_default = RayDefault()


# -- Dynamo's throughput planner -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Interval:
    """Sums over the calls of the current adjustment interval."""

    n: int = 0
    input_tps: float = 0.0
    output_tps: float = 0.0
    arrivals: float = 0.0
    ttft_sum: float = 0.0
    ttft_n: int = 0
    itl_sum: float = 0.0
    itl_n: int = 0
    conc_sum: float = 0.0
    conc_n: int = 0


@dataclass(frozen=True, slots=True)
class PlannerState:
    last_adjust_s: float | None = None
    interval: _Interval = _Interval()
    p_correction: float = 1.0
    d_correction: float = 1.0


@dataclass(frozen=True, slots=True)
class ThroughputPlanner:
    """Dynamo's SLA planner, throughput mode (see the module docstring).

    Attributes:
        adjustment_interval_s: seconds between adjustments (Dynamo's default 180).
        expected_ttft_s: the TTFT one replica gives a prompt of `isl` tokens at no load (Dynamo's
            prefill interpolator); None: no TTFT correction.
        expected_itl_s: the ITL at `concurrency` sequences per decode replica of `context` tokens each
            (Dynamo's decode interpolator); None: no ITL correction.
        prefill_correction, decode_correction: (low, high) clamps of the corrections.
    """

    adjustment_interval_s: float = 180.0
    expected_ttft_s: Callable[[float], float] | None = None
    expected_itl_s: Callable[[float, float], float] | None = None
    prefill_correction: tuple[float, float] = (0.0, 1.0)
    decode_correction: tuple[float, float] = (0.5, 2.0)

    def __call__(self, signals: ModelSignals, state: object, cfg: PolicyConfig) -> Decision:
        st = state if isinstance(state, PlannerState) else PlannerState()
        now = signals.now
        p_d = any(p.role == "prefill" for p in signals.pools.values())
        acc = self._accumulate(st.interval, signals, p_d)
        if st.last_adjust_s is None:
            st = replace(st, last_adjust_s=now)
        if now - st.last_adjust_s + 1e-9 < self.adjustment_interval_s or acc.n == 0:
            targets = {name: p.current for name, p in signals.pools.items()}
            left = self.adjustment_interval_s - (now - st.last_adjust_s)
            reasons = [Reason(n, HOLD, "interval", f"next adjustment in {left:.0f}s") for n in signals.pools]
            return Decision(targets, replace(st, interval=acc), reasons)  # type: ignore[arg-type]
        # The constant predictor: the next interval's rates are the last interval's means.
        inp, out, arr = acc.input_tps / acc.n, acc.output_tps / acc.n, acc.arrivals / acc.n
        isl = inp / arr if arr > 0 else 0.0
        osl = out / arr if arr > 0 else 0.0
        pc, dc = st.p_correction, st.d_correction
        notes = []
        if self.expected_ttft_s is not None and acc.ttft_n and isl > 0:
            pc = (acc.ttft_sum / acc.ttft_n) / max(self.expected_ttft_s(isl), 1e-9)
            notes.append(f"TTFT correction {pc:.2f}")
        if self.expected_itl_s is not None and acc.itl_n and acc.conc_n:
            conc = acc.conc_sum / acc.conc_n
            dc = (acc.itl_sum / acc.itl_n) / max(self.expected_itl_s(conc, isl + osl / 2), 1e-9)
            notes.append(f"ITL correction {dc:.2f}")
        pcc = min(max(pc, self.prefill_correction[0]), self.prefill_correction[1])
        dcc = min(max(dc, self.decode_correction[0]), self.decode_correction[1])
        ing = signals.ingress
        now_in = ing.input_tokens_per_s if ing is not None else inp
        now_out = ing.output_tokens_per_s if ing is not None else out
        targets: dict[str, int] = {}
        reasons: list[Reason] = []
        for name, pool in signals.pools.items():
            cap = cfg.capacity.get(name) or PoolCapacity()
            need = self._replicas(pool.role, cap, inp * pcc, out * dcc, p_d)
            if need is None:
                targets[name] = pool.current
                reasons.append(Reason(name, HOLD, "no_capacity", "no capacity given for this pool"))
                continue
            t = max(1, math.ceil(need - 1e-9))
            detail = (f"predicted {inp:.0f} prompt / {out:.0f} output tok/s"
                      + (f" ({', '.join(notes)})" if notes else "") + f": {need:.2f} replicas")  # fmt: skip
            n = pool.current
            if t < n:  # N/(N-1): the replicas left must carry what arrives now
                now_need = self._replicas(pool.role, cap, now_in * pcc, now_out * dcc, p_d) or 0.0
                floor = min(n, max(1, math.ceil(now_need - 1e-9)))
                if floor > t:
                    detail += f"; N/(N-1): {now_need:.2f} replicas' worth arriving now, keeps {floor}"
                    t = floor
            t = _clamp(t, pool)
            targets[name] = t
            reasons.append(Reason(name, _action(t, n), "throughput", detail))
        new = PlannerState(now, _Interval(), pc, dc)
        return Decision(targets, new, reasons)  # type: ignore[arg-type]

    @staticmethod
    def _replicas(role: str, cap: PoolCapacity, inp: float, out: float, p_d: bool) -> float | None:
        if role == "prefill":
            return inp / cap.input_tokens_per_s if cap.input_tokens_per_s else None
        if role == "decode" and p_d:
            return out / cap.output_tokens_per_s if cap.output_tokens_per_s else None
        if not cap.input_tokens_per_s or not cap.output_tokens_per_s:
            return None
        return inp / cap.input_tokens_per_s + out / cap.output_tokens_per_s

    @staticmethod
    def _accumulate(acc: _Interval, signals: ModelSignals, p_d: bool) -> _Interval:
        ing = signals.ingress
        ttft: list[float] = []
        itl: list[float] = []
        conc: list[float] = []
        for pool in signals.pools.values():
            owns_ttft = pool.role == "prefill" or not p_d
            for s in pool.samples:
                if owns_ttft and s.ttft_s is not None:
                    ttft.append(s.ttft_s)
                if pool.role in SERVING_ROLES:
                    if s.tpot_s is not None:
                        itl.append(s.tpot_s)
                    conc.append(s.running)
        t90, i90 = p90(ttft), p90(itl)
        return _Interval(
            acc.n + (1 if ing is not None else 0),
            acc.input_tps + (ing.input_tokens_per_s if ing is not None else 0.0),
            acc.output_tps + (ing.output_tokens_per_s if ing is not None else 0.0),
            acc.arrivals + (ing.arrivals_per_s if ing is not None else 0.0),
            acc.ttft_sum + (t90 or 0.0),
            acc.ttft_n + (t90 is not None),
            acc.itl_sum + (i90 or 0.0),
            acc.itl_n + (i90 is not None),
            acc.conc_sum + (sum(conc) / len(conc) if conc else 0.0),
            acc.conc_n + (1 if conc else 0),
        )


throughput_planner = ThroughputPlanner()

#: The baselines by name.
BASELINES: dict[str, Callable[[ModelSignals, object, PolicyConfig], Decision]] = {
    "ray_default": ray_default,
    "throughput_planner": throughput_planner,
    "fixed": fixed,
}
