"""`python -m loadtests sim | calibrate | plan | fit-profile`: the simulator's commands.

    python -m loadtests sim --workload loadtests/workloads/agent-intent.yaml [--config configs/local.yaml]
        [--profile MODEL[/POOL]=PROFILE ...] [--replicas MODEL/POOL=N ...] [--policy NAME]
        [--rate R] [--duration S] [--calibration FILE] [--search] [--out DIR]
    python -m loadtests calibrate --workload W --summary RUN/summary.json --out CAL.json [...]
    python -m loadtests plan ...        (see loadtests/sim/planner.py)
    python -m loadtests fit-profile ... (see loadtests/sim/fit.py)

`sim` writes the same `summary.json` (plus a `sim` section) and HTML report as `loadtests run`, so a
simulated and a measured run can be laid side by side; `--search` runs the same capacity search
(`loadtests.search`) over simulated trials.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtests import plan, search
from loadtests.sim import calibrate as cal
from loadtests.sim.calls import Jobs, Template, unit_tokens_of
from loadtests.sim.cluster import Overheads, SimOptions, Simulation, quantile
from loadtests.sim.fleet import Fleet, assignments, fleet_from_spec
from loadtests.sim.profile import ProfileError
from loadtests.summary import search_section, summary
from loadtests.workload import WorkloadError, WorkloadFile, load_workload
from serving.config import ServingSpec, SpecError, load_spec

DEFAULT_CONFIG = "configs/local.yaml"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments every simulator command shares: what to simulate."""
    p.add_argument("--workload", required=True, help="workload file (YAML), as `loadtests run` takes")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="deployment spec (tiers, routing, pools)")
    p.add_argument("--profile", action="append", default=[], metavar="MODEL[/POOL]=PROFILE",
                   help="engine profile of a model's pools (a shipped name or a .yaml)")  # fmt: skip
    p.add_argument("--replicas", action="append", default=[], metavar="MODEL/POOL=N", help="replica count")
    p.add_argument("--policy", help="router policy of every model (default: the spec's)")
    p.add_argument("--calibration", help="calibration file (python -m loadtests calibrate)")
    p.add_argument("--unit-tokens", type=int, help="tokens per block key (default: trace block, else 128)")
    p.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace) -> tuple[ServingSpec, WorkloadFile, Fleet, Jobs, SimOptions]:
    """Spec, workload, fleet, jobs and options from the shared arguments."""
    spec = load_spec(args.config)
    wf = load_workload(args.workload)
    fleet = fleet_from_spec(
        spec, assignments(args.profile, "profile"),
        {k: int(v) for k, v in assignments(args.replicas, "replicas").items()},
    )  # fmt: skip
    template, overheads = cal.load(args.calibration) if args.calibration else (Template(), Overheads())
    unit = args.unit_tokens or unit_tokens_of(wf, 128)
    loaded = {w.path: plan.trace_requests(w) for w in wf.workloads if w.type == "trace"}
    jobs = Jobs(wf, unit, template, loaded)
    opts = SimOptions(unit_tokens=unit, overheads=overheads, seed=args.seed, policy=args.policy)
    return spec, wf, fleet, jobs, opts


def simulate(spec: ServingSpec, fleet: Fleet, jobs: Jobs, opts: SimOptions, **kw: Any) -> dict[str, Any]:
    """One simulated run (a fresh `Jobs` each time, so every run of a seed is the same)."""
    fresh = Jobs(jobs.wf, jobs.unit, jobs.template, jobs.loaded)
    return Simulation(spec, fleet, opts).run(fresh, **kw)


