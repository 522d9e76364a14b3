"""`python -m loadtests plan`: the capacity planner, the cheapest fleet that meets a workload's SLOs.

    python -m loadtests plan --workload loadtests/workloads/mooncake-cluster.yaml [--rate R]
        [--duration 60] [--target 0.99] [--config configs/cluster-8b-70b.yaml] [--calibration FILE]
        [--profile MODEL[/ROLE]=PROFILE[,PROFILE...] ...] [--models M,...] [--layouts colocated,pd]
        [--ratios 1:1,1:2,2:1,1:3,3:1] [--policies cache_aware,power_of_two,round_robin]
        [--max-replicas 16] [--no-tenant-limits] [--prune model|layout|policy|layout+policy]
        [--seed 0] [--json FILE] [--show 12]
        [--workers N | --address ADDR | --no-ray]

For each model of the deployment spec that the workload's calls reach, the planner simulates
(`loadtests.sim.cluster.Simulation`: the real tier router, admission, router policies and P/D
decider over modelled engines) the workload at `--rate` jobs/s (as the workload's shape counts
them; without `--rate`, the file's own shape, e.g. a trace's timestamps) for `--duration`
simulated seconds, on candidate fleet **shapes**:

- **profile** (GPU type and TP degree): every engine profile of the model: the shipped profiles
  (`loadtests/sim/profiles/`) whose `model` (or one it `serves`) is the spec model's `source` or
  `name` (compared case-insensitively), else, failing that, a quantised variant of it (the profile
  model's last path segment is the source's last segment or the model name plus quantisation parts
  such as `-fp8`, as `RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic` for
  `meta-llama/Llama-3.3-70B-Instruct`), or the
  profiles `--profile MODEL=...` names (shipped names or `.yaml` paths; `MODEL/prefill=`,
  `MODEL/decode=`, `MODEL/colocated=` restrict one role);
- **layout**: colocated (one pool) or P/D (a prefill and a decode pool, each on any of the model's
  profiles of the same accelerator type: e.g. prefill TP4 + decode TP8), with the model's own
  `disaggregation` settings (defaults when the spec serves it colocated);
- **prefill:decode ratio** (`--ratios`, P/D only) and **router policy** (`--policies`, overriding
  the model's `router.policy`).

The rest of each pool (engine, engine_args, `max_ongoing_requests`, name) is the spec's pool of
that role, else its serving pool's. A shape scales by a whole factor k: k colocated replicas, or
p·k prefill + d·k decode replicas for ratio p:d, at most `--max-replicas` in any pool. For every
shape the planner finds the **fewest replicas that meet the target**: the fraction of the model's
requests that met their workload's SLOs (TTFT and TPOT; a rejected or failed request is a miss)
must be at least `--target`. The search grows k exponentially (1, 2, 4, ...) until a run meets the
target, then bisects between the last miss and the first hit (goodput is monotone enough in the
replica count for this to find the edge). A shape whose misses are mostly not about capacity (the
tenant token bucket's `tenant_rate_limited`, `request_too_large`, failed calls) stops at once: no
replica count fixes those. Cost is GPUs x `gpu_hour_usd`, summed over the pools. The cheapest shape
meeting the target wins (ties: higher SLO attainment, then fewer GPUs); the others are ranked
behind it with why each loses: what it costs more, or its worst metric at `--max-replicas` (the
miss cause that loses the most requests: "TTFT p99 4.1 s > SLO 3 s", "12% rejected (queue_full)").

`--prune GROUP` trades the runner-ups' exact figures for time (branch and bound): once a shape of a
group (the model; or its layout, policy, or both) meets the target at some cost, another shape of
the group grows no further than that cost, and stops as soon as even its next size would cost
more; the table then says "costs at least $X/h more". The cheapest shape of each group is never
cut short (a tie in cost is searched to the end), so the winner is the same as without pruning.

**Models are planned one at a time, with the other models held fixed**: the models of a spec serve
disjoint calls (a workload's call goes to one tier's model; the simulator has no tier fallback), so
one model's fleet does not change another's latency. Each simulation still runs the whole workload
through the whole spec, the other models on a generous fixed fleet (every pool at its spec
`replicas.max`, on the profile `fleet_from_spec` would pick), so the one thing they do share, the
tenant's token bucket in admission, is charged by all of the workload's calls as it is in
production; only the planned model's requests are scored. All models' searches share one pool of
workers. (Sweeping every model's candidates together would multiply the shapes, for no gain.)

Admission is simulated as the cluster enforces it: one controller per ingress replica, each
with its share of the limits (`loadtests.sim.cluster`). `--no-tenant-limits` lifts every tenant's
token bucket (rate and burst) and in-flight cap (`max_in_flight`), to size the fleet for traffic the
tenant limits would otherwise cap; pool concurrency (`replicas.max` x `max_ongoing_requests`) and
the wait queue stay as the spec sets them.

**Execution**: each simulation is one Ray task (`ray.init()` of a fresh local cluster with
`--workers` CPUs, default the machine's, no dashboard, its own temp dir under /tmp, auth off; or
`--address auto` to join the cluster of a Ray job). The spec (as a dict, re-validated in the task),
the workload, its trace requests and the profiles (as dicts) go into the object store once; a task
carries that reference, the shape and k. Every shape's next replica count is submitted as soon as
its previous run is in (the first wave is every shape at k = 1), results come back with
`ray.wait`, and a progress bar counts them (a plain line per finished run when stdout is not a
terminal). `--no-ray` runs the same tasks in this process. A simulation is deterministic for a seed
(`--seed`, plus the workload's own): every shape sees the same arrivals and requests, and the plan
is the same in process and on Ray (with `--prune`, which runner-ups are cut short, and so the
number of simulations, can depend on the order Ray's results come back in; the winners cannot).

`--json FILE` writes every simulation (shape, replicas and key figures), each model's winner and
ranked list, and the whole recommended fleet. Exit status: 0 when every planned model has a shape
that meets the target, 1 when one has none, 2 on a bad flag, spec, workload or profile.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import plan as load_plan
from loadtests import traces
from loadtests.sim import sweep
from loadtests.sim.calls import Jobs, Template, unit_tokens_of
from loadtests.sim.cluster import Overheads, PoolShape, SimOptions, Simulation
from loadtests.sim.profile import EngineProfile, ProfileError, load_profile, parse_profile, shipped_profiles
from loadtests.summary import percentile, summarize_run
from loadtests.workload import WorkloadError, WorkloadFile, load_workload, parse_workload
from router.contracts import Role
from router.tiers import TierError
from serving.config import ModelSpec, RouterPolicy, ServingSpec, SpecError, load_spec, parse_spec

DEFAULT_CONFIG = "configs/cluster-8b-70b.yaml"
DEFAULT_POLICIES = ("cache_aware", "power_of_two", "round_robin")
DEFAULT_RATIOS = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))
LAYOUTS = ("colocated", "pd")
#: Miss causes no replica count fixes (admission's tenant limits; calls that cannot be served).
UNFIXABLE = ("rejected:tenant_rate_limited", "rejected:request_too_large", "failed:")
#: A tenant limit high enough never to bind (--no-tenant-limits).
_UNLIMITED_TOKENS = 10**15


class PlanError(ValueError):
    """A plan that cannot be made as asked; the message says what to change."""


# -- shapes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """A candidate fleet shape of one model, scaled by a whole factor k.

    Attributes:
        model: the spec model it serves.
        layout: 'colocated' or 'pd'.
        profiles: profile names per pool: (colocated,) or (prefill, decode).
        ratio: replicas per unit of k per pool: (1,) or (prefill, decode).
        policy: the router policy of the model's pools.
    """

    model: str
    layout: str
    profiles: tuple[str, ...]
    ratio: tuple[int, ...]
    policy: str

    @property
    def roles(self) -> tuple[Role, ...]:
        return (Role.COLOCATED,) if self.layout == "colocated" else (Role.PREFILL, Role.DECODE)

    def replicas(self, k: int) -> tuple[int, ...]:
        """Replicas per pool at scale `k`."""
        return tuple(r * k for r in self.ratio)

    def kmax(self, max_replicas: int) -> int:
        """The largest k with no pool above `max_replicas`."""
        return max_replicas // max(self.ratio)

    @property
    def id(self) -> str:
        ratio = ":".join(map(str, self.ratio))
        return f"{self.model}|{self.layout}|{ratio}|{'+'.join(self.profiles)}|{self.policy}"

    def label(self, profiles: Mapping[str, EngineProfile]) -> str:
        """e.g. 'colocated H100 tp8' or 'P/D 2:1 H100 tp4 / H100 tp8'."""
        names = [_hw(profiles[p]) for p in self.profiles]
        if self.layout == "colocated":
            return f"colocated {names[0]}"
        return f"P/D {self.ratio[0]}:{self.ratio[1]} {names[0]} / {names[1]}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layout": self.layout,
            "profiles": list(self.profiles),
            "ratio": list(self.ratio),
            "policy": self.policy,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Shape:
        return cls(d["model"], d["layout"], tuple(d["profiles"]), tuple(d["ratio"]), d["policy"])


def _hw(p: EngineProfile) -> str:
    return f"{p.accelerator} tp{p.tp}" + (f" pp{p.pp}" if p.pp > 1 else "")


def _last(name: str) -> str:
    return name.lower().rstrip("/").rsplit("/", 1)[-1]


#: Name parts a quantised variant of a checkpoint adds (`...-Instruct-FP8-dynamic`, `-AWQ-INT4`).
QUANT_SUFFIXES = frozenset(
    (
        "fp8 fp16 bf16 fp4 nvfp4 mxfp4 int4 int8 awq gptq marlin dynamic static w4a16 w8a8 w8a16 quantized"
    ).split()
)


def profile_fits(profile: EngineProfile, model: ModelSpec) -> int:
    """2: the profile's model is the spec model's source or name (case-insensitive); 1: a quantised
    variant of it (its last path segment is the source's last segment, or the model name, followed
    only by `QUANT_SUFFIXES` parts); 0: no."""
    names = {model.source.lower(), model.name.lower()}
    if {profile.model.lower(), *(x.lower() for x in profile.serves)} & names:
        return 2
    base = _last(profile.model)
    for n in {_last(model.source), model.name.lower()}:
        if n and base.startswith(n + "-") and set(base[len(n) + 1 :].split("-")) <= QUANT_SUFFIXES:
            return 1
    return 0


def model_profiles(
    model: ModelSpec, shipped: Sequence[EngineProfile], named: Mapping[str, Sequence[EngineProfile]]
) -> dict[Role, list[EngineProfile]]:
    """Candidate profiles per role of `model`: the ones `named` gives (keys `model` or
    `model/role`), else the shipped profiles that fit it (exact matches first, else variants)."""
    everyone = named.get(model.name)
    if everyone is None:
        exact = [p for p in shipped if profile_fits(p, model) == 2]
        everyone = exact or [p for p in shipped if profile_fits(p, model) == 1]
    out = {}
    for role in (Role.COLOCATED, Role.PREFILL, Role.DECODE):
        out[role] = list(named.get(f"{model.name}/{role.value}", everyone))
    if not any(out.values()):
        raise PlanError(
            f"no engine profile for model {model.name} (source {model.source}): no shipped profile's "
            f"model is {model.source!r} or a variant of it; name one with --profile {model.name}=<profile "
            "or .yaml>, or fit one: python -m loadtests fit-profile"
        )
    return out


def shapes_for(
    model: ModelSpec,
    profiles: Mapping[Role, Sequence[EngineProfile]],
    layouts: Sequence[str],
    ratios: Sequence[tuple[int, int]],
    policies: Sequence[str],
) -> list[Shape]:
    """Every candidate shape of `model` (P/D pairs share an accelerator type)."""
    out = []
    for policy in policies:
        if "colocated" in layouts:
            for p in profiles[Role.COLOCATED]:
                out.append(Shape(model.name, "colocated", (p.name,), (1,), policy))
        if "pd" in layouts:
            for pre in profiles[Role.PREFILL]:
                for dec in profiles[Role.DECODE]:
                    if pre.accelerator.lower() != dec.accelerator.lower():
                        continue
                    for r in ratios:
                        out.append(Shape(model.name, "pd", (pre.name, dec.name), tuple(r), policy))
    return out


# -- the spec and fleet of one candidate -------------------------------------------------------


def simulated_spec(spec: ServingSpec, lift_tenant_limits: bool) -> dict[str, Any]:
    """`spec` as the planner simulates it (a dict): with `lift_tenant_limits`, no tenant limit that
    binds: neither the token bucket nor the in-flight cap (`max_in_flight`, 512 by default: a
    workload that keeps more of one tenant's requests in flight would otherwise measure that cap,
    429 `tenant_concurrency`, not the pool)."""
    d = spec.model_dump(mode="json")
    if lift_tenant_limits:
        adm = d["admission"]
        for t in [adm["default_tenant"], *adm["tenants"]]:
            t["tokens_per_s"] = float(_UNLIMITED_TOKENS)
            t["burst_tokens"] = _UNLIMITED_TOKENS
            t["max_in_flight"] = None  # null: no cap (serving.config.TenantLimits)
    return d


def candidate_spec(
    base: Mapping[str, Any], shape: Shape, k: int, profiles: Mapping[str, EngineProfile]
) -> ServingSpec:
    """The spec with `shape.model`'s pools replaced by `shape` at scale `k` (validated)."""
    d = copy.deepcopy(dict(base))
    m = next(m for m in d["models"] if m["name"] == shape.model)
    old = {p["role"]: p for p in m["pools"]}
    serving = old.get(Role.DECODE.value) or old[Role.COLOCATED.value]
    pools = []
    for role, name, n in zip(shape.roles, shape.profiles, shape.replicas(k), strict=True):
        prof = profiles[name]
        template = old.get(role.value)
        p = copy.deepcopy(template if template is not None else serving)
        if template is None:
            p["name"] = None
        p["role"] = role.value
        p["accelerator"] = prof.accelerator
        p["parallelism"] = {"tp": prof.tp, "pp": prof.pp}
        p["replicas"] = {"min": n, "max": n}
        pools.append(p)
    m["pools"] = pools
    try:
        return parse_spec(d, f"<{shape.id} x{k}>")
    except SpecError as e:
        raise PlanError(str(e)) from None


