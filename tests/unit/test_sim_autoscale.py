"""Autoscaling in the simulator (loadtests.sim.autoscale) and the baseline policies (autoscaler.baselines):
replicas serve only after their start-up, a scale-down drains without failing anything, a pool at zero
holds its first call, GPU-hours are exact, and a fixed policy changes nothing."""

from __future__ import annotations

import pytest

from autoscaler.baselines import PlannerState, RayDefault, RayState, ThroughputPlanner, fixed
from autoscaler.policy import ModelState, decide
from autoscaler.signals import IngressSample, ModelSignals, PoolSignals, ReplicaSample
from loadtests.plan import Arrival
from loadtests.sim.autoscale import Autoscaler, ScaleEvent, reversals
from loadtests.sim.calls import Jobs, Template
from loadtests.sim.cluster import SimOptions, Simulation
from serving.config import AutoscalingSpec
from tests.unit.sim_helpers import autoscaled_spec, fleet, profile, run, scripted, spec, workload


def intent(prompt: int = 100, out: int = 5, **kw):
    return {"type": "intent", "model": "m", "prompt_tokens": prompt, "max_tokens": out, **kw}


def colocated(lo: int, hi: int, initial: int | None = None, max_ongoing: int = 64) -> list[dict]:
    reps = {"min": lo, "max": hi, **({"initial": initial} if initial is not None else {})}
    return [{"role": "colocated", "replicas": reps, "max_ongoing_requests": max_ongoing}]


def sim_for(sp, prof, replicas: int, policy, interval_s: float = 5.0, **opts) -> Simulation:
    auto = Autoscaler(policy, interval_s=interval_s, initial_state=ModelState)
    return Simulation(sp, fleet(prof, replicas=replicas), SimOptions(unit_tokens=16, autoscaler=auto, **opts))


def pool_doc(doc: dict) -> dict:
    return doc["sim"]["pools"]["m/colocated"]


# -- the replica lifecycle ------------------------------------------------------------------------


def test_a_scale_up_becomes_routable_only_after_the_profiles_startup_s():
    prof = profile(startup_s=30.0)
    sp = autoscaled_spec(colocated(1, 2), model={"router": {"stats_period_s": 0.5}})
    sim = sim_for(sp, prof, 1, scripted({5.0: {"colocated": 2}}))
    seen: list[tuple[float, list[str]]] = []
    sim.probe = lambda now, s: seen.append((now, [v.replica_id for v in s.models["m"].serving.views]))
    doc = run(sp, {}, workload(intent(), kind="constant", rate=2.0, duration_s=60), sim=sim)
    new = "m/colocated-1"
    assert all(new not in ids for t, ids in seen if t < 35.0)
    assert all(new in ids for t, ids in seen if t > 35.0)
    auto = pool_doc(doc)["autoscaling"]
    assert auto["timeline"][:3] == [[0.0, 1, 1], [5.0, 2, 1], [35.0, 2, 2]]
    assert auto["scale_events"] == {"up": 1, "down": 0}
    assert sim.models["m"].serving.engines[new].busy_s > 0  # it did serve once ready
    assert doc["ok"] == doc["requests"] == 120


def test_a_scale_down_drains_with_no_failure_and_the_replica_gets_no_new_call():
    prof = profile(startup_s=10.0, max_num_seqs=4)
    sp = autoscaled_spec(colocated(1, 2, initial=2), model={"router": {"stats_period_s": 0.1}})
    sim = sim_for(sp, prof, 2, scripted({20.0: {"colocated": 1}}))
    sent: list[tuple[float, str]] = []
    at_drain: dict[str, int] = {}

    def probe(now, s):
        pool = s.models["m"].serving
        if not sent and not hasattr(pool.policy, "_logged"):
            on_sent = pool.policy.on_sent

            def log(req, rid):
                sent.append((s.loop.time(), rid))
                on_sent(req, rid)

            pool.policy.on_sent, pool.policy._logged = log, True
        if 20.0 <= now < 20.1:
            at_drain.update(pool.inflight)

    sim.probe = probe
    # Long answers (200 tokens of >= 10 ms steps): the drained replica holds calls when the drain starts.
    doc = run(sp, {}, workload(intent(100, 200), rate=3.0, duration_s=60), sim=sim)
    scaler = sim.scalers["m"].scalers["colocated"]
    (drained,) = [life for life in scaler.lives.values() if life.drain_s is not None]
    assert drained.drain_s == 20.0 and drained.gone_s > 20.5  # it finished what it held first
    assert at_drain[drained.rid] > 0
    assert not [t for t, rid in sent if rid == drained.rid and t >= 20.0]  # no call routed to it after
    assert [t for t, rid in sent if rid == drained.rid and t < 20.0]  # (it did get calls before)
    assert doc["ok"] == doc["requests"] and doc["rejected"] == doc["failed"] == 0
    pool = sim.models["m"].serving
    assert drained.rid not in pool.engines and drained.rid not in pool.inflight
    assert pool.policy.index.blocks(drained.rid) == 0  # its blocks left the router's index
    assert any(e.id == drained.rid for e in pool.retired)
    assert pool_doc(doc)["autoscaling"]["scale_events"] == {"up": 0, "down": 1}


