"""A fleet to simulate: the deployment spec's pools, each with an engine profile and a replica count.

`fleet_from_spec(spec, profiles, replicas)` gives every pool of every model a profile: the one named
for it (`profiles["<model>/<pool>"]` or `profiles["<model>"]`), else the shipped profile whose
`model` (or one it `serves`) is the model's `source` (or name) and whose accelerator and TP degree
are the pool's; the pool's `engine_args` `max_num_seqs` / `max_num_batched_tokens` replace the
profile's scheduler limits. Replica counts
are the pool's `replicas.initial` (else `min`, at least 1) unless `replicas` names them; 0 only for a
pool with `replicas.min: 0` (an autoscaler, `SimOptions.autoscaler`, starts its replicas).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from loadtests.sim.cluster import PoolShape
from loadtests.sim.profile import EngineProfile, ProfileError, load_profile, shipped_profiles
from router.contracts import Role
from serving.config import ModelSpec, PoolSpec, ServingSpec

Fleet = dict[str, dict[Role, PoolShape]]


def _matching(model: ModelSpec, pool: PoolSpec) -> EngineProfile:
    names = {model.source.lower(), model.name.lower()}
    want = (pool.accelerator.lower(), pool.parallelism.tp)
    for p in shipped_profiles():
        if {p.model.lower(), *(s.lower() for s in p.serves)} & names and (
            p.accelerator.lower(),
            p.tp,
        ) == want:
            return p
    raise ProfileError(
        f"no shipped profile for {model.name}/{pool.pool_name} (model {model.source}, {pool.accelerator}, "
        f"tp {pool.parallelism.tp}); name one with --profile {model.name}/{pool.pool_name}=<profile or "
        "file>, or fit one: python -m loadtests fit-profile"
    )


def fleet_from_spec(
    spec: ServingSpec,
    profiles: Mapping[str, str | EngineProfile] | None = None,
    replicas: Mapping[str, int] | None = None,
) -> Fleet:
    """The fleet of `spec` (see the module docstring). Keys are `model` or `model/pool`."""
    profiles = dict(profiles or {})
    replicas = dict(replicas or {})
    known = {m.name for m in spec.models} | {f"{m.name}/{p.pool_name}" for m in spec.models for p in m.pools}
    for what, keys in (("profile", profiles), ("replicas", replicas)):
        bad = sorted(set(keys) - known)
        if bad:
            raise ValueError(f"{what}: unknown pool(s) {bad}; the pools are {sorted(known)}")
    fleet: Fleet = {}
    for m in spec.models:
        pools: dict[Role, PoolShape] = {}
        for p in m.pools:
            key = f"{m.name}/{p.pool_name}"
            named = profiles.get(key, profiles.get(m.name))
            prof = (
                named
                if isinstance(named, EngineProfile)
                else load_profile(named)
                if named
                else _matching(m, p)
            )
            prof = with_engine_args(prof, p.engine_args)
            n = replicas.get(key, p.replicas.start)
            if n < 1 and not (n == 0 and p.replicas.min == 0 and p.replicas.max > 0):
                raise ValueError(f"replicas: {key} needs at least 1 replica to simulate, not {n}")
            pools[p.role] = PoolShape(prof, n)
        fleet[m.name] = pools
    return fleet


#: vLLM engine arguments that override a profile's scheduler limits (the pool's engine runs with them).
ENGINE_LIMITS = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens"}


def with_engine_args(profile: EngineProfile, engine_args: Mapping[str, object]) -> EngineProfile:
    """`profile` with the scheduler limits the pool's `engine_args` set."""
    over = {field: int(engine_args[arg]) for arg, field in ENGINE_LIMITS.items() if arg in engine_args}
    return replace(profile, **over) if over else profile


def assignments(items: list[str], what: str) -> dict[str, str]:
    """`KEY=VALUE` command-line items as a dict (ValueError naming the bad one)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--{what} {item!r}: expected KEY=VALUE, e.g. tiny-intent/colocated=2")
        out[key] = value
    return out