def held_fleet(
    spec: ServingSpec,
    shipped: Sequence[EngineProfile],
    named: Mapping[str, Sequence[EngineProfile]],
    busy: set[str],
) -> dict[str, list[tuple[str, str, int]]]:
    """The fixed fleet of every model while another is planned: each pool at `replicas.max` on its
    spec profile (`named`'s first, else the shipped one of the pool's accelerator and TP). A model
    the workload never reaches gets whatever profile fits (its engines stay idle)."""
    out = {}
    for m in spec.models:
        pools = []
        for p in m.pools:
            cands = list(named.get(f"{m.name}/{p.role.value}", named.get(m.name, ())))
            if not cands:
                fits = sorted(
                    (p_ for p_ in shipped if profile_fits(p_, m)), key=lambda x: -profile_fits(x, m)
                )
                want = (p.accelerator.lower(), p.parallelism.tp)
                cands = [x for x in fits if (x.accelerator.lower(), x.tp) == want] or fits
            if not cands:
                if m.name in busy:
                    raise PlanError(
                        f"no engine profile for {m.name}/{p.pool_name} ({p.accelerator}, "
                        f"tp {p.parallelism.tp}); name one with --profile {m.name}=<profile or .yaml>"
                    )
                cands = [_IDLE]
            pools.append((p.role.value, cands[0].name, p.replicas.max))
        out[m.name] = pools
    return out


