"""Capacity: P/D vs colocated goodput per GPU at SLO, and the router policies, on the Mooncake trace.

    python -m benchmarks.capacity [--json FILE] [--plots DIR] [--workers N | --no-ray]
        [--config configs/cluster-8b-70b.yaml] [--workload loadtests/workloads/mooncake-cluster.yaml]
        [--target 0.99] [--ratios 1:1,2:1,3:1] [--max-replicas 12] [--tenant-limits] [--seed 0]

Method
------
Everything here is simulated (`loadtests.sim`: the real tier router, admission controller, router
policies and P/D decider over modelled engines, on a virtual clock); the engines are the shipped
H100 profiles of Llama-3.3-70B FP8 at TP4 and TP8 (`loadtests/sim/profiles/`, derived from published
figures, each term's derivation in the file), at $3.02 per GPU-hour.

**Traffic**: `loadtests/workloads/mooncake-cluster.yaml`: the Mooncake conversation trace (Qin et al.,
"Mooncake: Trading More Storage for Less Computation - A KVCache-centric Architecture for Serving
LLM Chatbot", USENIX FAST 2025; `FAST25-release/traces/conversation_trace.jsonl` of
github.com/kvcache-ai/Mooncake, Apache-2.0; `/work/shared/traces/README.md`) at full size
(`token_scale` 1.0, prompts capped at 30,000 tokens), its first 10,000 requests replayed at their
own timestamps (about 49 minutes, 3.4 requests/s, with the trace's bursts), all to the 70B model of
`configs/cluster-8b-70b.yaml`, SLO TTFT 3 s and TPOT 0.1 s per request. The trace's 512-token
`hash_ids` are the prompts' prefix blocks (shared blocks hit the prefix cache). It is long-input
traffic: prompts of 10,210 tokens on average (median 7,061) against 345 output tokens.

**(1) P/D vs colocated**: `loadtests.sim.planner.plan` over every shape of the 70B: colocated on
TP4 or TP8 replicas, and P/D with prefill and decode each on TP4 or TP8 at every `--ratios`
prefill:decode ratio, each with each router policy (cache_aware, power_of_two, round_robin), at
the fewest replicas for which at least `--target` of the requests meet both SLOs (exponential
growth, then bisection on the replica count). The search is pruned per (layout, policy)
(`--prune layout+policy`): a shape stops once it cannot be the cheapest of its layout and policy,
so each (layout, policy)'s cheapest fleet is exact and the others are bounds. For each layout (with
its best policy, and with each policy) the cheapest fleet is reported with its goodput per GPU
(requests meeting the SLOs per second / GPUs), next to the spec's own fleet (2 prefill TP4 + 1
decode TP8 at start, 4 + 4 at `replicas.max`; simulated, not searched). The tenant token bucket is
lifted (`--no-tenant-limits` of the planner; `--tenant-limits` keeps the spec's 50,000 tokens/s):
a tenant's rate limit is a policy, not a capacity, and this traffic (~35k prompt tokens/s, in
bursts) would hit it.

**(2) Routing**: the overall winner's fleet, unchanged, with each router policy: prefix-hit rate
(cached / prompt tokens), p50/p99 TTFT and SLO attainment; and each policy's own cheapest fleet of
that layout, from (1).

Admission is simulated as the cluster enforces it (the planner's single controller holds the
cluster-wide limits). `--plots DIR` writes `sim-pd-vs-colocated.png` and `sim-routing.png`
(`--plots docs/img` for the README's). A default run is ~115 simulations of 10,000 requests as Ray
tasks: ~100 s on 2 idle cores, ~4-5 minutes when they are shared.

Findings
--------
Seed 0, target 0.99 (every figure is deterministic for the seed):

* **P/D wins**: the cheapest fleet is P/D 3:1, prefill 3 x TP8 + decode 1 x TP4 (28 GPUs, $84.56/h;
  99.51 % within SLO with round_robin, 99.28 % with cache_aware), 0.1185 goodput/s per GPU. The
  cheapest colocated fleet is 8 x TP4 with round_robin (32 GPUs, $96.64/h, 0.1033/s per GPU): P/D
  gives 1.15x the goodput per GPU. With the cache-aware router on both, colocated needs 11 x TP8
  (88 GPUs; TP4 misses even at 12) and P/D gives 3.14x. The TP8 prefill replicas are what make P/D
  cheap: prefill on TP4 needs 10-12 replicas for the 3 s TTFT on 30k-token prompts (60-80 GPUs).
* **The spec's own fleet is too small for this traffic**: 2 + 1 replicas (16 GPUs) meet the SLOs
  for 58 % of requests (TTFT p99 10 s); even at its `replicas.max` (4 + 4, 48 GPUs) 95.5 % (TTFT
  p99 4.4 s): the TP4 prefill side is the bottleneck, and the planner's answer flips the TPs.
* **Routing**: on the winner's fleet cache_aware doubles the prefix-hit rate (23.9 % vs 12.0 /
  11.9 % for power_of_two / round_robin) but not the SLO attainment (99.28 % vs 98.62 / 99.51 %;
  TTFT p99 2.83 vs 3.24 / 2.68 s), and colocated it needs 2.75x round robin's GPUs (88 vs 32). Its
  imbalance gate counts requests (ratio 1.25, slack 3, tuned on short agent turns in
  `benchmarks.router_quality`); with ~10k-token prompts a replica 3 requests over the mean holds
  seconds of queued prefill, so affinity to a shared prefix costs more TTFT than the hit saves.
  power_of_two, which only sees the 1 s-old load reports, herds and is the worst of the three.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common import BenchmarkError, load_average, machine_info, run_main
from loadtests import plan as load_plan
from loadtests.sim import planner, sweep
from loadtests.sim.planner import PlanError, Shape
from loadtests.sim.profile import shipped_profiles
from loadtests.workload import load_workload
from router.contracts import Role
from serving.config import load_spec

MODEL = "llama-3.3-70b-instruct"
POLICIES = ("cache_aware", "power_of_two", "round_robin")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cluster-8b-70b.yaml", help="deployment spec")
    p.add_argument("--workload", default="loadtests/workloads/mooncake-cluster.yaml", help="workload file")
    p.add_argument("--model", default=MODEL, help="the model to size")
    p.add_argument("--target", type=float, default=0.99, help="fraction of requests within their SLOs")
    p.add_argument("--ratios", default="1:1,2:1,3:1", help="P/D prefill:decode ratios")
    p.add_argument("--max-replicas", type=int, default=12, help="most replicas in one pool")
    p.add_argument("--duration", type=float, help="simulated seconds (default: the workload's duration_s)")
    p.add_argument("--tenant-limits", action="store_true", help="keep the spec's tenant token buckets")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--no-ray", action="store_true", help="simulate in this process")
    p.add_argument("--plots", type=Path, help="write the PNG plots into this directory (e.g. docs/img)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.ratios = planner._ratios(args.ratios)
    except argparse.ArgumentTypeError as e:
        p.error(f"--ratios: {e}")
    if not 0 < args.target <= 1 or args.max_replicas < 1:
        p.error("--target must be in (0, 1] and --max-replicas >= 1")
    return args, args.json


def _trace_stats(wf) -> dict[str, Any]:
    (w,) = wf.workloads
    reqs = load_plan.trace_requests(w)
    inp = [r.input_tokens for r in reqs]
    span = (reqs[-1].t_s - reqs[0].t_s) / w.time_scale
    return {
        "requests": len(reqs),
        "span_s": round(span, 1),
        "rate_per_s": round(len(reqs) / span, 3) if span else None,
        "input_tokens_mean": round(statistics.fmean(inp)),
        "input_tokens_p50": round(statistics.median(inp)),
        "input_tokens_max": max(inp),
        "output_tokens_mean": round(statistics.fmean(r.output_tokens for r in reqs)),
        "capped_at": w.max_input_tokens,
    }


def _group_best(ranked: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cheapest meeting row per layout and per (layout, policy): `layout` / `layout/policy`."""
    out: dict[str, Any] = {}
    for r in ranked:  # cheapest first
        if r["met"]:
            out.setdefault(r["layout"], r)
            out.setdefault(f"{r['layout']}/{r['policy']}", r)
    return out


