"""The cluster simulator: known answers (queueing formulas, exact single-request timings, P/D
transfer), the real router/admission code in the loop, determinism and bounded memory."""

from __future__ import annotations

import random
import statistics
import tracemalloc

import pytest

from loadtests.plan import Arrival
from loadtests.sim.calls import Jobs, KeyChain, Template, none_hash, units_of
from loadtests.sim.cluster import SimOptions, Simulation
from loadtests.sim.stats import Histogram
from router.hashing import BlockHasher
from tests.unit.sim_helpers import fleet, profile, run, spec, workload


def intent(prompt: int = 100, out: int = 5, **kw):
    return {"type": "intent", "model": "m", "prompt_tokens": prompt, "max_tokens": out, **kw}


# -- known answers ------------------------------------------------------------------------------


def test_single_request_timings_are_the_profiles_step_costs_exactly():
    """Batching off, arrivals far apart: TTFT is one prefill step, each later token one decode step."""
    p = profile(max_num_seqs=1, step={"per_context_token_s": 1e-6})
    doc = run(spec(), fleet(p), workload(intent(100, 5), kind="constant", rate=0.5, duration_s=20))
    prefill = 0.01 + 100 * 1e-5
    # decode steps read the context: prompt + tokens so far (101, 102, 103, 104)
    decode = [0.01 + 1e-3 + c * 1e-6 for c in (101, 102, 103, 104)]
    lat = doc["latency"]
    assert doc["requests"] == 10 and doc["ok"] == 10
    assert lat["ttft"]["p50"] == pytest.approx(prefill, rel=1e-9)
    assert lat["ttft"]["p99"] == pytest.approx(prefill, rel=1e-9)
    assert lat["e2e"]["mean"] == pytest.approx(prefill + sum(decode), rel=1e-9)
    assert lat["tpot"]["mean"] == pytest.approx(sum(decode) / 4, rel=1e-9)


def test_md1_queue_mean_wait_matches_the_formula():
    """One server, no batching, deterministic service D, Poisson arrivals: Wq = rho D / (2 (1 - rho))."""
    p = profile(max_num_seqs=1)
    service = (0.01 + 100 * 1e-5) + 4 * (0.01 + 1e-3)  # prefill step + 4 decode steps = 0.055 s
    rho = 0.6
    doc_sim = Simulation(spec(), fleet(p), SimOptions(unit_tokens=16, keep_records=True))
    run(spec(), fleet(p), workload(intent(100, 5), rate=rho / service, duration_s=3000), sim=doc_sim)
    waits = [r["ttft"] - (0.01 + 100 * 1e-5) for r in doc_sim.recorder.records]
    expected = rho * service / (2 * (1 - rho))
    assert len(waits) > 30_000
    assert statistics.fmean(waits) == pytest.approx(expected, rel=0.05)


def test_littles_law_holds_on_a_steady_batched_run():
    """Time-averaged requests in the engine = completion rate x mean time in it."""
    sp = spec(model={"router": {"stats_period_s": 0.05}})
    sim = Simulation(sp, fleet(profile(max_num_seqs=8)), SimOptions(unit_tokens=16, keep_records=True))
    samples: list[int] = []
    sim.probe = lambda now, s: samples.append(
        sum(e.running + e.queued for e in s.models["m"].serving.engines.values())
    )
    doc = run(sp, {}, workload(intent(200, 40), rate=6.0, duration_s=600), sim=sim)
    recs = sim.recorder.records
    span = max(r["sent"] + r["e2e"] for r in recs)
    little = len(recs) / span * statistics.fmean(r["e2e"] for r in recs)
    assert doc["ok"] == len(recs) > 3000
    assert statistics.fmean(samples) == pytest.approx(little, rel=0.05)
    assert 1.0 < little < 8.0  # it did batch and queue


