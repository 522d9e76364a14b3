"""Builders for simulator tests: a one-model spec, an in-memory profile, a workload, one run."""

from __future__ import annotations

from typing import Any

from loadtests.sim.calls import Jobs, Template
from loadtests.sim.cluster import PoolShape, SimOptions, Simulation
from loadtests.sim.profile import EngineProfile, parse_profile
from loadtests.workload import parse_workload
from router.contracts import Role
from serving.config import ServingSpec, parse_spec


def profile(**over: Any) -> EngineProfile:
    step = {"base_s": 0.01, "per_prefill_token_s": 1e-5, "per_decode_seq_s": 1e-3, "per_context_token_s": 0.0}
    step.update(over.pop("step", {}))
    data = {
        "name": "test", "model": "m", "accelerator": "cpu", "tp": 1, "pp": 1, "dtype": "float32",
        "step": step, "max_num_seqs": 64, "max_num_batched_tokens": 4096, "block_tokens": 16,
        "kv_blocks": 100_000, "kv_bytes_per_token": 1000, "link_gbps": 8.0, "link_latency_s": 0.001,
        "startup_s": 10.0, "gpu_hour_usd": 1.0, "sources": ["a test"],
    }  # fmt: skip
    data.update(over)
    return parse_profile(data, "test.yaml")


def spec(pd: bool = False, replicas: int = 1, **over: Any) -> ServingSpec:
    pools = (
        [{"role": "prefill", "replicas": {"min": replicas, "max": replicas}},
         {"role": "decode", "replicas": {"min": replicas, "max": replicas}}]
        if pd else [{"role": "colocated", "replicas": {"min": replicas, "max": replicas}}]
    )  # fmt: skip
    model = {"name": "m", "source": "m", "pools": pools, **over.pop("model", {})}
    data = {"models": [model], "auth": {"enabled": False}, "admission": {"enabled": False}, **over}
    return parse_spec(data)


def fleet(prof: EngineProfile, pd: bool = False, replicas: int = 1) -> dict:
    if pd:
        return {"m": {Role.PREFILL: PoolShape(prof, replicas), Role.DECODE: PoolShape(prof, replicas)}}
    return {"m": {Role.COLOCATED: PoolShape(prof, replicas)}}


def workload(*workloads: dict, kind: str = "poisson", rate: float = 1.0, duration_s: float = 60.0, **kw: Any):
    return parse_workload({"duration_s": duration_s, "shape": {"kind": kind, "rate": rate},
                           "workloads": list(workloads), **kw})  # fmt: skip


def run(sp: ServingSpec, fl: dict, wf, unit: int = 16, sim: Simulation | None = None, **opts: Any) -> dict:
    sim = sim or Simulation(sp, fl, SimOptions(unit_tokens=unit, **opts))
    return sim.run(Jobs(wf, unit, Template(), {}))


# -- autoscaling ---------------------------------------------------------------------------------


def autoscaled_spec(pools: list[dict], autoscaling: dict | None = None, **over: Any) -> ServingSpec:
    """A one-model spec whose pools (dicts with role and replicas) the simulator's autoscaler sizes."""
    model = {"pools": pools, "autoscaling": {"warmup_s": 0.0, **(autoscaling or {})}, **over.pop("model", {})}
    return spec(model=model, **over)


def scripted(plan: dict[float, dict[str, int]]):
    """A policy (autoscaler.policy.decide's call shape) that sets each pool's target at the times given:
    from `t` on, `plan[t]` (pool name -> replicas); before the first, pools keep their size. It logs
    every call's signals in `.calls`."""
    from autoscaler.policy import Decision

    times = sorted(plan)

    def policy(signals, state, cfg):
        policy.calls.append(signals)
        targets = {name: p.current for name, p in signals.pools.items()}
        for t in times:
            if signals.now >= t:
                targets.update(plan[t])
        return Decision(targets, state, [])

    policy.calls = []
    return policy
