"""Routing decision latency and index memory at fleet sizes 8 / 64 / 256 / 1,024 with 1M indexed blocks.

    python -m benchmarks.router_decision [--replicas 8,64,256,1024] [--blocks 1000000]
        [--prompt-blocks 64] [--decisions 2000] [--json FILE]

Method: a `BlockIndex` is filled with `--blocks` block keys spread over the replicas the way a
multi-tenant agent fleet fills it: a few hundred shared prefixes (system prompts, tools), each
held by several replicas, plus per-session blocks held by one replica each. Then `--decisions`
requests, each `--prompt-blocks` blocks long (a shared prefix of random length and a private
tail), are routed by the cache-aware policy against `ReplicaView`s with random load and KV usage.
A decision is `policy.route(...)`: filters, the index match, every scorer, the gate, the ranking
(block hashing of the prompt happens once at the ingress and is timed separately, per request).
Memory is the traced Python allocation of the filled index (tracemalloc).

Goal: p99 decision latency <= 200 us at 256 replicas.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from benchmarks.common import percentile
from router.hashing import BlockHasher
from router.index import BlockIndex
from router.policy import CacheAwarePolicy, Gate, ReplicaView, RoutingRequest, Weights
from serving.config import RouterSpec

_SPEC = RouterSpec()  # the shipped defaults
WEIGHTS = Weights(**_SPEC.weights.model_dump())
GATE = Gate(**_SPEC.gate.model_dump())


def fill(index: BlockIndex, replicas: list[str], blocks: int, rng: random.Random) -> list[list[int]]:
    """Fill `index` with about `blocks` (replica, block) entries; return the shared prefixes."""
    prefixes = [[rng.getrandbits(64) for _ in range(rng.randrange(8, 64))] for _ in range(300)]
    placed = 0
    copies = max(1, min(8, len(replicas) // 4))
    for p in prefixes:
        for r in rng.sample(replicas, copies):
            index.add(r, p)
            placed += len(p)
    while placed < blocks:
        r = replicas[rng.randrange(len(replicas))]
        chunk = [rng.getrandbits(64) for _ in range(64)]
        index.add(r, chunk)
        placed += len(chunk)
    return prefixes


def run_level(n: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(n)
    replicas = [f"decode#{i:04d}" for i in range(n)]
    budget = max(args.blocks // n * 2, 1024)
    gc.collect()
    tracemalloc.start()
    index = BlockIndex(budget)
    prefixes = fill(index, replicas, args.blocks, rng)
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    policy = CacheAwarePolicy(index, WEIGHTS, GATE, stale_after_s=5.0, sessions=100_000, rng=rng)
    now = 1000.0
    views = [
        ReplicaView(r, running=rng.randrange(0, 32), waiting=rng.randrange(0, 4),
                    kv_usage=rng.random(), updated_at=now)
        for r in replicas
    ]  # fmt: skip
    requests = []
    for i in range(args.decisions):
        p = prefixes[rng.randrange(len(prefixes))]
        shared = p[: rng.randrange(1, len(p) + 1)]
        tail = [rng.getrandbits(64) for _ in range(max(0, args.prompt_blocks - len(shared)))]
        requests.append(RoutingRequest(f"r{i}", shared + tail, tenant="t", session_id=f"s{i % 500}"))
    for req in requests[:50]:  # warm-up
        policy.route(req, views, now)
    lat = []
    matched = 0
    for req in requests:
        t0 = time.perf_counter_ns()
        d = policy.route(req, views, now)
        lat.append((time.perf_counter_ns() - t0) / 1e3)
        matched += d.matched_blocks > 0
    return {
        "replicas": n,
        "indexed_entries": sum(index.blocks(r) for r in replicas),
        "distinct_blocks": len(index),
        "index_mib": mem / 2**20,
        "decision_us_p50": percentile(lat, 50),
        "decision_us_p99": percentile(lat, 99),
        "decision_us_mean": statistics.fmean(lat),
        "decisions_with_prefix_hit": matched / len(requests),
    }


def hashing_cost(block_size: int, tokens: int) -> float:
    """Microseconds to hash one `tokens`-long prompt (done once per request at the ingress)."""
    h = BlockHasher(block_size)
    ids = list(range(tokens))
    t0 = time.perf_counter()
    for _ in range(20):
        h.keys(ids, cache_salt="tenant")
    return (time.perf_counter() - t0) / 20 * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 256, 1024])
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--prompt-blocks", type=int, default=64)
    p.add_argument("--decisions", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    levels = [run_level(n, args) for n in args.replicas]
    hashing = {
        "block16_1k_tokens_us": hashing_cost(16, 1024),
        "block16_8k_tokens_us": hashing_cost(16, 8192),
    }
    print(f"cache-aware decision latency, {args.blocks:,} indexed blocks, {args.prompt_blocks}-block prompts")
    print(f"{'replicas':>8} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'index MiB':>10} {'hit':>6}")
    for lv in levels:
        print(
            f"{lv['replicas']:>8} {lv['decision_us_p50']:>8.1f} {lv['decision_us_p99']:>8.1f} "
            f"{lv['decision_us_mean']:>8.1f} {lv['index_mib']:>10.1f} {lv['decisions_with_prefix_hit']:>6.2f}"
        )
    print(
        "prompt hashing at the ingress (sha256, block 16): "
        f"1k tokens {hashing['block16_1k_tokens_us']:.0f} us, "
        f"8k tokens {hashing['block16_8k_tokens_us']:.0f} us"
    )
    at256 = next((lv for lv in levels if lv["replicas"] == 256), None)
    if at256 is not None:
        ok = at256["decision_us_p99"] <= 200
        print(
            f"goal p99 <= 200 us at 256 replicas: {'met' if ok else 'NOT met'} "
            f"({at256['decision_us_p99']:.1f} us)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"levels": levels, "hashing": hashing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
