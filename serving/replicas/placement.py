"""Placement: a pool's parallelism → Ray Serve replica resources and placement-group bundles.

The rules (one place; `tandem plan` prints them, `serving.app` applies them):

- **One GPU per replica** (tp = pp = 1): the replica actor asks for `num_gpus: 1`; no placement group.
- **TP > 1**: one placement group per replica, one bundle per GPU, `STRICT_PACK` so the tensor-parallel
  ranks share a node (NVLink). The replica actor sits in bundle 0 with the first GPU; vLLM's Ray
  executor starts one worker per GPU bundle of the replica's placement group.
- **PP > 1**: the same tp x pp bundles under `PACK`: stages fill a node and spill onto the next, so
  pipeline stages may span nodes while a node's GPUs are used first.
- **DP > 1**: each data-parallel rank is its own Ray Serve replica with the tp x pp bundles above. The
  dp replicas form one Ray Serve *gang* (`gang_scheduling_config`, gang size dp, placed `SPREAD` across
  nodes when a rank has one GPU, `PACK` otherwise; the gang restarts as a unit, as a vLLM DP group
  must). The replica's gang rank is its vLLM `data_parallel_rank` (external load balancing: Serve
  routes requests to every rank). With `ep`, vLLM's `enable_expert_parallel` shards experts over the
  dp x tp ranks (DeepSeek-style MoE).
- **SGLang** keeps its DP ranks inside one engine (DP attention: `tp_size` = tp x dp GPUs, `dp_size`
  = dp), so an SGLang replica takes tp x pp x dp GPUs under the TP/PP rules above, and no gang.

GPU bundles also carry `accelerator_type:<type>: 0.001` so they land on the pool's GPU type, as
ray.serve.llm does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.config import EngineKind, ModelSpec, PoolSpec, ServingSpec

#: Tiny share of Ray's accelerator_type resource: pins a bundle to a GPU type without using it up.
ACCELERATOR_SHARE = 0.001


@dataclass(frozen=True, slots=True)
class PoolPlacement:
    """Where the replicas of one pool go."""

    model: str
    pool: str
    role: str
    accelerator: str
    #: Resource bundles of one replica (bundle 0 also holds the replica actor).
    bundles: list[dict[str, float]]
    #: Placement-group strategy per replica (None: no placement group of its own).
    strategy: str | None
    gpus_per_replica: int
    #: Serve replicas at the pool's maximum size (dp ranks x groups).
    max_replicas: int
    #: Data-parallel group size (1: replicas are independent).
    dp: int = 1
    gang_strategy: str | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        """GPUs the pool takes at its maximum size."""
        return self.gpus_per_replica * self.max_replicas


def _gpu_bundle(accelerator: str, extra: dict[str, float] | None = None) -> dict[str, float]:
    bundle: dict[str, float] = dict(extra or {})
    bundle["GPU"] = 1
    bundle[f"accelerator_type:{accelerator}"] = ACCELERATOR_SHARE
    return bundle


def place_pool(model: ModelSpec, pool: PoolSpec) -> PoolPlacement:
    """The placement of `pool` (see the module docstring for the rules)."""
    par = pool.parallelism
    actor: dict[str, Any] = {"num_cpus": pool.cpus_per_replica}
    # SGLang runs its data-parallel (DP-attention) ranks inside one engine: one replica holds them.
    dp = 1 if pool.engine is EngineKind.SGLANG else par.dp
    n = par.accelerators_per_replica * (par.dp // dp)
    replicas = pool.replicas.max * dp
    gang = None
    if dp > 1:
        gang = "SPREAD" if n == 1 else "PACK"
    if not pool.uses_gpu:
        return PoolPlacement(
            model=model.name,
            pool=pool.pool_name,
            role=pool.role.value,
            accelerator="cpu",
            bundles=[{"CPU": pool.cpus_per_replica}],
            strategy=None,
            gpus_per_replica=0,
            max_replicas=replicas,
            dp=dp,
            gang_strategy=gang,
            ray_actor_options=actor,
        )
    bundles = [_gpu_bundle(pool.accelerator, {"CPU": pool.cpus_per_replica})] + [
        _gpu_bundle(pool.accelerator) for _ in range(n - 1)
    ]
    strategy: str | None
    if n == 1 and dp == 1:
        # A single GPU needs no placement group: the actor asks for it directly.
        actor["num_gpus"] = 1
        actor["accelerator_type"] = pool.accelerator
        strategy = None
    elif dp > 1:
        strategy = None  # the Serve gang places the ranks (see placement_options)
    else:
        strategy = "STRICT_PACK" if par.pp == 1 else "PACK"
    return PoolPlacement(
        model=model.name,
        pool=pool.pool_name,
        role=pool.role.value,
        accelerator=pool.accelerator,
        bundles=bundles,
        strategy=strategy,
        gpus_per_replica=n,
        max_replicas=replicas,
        dp=dp,
        gang_strategy=gang,
        ray_actor_options=actor,
    )


def placement_options(placement: PoolPlacement) -> dict[str, Any]:
    """The Ray Serve deployment options that realise `placement` (resources only)."""
    opts: dict[str, Any] = {"ray_actor_options": dict(placement.ray_actor_options)}
    uses_pg = placement.strategy is not None or placement.dp > 1
    if uses_pg and placement.gpus_per_replica > 0:
        opts["placement_group_bundles"] = [dict(b) for b in placement.bundles]
    if placement.dp > 1:
        # Serve forbids a per-replica strategy inside a gang: the gang's strategy places it.
        opts["gang_scheduling_config"] = {
            "gang_size": placement.dp,
            "gang_placement_strategy": placement.gang_strategy,
        }
    elif placement.strategy is not None:
        opts["placement_group_strategy"] = placement.strategy
    return opts


def plan(spec: ServingSpec) -> list[PoolPlacement]:
    """Placement of every pool of `spec` that Ray runs (an external server's pool is not placed)."""
    return [place_pool(m, p) for m in spec.models for p in m.pools if p.upstream is None]


def _fmt_bundle(b: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"


def _fmt_bundles(bundles: list[dict[str, float]]) -> str:
    """Bundles with runs of identical ones folded: `[{CPU: 8, GPU: 1}, {GPU: 1} x 3]`."""
    out: list[str] = []
    i = 0
    while i < len(bundles):
        j = i
        while j + 1 < len(bundles) and bundles[j + 1] == bundles[i]:
            j += 1
        n = j - i + 1
        out.append(_fmt_bundle(bundles[i]) + (f" x {n}" if n > 1 else ""))
        i = j + 1
    return "[" + ", ".join(out) + "]"


def format_plan(placements: list[PoolPlacement]) -> str:
    """A human-readable plan: per pool, bundles, GPUs per replica and in total."""
    lines = []
    total = 0
    for p in placements:
        total += p.total_gpus
        lines.append(f"{p.model}/{p.pool}  role={p.role}  accelerator={p.accelerator}")
        if p.dp > 1:
            strat = f"Serve gang of {p.dp} DP ranks, {p.gang_strategy}"
        else:
            strat = p.strategy or "none (no placement group)"
        lines.append(f"  replica bundles: {_fmt_bundles(p.bundles)}")
        lines.append(f"  strategy: {strat}")
        lines.append(
            f"  GPUs per replica: {p.gpus_per_replica}   replicas (max): {p.max_replicas}   "
            f"GPUs (max): {p.total_gpus}"
        )
    lines.append(f"total GPUs (max): {total}")
    return "\n".join(lines)
