"""How fast is the cluster simulator? A thousand replicas, a million requests, on this machine.

    python -m benchmarks.sim_speed [--requests 1000000] [--layout cluster|single] [--json FILE]

**cluster** (the goal's case): the 8B + 70B example (`configs/cluster-8b-70b.yaml`: tiers, routing,
P/D settings, cache-aware routers) scaled to `--replicas` (1,000) replicas with the shipped GPU
profiles: 60 % in the 8B INT4 pool on L4, 15 % 70B FP8 prefill (H100 TP4) and 25 % 70B decode
(H100 TP8). Traffic: intent calls (256-token prompts, 32 tokens out, `x-tandem-task: intent`) and
agent sessions on the 70B (a 2,048-token system prompt shared by 16 variants, 4 turns of 256 tokens,
128 tokens out) in the ratio 3:1, Poisson arrivals at `--rate` jobs/s, generated as they are due
(no plan held in memory). **single**: one colocated 8B pool of all the replicas (one cache-aware
router ranking 1,000 candidates per request: the router's own cost dominates).

Every request goes through the real tier router, admission, block hashing, router policy and P/D
decider; the summary streams (no per-request records). Prints simulated requests per second of
wall time, the wall time of the whole run, peak resident memory (ru_maxrss) and what the run
simulated (so the speed is not bought by an idle fleet). The goal: 1,000 replicas x 1,000,000
requests in under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.common import machine_info, run_main
from loadtests.plan import Arrival
from loadtests.sim.calls import Jobs, Template
from loadtests.sim.cluster import SimOptions, Simulation
from loadtests.sim.fleet import fleet_from_spec
from loadtests.workload import parse_workload
from serving.config import load_spec

GOAL_S = 600.0


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000, help="requests to simulate (about)")
    p.add_argument("--replicas", type=int, default=1000)
    p.add_argument("--layout", choices=("cluster", "single"), default="cluster")
    p.add_argument("--rate", type=float, help="jobs/s (default: ~60 %% of the fleet's capacity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    return a, a.json


def _spec(layout: str, replicas: int):
    spec = load_spec("configs/cluster-8b-70b.yaml")
    data = spec.model_dump(mode="json")
    if layout == "single":
        small, prefill, decode = replicas, 0, 0
    else:
        small, prefill = round(replicas * 0.6), round(replicas * 0.15)
        decode = replicas - small - prefill
    for m in data["models"]:
        for pool in m["pools"]:
            n = {"colocated": small, "prefill": prefill, "decode": decode}[pool["role"]]
            pool["replicas"] = {"min": max(n, 1), "max": max(n, 1), "initial": max(n, 1)}
    data["admission"]["enabled"] = False  # the fleet is sized by replicas here, not by admission
    data["auth"] = {"enabled": False, "allow_remote_unauthenticated": True}
    return type(spec).model_validate(data), (small, prefill, decode)


def _workload(layout: str) -> Any:
    agent_model = "llama-3.1-8b-instruct-awq" if layout == "single" else "llama-3.3-70b-instruct"
    return parse_workload({
        "duration_s": 3600, "shape": {"kind": "poisson", "rate": 1.0}, "seed": 0,
        "workloads": [
            {"type": "intent", "weight": 3, "model": "auto", "task": "intent", "prompt_tokens": 256,
             "max_tokens": 32, "slo": {"ttft_s": 0.5}},
            {"type": "agent", "weight": 1, "model": agent_model, "system_prompts": 16, "system_tokens": 2048,
             "turns": 4, "user_tokens": 256, "max_tokens": 128, "slo": {"ttft_s": 3.0, "tpot_s": 0.1}},
        ],
    })  # fmt: skip


def _arrivals(n_jobs: int, rate: float, seed: int) -> Iterator[Arrival]:
    rng = random.Random(seed)
    t = 0.0
    items = [0, 0]
    for k in range(n_jobs):
        t += rng.expovariate(rate)
        w = 0 if rng.random() < 0.75 else 1
        yield Arrival(k, t, w, items[w])
        items[w] += 1


def run(a: argparse.Namespace) -> dict[str, Any]:
    spec, (small, prefill, decode) = _spec(a.layout, a.replicas)
    wf = _workload(a.layout)
    fleet = fleet_from_spec(spec)
    # A job is 0.75 x 1 intent call + 0.25 x 4 agent turns = 1.75 requests.
    n_jobs = round(a.requests / 1.75)
    # ~60 % of capacity: an L4 8B replica takes ~6 intent calls/s at its TTFT SLO, a 70B TP8 decode
    # replica ~1.5 agent sessions/s (the planner finds the real figures; this only has to load the fleet).
    rate = a.rate or (0.6 * min(small * 6 / 0.75 if small else 1e9, (decode or small) * 1.5 / 0.25))
    sim = Simulation(spec, fleet, SimOptions(unit_tokens=128, seed=a.seed, keep_records=False))
    jobs = Jobs(wf, 128, Template(), {})
    print(
        f"sim_speed: {a.layout}: {small} + {prefill} + {decode} replicas, {n_jobs} jobs at {rate:.0f}/s",
        flush=True,
    )
    t0 = time.perf_counter()
    doc = sim.run(jobs, arrivals=_arrivals(n_jobs, rate, a.seed), duration_s=n_jobs / rate)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = doc["requests"]
    pools = {
        k: {"replicas": v["replicas"], "utilisation": v["utilisation"]}
        for k, v in doc["sim"]["pools"].items()
    }
    return {
        "layout": a.layout,
        "replicas": small + prefill + decode,
        "requests": n,
        "jobs": n_jobs,
        "rate_jobs_per_s": rate,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "peak_rss_bytes": rss,
        "simulated_s": doc["sim"]["simulated_s"],
        "ok": doc["ok"],
        "slo_fraction": doc["slo_fraction"],
        "cached_fraction": doc["cached_fraction"],
        "ttft_p50_s": doc["latency"]["ttft"]["p50"],
        "ttft_p99_s": doc["latency"]["ttft"]["p99"],
        "pools": pools,
        "goal_met": wall < GOAL_S and n >= 1_000_000 and small + prefill + decode >= 1000,
        "machine": machine_info(),
    }


def report(r: dict[str, Any]) -> str:
    mib = r["peak_rss_bytes"] / 2**20
    t50, t99 = r["ttft_p50_s"] * 1e3, r["ttft_p99_s"] * 1e3
    lines = [
        f"sim_speed ({r['layout']}): {r['replicas']} replicas, {r['requests']:,} requests in "
        f"{r['wall_s']:.0f} s of wall time = {r['requests_per_s']:,.0f} requests/s simulated; "
        f"peak RSS {mib:.0f} MiB",
        f"  simulated {r['simulated_s']:.0f} s of traffic; {r['ok']:,} ok, SLO met {r['slo_fraction']:.1%}, "
        f"prefix hits {r['cached_fraction']:.1%}, TTFT p50/p99 {t50:.0f}/{t99:.0f} ms",
    ]
    for k, v in r["pools"].items():
        lines.append(f"  {k}: {v['replicas']} replicas, {v['utilisation']:.0%} busy")
    verdict = "MET" if r["goal_met"] else "MISSED"
    lines.append(f"goal (>= 1,000 replicas x 1,000,000 requests < {GOAL_S:.0f} s): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, _parse, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
