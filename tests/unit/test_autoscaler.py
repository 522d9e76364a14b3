"""The SLO autoscaler's policy over signal traces (autoscaler/policy.py): table-driven, pure.

A small closed loop drives `decide`: each pool's load (in replica-equivalents at its capacity) follows
a trace; replicas asked for become ready after a start-up time; each tick's samples come from the
load spread over the ready replicas, with latencies that grow when a replica runs past its capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from autoscaler.policy import DOWN, UP, ModelState, PoolCapacity, decide
from autoscaler.signals import IngressSample, ModelSignals, PoolSignals, ReplicaSample
from serving.config import AutoscalingSpec, PoolCapacitySpec, SpecError, parse_spec

CAP_IN, CAP_OUT = 1000.0, 200.0
TICK_S = 5.0


def config(**over):
    caps = {
        "colocated": PoolCapacitySpec(input_tokens_per_s=CAP_IN, output_tokens_per_s=CAP_OUT),
        "prefill": PoolCapacitySpec(input_tokens_per_s=CAP_IN),
        "decode": PoolCapacitySpec(output_tokens_per_s=CAP_OUT),
    }
    base = {"capacity": caps, "cold_start_s": 30.0, "warmup_s": 0.0}
    base.update(over)
    return AutoscalingSpec(**base).policy_config(1.0)


@dataclass
class Pool:
    role: str
    min: int = 1
    max: int = 8
    target: int = 1
    ready: list[float] = field(default_factory=list)  # ready time of each replica, oldest first

    def running(self, now: float) -> int:
        return sum(1 for t in self.ready if t <= now)


@dataclass
class Run:
    """What a closed-loop run did: per tick (t, {pool: target}) and every scale event."""

    targets: list[tuple[float, dict[str, int]]]
    events: list[tuple[float, str, str, int, int]]  # (t, pool, direction, from, to)
    reasons: list[str]

    def changes(self, pool: str) -> list[tuple[float, str]]:
        return [(t, d) for t, p, d, _, _ in self.events if p == pool]

    def final(self, pool: str) -> int:
        return self.targets[-1][1][pool]

    def peak(self, pool: str) -> int:
        return max(t[pool] for _, t in self.targets)


def closed_loop(
    pools: dict[str, Pool],
    load: Callable[[float, str], float],
    duration_s: float,
    cfg=None,
    startup_s: float = 30.0,
    arrivals: Callable[[float], float] = lambda t: 1.0,
    kv_per_load: float = 0.3,
) -> Run:
    """Drive `decide` for `duration_s`: `load(t, role)` is the pool's work in replica-equivalents."""
    cfg = cfg or config()
    for p in pools.values():
        p.ready = [-1e9] * p.target
    state = ModelState()
    run = Run([], [], [])
    t = 0.0
    while t <= duration_s:
        sigs = {}
        for name, p in pools.items():
            n_run = p.running(t)
            w = load(t, p.role)
            per = w / n_run if n_run else 0.0
            over = max(per, 1.0)  # latency grows past capacity
            samples = tuple(
                ReplicaSample(
                    f"{name}-{i}",
                    age_s=1.0,
                    uptime_s=t - p.ready[i] if p.ready[i] > -1e8 else 1e6,
                    running=per * 8,
                    input_tokens_per_s=per
                    * (CAP_IN if p.role != "decode" else 0)
                    * (0.5 if p.role == "colocated" else 1),
                    output_tokens_per_s=per
                    * (CAP_OUT if p.role != "prefill" else 0)
                    * (0.5 if p.role == "colocated" else 1),
                    kv_usage=min(1.0, per * kv_per_load) if p.role != "prefill" else 0.0,
                    ttft_s=0.2 * over**3 if p.role != "decode" else 0.2 * over**3,
                    tpot_s=0.02 * over**2 if p.role != "prefill" else None,
                )
                for i in range(len(p.ready))
                if p.ready[i] <= t
            )
            sigs[name] = PoolSignals(name, p.role, p.target, n_run, p.min, p.max, 64, samples)
        rate = arrivals(t)
        ing = IngressSample(1.0, arrivals_per_s=rate, input_tokens_per_s=rate * 100)
        d = decide(ModelSignals("m", t, sigs, ing), state, cfg)
        state = d.state
        run.reasons += [f"{t:.0f} {r}" for r in d.reasons]
        for name, p in pools.items():
            new = d.targets[name]
            if new > p.target:
                p.ready += [t + startup_s] * (new - p.target)
            elif new < p.target:
                p.ready.sort()
                del p.ready[new:]  # the newest go first (the simulator drains the least loaded)
            if new != p.target:
                run.events.append((t, name, UP if new > p.target else DOWN, p.target, new))
            p.target = new
        run.targets.append((t, {n: p.target for n, p in pools.items()}))
        t += TICK_S
    return run