def test_pd_pair_differs_from_colocated_by_the_transfer_and_the_decode_step_that_takes_it():
    """Same profile, no load: a P/D request's first token waits for the KV transfer and for the decode
    engine's first step (vLLM recomputes the last prompt token there); every later token is the same."""
    p = profile(link_gbps=1.0, link_latency_s=0.002)
    wf = workload(intent(1000, 8), kind="constant", rate=0.2, duration_s=50)
    colo = run(spec(), fleet(p), wf)
    pd_spec = spec(pd=True, model={"disaggregation": {"mode": "on"}})
    pd = run(pd_spec, fleet(p, pd=True), wf)
    transfer = 0.002 + 1000 * 1000 * 8 / 1e9
    first_decode = 0.01 + 1e-3  # one sequence, per_context_token_s 0
    assert pd["sim"]["pools"]["m/decode"]["disagg"] == 10
    assert pd["sim"]["pools"]["m/prefill"]["kv_moved_bytes"] == 10 * 1000 * 1000
    assert pd["latency"]["ttft"]["mean"] - colo["latency"]["ttft"]["mean"] == pytest.approx(
        transfer + first_decode, rel=1e-6
    )
    assert pd["latency"]["tpot"]["mean"] == pytest.approx(colo["latency"]["tpot"]["mean"], rel=1e-9)
    faster = run(pd_spec, fleet(profile(link_gbps=10.0, link_latency_s=0.002), pd=True), wf)
    saved = pd["latency"]["ttft"]["mean"] - faster["latency"]["ttft"]["mean"]
    assert saved == pytest.approx(1000 * 1000 * 8 / 1e9 - 1000 * 1000 * 8 / 1e10, rel=1e-6)


# -- the real code in the loop ------------------------------------------------------------------


def agent(**kw):
    return {"type": "agent", "model": "m", "system_prompts": 2, "system_tokens": 512, "turns": 4,
            "user_tokens": 64, "max_tokens": 32, **kw}  # fmt: skip


def test_the_cache_aware_router_keeps_sessions_on_their_prefix_and_round_robin_does_not():
    wf = workload(agent(system_tokens=64, user_tokens=256), rate=2.0, duration_s=120)
    fl = fleet(profile(), replicas=4)
    aware = run(spec(replicas=4), fl, wf)
    rr = run(spec(replicas=4, model={"router": {"policy": "round_robin"}}), fl, wf)
    assert aware["cached_fraction"] > 0.6, aware["cached_fraction"]
    assert rr["cached_fraction"] < aware["cached_fraction"] - 0.2
    # the spec's router settings reach the policy: no prefix or session pull loses the hits too
    off = run(spec(replicas=4, model={"router": {"weights": {"prefix": 0, "session": 0}}}), fl, wf)
    assert off["cached_fraction"] < aware["cached_fraction"] - 0.2


def test_kv_events_keep_the_router_index_in_step_with_the_engines_cache():
    """Tiny caches: engines evict; with KV events the index forgets evicted blocks."""
    p = profile(kv_blocks=400)  # 400 x 16 tokens
    wf = workload(agent(), rate=1.0, duration_s=60)
    sim = Simulation(spec(replicas=2), fleet(p, replicas=2), SimOptions(unit_tokens=16))
    run(spec(replicas=2), {}, wf, sim=sim)
    pool = sim.models["m"].serving
    for rid, e in pool.engines.items():
        assert pool.policy.index.blocks(rid) <= e.capacity
        cached = set(e._free_cached) | set(e._held)
        assert set(pool.policy.index._lru[rid]) <= cached


def test_admission_rejects_in_the_simulation_with_the_real_reasons():
    limits = {"enabled": True, "default_tenant": {"tokens_per_s": 500, "burst_tokens": 2000}}
    doc = run(spec(admission=limits), fleet(profile()), workload(intent(100, 50), rate=20.0, duration_s=30))
    assert doc["rejected"] > 0
    assert set(doc["rejected_by_reason"]) == {"tenant_rate_limited"}
    # about the bucket's rate is admitted: 500 tokens/s / 150 tokens a request, plus the burst
    assert doc["ok"] == pytest.approx(500 * 30 / 150 + 2000 / 150, rel=0.15)


def test_a_full_pool_queue_rejects_rather_than_waits_past_the_slo():
    limits = {"enabled": True, "pool_limits": [{"model": "m", "max_concurrency": 2}], "max_queue": 4}
    sp = spec(admission=limits, tiers=[{"name": "t", "model": "m", "ttft_slo_s": 0.5}])
    doc = run(sp, fleet(profile(max_num_seqs=2)), workload(intent(2000, 100, model="auto", task="t"),
                                                           rate=30.0, duration_s=20))  # fmt: skip
    assert doc["rejected"] > 0
    assert set(doc["rejected_by_reason"]) <= {"queue_full", "predicted_wait", "queue_timeout"}