_IDLE = parse_profile(
    {
        "name": "idle",
        "model": "-",
        "accelerator": "cpu",
        "tp": 1,
        "pp": 1,
        "dtype": "-",
        "step": {
            "base_s": 0.001,
            "per_prefill_token_s": 0.0,
            "per_decode_seq_s": 0.0,
            "per_context_token_s": 0.0,
        },
        "max_num_seqs": 1,
        "max_num_batched_tokens": 16,
        "block_tokens": 16,
        "kv_blocks": 1,
        "kv_bytes_per_token": 0,
        "link_gbps": 1.0,
        "link_latency_s": 0.0,
        "startup_s": 0.0,
        "gpu_hour_usd": 0.0,
        "sources": ["a placeholder for a model no call of the workload reaches: its engines never run"],
    },
    "idle",
)


# -- one simulation (a Ray task, or in process) ------------------------------------------------


@dataclass(slots=True)
class Context:
    """What every simulation of a plan shares (put in Ray's object store once)."""

    key: str
    spec: dict[str, Any]
    workload: dict[str, Any]
    loaded: dict[str, list[traces.TraceRequest]]
    unit: int
    template: Template
    overheads: Overheads
    seed: int
    rate: float | None
    duration_s: float
    target: float
    profiles: dict[str, dict[str, Any]]
    held: dict[str, list[tuple[str, str, int]]]
    model_of: dict[str, str]  # workload name -> model
    slo_of: dict[str, tuple[float | None, float | None]]  # workload name -> (ttft, tpot)


@dataclass(slots=True)
class _Prepared:
    wf: WorkloadFile
    profiles: dict[str, EngineProfile]


_PREPARED: dict[str, tuple[Context, _Prepared]] = {}


def _prepare(ctx: Context) -> _Prepared:
    hit = _PREPARED.get(ctx.key)
    if hit is not None:
        return hit[1]
    prep = _Prepared(parse_workload(ctx.workload), {n: parse_profile(d, n) for n, d in ctx.profiles.items()})
    if len(_PREPARED) >= 2:
        _PREPARED.clear()
    _PREPARED[ctx.key] = (ctx, prep)
    return prep


def _context(box: Any) -> Context:
    """The plan's context: itself (in process), or from a one-element list holding its object
    reference (so Ray does not resolve it per task; a worker fetches it once per plan)."""
    if isinstance(box, Context):
        return box
    ref = box[0]
    hit = _PREPARED.get(ref.hex())
    if hit is not None:
        return hit[0]
    import ray

    ctx = ray.get(ref)
    ctx.key = ref.hex()
    return ctx


