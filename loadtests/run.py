"""`python -m loadtests run | search | report`: bounded headless Locust runs, the capacity search, reports.

    python -m loadtests run --workload loadtests/workloads/agent-intent.yaml            # local stack
    python -m loadtests run --workload FILE --host https://tandem.example.com            # a cluster
    python -m loadtests run --workload FILE --workers 2                                   # 1 master + 2
    python -m loadtests search --workload FILE --target 0.99 --trial-s 30 --repeats 2
    python -m loadtests report results/loadtest-.../summary.json

This process never imports Locust or Ray: Locust runs in its own processes (it patches the standard
library with gevent), and a local stack is `tandem up` in another. With the default host and nothing
answering there, `run` and `search` start `tandem up` with `--config` (configs/local.yaml) and stop
it when they end; a stack that was already up is left alone.

Each run writes into `--out`: `records.jsonl` (every request), `generator.json` (the generator's
CPU time and unfinished jobs), Locust's own `locust_stats.csv` / `locust.html`, and the report:
`summary.json` (`loadtests.summary`) with `index.html` and its PNG plots (`loadtests.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loadtests import search as capacity
from loadtests.summary import search_section, summarize_run, summary
from loadtests.workload import WorkloadError, WorkloadFile, load_workload

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_HOST = "http://127.0.0.1:8000"
#: How often a run says how far it is (seconds).
PROGRESS_INTERVAL_S = 15.0
#: How long a started `tandem up` may take to serve (it builds nothing: `make models` ran first).
STACK_READY_S = 420.0


class LoadTestError(RuntimeError):
    """A run that could not be made; the message says why and what to do."""


def _status(host: str) -> int | None:
    """The HTTP status of GET /v1/models (None: nothing answers). A 401 answers too: with auth on,
    listing models needs a key, and the probe need not hold one."""
    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/v1/models", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


@contextlib.contextmanager
def local_stack(host: str, config: str | None, out: Path, wait_s: float = 0.0) -> Iterator[None]:
    """`tandem up` on `host`'s port unless something answers there; stopped on exit if started here.
    A host this cannot start (another machine, or `config` None) is waited for up to `wait_s`."""
    url = urlparse(host)
    local = url.hostname in {"127.0.0.1", "localhost"} and config is not None
    deadline = time.monotonic() + (0.0 if local else wait_s)
    while _status(host) is None and time.monotonic() < deadline:
        time.sleep(5)
    if _status(host) is not None:
        yield
        return
    if not local:
        raise LoadTestError(f"nothing answers at {host}/v1/models: start Tandem there, or check --host")
    port = url.port or 80
    log = out / "tandem.log"
    cmd = [sys.executable, "-m", "serving.cli", "up", "--config", config, "--port", str(port)]
    print(f"loadtest: nothing answers at {host}; starting `tandem up --config {config}` ({log})", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STACK_READY_S
        while _status(host) != 200:
            if proc.poll() is not None:
                raise LoadTestError(f"tandem up exited ({proc.returncode}) before serving: see {log}")
            if time.monotonic() > deadline:
                raise LoadTestError(f"tandem up did not serve {host} within {STACK_READY_S:.0f} s: see {log}")
            time.sleep(2)
        print(f"loadtest: tandem up serves {host}", flush=True)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # tandem up stops its own Ray cluster and nothing else
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _locust(args: list[str], log: Path) -> subprocess.Popen:
    f = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args],
                            stdout=f, stderr=subprocess.STDOUT)  # fmt: skip


def run_limit(duration_s: float, drain_s: float, remote_workers: bool) -> float:
    """How long one Locust run may take: twice its load and drain, plus the processes' start, plus
    15 min for remote workers to be scheduled, pull their image and connect."""
    return 2 * (duration_s + drain_s) + (900 if remote_workers else 300)


def locust_run(
    workload: str,
    host: str,
    out: Path,
    *,
    workers: int = 0,
    expect_workers: int = 0,
    master_port: int = 5557,
    rate: float | None = None,
    duration_s: float | None = None,
    drain_s: float = 60.0,
    timeout_s: float | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One headless Locust run in its own processes (local, or a master with `workers` local workers or
    `expect_workers` remote ones); its records and generator figures. `duration_s` overrides the
    file's; the run is bounded by `timeout_s` (default: twice the load and the drain, plus the start,
    and 15 min for remote workers to be scheduled and connect). `progress` is called with the seconds
    elapsed every `PROGRESS_INTERVAL_S` while it runs."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--workload", workload, "--drain-s", str(drain_s)]
    if rate:
        common += ["--rate", str(rate)]
    if duration_s:
        common += ["--duration", str(duration_s)]
    records, generator = out / "records.jsonl", out / "generator.json"
    main = ["--headless", "--host", host, *common, "--records", str(records), "--generator", str(generator),
            "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--only-summary",
            "--loglevel", "INFO"]  # fmt: skip
    n = workers or expect_workers
    if n:
        main += ["--master", "--expect-workers", str(n), "--master-bind-port", str(master_port)]
        if workers:
            main += ["--master-bind-host", "127.0.0.1"]
    procs = [_locust(main, out / "locust.log")]
    for i in range(workers):
        worker_args = ["--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port), *common]
        procs.append(_locust(worker_args, out / f"locust-worker-{i}.log"))
    limit = timeout_s or run_limit(duration_s or 0.0, drain_s, bool(expect_workers))
    started = time.monotonic()
    try:
        while True:
            try:
                rc = procs[0].wait(timeout=PROGRESS_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed > limit:
                    log = out / "locust.log"
                    raise LoadTestError(f"locust did not end within {limit:.0f} s: see {log}") from None
                if progress is not None:
                    progress(elapsed)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
            if p.poll() is None:
                p.kill()
    if not records.exists():
        raise LoadTestError(f"locust exited ({rc}) without records: see {out / 'locust.log'}")
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    gen = json.loads(generator.read_text()) if generator.exists() else {}
    return rows, gen


def _slos(wf: WorkloadFile) -> dict[str, dict[str, float | None]]:
    return {w.name or w.type: w.slo.model_dump() for w in wf.workloads}


def rate_unit(wf: WorkloadFile) -> str:
    """What the offered rate counts: requests, agent sessions, or jobs of a mix (see loadtests.plan)."""
    types = {w.type for w in wf.workloads}
    if types == {"agent"}:
        return "sessions/s"
    return "jobs/s" if types & {"agent", "fanout"} else "req/s"


def _offered(wf: WorkloadFile, rate: float | None) -> float | None:
    if rate:
        return rate
    return wf.shape.rate if wf.shape.kind in {"constant", "poisson", "gamma"} else None


def run_summary(
    records: list[dict[str, Any]],
    gen: dict[str, Any],
    wf: WorkloadFile,
    rate: float | None,
    duration_s: float,
    label: str,
) -> dict[str, Any]:
    offered = _offered(wf, rate)
    run = summarize_run(records, duration_s=duration_s, offered_rate=offered, slos=_slos(wf), label=label)
    run["rate_unit"] = rate_unit(wf)
    run["generator"] = {
        "cpu_s": gen.get("cpu_s"),
        "cpu_per_request_ms": 1000 * gen["cpu_s"] / len(records) if records and gen.get("cpu_s") else None,
        "unfinished_jobs": gen.get("unfinished_jobs"),
        "all_done": gen.get("all_done"),
    }
    return run


def _print_run(run: dict[str, Any]) -> None:
    lat = run["latency"]
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    print(
        f"  offered {run['offered_rate']:.3g}/s  requests {run['requests']}  ok {run['ok']}  "
        f"rejected {run['rejected']} {run['rejected_by_reason'] or ''}  failed {run['failed']}  "
        f"SLO {run['slo_fraction']:.1%}  goodput {run['goodput_rps']:.2f}/s  "
        f"TTFT p50/p99 {ms(lat['ttft']['p50'])}/{ms(lat['ttft']['p99'])} ms  "
        f"TPOT p50 {ms(lat['tpot']['p50'])} ms  out {run['output_tokens_per_s']:.0f} tok/s  "
        f"late p99 {1000 * run['pacing']['late_p99_s']:.1f} ms",
        flush=True,
    )


def _write(doc: dict[str, Any], out: Path, report: bool) -> None:
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    print(f"loadtest: summary {out / 'summary.json'}", flush=True)
    if report:
        from loadtests.report import write_report

        print(f"loadtest: report {write_report(doc, out)}", flush=True)


def _meta(args: argparse.Namespace, wf: WorkloadFile) -> dict[str, Any]:
    return {
        "host": args.host,
        "workload": args.workload,
        "shape": wf.shape.model_dump(),
        "duration_s": args.duration or wf.duration_s,
        "workers": args.workers or args.expect_workers or 1,
        "rate_unit": rate_unit(wf),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def cmd_run(args: argparse.Namespace, wf: WorkloadFile, out: Path) -> int:
    duration = args.duration or wf.duration_s
    print(f"loadtest: {args.workload} against {args.host} for {duration:.0f} s -> {out}", flush=True)
    records, gen = locust_run(
        args.workload, args.host, out, workers=args.workers, expect_workers=args.expect_workers,
        master_port=args.master_bind_port, rate=args.rate, duration_s=args.duration, drain_s=args.drain_s,
        timeout_s=run_limit(duration, args.drain_s, bool(args.expect_workers)),
        progress=lambda t: print(f"loadtest: {t:.0f} s (load for {duration:.0f} s, then requests finish)",
                                 flush=True),
    )  # fmt: skip
    run = run_summary(records, gen, wf, args.rate, duration, "run")
    _print_run(run)
    _write(summary([run], **_meta(args, wf)), out, args.report)
    return 0


def cmd_search(args: argparse.Namespace, wf: WorkloadFile, out: Path) -> int:
    runs: list[dict[str, Any]] = []

    def trial(rate: float) -> capacity.Trial:
        label = f"rate-{rate:.4g}-{len(runs) + 1}"
        records, gen = locust_run(
            args.workload, args.host, out / label, workers=args.workers, expect_workers=args.expect_workers,
            master_port=args.master_bind_port, rate=rate, duration_s=args.trial_s, drain_s=args.drain_s,
        )  # fmt: skip
        run = run_summary(records, gen, wf, rate, args.trial_s, label)
        _print_run(run)
        runs.append(run)
        return capacity.Trial(rate, run["requests"], run["slo_met"])

    print(
        f"loadtest: capacity search on {args.workload} at {args.host}, target {args.target:.1%}", flush=True
    )
    result = capacity.search(
        trial, target=args.target, start_rate=args.start_rate, growth=args.growth,
        rel_tolerance=args.tolerance, repeats=args.repeats, max_rates=args.max_rates,
        progress=lambda line: print(f"  {line}", flush=True),
    )  # fmt: skip
    hi = "not reached" if result.first_failing is None else f"{result.first_failing:.3g}"
    unit = rate_unit(wf)
    print(f"loadtest: capacity {result.capacity:.3g} {unit} (first failing rate {hi})", flush=True)
    found = {**search_section(result), "rate_unit": rate_unit(wf)}
    _write(summary(runs, search=found, **_meta(args, wf)), out, args.report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "search"):
        s = sub.add_parser(name)
        s.add_argument("--workload", required=True, help="workload file (YAML)")
        s.add_argument("--host", default=os.environ.get("TANDEM_URL", DEFAULT_HOST), help="Tandem's URL")
        s.add_argument("--out", help="results directory (default results/loadtest-<time>)")
        s.add_argument("--config", default="configs/local.yaml",
                       help="spec for `tandem up` when nothing answers at a local --host")  # fmt: skip
        s.add_argument("--no-stack", action="store_true", help="never start a local stack")
        s.add_argument("--wait-s", type=float, default=0.0,
                       help="wait this long for a host this cannot start to answer")  # fmt: skip
        s.add_argument("--workers", type=int, default=0, help="local Locust workers (0: one process)")
        s.add_argument("--expect-workers", type=int, default=0, help="remote workers to wait for (a cluster)")
        s.add_argument("--master-bind-port", type=int, default=5557)
        s.add_argument("--drain-s", type=float, default=60.0, help="time requests may finish after the load")
        s.add_argument("--no-report", dest="report", action="store_false", help="summary.json only")
        s.add_argument("--rate", type=float, help="open-loop rate (jobs/s) instead of the file's")
        s.add_argument("--duration", type=float, help="seconds of load instead of the file's duration_s")
    s = sub.choices["search"]
    s.add_argument("--target", type=float, default=0.99, help="fraction of requests that must meet the SLOs")
    s.add_argument("--start-rate", type=float, default=1.0)
    s.add_argument("--growth", type=float, default=2.0)
    s.add_argument("--tolerance", type=float, default=0.1, help="stop bisecting within this relative gap")
    s.add_argument("--repeats", type=int, default=2, help="trials per rate")
    s.add_argument("--max-rates", type=int, default=10)
    s.add_argument("--trial-s", type=float, default=30.0, help="seconds of load per trial")
    r = sub.add_parser("report")
    r.add_argument("summary")
    r.add_argument("--out")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from loadtests.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] and argv[0] in ("sim", "calibrate", "plan", "fit-profile"):
        from loadtests.sim.cli import main as sim_main

        return sim_main(argv)
    args = build_parser().parse_args(argv)
    try:
        wf = load_workload(args.workload)
    except WorkloadError as e:
        print(e, file=sys.stderr)
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"results/loadtest-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with local_stack(args.host, None if args.no_stack else args.config, out, args.wait_s):
            return cmd_run(args, wf, out) if args.cmd == "run" else cmd_search(args, wf, out)
    except LoadTestError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 1