def test_fanout_tasks_are_held_to_the_tenants_width():
    sp = spec(admission={"enabled": True, "default_tenant": {"fanout_width": 2}})
    sim = Simulation(sp, fleet(profile()), SimOptions(unit_tokens=16))
    peak = []
    sim.probe = lambda now, s: peak.append(s.calls_in_flight)
    wf = workload({"type": "fanout", "model": "m", "width": 8, "prompt_tokens": 64, "max_tokens": 200},
                  kind="constant", rate=0.1, duration_s=30)  # fmt: skip
    doc = run(sp, {}, wf, sim=sim)
    assert doc["ok"] == 24 and max(peak) <= 2


# -- keys, determinism, memory ------------------------------------------------------------------


def test_keychain_matches_the_routers_block_hasher():
    units = [random.Random(1).randrange(1 << 40) for _ in range(12)]
    for salt in (None, "tenant-salt"):
        chain = KeyChain(none_hash(), salt)
        assert chain.keys(units[:5]) == BlockHasher(1, seed="vllm-none-hash").keys(units[:5], salt)
        assert chain.keys(units) == BlockHasher(1, seed="vllm-none-hash").keys(units, salt)
        other = units[:3] + [7, 8]
        assert chain.keys(other) == BlockHasher(1, seed="vllm-none-hash").keys(other, salt)


def test_units_share_only_whole_blocks_of_the_shared_prefix():
    assert units_of(1000, 40, 5000, 100, 16) == [1000, 1001, 5002, 5003, 5004, 5005]


def test_a_seed_gives_the_same_run_and_another_seed_another():
    wf = workload(agent(), intent(), rate=2.0, duration_s=60)
    a = run(spec(replicas=2), fleet(profile(), replicas=2), wf)
    b = run(spec(replicas=2), fleet(profile(), replicas=2), wf)
    assert a == b
    c = run(
        spec(replicas=2),
        fleet(profile(), replicas=2),
        workload(agent(), intent(), rate=2.0, duration_s=60, seed=5),
    )
    assert c["latency"] != a["latency"]


def test_streamed_summary_agrees_with_the_exact_one():
    wf = workload(agent(), intent(), rate=3.0, duration_s=120)
    exact = run(spec(replicas=2), fleet(profile(), replicas=2), wf, keep_records=True)
    streamed = run(spec(replicas=2), fleet(profile(), replicas=2), wf, keep_records=False)
    for k in ("requests", "ok", "rejected", "tokens", "slo_met"):
        assert streamed[k] == exact[k]
    for metric in ("ttft", "tpot", "e2e"):
        for p in ("p50", "p90", "p99"):
            assert streamed["latency"][metric][p] == pytest.approx(exact["latency"][metric][p], rel=0.01)
    assert streamed["timeseries"]["sent"] == exact["timeseries"]["sent"]


def test_memory_is_bounded_by_requests_in_flight_not_by_the_run_length():
    """Streaming summary, arrivals generated as they come: 4x the requests, about the same peak (caches
    and the router's index are bounded by their own sizes, reached in both runs)."""

    def arrivals(n: int, rate: float):
        rng, t = random.Random(0), 0.0
        for k in range(n):
            t += rng.expovariate(rate)
            yield Arrival(k, t, 0, k)

    def peak(n: int) -> int:
        wf = workload(intent(100, 5), rate=50.0, duration_s=n / 50)
        p = profile(max_num_seqs=256, kv_blocks=500)
        sp = spec(model={"router": {"block_budget": 500}})
        sim = Simulation(sp, fleet(p), SimOptions(unit_tokens=16, keep_records=False))
        tracemalloc.start()
        sim.run(Jobs(wf, 16, Template(), {}), arrivals=arrivals(n, 50.0))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(5_000), peak(20_000)
    assert large < 1.3 * small


def test_histogram_percentiles_are_within_half_a_percent():
    rng = random.Random(3)
    xs = [rng.lognormvariate(-3, 1) for _ in range(20_000)]
    h = Histogram()
    for x in xs:
        h.add(x)
    xs.sort()
    for p in (50, 90, 99):
        exact = xs[round((len(xs) - 1) * p / 100)]
        assert h.percentile(p) == pytest.approx(exact, rel=0.006)