def test_a_pool_at_zero_holds_its_first_call_until_a_replica_is_ready_and_serves_it():
    prof = profile(startup_s=12.0)
    sp = autoscaled_spec(colocated(0, 1, initial=0))
    calls = []

    def wrapped(signals, state, cfg):  # the real policy, logging what it saw
        calls.append(signals)
        return decide(signals, state, cfg)

    sim = sim_for(sp, prof, 0, wrapped)
    wf = workload(intent(100, 5), kind="constant", rate=1.0, duration_s=10)
    doc = sim.run(Jobs(wf, 16, Template(), {}), arrivals=[Arrival(0, 1.0, 0, 0)])
    # t=5: the ingress shows one call queued (at no replica) -> from zero to one; ready at 17.
    first = next(s for s in calls if s.pools["colocated"].current == 0 and s.ingress and s.ingress.queued)
    assert first.now == 5.0 and first.ingress.queued == 1.0 and first.pools["colocated"].running == 0
    assert doc["ok"] == 1
    r = sim.recorder.records[0]
    assert r["ttft"] == pytest.approx(17.0 - 1.0 + 0.01 + 100 * 1e-5, rel=1e-9)
    assert pool_doc(doc)["autoscaling"]["timeline"][:3] == [[0.0, 0, 0], [5.0, 1, 0], [17.0, 1, 1]]
    # A start-up longer than the admission queue timeout (30 s): the held call is rejected, not lost.
    sim = sim_for(sp, profile(startup_s=60.0), 0, decide)
    doc = sim.run(Jobs(wf, 16, Template(), {}), arrivals=[Arrival(0, 1.0, 0, 0)])
    assert doc["rejected"] == 1 and doc["rejected_by_reason"] == {"queue_timeout": 1}


def test_gpu_hours_are_replica_seconds_times_gpus_from_the_request_to_the_removal():
    prof = profile(startup_s=10.0, tp=2)  # 2 GPUs a replica
    sp = autoscaled_spec(colocated(1, 2))
    sim = sim_for(sp, prof, 1, scripted({8.0: {"colocated": 2}, 52.0: {"colocated": 1}}), interval_s=4.0)
    # Calls every 3.33 s of ~60 ms: both replicas are idle at t=52, so the drain ends at once.
    doc = run(sp, {}, workload(intent(), kind="constant", rate=0.3, duration_s=90), sim=sim)
    end = doc["sim"]["simulated_s"]
    auto = pool_doc(doc)["autoscaling"]
    assert auto["timeline"] == [[0.0, 1, 1], [8.0, 2, 1], [18.0, 2, 2], [52.0, 1, 1]]
    assert auto["replica_seconds"] == pytest.approx(end + (52.0 - 8.0), rel=1e-12)
    assert pool_doc(doc)["gpu_hours"] == pytest.approx(2 * (end + 44.0) / 3600, rel=1e-12)
    assert doc["sim"]["gpu_hours"] == pytest.approx(pool_doc(doc)["gpu_hours"], rel=1e-12)
    # a fixed pool: replicas x GPUs x the run
    fixed_doc = run(spec(replicas=3), fleet(prof, replicas=3), workload(intent(), kind="constant", rate=0.3,
                                                                        duration_s=90))  # fmt: skip
    assert pool_doc(fixed_doc)["gpu_hours"] == pytest.approx(3 * 2 * fixed_doc["sim"]["simulated_s"] / 3600)