def simulate_shape(box: Any, shape_d: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Simulate `shape` at scale `k`: its key figures (see `figures`)."""
    t0 = time.perf_counter()
    ctx = _context(box)
    prep = _prepare(ctx)
    shape = Shape.from_dict(shape_d)
    spec = candidate_spec(ctx.spec, shape, k, prep.profiles)
    fleet: dict[str, dict[Role, PoolShape]] = {}
    for model, pools in ctx.held.items():
        fleet[model] = {Role(role): PoolShape(prep.profiles.get(name, _IDLE), n) for role, name, n in pools}
    fleet[shape.model] = {
        role: PoolShape(prep.profiles[name], n)
        for role, name, n in zip(shape.roles, shape.profiles, shape.replicas(k), strict=True)
    }
    opts = SimOptions(
        unit_tokens=ctx.unit, overheads=ctx.overheads, seed=ctx.seed, keep_records=True, policy=shape.policy
    )
    sim = Simulation(spec, fleet, opts)
    doc = sim.run(Jobs(prep.wf, ctx.unit, ctx.template, ctx.loaded), rate=ctx.rate, duration_s=ctx.duration_s)
    records = [r for r in sim.recorder.records if ctx.model_of.get(r["name"]) == shape.model]
    fig = figures(records, doc, shape, k, prep.profiles, ctx)
    fig["wall_s"] = round(time.perf_counter() - t0, 3)
    return fig


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2g} s" if x >= 1 else f"{x * 1000:.0f} ms"


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %" if x < 0.995 or x == 1 else f"{x * 100:.2f} %"


def _quantile_name(target: float) -> str:
    return f"p{target * 100:g}"


def miss_causes(
    records: Sequence[Mapping[str, Any]], slo_of: Mapping[str, tuple[float | None, float | None]]
) -> Counter:
    """Why each request that missed its SLOs missed: 'rejected:<reason>', 'failed:<reason>', 'ttft'
    (late first token) or 'tpot' (slow tokens after it)."""
    out: Counter = Counter()
    for r in records:
        if r.get("slo_met"):
            continue
        if r["outcome"] != "ok":
            out[f"{r['outcome']}:{r.get('reason') or 'unknown'}"] += 1
            continue
        ttft_slo, tpot_slo = slo_of.get(r["name"], (None, None))
        if ttft_slo is not None and r["ttft"] is not None and r["ttft"] > ttft_slo:
            out["ttft"] += 1
        elif tpot_slo is not None and r["tpot"] is not None and r["tpot"] > tpot_slo:
            out["tpot"] += 1
        else:
            out["other"] += 1
    return out


def worst_reason(records: Sequence[Mapping[str, Any]], causes: Counter, ctx: Context) -> str | None:
    """Why a run missed the target, as a sentence fragment: the miss cause that loses the most
    requests ("TTFT p99 4.1 s > SLO 3 s (6.3% of requests)", "12% rejected (queue_full)"), with the
    next ones when it alone loses no more than the target allows."""
    if not causes:
        return None
    allowed = (1 - ctx.target) * len(records)
    parts, lost = [], 0
    for cause, n in causes.most_common():
        parts.append(_describe(cause, n, records, ctx))
        lost += n
        if n > allowed or lost > allowed or len(parts) == 3:
            break
    return "; ".join(parts)


def _describe(cause: str, n: int, records: Sequence[Mapping[str, Any]], ctx: Context) -> str:
    total = len(records)
    if cause in ("ttft", "tpot"):
        # The workload whose requests miss most on this metric, at the target's percentile.
        i = 0 if cause == "ttft" else 1
        by_name: Counter = Counter()
        for r in records:
            slo = ctx.slo_of.get(r["name"], (None, None))[i]
            v = r.get(cause)
            if r["outcome"] == "ok" and slo is not None and v is not None and v > slo:
                by_name[r["name"]] += 1
        name = by_name.most_common(1)[0][0]
        slo = ctx.slo_of[name][i]
        values = [
            r[cause] for r in records if r["name"] == name and r["outcome"] == "ok" and r[cause] is not None
        ]
        q = percentile(values, ctx.target * 100)
        what = cause.upper() + (f" of {name}" if len({r["name"] for r in records}) > 1 else "")
        share = _share(n, total)
        if q is not None and q > slo:
            return f"{what} {_quantile_name(ctx.target)} {_secs(q)} > SLO {_secs(slo)} ({share} of requests)"
        return f"{what} > SLO {_secs(slo)} for {share} of requests"
    kind, _, reason = cause.partition(":")
    if kind in ("rejected", "failed"):
        return f"{_share(n, total)} {kind} ({reason})"
    return f"{_share(n, total)} missed their SLOs"


def _share(n: int, total: int) -> str:
    x = n / total
    return f"{x:.0%}" if x >= 0.095 else f"{x:.1%}"


def figures(
    records: Sequence[Mapping[str, Any]],
    doc: Mapping[str, Any],
    shape: Shape,
    k: int,
    profiles: Mapping[str, EngineProfile],
    ctx: Context,
) -> dict[str, Any]:
    """A run's key figures for the planned model (its records only; pools from the sim section)."""
    n_rep = shape.replicas(k)
    gpus = sum(n * profiles[p].gpus for p, n in zip(shape.profiles, n_rep, strict=True))
    usd = sum(
        n * profiles[p].gpus * profiles[p].gpu_hour_usd for p, n in zip(shape.profiles, n_rep, strict=True)
    )
    s = summarize_run(
        records, duration_s=doc["duration_s"], offered_rate=doc.get("offered_rate"), slos=doc.get("slos")
    )
    causes = miss_causes(records, ctx.slo_of)
    n = len(records)
    unfixable = sum(c for k_, c in causes.items() if any(k_.startswith(u) for u in UNFIXABLE))
    pools = {p["role"]: p for name, p in doc["sim"]["pools"].items() if name.split("/")[0] == shape.model}
    lat = s["latency"]
    dec = pools.get(Role.DECODE.value, {})
    return {
        "id": shape.id,
        "k": k,
        "replicas": {r.value: c for r, c in zip(shape.roles, n_rep, strict=True)},
        "gpus": gpus,
        "usd_per_hour": round(usd, 4),
        "requests": n,
        "slo_met": s["slo_met"],
        "slo_fraction": s["slo_fraction"],
        "met": n > 0 and s["slo_fraction"] >= ctx.target,
        "goodput_rps": s["goodput_rps"],
        "ok": s["ok"],
        "rejected": s["rejected"],
        "failed": s["failed"],
        "rejected_by_reason": s["rejected_by_reason"],
        "ttft_p50": lat["ttft"]["p50"],
        "ttft_p99": lat["ttft"]["p99"],
        "tpot_p50": lat["tpot"]["p50"],
        "tpot_p99": lat["tpot"]["p99"],
        "e2e_p99": lat["e2e"]["p99"],
        "prefix_hit": s["cached_fraction"],
        "utilisation": {r: p["utilisation"] for r, p in pools.items()},
        "kv_moved_gb": sum(p["kv_moved_bytes"] for p in pools.values()) / 1e9,
        "disagg": dec.get("disagg"),
        "local_prefill": dec.get("colocated"),
        "misses": dict(causes),
        "unfixable": n > 0 and unfixable > (1 - ctx.target) * n,
        "worst": worst_reason(records, causes, ctx),
        "simulated_s": doc["sim"]["simulated_s"],
    }


# -- the search --------------------------------------------------------------------------------


@dataclass(slots=True)
class Search:
    """The fewest-replicas search of one shape: grow k x2 until a run meets the target, then bisect.

    With a prune `group`, the search also stops once even its next possible size would cost more
    than the cheapest fleet found so far in its group (`best_usd`), and grows no further than that.
    """

    shape: Shape
    kmax: int
    unit_usd: float = 0.0  # $/h per unit of k
    group: Any = None  # None: never pruned
    lo: int = 0  # the largest k known to miss
    hi: int | None = None  # the smallest k known to meet
    unfixable: bool = False
    pruned: bool = False
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def next_k(self, best_usd: float | None = None) -> int | None:
        if self.unfixable or self.pruned or self.kmax < 1:
            return None
        if self.hi is None:
            if self.lo >= self.kmax:
                return None
            k = 1 if self.lo == 0 else min(2 * self.lo, self.kmax)
        elif self.hi - self.lo <= 1:
            return None
        else:
            k = (self.lo + self.hi) // 2
        if best_usd is not None and self.group is not None and self.unit_usd > 0:
            cap = math.floor(best_usd / self.unit_usd + 1e-9)
            if cap <= self.lo:
                self.pruned = True
                return None
            k = min(k, cap)
        return k

    def record(self, k: int, fig: dict[str, Any]) -> None:
        self.runs[k] = fig
        if fig["met"]:
            self.hi = k if self.hi is None else min(self.hi, k)
        else:
            self.lo = max(self.lo, k)
            self.unfixable = self.unfixable or fig["unfixable"]

    @property
    def exact(self) -> bool:
        """Whether `hi` is known to be the fewest replicas that meet the target."""
        return self.hi is not None and self.hi - self.lo <= 1

    @property
    def best(self) -> dict[str, Any] | None:
        """The run that stands for the shape: its cheapest meeting run, else its largest."""
        if self.hi is not None:
            return self.runs[self.hi]
        return self.runs[max(self.runs)] if self.runs else None


def run_searches(
    searches: Sequence[Search], executor: Any, progress: sweep.Progress | None, labels: Mapping[str, str]
) -> int:
    """Drive every search to its end (each shape's next run is submitted as soon as its last is in);
    returns the simulations run."""
    submitted = done = 0
    best: dict[Any, float] = {}  # prune group -> $/h of its cheapest fleet that meets the target

    def submit(i: int) -> None:
        nonlocal submitted
        s = searches[i]
        k = s.next_k(best.get(s.group))
        if k is not None:
            executor.submit((i, k), s.shape, k)
            submitted += 1
            if progress:
                progress.submitted()

    for i in range(len(searches)):
        submit(i)
    while executor.pending():
        (i, k), fig = executor.next_done()
        s = searches[i]
        s.record(k, fig)
        if fig["met"] and s.group is not None:
            best[s.group] = min(best.get(s.group, math.inf), fig["usd_per_hour"])
        done += 1
        submit(i)
        if progress:
            reps = "+".join(map(str, s.shape.replicas(k)))
            state = "meets" if fig["met"] else "misses"
            progress.finished(
                done,
                submitted,
                f"{labels[s.shape.id]} {s.shape.policy} x{reps}: SLO met "
                f"{_pct(fig['slo_fraction'])} ({state}), {fig['wall_s']:.1f} s",
            )
    return done


# -- the plan ----------------------------------------------------------------------------------


def workload_models(spec: ServingSpec, wf: WorkloadFile) -> dict[str, str]:
    """Workload report name -> the model its calls go to (the tier router, as the simulator asks)."""
    router = spec.tier_router()
    out: dict[str, str] = {}
    for w in wf.workloads:
        name = w.name or w.type
        try:
            model = router.resolve(w.model, getattr(w, "task", None)).model
        except TierError as e:
            raise PlanError(f"workload {name}: {e}") from None
        if out.get(name, model) != model:
            raise PlanError(f"two workloads named {name!r} go to different models; give them distinct names")
        out[name] = model
    return out


@dataclass(slots=True)
class _Setup:
    ctx: Context
    planned: list[str]
    busy: list[str]
    held: dict[str, list[tuple[str, str, int]]]
    profiles: dict[str, EngineProfile]
    per_model: dict[str, dict[str, Any]]
    searches: list[Search]
    labels: dict[str, str]


def _setup(
    spec: ServingSpec,
    wf: WorkloadFile,
    *,
    rate: float | None,
    duration_s: float,
    target: float,
    profiles: Mapping[str, Sequence[EngineProfile]] | None,
    models: Sequence[str] | None,
    layouts: Sequence[str],
    ratios: Sequence[tuple[int, int]],
    policies: Sequence[str],
    max_replicas: int,
    lift_tenant_limits: bool,
    seed: int,
    unit_tokens: int | None,
    template: Template | None,
    overheads: Overheads | None,
    fixed: Sequence[tuple[Shape, int]] = (),
    prune: tuple[str, ...] | None = None,
) -> _Setup:
    """Validate the request, pick the candidate shapes and build the shared context."""
    if not 0 < target <= 1:
        raise PlanError(f"target must be a fraction in (0, 1], not {target}")
    if max_replicas < 1:
        raise PlanError(f"max_replicas must be at least 1, not {max_replicas}")
    if duration_s <= 0:
        raise PlanError(f"duration must be > 0 s, not {duration_s}")
    if rate is None and wf.shape.kind == "closed":
        raise PlanError("the workload is a closed loop (users, no rate): give --rate (jobs/s) to plan for")
    if rate is not None and rate <= 0:
        raise PlanError(f"rate must be > 0 jobs/s, not {rate}")
    known = [p.value for p in RouterPolicy]
    bad = sorted(set(policies) - set(known)) + sorted({s.policy for s, _ in fixed} - set(known))
    if bad or not policies:
        raise PlanError(f"unknown router policy {bad}; choose from {known}")
    bad = sorted(set(layouts) - set(LAYOUTS))
    if bad or not layouts:
        raise PlanError(f"unknown layout {bad}; choose from {list(LAYOUTS)}")
    named = dict(profiles or {})
    spec_models = {m.name: m for m in spec.models}
    bad = sorted({k.split("/")[0] for k in named} - set(spec_models))
    if bad:
        raise PlanError(f"--profile: unknown model(s) {bad}; the spec's models are {sorted(spec_models)}")
    bad = sorted(k for k in named if "/" in k and k.split("/", 1)[1] not in {r.value for r in Role})
    if bad:
        raise PlanError(f"--profile: {bad}: a role is colocated, prefill or decode")
    model_of = workload_models(spec, wf)
    busy = sorted(set(model_of.values()), key=list(spec_models).index)
    if fixed:
        models = sorted({s.model for s, _ in fixed})
    if models:
        bad = sorted(set(models) - set(spec_models))
        if bad:
            raise PlanError(f"--models: unknown model(s) {bad}; the spec's models are {sorted(spec_models)}")
        idle = sorted(set(models) - set(busy))
        if idle:
            raise PlanError(f"--models: no call of the workload goes to {idle}; it reaches {busy}")
        planned = [m for m in busy if m in models]
    else:
        planned = busy
    shipped = shipped_profiles()
    all_profiles: dict[str, EngineProfile] = {p.name: p for p in shipped}
    for ps in named.values():
        for p in ps:
            all_profiles[p.name] = p
    all_profiles[_IDLE.name] = _IDLE
    searches: list[Search] = []
    per_model: dict[str, dict[str, Any]] = {}
    for name in [] if fixed else planned:
        m = spec_models[name]
        cands = model_profiles(m, shipped, named)
        shapes = shapes_for(m, cands, layouts, ratios, policies)
        if not shapes:
            raise PlanError(
                f"{name}: no candidate shape (layouts {list(layouts)}, profiles "
                f"{ {r.value: [p.name for p in ps] for r, ps in cands.items()} })"
            )
        per_model[name] = {
            "profiles": {r.value: [p.name for p in ps] for r, ps in cands.items() if ps},
            "shapes": len(shapes),
        }
        for sh in shapes:
            unit = sum(
                r * all_profiles[p].gpus * all_profiles[p].gpu_hour_usd
                for r, p in zip(sh.ratio, sh.profiles, strict=True)
            )
            group = None if prune is None else (sh.model, *(getattr(sh, f) for f in prune))
            searches.append(Search(sh, sh.kmax(max_replicas), unit_usd=unit, group=group))
    for shape, _ in fixed:
        missing = [p for p in shape.profiles if p not in all_profiles]
        if missing:
            raise PlanError(f"{shape.id}: unknown profile(s) {missing}")
    held = held_fleet(spec, shipped, named, set(busy))
    for pools in held.values():
        for _, pname, _ in pools:
            if pname not in all_profiles:
                all_profiles[pname] = load_profile(pname)
    unit = unit_tokens or unit_tokens_of(wf, 128)
    loaded = {w.path: load_plan.trace_requests(w) for w in wf.workloads if w.type == "trace"}
    shapes_used = [s.shape for s in searches] + [s for s, _ in fixed]
    used = {p for s in shapes_used for p in s.profiles} | {n for ps in held.values() for _, n, _ in ps}
    ctx = Context(
        key=uuid.uuid4().hex,
        spec=simulated_spec(spec, lift_tenant_limits),
        workload=wf.model_dump(mode="json"),
        loaded=loaded,
        unit=unit,
        template=template or Template(),
        overheads=overheads or Overheads(),
        seed=seed,
        rate=rate,
        duration_s=duration_s,
        target=target,
        profiles={n: all_profiles[n].as_dict() for n in sorted(used) if n != _IDLE.name},
        held=held,
        model_of=model_of,
        slo_of={(w.name or w.type): (w.slo.ttft_s, w.slo.tpot_s) for w in wf.workloads},
    )
    labels = {s.id: s.label(all_profiles) for s in shapes_used}
    return _Setup(ctx, planned, busy, held, all_profiles, per_model, searches, labels)


def _timing(t0: float, t_setup: float, t_sims: float, use_ray: bool) -> dict[str, Any]:
    workers = 1
    if use_ray:
        import ray

        workers = int(ray.cluster_resources().get("CPU", 0))
    return {
        "setup_s": round(t_setup, 3),
        "simulations_s": round(t_sims, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "executor": "ray" if use_ray else "in-process",
        "workers": workers,
    }


PRUNE_GROUPS = ("model", "layout", "policy", "layout+policy")


def _prune_fields(prune: str | None) -> tuple[str, ...] | None:
    if prune is None:
        return None
    if prune not in PRUNE_GROUPS:
        raise PlanError(f"prune: {prune!r} is not a group; choose from {list(PRUNE_GROUPS)}")
    return () if prune == "model" else tuple(prune.split("+"))


def plan(
    spec: ServingSpec,
    wf: WorkloadFile,
    *,
    rate: float | None = None,
    duration_s: float = 60.0,
    target: float = 0.99,
    profiles: Mapping[str, Sequence[EngineProfile]] | None = None,
    models: Sequence[str] | None = None,
    layouts: Sequence[str] = LAYOUTS,
    ratios: Sequence[tuple[int, int]] = DEFAULT_RATIOS,
    policies: Sequence[str] = DEFAULT_POLICIES,
    max_replicas: int = 16,
    lift_tenant_limits: bool = False,
    seed: int = 0,
    unit_tokens: int | None = None,
    template: Template | None = None,
    overheads: Overheads | None = None,
    use_ray: bool = True,
    workers: int | None = None,
    address: str | None = None,
    progress: sweep.Progress | None = None,
    prune: str | None = None,
) -> dict[str, Any]:
    """Search the cheapest fleet shape per model (see the module docstring); the report as a dict.

    `profiles`: candidate profiles by `model` or `model/role` (default: the shipped ones that fit).
    `prune`: None (every shape's exact fewest replicas), or the group within which a shape's search
    stops once it cannot be the cheapest: 'model', 'layout', 'policy' or 'layout+policy'.
    """
    t0 = time.perf_counter()
    prune_fields = _prune_fields(prune)
    st = _setup(
        spec,
        wf,
        rate=rate,
        duration_s=duration_s,
        target=target,
        profiles=profiles,
        models=models,
        layouts=layouts,
        ratios=ratios,
        policies=policies,
        max_replicas=max_replicas,
        lift_tenant_limits=lift_tenant_limits,
        seed=seed,
        unit_tokens=unit_tokens,
        template=template,
        overheads=overheads,
        prune=prune_fields,
    )
    t_setup = time.perf_counter() - t0
    try:
        with sweep.executor(simulate_shape, st.ctx, use_ray, workers, address) as executor:
            t_start = time.perf_counter()
            n_sims = run_searches(st.searches, executor, progress, st.labels)
            t_sims = time.perf_counter() - t_start
            timing = _timing(t0, t_setup, t_sims, use_ray)
    finally:
        if progress:
            progress.close()
    return _report(
        spec,
        wf,
        st,
        max_replicas=max_replicas,
        policies=policies,
        layouts=layouts,
        ratios=ratios,
        lift=lift_tenant_limits,
        prune=prune,
        n_sims=n_sims,
        timing=timing,
    )


def evaluate(
    spec: ServingSpec,
    wf: WorkloadFile,
    runs: Sequence[tuple[Shape, int]],
    *,
    rate: float | None = None,
    duration_s: float = 60.0,
    target: float = 0.99,
    profiles: Mapping[str, Sequence[EngineProfile]] | None = None,
    lift_tenant_limits: bool = False,
    seed: int = 0,
    unit_tokens: int | None = None,
    template: Template | None = None,
    overheads: Overheads | None = None,
    use_ray: bool = True,
    workers: int | None = None,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Simulate given shapes at given scales (no search), as the planner does; their figures, in order."""
    st = _setup(
        spec,
        wf,
        rate=rate,
        duration_s=duration_s,
        target=target,
        profiles=profiles,
        models=None,
        layouts=LAYOUTS,
        ratios=DEFAULT_RATIOS,
        policies=DEFAULT_POLICIES,
        max_replicas=1,
        lift_tenant_limits=lift_tenant_limits,
        seed=seed,
        unit_tokens=unit_tokens,
        template=template,
        overheads=overheads,
        fixed=runs,
    )
    out: dict[int, dict[str, Any]] = {}
    with sweep.executor(simulate_shape, st.ctx, use_ray, workers, address) as executor:
        for i, (shape, k) in enumerate(runs):
            executor.submit(i, shape, k)
        while executor.pending():
            i, fig = executor.next_done()
            out[i] = {"shape": st.labels[runs[i][0].id], **runs[i][0].as_dict(), **fig}
    return [out[i] for i in range(len(runs))]


def _row(s: Search, labels: Mapping[str, str]) -> dict[str, Any]:
    best = s.best
    row = {"shape": labels[s.shape.id], **s.shape.as_dict(), "kmax": s.kmax, "runs": len(s.runs)}
    if best is not None:
        row.update(best)
    row.update(
        met=s.hi is not None,
        exact=s.exact,
        unfixable=s.unfixable,
        pruned=s.pruned,
        lower_bound_usd=round((s.lo + 1) * s.unit_usd, 4) if s.pruned else None,
    )
    return row


def _rank(
    searches: Sequence[Search], labels: Mapping[str, str], target: float, max_replicas: int
) -> list[dict[str, Any]]:
    rows = [_row(s, labels) for s in searches]
    feasible = sorted(
        (r for r in rows if r["met"]),
        key=lambda r: (r["usd_per_hour"], -r["slo_fraction"], r["gpus"], r["shape"], r["policy"]),
    )
    pruned = sorted((r for r in rows if not r["met"] and r["pruned"]), key=lambda r: r["lower_bound_usd"])
    others = sorted(
        (r for r in rows if not r["met"] and not r["pruned"]),
        key=lambda r: (-r.get("slo_fraction", -1), r.get("usd_per_hour", 0), r["shape"], r["policy"]),
    )
    ranked = feasible + pruned + others
    win = feasible[0] if feasible else None
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
        reps = "+".join(map(str, r["replicas"].values())) if "replicas" in r else "-"
        if r is win:
            r["why"] = "cheapest that meets the target"
        elif r["met"] and not r["exact"]:
            assert win is not None
            d = r["lower_bound_usd"] - win["usd_per_hour"]
            r["why"] = (
                f"costs at least ${d:.2f}/h more (meets at {reps} replicas; the search stopped once no "
                "smaller size could be the cheapest: --prune)"
            )
        elif r["met"]:
            assert win is not None
            d = r["usd_per_hour"] - win["usd_per_hour"]
            if d > 1e-9:
                r["why"] = f"costs ${d:.2f}/h more ({r['gpus']} vs {win['gpus']} GPUs)"
            elif r["slo_fraction"] < win["slo_fraction"]:
                ours, theirs = _pct(r["slo_fraction"]), _pct(win["slo_fraction"])
                r["why"] = f"same cost, lower SLO attainment ({ours} vs {theirs})"
            else:
                r["why"] = "ties with the winner (ranked by fewer GPUs, then name)"
        elif r["kmax"] < 1:
            r["why"] = f"its ratio needs more than --max-replicas {max_replicas} in one pool"
        elif r["unfixable"]:
            r["why"] = (
                f"cannot meet {target:.3g} at any size: {r['worst']} (admission's tenant limits or "
                "unservable calls, not capacity; see --no-tenant-limits)"
            )
        elif r["pruned"]:
            assert win is not None
            d = r["lower_bound_usd"] - win["usd_per_hour"]
            r["why"] = (
                f"costs at least ${d:.2f}/h more: misses at {reps} replicas ({r['worst']}), and the next "
                "size already costs more than its group's cheapest (--prune)"
            )
        else:
            r["why"] = (
                f"misses {target:.3g} even at {reps} replicas (--max-replicas {max_replicas}): {r['worst']}"
            )
    return ranked


def _report(
    spec: ServingSpec,
    wf: WorkloadFile,
    st: _Setup,
    *,
    max_replicas: int,
    policies: Sequence[str],
    layouts: Sequence[str],
    ratios: Sequence[tuple[int, int]],
    lift: bool,
    prune: str | None,
    n_sims: int,
    timing: Mapping[str, Any],
) -> dict[str, Any]:
    ctx, searches, labels, profiles, planned = st.ctx, st.searches, st.labels, st.profiles, st.planned
    models: dict[str, Any] = {}
    fleet_pools = []
    for name in planned:
        ranked = _rank([s for s in searches if s.shape.model == name], labels, ctx.target, max_replicas)
        win = ranked[0] if ranked and ranked[0]["met"] else None
        models[name] = {**st.per_model[name], "winner": win, "ranked": ranked}
        if win is not None:
            for role, n in win["replicas"].items():
                prof = profiles[win["profiles"][list(win["replicas"]).index(role)]]
                fleet_pools.append(
                    {
                        "model": name,
                        "role": role,
                        "profile": prof.name,
                        "replicas": n,
                        "gpus": n * prof.gpus,
                        "usd_per_hour": n * prof.gpus * prof.gpu_hour_usd,
                    }
                )
    sims = []
    for s in searches:
        for k in sorted(s.runs):
            sims.append({"shape": labels[s.shape.id], **s.shape.as_dict(), **s.runs[k]})
    complete = all(models[m]["winner"] is not None for m in planned)
    return {
        "planner": {
            "rate": ctx.rate,
            "duration_s": ctx.duration_s,
            "target": ctx.target,
            "seed": ctx.seed,
            "unit_tokens": ctx.unit,
            "max_replicas": max_replicas,
            "policies": list(policies),
            "layouts": list(layouts),
            "ratios": [list(r) for r in ratios],
            "no_tenant_limits": lift,
            "prune": prune,
            "overheads": {"ttft_s": ctx.overheads.ttft_s, "slowdown": ctx.overheads.slowdown},
            "template": {"base": ctx.template.base, "per_message": ctx.template.per_message},
        },
        "workload": {"mix": wf.mix(), "shape": wf.shape.model_dump(), "models": ctx.model_of},
        "planned": planned,
        "held": {
            m: [{"role": r, "profile": p, "replicas": n} for r, p, n in pools]
            for m, pools in st.held.items()
            if m not in planned
        },
        "idle_models": [m.name for m in spec.models if m.name not in st.busy],
        "models": models,
        "fleet": {
            "complete": complete,
            "pools": fleet_pools,
            "gpus": sum(p["gpus"] for p in fleet_pools),
            "usd_per_hour": round(sum(p["usd_per_hour"] for p in fleet_pools), 4),
        },
        "simulations": sims,
        "simulations_run": n_sims,
        "timing": timing,
    }


# -- the report --------------------------------------------------------------------------------


def _n(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _util(u: Mapping[str, float] | None) -> str:
    if not u:
        return "-"
    if "colocated" in u:
        return f"{u['colocated']:.0%}"
    return f"{u.get('prefill', 0):.0%}/{u.get('decode', 0):.0%}"


def render(report: Mapping[str, Any], show: int = 12) -> str:
    """The plan as text: per model, the winner, then a table of the runners-up and why each loses."""
    p = report["planner"]
    lines = []
    rate = f"{p['rate']:g} jobs/s" if p["rate"] is not None else "the workload's own arrivals"
    lines.append(
        f"plan: {rate} for {p['duration_s']:g} s simulated; target {p['target']:.3g} of requests within "
        f"their SLOs; up to {p['max_replicas']} replicas a pool; {report['simulations_run']} simulations in "
        f"{report['timing']['simulations_s']:.1f} s ({report['timing']['executor']}, "
        f"{_n(report['timing']['workers'], 'worker')})"
    )
    for m, pools in report["held"].items():
        held = ", ".join(f"{x['role']} {x['replicas']} x {x['profile']}" for x in pools)
        idle = " (no calls reach it)" if m in report["idle_models"] else ""
        lines.append(f"  {m}: held at {held}{idle}")
    for name, mm in report["models"].items():
        win = mm["winner"]
        lines.append("")
        cands = "; ".join(f"{r}: {', '.join(ps)}" for r, ps in mm["profiles"].items())
        lines.append(f"{name}: {mm['shapes']} shapes (profiles {cands})")
        if win is None:
            lines.append(f"  NO shape meets {p['target']:.3g} within --max-replicas {p['max_replicas']}")
        else:
            reps = " + ".join(f"{n} {r}" for r, n in win["replicas"].items())
            lines.append(
                f"  cheapest: {win['shape']}, {win['policy']}: {reps} ({', '.join(win['profiles'])}) = "
                f"{_n(win['gpus'], 'GPU')}, ${win['usd_per_hour']:.2f}/h; SLO met "
                f"{_pct(win['slo_fraction'])} of {win['requests']}, goodput {win['goodput_rps']:.3g}/s "
                f"({win['goodput_rps'] / win['gpus']:.3g}/s per GPU)"
            )
        head = (
            "#",
            "shape",
            "policy",
            "replicas",
            "GPUs",
            "$/h",
            "SLO met",
            "TTFT p50/p99",
            "TPOT p99",
            "prefix hit",
            "util",
            "why",
        )
        rows = []
        for r in mm["ranked"][:show]:
            if "requests" not in r:
                rows.append(
                    (
                        str(r["rank"]),
                        r["shape"],
                        r["policy"],
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        r["why"],
                    )
                )
                continue
            rows.append(
                (
                    str(r["rank"]),
                    r["shape"],
                    r["policy"],
                    "+".join(map(str, r["replicas"].values())),
                    str(r["gpus"]),
                    f"{r['usd_per_hour']:.2f}",
                    _pct(r["slo_fraction"]),
                    f"{_secs(r['ttft_p50'])}/{_secs(r['ttft_p99'])}",
                    _secs(r["tpot_p99"]),
                    f"{r['prefix_hit']:.0%}",
                    _util(r["utilisation"]),
                    r["why"],
                )
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i in (1, 2, 11) else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append("  " + fmt.format(*head).rstrip())
        for row in rows:
            lines.append("  " + fmt.format(*row).rstrip())
        if len(mm["ranked"]) > show:
            lines.append(f"  ... {len(mm['ranked']) - show} more shapes in --json")
    f = report["fleet"]
    lines.append("")
    if f["pools"]:
        pools = ", ".join(f"{x['model']}/{x['role']} {x['replicas']} x {x['profile']}" for x in f["pools"])
        lines.append(
            f"fleet: {pools} = {_n(f['gpus'], 'GPU')}, ${f['usd_per_hour']:.2f}/h"
            + ("" if f["complete"] else " (incomplete: a model has no shape meeting the target)")
        )
    else:
        lines.append("fleet: none (no model has a shape that meets the target)")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ratios(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for item in _csv(text):
        a, sep, b = item.partition(":")
        try:
            p, d = int(a), int(b)
        except ValueError:
            p = d = 0
        if not sep or p < 1 or d < 1:
            raise argparse.ArgumentTypeError(
                f"bad ratio {item!r}: want PREFILL:DECODE whole numbers >= 1, e.g. 1:2"
            )
        g = math.gcd(p, d)
        if (p // g, d // g) not in out:
            out.append((p // g, d // g))
    if not out:
        raise argparse.ArgumentTypeError("no ratio given")
    return out


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want a fraction in (0, 1], e.g. 0.99")
    return v


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests plan",
        description="Capacity planner: the cheapest simulated fleet shape that meets a workload's SLOs.",
    )
    p.add_argument("--workload", required=True, help="workload file (YAML), as `loadtests run` takes")
    p.add_argument("--rate", type=_positive(float), help="jobs/s to plan for (default: the file's own shape)")
    p.add_argument("--duration", type=_positive(float), default=60.0, help="simulated seconds per run (60)")
    p.add_argument(
        "--target",
        type=_fraction,
        default=0.99,
        help="fraction of requests that must meet their SLOs (0.99; rejections are misses)",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"deployment spec ({DEFAULT_CONFIG})")
    p.add_argument("--calibration", help="calibration file (python -m loadtests calibrate)")
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="MODEL[/ROLE]=PROFILE[,PROFILE...]",
        help="candidate engine profiles of a model (shipped names or .yaml paths)",
    )
    p.add_argument(
        "--models", type=_csv, help="plan only these models (default: every one the workload reaches)"
    )
    p.add_argument("--layouts", type=_csv, default=list(LAYOUTS), help="colocated,pd (both)")
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=list(DEFAULT_RATIOS),
        help="P/D prefill:decode ratios (1:1,1:2,2:1,1:3,3:1)",
    )
    p.add_argument(
        "--policies",
        type=_csv,
        default=list(DEFAULT_POLICIES),
        help="router policies (cache_aware,power_of_two,round_robin; also consistent_hash)",
    )
    p.add_argument("--max-replicas", type=_positive(int), default=16, help="most replicas in one pool (16)")
    p.add_argument(
        "--no-tenant-limits", action="store_true", help="lift every tenant's token bucket and in-flight cap"
    )
    p.add_argument(
        "--prune",
        choices=PRUNE_GROUPS,
        help="stop a shape's search once it cannot be the cheapest of its group (default: every shape exact)",
    )
    p.add_argument(
        "--unit-tokens", type=_positive(int), help="tokens per block key (default: trace block, else 128)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every simulation, the winners and the ranked lists here")
    p.add_argument("--show", type=_positive(int), default=12, help="rows of each model's table (12)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_positive(int), help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--address", help="join this Ray cluster (e.g. auto, inside a Ray job)")
    g.add_argument("--no-ray", action="store_true", help="run the simulations in this process")
    return p


def _profiles_arg(items: Iterable[str]) -> dict[str, list[EngineProfile]]:
    out: dict[str, list[EngineProfile]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise PlanError(f"--profile {item!r}: expected MODEL[/ROLE]=PROFILE[,PROFILE...]")
        out.setdefault(key, []).extend(load_profile(v) for v in _csv(value))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from loadtests.sim import calibrate as cal

        spec = load_spec(args.config)
        wf = load_workload(args.workload)
        template, overheads = cal.load(args.calibration) if args.calibration else (None, None)
        report = plan(
            spec,
            wf,
            rate=args.rate,
            duration_s=args.duration,
            target=args.target,
            profiles=_profiles_arg(args.profile),
            models=args.models,
            layouts=args.layouts,
            ratios=args.ratios,
            policies=args.policies,
            max_replicas=args.max_replicas,
            lift_tenant_limits=args.no_tenant_limits,
            seed=args.seed,
            unit_tokens=args.unit_tokens,
            template=template,
            overheads=overheads,
            use_ray=not args.no_ray,
            workers=args.workers,
            address=args.address,
            progress=sweep.Progress(),
            prune=args.prune,
        )
    except (PlanError, WorkloadError, SpecError, ProfileError, traces.TraceError, OSError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    report["planner"].update(workload=args.workload, config=args.config, calibration=args.calibration)
    print(render(report, args.show), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"plan: wrote {args.json}", flush=True)
    return 0 if report["fleet"]["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