def _line(doc: dict[str, Any]) -> str:
    t, p = doc["latency"]["ttft"], doc["latency"]["tpot"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"

    return (
        f"{doc['requests']} requests, {doc['ok']} ok, {doc['rejected']} rejected; SLO met "
        f"{doc['slo_fraction']:.1%}; TTFT p50/p99 {ms(t['p50'])}/{ms(t['p99'])} ms, TPOT p50/p99 "
        f"{ms(p['p50'])}/{ms(p['p99'])} ms; prefix hits {doc['cached_fraction']:.1%}"
    )


def cmd_sim(args: argparse.Namespace) -> int:
    spec, wf, fleet, jobs, opts = setup(args)
    out = Path(args.out or "results/sim")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"simulated": True, "workload": args.workload, "config": args.config,
            "fleet": {f"{m}/{r.value}": f"{s.replicas} x {s.profile.name}" for m, ps in fleet.items()
                      for r, s in ps.items()}}  # fmt: skip
    t0 = time.perf_counter()
    if not args.search:
        doc = simulate(spec, fleet, jobs, opts, rate=args.rate, duration_s=args.duration, label="sim")
        print(f"sim: {_line(doc)} ({time.perf_counter() - t0:.1f} s)", flush=True)
        full = summary([doc], **meta)
    else:
        runs: list[dict[str, Any]] = []

        def trial(rate: float) -> search.Trial:
            o = SimOptions(opts.unit_tokens, opts.overheads, opts.seed + len(runs), opts.keep_records,
                           opts.window_s, opts.policy)  # fmt: skip
            doc = simulate(spec, fleet, jobs, o, rate=rate, duration_s=args.duration, label=f"{rate:g}")
            runs.append(doc)
            return search.Trial(rate, doc["requests"], doc["slo_met"])

        result = search.search(trial, target=args.target, start_rate=args.start_rate, growth=2.0,
                               rel_tolerance=0.05, repeats=1, max_rates=args.max_rates,
                               progress=lambda line: print(f"  {line}", flush=True))  # fmt: skip
        print(f"sim: capacity {result.capacity:.3g} (first failing {result.first_failing})", flush=True)
        full = summary(runs, search=search_section(result), **meta)
    (out / "summary.json").write_text(json.dumps(full, indent=1))
    if args.report:
        from loadtests.report import write_report

        write_report(full, out)
    print(f"sim: wrote {out}/summary.json", flush=True)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    spec, wf, fleet, jobs, opts = setup(args)
    doc = json.loads(Path(args.summary).read_text())
    measured = doc["runs"][args.run]
    rate = args.rate  # None: the workload's own shape (a ramp, a trace), as the run was offered
    duration = measured["duration_s"]
    template = cal.fit_template(measured, cal.call_shapes(jobs, rate, duration))
    jobs = Jobs(wf, jobs.unit, template, jobs.loaded)

    def run(oh: Overheads) -> dict[str, Any]:
        o = SimOptions(opts.unit_tokens, oh, opts.seed, policy=opts.policy)
        return simulate(spec, fleet, jobs, o, rate=rate, duration_s=duration)

    overheads, sim_doc = cal.fit_overheads(measured, run)
    records_path = Path(args.summary).parent / "records.jsonl"
    if records_path.exists():  # the noise: per-request overhead distributions from the records
        measured_records = [json.loads(line) for line in records_path.read_text().splitlines() if line]

        def records(oh: Overheads) -> list[dict[str, Any]]:
            sim = Simulation(spec, fleet, SimOptions(opts.unit_tokens, oh, opts.seed, keep_records=True))
            sim.run(Jobs(wf, jobs.unit, template, jobs.loaded), rate=rate, duration_s=duration)
            return sim.recorder.records

        overheads = cal.fit_noise(measured_records, overheads.slowdown, records)
        sim_doc = run(overheads)
    cal.save(
        args.out, template, overheads, {"summary": args.summary, "run": args.run, "workload": args.workload}
    )
    p50, p99 = (_tab(overheads.ttft_table, p, overheads.ttft_s) for p in (0.5, 0.99))
    print(f"calibrate: template {template}, slowdown {overheads.slowdown:.3f}, TTFT overhead p50/p99 "
          f"{p50}/{p99} ms", flush=True)  # fmt: skip
    print(f"calibrate: measured  {_line(measured)}", flush=True)
    print(f"calibrate: simulated {_line(sim_doc)}", flush=True)
    return 0


def _tab(table: Any, p: float, offset: float) -> str:
    return f"{(offset + (quantile(table, p) if table else 0.0)) * 1000:.0f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sim", help="simulate a workload on a fleet")
    add_model_args(s)
    s.add_argument("--rate", type=float, help="open-loop rate (jobs/s) instead of the file's")
    s.add_argument("--duration", type=float, help="seconds of load instead of the file's")
    s.add_argument("--out", help="results directory (default results/sim)")
    s.add_argument("--no-report", dest="report", action="store_false")
    s.add_argument("--search", action="store_true", help="search the capacity (as `loadtests search`)")
    s.add_argument("--target", type=float, default=0.99)
    s.add_argument("--start-rate", type=float, default=1.0)
    s.add_argument("--max-rates", type=int, default=12)
    c = sub.add_parser("calibrate", help="fit the serving overheads to a measured run")
    add_model_args(c)
    c.add_argument("--summary", required=True, help="summary.json of a `loadtests run`")
    c.add_argument("--run", type=int, default=0, help="which run of the summary")
    c.add_argument(
        "--rate", type=float, help="the rate the run was offered with --rate (default: the file's)"
    )
    c.add_argument("--out", required=True, help="calibration file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from loadtests.sim.planner import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["fit-profile"]:
        from loadtests.sim.fit import main as fit_main

        return fit_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return cmd_sim(args) if args.cmd == "sim" else cmd_calibrate(args)
    except (WorkloadError, SpecError, ProfileError, ValueError) as e:
        print(f"{args.cmd}: {e}", file=sys.stderr)
        return 2