def reversals(run: Run, pool: str, cooldown_s: float) -> list[tuple[float, float]]:
    """Pairs of opposite scale events of `pool` closer than `cooldown_s`."""
    ch = run.changes(pool)
    return [(a, b) for (a, da), (b, db) in zip(ch, ch[1:], strict=False) if da != db and b - a < cooldown_s]


def colocated(**kw) -> dict[str, Pool]:
    return {"colocated": Pool("colocated", **kw)}


def pd(**kw) -> dict[str, Pool]:
    return {"prefill": Pool("prefill", **kw), "decode": Pool("decode", **kw)}


# --- traces -------------------------------------------------------------------------------------


def step(lo: float, hi: float, at: float, until: float = math.inf) -> Callable[[float, str], float]:
    return lambda t, role: hi if at <= t < until else lo


def ramp(lo: float, hi: float, t0: float, t1: float) -> Callable[[float, str], float]:
    return lambda t, role: lo + (hi - lo) * min(1.0, max(0.0, (t - t0) / (t1 - t0)))


def diurnal(lo: float, hi: float, period: float) -> Callable[[float, str], float]:
    return lambda t, role: lo + (hi - lo) * 0.5 * (1 - math.cos(2 * math.pi * t / period))


@pytest.mark.parametrize(
    ("name", "trace", "duration", "peak_at_least", "final"),
    [
        # 3.6 replica-equivalents at 75 % target -> 5 replicas; back to 1 after it ends.
        ("step", step(0.4, 3.6, 100, 600), 1500, 5, 1),
        ("ramp", ramp(0.3, 4.4, 50, 650), 700, 6, 6),
        ("burst", step(0.4, 6.0, 100, 160), 1200, 2, 1),
        ("diurnal", diurnal(0.4, 3.6, 2400), 2400, 5, 1),
    ],
)
def test_traces_follow_load_and_come_back(name, trace, duration, peak_at_least, final):
    run = closed_loop(colocated(), trace, duration)
    assert run.peak("colocated") >= peak_at_least, run.reasons
    assert run.final("colocated") == final, run.reasons
    assert not reversals(run, "colocated", config().downscale_cooldown_s), run.events
    # Up steps at most double the pool (max_step_up 1.0); down steps remove one replica.
    for _, _, d, a, b in run.events:
        assert (b <= 2 * a if a else b == 1) if d == UP else b == a - 1


def test_step_meets_demand_before_the_slo_step():
    """The demand term sizes at once for the load seen: 3.6 over 75 % is 5 replicas (1 -> 2 -> 4 -> 5)."""
    run = closed_loop(colocated(), step(0.4, 3.6, 100), 400)
    assert run.final("colocated") == 5
    first = [e for e in run.events if e[2] == UP][0]
    assert first[0] == 100 and "demand" in "".join(r for r in run.reasons if r.startswith("100 "))


@pytest.mark.parametrize("load", [0.5, 0.8, 1.2, 1.5, 1.9, 2.2, 2.6])
def test_no_oscillation_at_one_to_three_replicas_under_constant_load(load):
    """Constant load near the 1, 2 and 3 replica boundaries: the pool settles and stays put."""
    run = closed_loop(colocated(), lambda t, r: load, 3000)
    settled = [t for t, ts in run.targets if t > 600]
    sizes = {ts["colocated"] for t, ts in run.targets if t > 600}
    assert settled and len(sizes) == 1, run.events
    assert 1 <= sizes.pop() <= 4
    assert len(run.events) <= 3, run.events