@pytest.mark.parametrize("pd", [False, True])
def test_a_fixed_policy_gives_the_same_run_as_no_autoscaler(pd):
    prof = profile(max_num_seqs=8)
    reps = {"min": 2, "max": 4, "initial": 2}
    pools = [{"role": "prefill", "replicas": reps}, {"role": "decode", "replicas": reps}] if pd else [
        {"role": "colocated", "replicas": reps}]  # fmt: skip
    sp = autoscaled_spec(pools, model={"disaggregation": {"mode": "on"}} if pd else {})
    agent = {"type": "agent", "model": "m", "system_prompts": 2, "system_tokens": 512, "turns": 3,
             "user_tokens": 64, "max_tokens": 32}  # fmt: skip
    wf = workload(agent, intent(300, 20, weight=2), rate=3.0, duration_s=120)
    plain = run(sp, fleet(prof, pd=pd, replicas=2), wf)
    sim = (
        sim_for(sp, prof, 2, fixed)
        if not pd
        else Simulation(
            sp, fleet(prof, pd=True, replicas=2), SimOptions(unit_tokens=16, autoscaler=Autoscaler(fixed))
        )
    )
    held = run(sp, {}, wf, sim=sim)
    for key in ("requests", "ok", "rejected", "latency", "cached_fraction", "by_type", "timeseries"):
        assert held[key] == plain[key], key
    for name, p in plain["sim"]["pools"].items():
        q = held["sim"]["pools"][name]
        for key in ("utilisation", "prefill_tokens", "decode_tokens", "cached_hit_tokens", "gpu_hours"):
            assert q[key] == pytest.approx(p[key], rel=1e-12), (name, key)
        assert q["autoscaling"]["scale_events"] == {"up": 0, "down": 0}


def test_the_tandem_policy_scales_a_pool_up_under_load_and_back_down_after_it():
    prof = profile(max_num_seqs=16, startup_s=20.0)
    caps = {"colocated": {"input_tokens_per_s": 5000, "output_tokens_per_s": 300}}
    sp = autoscaled_spec(colocated(1, 4), {"capacity": caps, "downscale_stabilization_s": 30,
                                           "downscale_cooldown_s": 40, "cold_start_s": 20})  # fmt: skip
    sim = sim_for(sp, prof, 1, decide)
    busy = [Arrival(i, i / 12.0, 0, i) for i in range(12 * 120)]  # 12/s for 2 min, then a trickle
    quiet = [Arrival(len(busy) + i, 120.0 + i * 2.0, 0, len(busy) + i) for i in range(120)]
    doc = sim.run(Jobs(workload(intent(200, 40)), 16, Template(), {}), arrivals=busy + quiet, duration_s=360)
    auto = pool_doc(doc)["autoscaling"]
    assert auto["peak_target"] >= 3
    assert auto["timeline"][-1][1:] == [1, 1]
    assert auto["scale_events"]["down"] >= 2
    assert doc["ok"] == doc["requests"] and doc["failed"] == doc["rejected"] == 0


def test_reversals_count_opposite_moves_within_the_cooldown():
    ev = [ScaleEvent(0, "up", 1, 2), ScaleEvent(60, "down", 2, 1), ScaleEvent(100, "up", 1, 2),
          ScaleEvent(400, "down", 2, 1), ScaleEvent(500, "down", 1, 0)]  # fmt: skip
    assert reversals(ev, 120.0) == 2  # 60 (down 60 s after an up), 100 (up 40 s after a down)


# -- the baselines --------------------------------------------------------------------------------

CFG = AutoscalingSpec(warmup_s=0.0).policy_config(1.0)


def signals(now: float, current: int, running: int, load: float = 0.0, queued: float = 0.0, role="colocated",
            max_ongoing: int = 16, lo: int = 1, hi: int = 8) -> ModelSignals:  # fmt: skip
    samples = tuple(
        ReplicaSample(f"r{i}", 1.0, 100.0, running=load / max(running, 1)) for i in range(running)
    )
    pool = PoolSignals(role, role, current, running, lo, hi, max_ongoing, samples)
    return ModelSignals("m", now, {role: pool}, IngressSample(1.0, queued=queued))