def spec_shapes(spec, model: str) -> dict[str, tuple[Shape, int]]:
    """The spec's own fleet of `model` at its initial and its largest size, as (shape, k)."""
    m = spec.model(model)
    (held,) = [v for k, v in planner.held_fleet(spec, shipped_profiles(), {}, {model}).items() if k == model]
    order = [Role.COLOCATED] if not m.disaggregated else [Role.PREFILL, Role.DECODE]
    prof = {role: name for role, name, _ in held}
    out = {}
    for what, counts in (
        ("initial", [m.pool(r).replicas.start for r in order]),
        ("max", [m.pool(r).replicas.max for r in order]),
    ):
        g = math.gcd(*counts)
        layout = "colocated" if order == [Role.COLOCATED] else "pd"
        shape = Shape(
            model, layout, tuple(prof[r.value] for r in order), tuple(c // g for c in counts), "cache_aware"
        )
        out[what] = (shape, g)
    return out


def _summary(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    keys = (
        "shape",
        "layout",
        "profiles",
        "ratio",
        "policy",
        "replicas",
        "gpus",
        "usd_per_hour",
        "requests",
        "slo_fraction",
        "goodput_rps",
        "ttft_p50",
        "ttft_p99",
        "tpot_p99",
        "prefix_hit",
        "utilisation",
        "kv_moved_gb",
        "disagg",
        "local_prefill",
        "rejected",
        "worst",
        "met",
    )
    out = {k: r.get(k) for k in keys}
    out["goodput_per_gpu"] = r["goodput_rps"] / r["gpus"] if r.get("gpus") else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    load = load_average()
    spec = load_spec(args.config)
    wf = load_workload(args.workload)
    duration = args.duration or wf.duration_s
    trace = _trace_stats(wf)
    if trace["span_s"] > duration:
        raise BenchmarkError(f"--duration {duration:g} s is shorter than the replay ({trace['span_s']} s)")
    common = dict(
        rate=None,
        duration_s=duration,
        target=args.target,
        lift_tenant_limits=not args.tenant_limits,
        seed=args.seed,
        use_ray=not args.no_ray,
        workers=args.workers,
    )
    phases: dict[str, float] = {}
    try:
        with sweep.ray_session(args.workers) if not args.no_ray else nullcontext():
            # (1) every shape and policy; each (layout, policy)'s cheapest searched exactly.
            t = time.perf_counter()
            planned = planner.plan(
                spec,
                wf,
                models=[args.model],
                policies=list(POLICIES),
                ratios=args.ratios,
                max_replicas=args.max_replicas,
                prune="layout+policy",
                progress=sweep.Progress(),
                **common,
            )
            phases["plan_s"] = round(time.perf_counter() - t, 1)
            timing = planned["timing"]
            ranked = planned["models"][args.model]["ranked"]
            win = planned["models"][args.model]["winner"]
            if win is None:
                raise BenchmarkError(
                    f"no shape of {args.model} meets {args.target} within {args.max_replicas}"
                )
            # (2) the winner's fleet with each policy; and the spec's own fleets for reference.
            t = time.perf_counter()
            base = Shape.from_dict(win)
            same = [
                (Shape(base.model, base.layout, base.profiles, base.ratio, p), win["k"]) for p in POLICIES
            ]
            own_spec = spec_shapes(spec, args.model)
            figs = planner.evaluate(spec, wf, same + list(own_spec.values()), **common)
            phases["fixed_fleets_s"] = round(time.perf_counter() - t, 1)
    except PlanError as e:
        raise BenchmarkError(str(e)) from None
    best = _group_best(ranked)
    routing = []
    for fig in figs[: len(POLICIES)]:
        cheapest = best.get(f"{base.layout}/{fig['policy']}")
        routing.append(
            {"policy": fig["policy"], "same_fleet": _summary(fig), "own_fleet": _summary(cheapest)}
        )
    result = {
        "benchmark": "capacity",
        "config": {
            "spec": args.config,
            "workload": args.workload,
            "model": args.model,
            "target": args.target,
            "ratios": [list(r) for r in args.ratios],
            "max_replicas": args.max_replicas,
            "duration_s": duration,
            "tenant_limits": args.tenant_limits,
            "seed": args.seed,
            "executor": "in-process" if args.no_ray else "ray",
            "workers": timing["workers"],
        },
        "trace": trace,
        "cheapest": {k: _summary(v) for k, v in best.items()},
        "winner": _summary(win),
        "spec_fleet": {k: _summary(v) for k, v in zip(own_spec, figs[len(POLICIES) :], strict=True)},
        "routing": routing,
        "plan": {"ranked": [_summary(r) | {"why": r["why"], "rank": r["rank"]} for r in ranked]},
        "simulations": planned["simulations_run"] + len(figs),
        "sim_wall_s_mean": round(statistics.fmean(s["wall_s"] for s in planned["simulations"]), 2),
        "phases": phases,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "load_average_before": load,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }
    if args.plots:
        result["plots"] = plot(result, args.plots)
    return result


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _reps(x: dict[str, Any]) -> str:
    return "+".join(map(str, x["replicas"].values()))


def _line(label: str, x: dict[str, Any]) -> str:
    return (
        f"| {label} | {x['shape']} | {_reps(x)} | {x['gpus']} | {x['usd_per_hour']:.2f} | "
        f"{x['slo_fraction']:.2%} | "
        f"{x['goodput_rps']:.3f} | {x['goodput_per_gpu']:.4f} | {_s(x['ttft_p50'])} / {_s(x['ttft_p99'])} | "
        f"{x['tpot_p99'] * 1000:.0f} ms | {x['prefix_hit']:.1%} |"
    )


def format_report(r: dict[str, Any]) -> str:
    t, c, best = r["trace"], r["config"], r["cheapest"]
    lines = [
        f"Capacity of {c['model']} ({c['spec']}) on {c['workload']}: {t['requests']} requests over "
        f"{t['span_s']:.0f} s ({t['rate_per_s']} /s), prompts mean {t['input_tokens_mean']} / median "
        f"{t['input_tokens_p50']} tokens (capped at {t['capped_at']}), output mean "
        f"{t['output_tokens_mean']}; target {c['target']} of requests within TTFT 3 s and TPOT 0.1 s",
        "",
        "(1) P/D vs colocated: the cheapest fleet that meets the target, per layout and router policy",
        "",
        "| layout / policy | shape | replicas | GPUs | $/h | SLO met | goodput/s | goodput/s per GPU |"
        " TTFT p50 / p99 | TPOT p99 | prefix hit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in ("colocated", "pd"):
        if layout in best:
            lines.append(_line(f"**{layout}** (any policy)", best[layout]))
        for p in POLICIES:
            if f"{layout}/{p}" in best:
                lines.append(_line(f"{layout} / {p}", best[f"{layout}/{p}"]))
    for what, x in r["spec_fleet"].items():
        lines.append(_line(f"spec's {what} fleet (not searched)", x))
    if "pd" in best and "colocated" in best:
        ratio = best["pd"]["goodput_per_gpu"] / best["colocated"]["goodput_per_gpu"]
        same = best.get("colocated/cache_aware"), best.get("pd/cache_aware")
        lines += [
            "",
            f"P/D goodput per GPU = {ratio:.2f} x colocated's at the SLO (each with its best router)",
        ]
        if all(same):
            ca = same[1]["goodput_per_gpu"] / same[0]["goodput_per_gpu"]
            lines[-1] += f"; {ca:.2f} x with the cache-aware router on both."
    for what, x in r["spec_fleet"].items():
        if not x["met"]:
            lines.append(f"The spec's {what} fleet misses the target: {x['worst']}.")
    w = r["winner"]
    lines += [
        "",
        f"(2) Routing on the winner's fleet ({w['shape']}, {_reps(w)} replicas, {w['gpus']} GPUs, chosen "
        f"with {w['policy']})",
        "",
        "| policy | prefix hit | TTFT p50 | TTFT p99 | TPOT p99 | SLO met | its cheapest "
        f"{w['layout']} fleet |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["routing"]:
        x, own = row["same_fleet"], row["own_fleet"]
        fleet = (
            f"{own['shape']} x {_reps(own)}, {own['gpus']} GPUs, ${own['usd_per_hour']:.2f}/h" if own else "-"
        )
        lines.append(
            f"| {row['policy']} | {x['prefix_hit']:.1%} | {_s(x['ttft_p50'])} | {_s(x['ttft_p99'])} | "
            f"{x['tpot_p99'] * 1000:.0f} ms | {x['slo_fraction']:.2%} | {fleet} |"
        )
    ph = r["phases"]
    lines += [
        "",
        f"{r['simulations']} simulations ({r['sim_wall_s_mean']:.2f} s each on average) in "
        f"{r['elapsed_s']:.0f} s ({c['executor']}, {c['workers']} workers; plan {ph['plan_s']:.0f} s, fixed "
        f"fleets {ph['fixed_fleets_s']:.0f} s); load average {r['load_average_before']} -> "
        f"{r['load_average_after']}",
    ]
    if r.get("plots"):
        lines.append("plots: " + ", ".join(r["plots"]))
    return "\n".join(lines)


def plot(r: dict[str, Any], out: Path) -> list[str]:
    """`sim-pd-vs-colocated.png` and `sim-routing.png` in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    c, best = r["config"], r["cheapest"]
    title = f"{c['model']}, Mooncake conversation trace ({r['trace']['requests']} requests), simulated"
    paths = []

    rows = [
        (f"{lay} / {p}", best[f"{lay}/{p}"])
        for lay in ("pd", "colocated")
        for p in POLICIES
        if f"{lay}/{p}" in best
    ]
    rows += [(f"spec's {k} fleet", v) for k, v in r["spec_fleet"].items()]
    names = [n for n, _ in rows]
    colours = ["tab:blue" if "pd" in n.split(" ")[0] else "tab:orange" for n, _ in rows]
    colours = [
        col if not n.startswith("spec") else "tab:gray" for col, (n, _) in zip(colours, rows, strict=True)
    ]
    vals = [v["goodput_per_gpu"] for _, v in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    hatch = ["" if v["met"] else "//" for _, v in rows]
    a.barh(names, vals, color=colours, hatch=hatch)
    for i, (_, v) in enumerate(rows):
        met = "" if v["met"] else f", misses: {v['slo_fraction']:.1%} met"
        a.text(vals[i], i, f" {v['shape']} x {_reps(v)} = {v['gpus']} GPUs{met}", va="center", fontsize=7.5)
    a.invert_yaxis()
    a.set_xlim(0, max(vals) * 1.9)
    a.set_xlabel("goodput per GPU (requests meeting the SLOs / s / GPU)")
    a.set_title(f"cheapest fleet meeting {c['target']:.0%} within TTFT 3 s and TPOT 0.1 s", fontsize=9)
    b.barh(names, [v["usd_per_hour"] for _, v in rows], color=colours, hatch=hatch)
    b.invert_yaxis()
    b.set_yticks([])
    b.set_xlabel(r"\$ / hour (GPUs x \$3.02)")
    fig.suptitle(title + ": P/D (blue), colocated (orange), the spec's own (grey)", fontsize=10)
    fig.tight_layout()
    p = out / "sim-pd-vs-colocated.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    rows = r["routing"]
    pol = [x["policy"] for x in rows]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    axes[0].bar(pol, [x["same_fleet"]["prefix_hit"] * 100 for x in rows], color="tab:green")
    axes[0].set_ylabel("prefix-cache hit (% of prompt tokens)")
    axes[1].bar(pol, [x["same_fleet"]["ttft_p99"] for x in rows], color="tab:red")
    axes[1].axhline(3.0, color="k", ls="--", lw=1, label="SLO 3 s")
    axes[1].set_ylabel("TTFT p99 (s)")
    axes[1].legend(fontsize=8)
    met = [x["same_fleet"]["slo_fraction"] * 100 for x in rows]
    axes[2].bar(pol, met, color="tab:cyan")
    axes[2].axhline(c["target"] * 100, color="k", ls="--", lw=1, label=f"target {c['target']:.0%}")
    axes[2].set_ylim(min(met + [c["target"] * 100]) - 2, 100.5)
    axes[2].set_ylabel("requests within SLOs (%)")
    axes[2].legend(fontsize=8)
    costs = [x["own_fleet"]["usd_per_hour"] if x["own_fleet"] else 0 for x in rows]
    axes[3].bar(pol, costs, color="tab:purple")
    for i, x in enumerate(rows):
        label = f"{x['own_fleet']['gpus']} GPUs" if x["own_fleet"] else "none\nmeets"
        axes[3].text(i, costs[i], label, ha="center", va="bottom", fontsize=8)
    axes[3].set_ylim(0, max(costs + [1]) * 1.2)
    axes[3].set_ylabel(r"\$ / hour of its cheapest fleet")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7.5)
    w = r["winner"]
    fig.suptitle(f"{title}: routing on the winner's fleet, {w['shape']} x {_reps(w)}", fontsize=10)
    fig.tight_layout()
    p = out / "sim-routing.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