def test_max_bound_and_min_bound_hold():
    run = closed_loop(colocated(max=3), lambda t, r: 9.0, 600)
    assert run.peak("colocated") == 3
    assert any("[bounds]" in r or "colocated up" in r for r in run.reasons)
    run = closed_loop(colocated(min=2, target=2), lambda t, r: 0.1, 2000)
    assert {ts["colocated"] for _, ts in run.targets} == {2}


def test_downscale_waits_stabilization_and_cooldown():
    cfg = config(downscale_stabilization_s=60, downscale_cooldown_s=200)
    run = closed_loop(colocated(), step(0.3, 3.0, 0, 300), 1500, cfg)
    downs = [t for t, d in run.changes("colocated") if d == DOWN]
    ups = [t for t, d in run.changes("colocated") if d == UP]
    assert downs and ups
    assert downs[0] >= 300 + 60  # load dropped at 300: a whole stabilization window first
    for a, b in zip(downs, downs[1:], strict=False):
        assert b - a >= 200  # cooldown between scale-downs
    assert downs[0] - ups[-1] >= 200  # and after the last scale-up
    assert any("[stabilizing]" in r for r in run.reasons) and any("[cooldown]" in r for r in run.reasons)


def test_n_minus_1_check_holds_two_replicas_whose_load_one_cannot_carry():
    """1.3 replica-equivalents: demand at 75 % asks 2; removing one would run the other at 130 %."""
    run = closed_loop(
        colocated(target=2), lambda t, r: 0.7 if t < 100 else 1.3, 1500, config(target_utilization=0.9)
    )
    assert {ts["colocated"] for t, ts in run.targets if t > 200} == {2}
    run = closed_loop(colocated(target=2), lambda t, r: 0.6, 1500, config(target_utilization=0.9))
    assert run.final("colocated") == 1


def test_kv_pressure_scales_decode_even_when_throughput_fits():
    """Long contexts fill the KV cache before the token rate needs another replica."""
    run = closed_loop(pd(), lambda t, r: 0.5, 300, kv_per_load=1.9)
    assert run.peak("decode") >= 2
    assert any("decode up [kv]" in r for r in run.reasons)
    assert run.peak("prefill") == 1


def test_prefill_and_decode_sized_from_their_own_demand():
    """Prompt-heavy load grows prefill; output-heavy grows decode; each pool from its own signal."""
    prompt_heavy = closed_loop(pd(), lambda t, r: 3.0 if r == "prefill" else 0.3, 600)
    assert prompt_heavy.final("prefill") == 4 and prompt_heavy.final("decode") == 1
    output_heavy = closed_loop(pd(), lambda t, r: 3.0 if r == "decode" else 0.3, 600)
    assert output_heavy.final("decode") == 4 and output_heavy.final("prefill") == 1


def test_ratio_held_while_both_ramp():
    cfg = config(min_prefill_decode_ratio=0.5, max_prefill_decode_ratio=2.0)
    run = closed_loop(
        pd(),
        ramp(0.2, 7.0, 0, 600),
        900,
        cfg,
    )
    run2 = closed_loop(pd(), lambda t, r: (6.0 if r == "decode" else 0.2) * min(1.0, t / 600), 900, cfg)
    for r in (run, run2):
        for _, ts in r.targets:
            assert 0.5 <= ts["prefill"] / ts["decode"] <= 2.0, r.events
    assert any("prefill up [ratio]" in x for x in run2.reasons)


def test_drain_to_zero_and_back():
    """A pool with min 0 goes to zero after idle_to_zero_s with nothing arriving; a request brings it back."""
    cfg = config(idle_to_zero_s=120)
    arrivals = lambda t: 0.0 if 200 <= t < 800 else 1.0  # noqa: E731
    run = closed_loop(
        colocated(min=0), lambda t, r: 0.0 if 200 <= t < 800 else 0.3, 1000, cfg, arrivals=arrivals
    )
    zero = [t for t, ts in run.targets if ts["colocated"] == 0]
    assert zero and min(zero) >= 200 + 120
    assert run.final("colocated") == 1
    back = [t for t, p, d, a, b in run.events if a == 0 and b == 1]
    assert back == [800.0]
    assert any("[from_zero]" in r for r in run.reasons) and any("[idle]" in r for r in run.reasons)