def test_ray_default_scales_up_only_after_30_s_and_down_only_after_600_s_of_the_same_wish():
    ray = RayDefault()
    state, current, changes = RayState(), 1, []
    for t in range(0, 800, 5):
        # 30 requests in flight until t=100 (a target of 16 // 2 = 8 per replica: 4 replicas), then none
        d = ray(signals(float(t), current, current, load=30.0 if t < 100 else 0.0), state, CFG)
        state = d.state
        if d.targets["colocated"] != current:
            current = d.targets["colocated"]
            changes.append((t, current))
    # up once the wish held 30 s; down 600 s after the first call whose 30 s look-back mean asked for
    # fewer (t=105: (4 x 30 + 0 + 0) / 6 = 20 requests -> 3; at t=100 the mean of 25 still rounds to 4)
    assert changes == [(30, 4), (705, 1)]
    # a pool at zero with a call waiting starts one at once (the cold-start path, no delay)
    d = ray(signals(900.0, 0, 0, queued=1.0), RayState(), CFG)
    assert d.targets["colocated"] == 1


def test_ray_default_sizes_by_requests_in_flight_over_half_of_max_ongoing():
    ray = RayDefault(upscale_delay_s=0.0)
    d = ray(signals(0.0, 2, 2, load=100.0, queued=28.0, max_ongoing=64), RayState(), CFG)
    assert d.targets["colocated"] == 4  # (100 + 28) / 32


def test_throughput_planner_adjusts_every_interval_only_and_sizes_by_capacity():
    cfg = AutoscalingSpec(capacity={"prefill": {"input_tokens_per_s": 1000.0},
                                    "decode": {"output_tokens_per_s": 100.0}}).policy_config(1.0)  # fmt: skip

    def sig(now, cur_p, cur_d, inp, out):
        p = PoolSignals("prefill", "prefill", cur_p, cur_p, 1, 10, 64, ())
        d = PoolSignals("decode", "decode", cur_d, cur_d, 1, 10, 64, ())
        ing = IngressSample(1.0, arrivals_per_s=1.0, input_tokens_per_s=inp, output_tokens_per_s=out)
        return ModelSignals("m", now, {"prefill": p, "decode": d}, ing)

    planner, state = ThroughputPlanner(), PlannerState()
    for t in range(0, 180, 5):
        d = planner(sig(float(t), 1, 1, 4500.0, 250.0), state, cfg)
        state = d.state
        assert d.targets == {"prefill": 1, "decode": 1}, t
    d = planner(sig(180.0, 1, 1, 4500.0, 250.0), state, cfg)
    assert d.targets == {"prefill": 5, "decode": 3}  # ceil(4500 / 1000), ceil(250 / 100)
    state = d.state
    d = planner(sig(185.0, 5, 3, 100.0, 10.0), state, cfg)
    assert d.targets == {"prefill": 5, "decode": 3}  # holds until the next interval
    # N/(N-1): the interval's mean asks for 2 prefill replicas, but what arrives now needs 4
    planner, state = ThroughputPlanner(adjustment_interval_s=10.0), PlannerState()
    for t in (0.0, 5.0):
        state = planner(sig(t, 6, 3, 1500.0, 250.0), state, cfg).state
    d = planner(sig(10.0, 6, 3, 3800.0, 250.0), state, cfg)
    assert d.targets["prefill"] == 4  # the mean (1500 + 1500 + 3800) / 3 = 2267 -> 3, kept at 4
    # a measured TTFT under the expected one scales prefill down (Dynamo's min(1, correction))
    planner = ThroughputPlanner(adjustment_interval_s=5.0, expected_ttft_s=lambda isl: 2.0)
    p = PoolSignals("prefill", "prefill", 1, 1, 1, 10, 64, (ReplicaSample("p0", 1.0, 100.0, ttft_s=1.0),))
    dd = PoolSignals("decode", "decode", 1, 1, 1, 10, 64, ())
    ing = IngressSample(1.0, arrivals_per_s=1.0, input_tokens_per_s=4000.0, output_tokens_per_s=50.0)
    state = planner(ModelSignals("m", 0.0, {"prefill": p, "decode": dd}, ing), PlannerState(), cfg).state
    d = planner(ModelSignals("m", 5.0, {"prefill": p, "decode": dd}, ing), state, cfg)
    assert d.targets["prefill"] == 2  # 4000 x 0.5 / 1000


def test_fixed_keeps_every_pool_whatever_the_load():
    d = fixed(signals(0.0, 3, 2, load=500.0, queued=50.0), ModelState(), CFG)
    assert d.targets == {"colocated": 3}
