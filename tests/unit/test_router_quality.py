"""The router-quality benchmark: trace generator, cache model, oracle, simulation and report."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from benchmarks import router_quality as rq
from router.hashing import BlockHasher
from router.policy import Gate, Policy, RoutingRequest, Weights, make_policy

TINY = rq.TraceConfig(
    sessions=12,
    seed=3,
    system_prompts=2,
    system_tokens=(100, 200),
    tools=2,
    tool_tokens=(40, 80),
    turns=(3, 6),
    user_tokens=(10, 40),
    answer_tokens=(10, 30),
    session_rate=2.0,
    think_s=1.0,
    tenants=2,
)
W = Weights(prefix=2.0, load=1.0, kv=0.5, session=1.0)
G = Gate(ratio=1.5, slack=4.0)


def _policy(name: str, budget: int, seed: int = 0) -> Policy:
    return make_policy(
        name,
        index_budget=budget,
        weights=W,
        gate=G,
        stale_after_s=5.0,
        sessions=1000,
        rng=random.Random(seed),
    )


def test_trace_is_deterministic_under_a_seed() -> None:
    a, b = rq.generate_trace(TINY), rq.generate_trace(TINY)
    assert [(s.tenant, s.start_s, s.turns, s.keys) for s in a] == [
        (s.tenant, s.start_s, s.turns, s.keys) for s in b
    ]
    c = rq.generate_trace(replace(TINY, seed=4))
    assert [s.keys for s in c] != [s.keys for s in a]
    starts = [s.start_s for s in a]
    assert starts == sorted(starts) and starts[0] > 0


def test_contexts_grow_turn_by_turn_and_keys_are_the_hashers() -> None:
    hasher = BlockHasher(TINY.block_size)
    for s in rq.generate_trace(TINY, keep_tokens=True):
        assert s.tokens is not None
        assert TINY.turns[0] <= len(s.turns) <= TINY.turns[1]
        lengths = [t.prompt_tokens for t in s.turns]
        assert s.prefix_tokens < lengths[0]
        assert all(b - a >= TINY.user_tokens[0] for a, b in zip(lengths, lengths[1:], strict=False))
        # Turn t+1 = turn t's prompt + its answer + a new user message.
        for t, nxt in zip(s.turns, s.turns[1:], strict=False):
            grown = nxt.prompt_tokens - t.prompt_tokens
            assert t.output_tokens + TINY.user_tokens[0] <= grown <= t.output_tokens + TINY.user_tokens[1]
        assert lengths[-1] == len(s.tokens)
        assert s.keys == hasher.keys(s.tokens, cache_salt=s.tenant)
        # Each turn's keys are a prefix of the next turn's (the context only grows).
        first = hasher.keys(s.tokens[: lengths[0]], cache_salt=s.tenant)
        assert first == s.keys[: lengths[0] // TINY.block_size]
        assert s.turns[0].think_s == 0.0


def test_salting_keeps_tenants_apart() -> None:
    one_prompt = replace(TINY, system_prompts=1, tools=0, sessions=20)
    salted = rq.generate_trace(one_prompt)
    by_tenant: dict[str, set[int]] = {}
    for s in salted:
        by_tenant.setdefault(s.tenant, set()).add(s.keys[0])
    assert len(by_tenant) == 2
    assert all(len(first) == 1 for first in by_tenant.values())  # same tenant, same prompt: shared
    (a,), (b,) = by_tenant.values()
    assert a != b
    unsalted = rq.generate_trace(replace(one_prompt, salt=False))
    assert len({s.keys[0] for s in unsalted}) == 1


def test_lru_cache_counts_leading_blocks_only() -> None:
    c = rq.LRUCache(capacity=10)
    c.insert([1, 2, 3, 4])
    assert c.hits([1, 2, 3, 4]) == 4
    assert c.hits([1, 2, 3, 4, 5, 6]) == 4
    assert c.hits([1, 2, 9, 4]) == 2  # stops at the first miss though 4 is held
    assert c.hits([9, 1, 2]) == 0
    assert c.hits([]) == 0


def test_lru_cache_evicts_least_recent_and_a_sequences_tail_first() -> None:
    c = rq.LRUCache(capacity=4)
    c.insert([1, 2, 3, 4])
    c.insert([5])
    assert len(c) == 4
    assert 4 not in c and c.hits([1, 2, 3, 4]) == 3  # the tail went first, the head survives
    c.insert([1, 2])  # touch: 3 and 5 are now the oldest
    c.insert([6, 7])
    assert 3 not in c and 5 not in c
    assert c.hits([1, 2, 3]) == 2 and 6 in c and 7 in c


def test_oracle_gate_steers_off_a_hot_replica() -> None:
    cluster = rq.Cluster(rq.ClusterConfig(replicas=2, slots=100, capacity_blocks=100))
    hot, cold = cluster.replicas
    hot.cache.insert([1, 2, 3])
    hot.running = 10
    req = RoutingRequest("r", block_keys=[1, 2, 3, 4])
    views = cluster.views(0.0)
    gated = rq.OraclePolicy(cluster, Gate(ratio=1.0, slack=0.0)).route(req, views, 0.0)
    assert gated.chosen == cold.replica_id and gated.matched_blocks == 0
    free = rq.OraclePolicy(cluster, None).route(req, views, 0.0)
    assert free.chosen == hot.replica_id and free.matched_blocks == 3
    hot.running = 0  # within the gate again: the hits win
    assert rq.OraclePolicy(cluster, Gate(ratio=1.0, slack=0.0)).route(
        req, cluster.views(0.0), 0.0
    ).chosen == (hot.replica_id)


def test_unbounded_oracle_hits_at_least_as_much_as_every_policy() -> None:
    # No eviction, no queueing, no prefill time: arrival times do not depend on the policy, so the
    # oracle's greedy choice (the longest prefix anywhere) is the best possible for every request.
    trace = rq.generate_trace(replace(TINY, sessions=20))
    cfg = rq.ClusterConfig(replicas=4, slots=1000, capacity_blocks=100_000, prefill_s_per_token=0.0)
    best = rq.simulate(trace, None, cfg, TINY.block_size)
    stats = rq.trace_stats(trace, TINY.block_size)
    assert best["hit_rate"] == pytest.approx(stats["infinite_cache_hit_rate"], abs=0.02)
    for name in rq.ALL_POLICIES[2:]:
        got = rq.simulate(trace, _policy(name, 100_000), cfg, TINY.block_size)
        assert got["requests"] == best["requests"] == stats["requests"]
        assert got["hit_rate"] <= best["hit_rate"] + 1e-12, name
    rr = rq.simulate(trace, _policy("round_robin", 100_000), cfg, TINY.block_size)
    assert rr["hit_rate"] < best["hit_rate"] - 0.1


def test_cache_aware_beats_round_robin_under_cache_pressure() -> None:
    trace = rq.generate_trace(replace(TINY, sessions=40, session_rate=4.0))
    cfg = rq.ClusterConfig(replicas=4, slots=4, capacity_blocks=120, decode_s_per_token=0.01)
    ca = rq.simulate(trace, _policy("cache_aware", cfg.capacity_blocks), cfg, TINY.block_size)
    rr = rq.simulate(trace, _policy("round_robin", cfg.capacity_blocks), cfg, TINY.block_size)
    assert ca["hit_rate"] > rr["hit_rate"] + 0.15
    assert ca["ttft_p50_s"] < rr["ttft_p50_s"]


class _Spy(Policy):
    """Round robin that records what the simulation shows it."""

    def __init__(self) -> None:
        self.inner = make_policy(
            "round_robin", index_budget=1, weights=W, gate=G, stale_after_s=1, sessions=1, rng=random.Random()
        )
        self.ages: list[float] = []
        self.sent: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.requests: list[RoutingRequest] = []

    def route(self, req, replicas, now):  # type: ignore[no-untyped-def]
        self.ages.extend(now - r.updated_at for r in replicas)
        self.requests.append(req)
        return self.inner.route(req, replicas, now)

    def on_sent(self, req, replica):  # type: ignore[no-untyped-def]
        self.sent[replica] = self.sent.get(replica, 0) + 1

    def on_done(self, req, replica):  # type: ignore[no-untyped-def]
        self.done[replica] = self.done.get(replica, 0) + 1


def test_simulation_books_every_request_and_serves_stale_stats() -> None:
    trace = rq.generate_trace(TINY)
    cfg = rq.ClusterConfig(replicas=3, slots=2, capacity_blocks=200, stats_interval_s=0.5)
    spy = _Spy()
    res = rq.simulate(trace, spy, cfg, TINY.block_size)
    n = sum(len(s.turns) for s in trace)
    assert res["requests"] == n == len(spy.requests)
    assert spy.sent == spy.done and sum(spy.sent.values()) == n
    assert sum(r["requests"] for r in res["per_replica"].values()) == n
    assert max(spy.ages) <= 0.5 + 1e-9 and max(spy.ages) > 0.1  # stale, but never older than a period
    req = spy.requests[0]
    s0 = trace[0]
    assert req.session_id == s0.session_id and req.tenant == s0.tenant and req.role == "decode"
    assert req.block_keys == s0.keys[: s0.turns[0].prompt_tokens // TINY.block_size]
    # Round robin over 3 replicas: requests served differ by at most one.
    assert res["balance"]["requests"] <= (n // 3 + 1) / (n / 3) + 1e-9


def test_simulation_is_deterministic() -> None:
    trace = rq.generate_trace(TINY)
    cfg = rq.ClusterConfig(replicas=3, slots=2, capacity_blocks=150)
    a = rq.simulate(trace, _policy("cache_aware", 150, seed=1), cfg, TINY.block_size)
    b = rq.simulate(trace, _policy("cache_aware", 150, seed=1), cfg, TINY.block_size)
    assert a == b


def test_main_writes_the_report(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "nested" / "rq.json"
    argv = [
        "--sessions", "8", "--replicas", "3", "--system-tokens", "100-200", "--tool-tokens", "40-80",
        "--turns", "3-5", "--user-tokens", "10-40", "--answer-tokens", "10-30", "--capacity-blocks", "150",
        "--seed", "2", "--json", str(out),
    ]  # fmt: skip
    assert rq.main(argv) == 0
    printed = capsys.readouterr().out
    assert "goal (cache_aware)" in printed and "round_robin" in printed
    report = json.loads(out.read_text())
    assert set(report) >= {"benchmark", "config", "trace", "policies", "goals"}
    assert list(report["policies"]) == list(rq.ALL_POLICIES)
    assert report["config"]["fleet"]["replicas"] == 3 and report["config"]["trace"]["sessions"] == 8
    assert report["config"]["cache_aware"]["gate"] == {
        "ratio": rq.DEFAULT_GATE.ratio,
        "slack": rq.DEFAULT_GATE.slack,
    }
    for name, p in report["policies"].items():
        assert set(p) >= {"hit_rate", "block_hit_rate", "vs_oracle", "balance", "ttft_p50_s", "ttft_p99_s"}, (
            name
        )
        assert set(p["balance"]) == {"requests", "busy_time", "tokens", "queue_len"}
        assert 0.0 <= p["hit_rate"] <= 1.0 and p["balance"]["requests"] >= 1.0
        assert p["requests"] == report["trace"]["requests"]
    assert report["policies"]["oracle"]["vs_oracle"] == 1.0
    assert "predicted_hit_rate" in report["policies"]["cache_aware"]
    goals = report["goals"]
    assert goals["met"] == (goals["hit_met"] and goals["balance_met"])
    assert goals["hit_met"] == (report["policies"]["cache_aware"]["vs_oracle"] >= rq.HIT_GOAL)
    assert goals["balance_met"] == (
        report["policies"]["cache_aware"]["balance"]["requests"] <= rq.BALANCE_GOAL
    )


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(SystemExit, match="nope"):
        rq.main(["--sessions", "2", "--policies", "oracle,nope"])