def test_cold_start_allowance_does_not_pile_on_replicas():
    """TTFT stays high while a replica starts: no further latency step within cold_start_s."""
    cfg = config(cold_start_s=60, capacity={})  # no capacity: latency and load signals only
    run = closed_loop(colocated(), lambda t, r: 1.6 if t >= 50 else 0.2, 300, cfg, startup_s=60)
    ups = [e for e in run.events if e[2] == UP]
    assert ups[0][0] == 50
    assert all(b[0] - a[0] >= 60 for a, b in zip(ups, ups[1:], strict=False)), ups
    assert any("[cold_start]" in r for r in run.reasons)


def test_stale_and_warming_samples_are_ignored():
    cfg = config(warmup_s=20, stale_after_s=10)
    hot = dict(
        running=60, input_tokens_per_s=5000, output_tokens_per_s=900, kv_usage=0.95, ttft_s=9.0, tpot_s=1.0
    )
    for sample in (
        ReplicaSample("r0", age_s=30, uptime_s=100, **hot),
        ReplicaSample("r0", age_s=1, uptime_s=5, **hot),
    ):
        sig = ModelSignals(
            "m", 10.0, {"colocated": PoolSignals("colocated", "colocated", 1, 1, 1, 4, 64, (sample,))}
        )
        assert decide(sig, ModelState(), cfg).targets == {"colocated": 1}
    ok = ReplicaSample("r0", age_s=1, uptime_s=100, **hot)
    sig = ModelSignals("m", 10.0, {"colocated": PoolSignals("colocated", "colocated", 1, 1, 1, 4, 64, (ok,))})
    assert decide(sig, ModelState(), cfg).targets == {"colocated": 2}


def test_missing_signals_hold_with_a_reason():
    sig = ModelSignals(
        "m",
        0.0,
        {"decode": PoolSignals("decode", "decode", 2, 2, 1, 4, 64)},
        missing={"decode": "no metrics yet"},
    )
    d = decide(sig, ModelState(), config())
    assert d.targets == {"decode": 2} and [r.code for r in d.reasons] == ["no_signals"]


def test_ingress_queue_and_rejections_scale_the_serving_pool():
    cfg = config()
    quiet = ReplicaSample("r0", 1, 100, running=10, output_tokens_per_s=50, kv_usage=0.2, tpot_s=0.02)
    pools = {
        "prefill": PoolSignals(
            "prefill",
            "prefill",
            1,
            1,
            1,
            4,
            64,
            (ReplicaSample("p0", 1, 100, input_tokens_per_s=100, ttft_s=0.2),),
        ),
        "decode": PoolSignals("decode", "decode", 1, 1, 1, 4, 64, (quiet,)),
    }
    for ing in (
        IngressSample(1, queued=12, queue_wait_s=0.8, arrivals_per_s=5),
        IngressSample(1, rejected_per_s=2, arrivals_per_s=5),
    ):
        d = decide(ModelSignals("m", 0.0, pools, ing), ModelState(), cfg)
        assert d.targets == {"prefill": 1, "decode": 2}, d.reasons
        assert d.reasons_for("decode")[0].code in ("queue", "rejections")


def test_forecast_scales_ahead_of_a_ramp():
    """With forecasting, a steady ramp is met earlier than without."""

    def first_up_to(n: int, forecast: bool) -> float:
        cfg = config(forecast=forecast, cold_start_s=120)
        trace = ramp(0.3, 6.0, 0, 1200)
        run = closed_loop(
            colocated(), trace, 1200, cfg, startup_s=120, arrivals=lambda t: 0.3 + 5.7 * t / 1200
        )
        return min(t for t, ts in run.targets if ts["colocated"] >= n)

    assert first_up_to(4, True) < first_up_to(4, False)


def test_every_decision_is_explained():
    run = closed_loop(pd(), step(0.3, 3.0, 100, 500), 1500)
    ups_downs = [r for r in run.reasons if " up [" in r or " down [" in r]
    assert len(ups_downs) >= len(run.events)
    assert all(r.split("] ", 1)[1] for r in ups_downs)


def test_spec_validates_and_resolves_the_ttft_objective():
    spec = parse_spec(
        {
            "models": [
                {
                    "name": "m",
                    "source": "local:tiny-intent",
                    "pools": [{"role": "colocated", "replicas": {"min": 1, "max": 4}}],
                    "autoscaling": {"capacity": {"colocated": {"output_tokens_per_s": 300}}},
                }
            ],
            "tiers": [
                {"name": "a", "model": "m", "ttft_slo_s": 0.7},
                {"name": "b", "model": "m", "ttft_slo_s": 3},
            ],
        }
    )
    cfg = spec.autoscaling_policy_config("m")
    assert cfg.ttft_slo_s == 0.7 and cfg.capacity == {"colocated": PoolCapacity(None, 300.0)}
    assert [p.pool_name for p in spec.autoscaled(spec.model("m"))] == ["colocated"]
    with pytest.raises(SpecError, match="autoscaling.capacity: unknown pools"):
        parse_spec(
            {
                "models": [
                    {
                        "name": "m",
                        "source": "x",
                        "pools": [{"role": "colocated"}],
                        "autoscaling": {"capacity": {"decode": {"output_tokens_per_s": 1}}},
                    }
                ]
            }
        )
    with pytest.raises(SpecError, match="kv_target"):
        parse_spec(
            {
                "models": [
                    {
                        "name": "m",
                        "source": "x",
                        "pools": [{"role": "colocated"}],
                        "autoscaling": {"kv_target": 0.99},
                    }
                ]
            }
        )


def test_no_scale_down_while_a_replica_asked_for_is_still_starting():
    """A start-up longer than the cooldown: the load dips while the new replica loads; it is kept."""
    cfg = config(downscale_stabilization_s=10, downscale_cooldown_s=20, cold_start_s=120)
    run = closed_loop(colocated(), lambda t, r: 1.2 if t < 40 else 0.5, 200, cfg, startup_s=90)
    ups = [t for t, d in run.changes("colocated") if d == UP]
    downs = [t for t, d in run.changes("colocated") if d == DOWN]
    assert ups == [0.0]
    # Once the replica is up (seen starting until 85 s), plus the cooldown.
    assert downs and downs[0] >= 90 + 20 - TICK_S
    held = [r for r in run.reasons if 60 <= float(r.split()[0]) < 90]
    assert held and all("[cooldown]" in r or "[starting]" in r or "[stabilizing]" in r for r in held), held
    # With no cooldown at all, the starting replica alone holds the pool.
    run = closed_loop(
        colocated(),
        lambda t, r: 1.2 if t < 40 else 0.5,
        200,
        config(downscale_stabilization_s=10, downscale_cooldown_s=0, cold_start_s=120),
        startup_s=90,
    )
    assert [t for t, d in run.changes("colocated") if d == DOWN][0] >= 90
    assert any("[starting]" in r for r in run.reasons)


def test_a_load_that_missed_the_latency_objective_is_not_returned_to():
    """Capacity says 2 replicas carry 1.0 replica-equivalents; TTFT says otherwise: the third replica
    added for it is kept while the load stays, for slo_memory_s."""
    cfg = config(downscale_stabilization_s=0, downscale_cooldown_s=0, slo_memory_s=600)

    def signals(t: float, n: int, ttft: float) -> ModelSignals:
        per = 1.0 / n
        s = tuple(
            ReplicaSample(
                f"r{i}",
                1,
                100,
                input_tokens_per_s=per * CAP_IN / 2,
                output_tokens_per_s=per * CAP_OUT / 2,
                ttft_s=ttft,
            )
            for i in range(n)
        )
        return ModelSignals("m", t, {"colocated": PoolSignals("colocated", "colocated", n, n, 1, 8, 64, s)})

    d = decide(signals(0, 2, 5.0), ModelState(), cfg)
    assert d.targets == {"colocated": 3} and d.reasons[0].code == "ttft"
    d = decide(signals(10, 3, 0.2), d.state, cfg)
    assert d.targets == {"colocated": 3}
    assert "latency objective was missed at 50%" in d.reasons[0].detail
    d = decide(signals(700, 3, 0.2), d.state, cfg)  # forgotten after slo_memory_s
    assert d.targets == {"colocated": 2}
