"""What an idle local stack costs: CPU of every process `make run` starts, over a quiet window.

    python -m benchmarks.idle [--config configs/local.yaml] [--seconds 30] [--settle 10] [--json FILE]

Method: start `tandem up --config FILE` exactly as `make run` does (its own Ray cluster, every
engine of the spec), wait until it prints that it is serving and answers `GET /v1/models`, let it
settle for `--settle` seconds, then read the CPU seconds (user + system, psutil) of every process
in its tree (and any process naming its Ray temp dir) at the start and the end of a `--seconds`
window in which nothing is sent to it. Each figure is CPU seconds / wall seconds, i.e. cores kept
busy, summed per kind of process (the roles of `benchmarks.overhead`). Then SIGTERM, and wait for
`tandem up` to stop.

The goal (issue 13): the whole idle stack under 0.10 cores. Before the NIXL fix
(`serving/replicas/engines/vllm_plugin.py`) each P/D engine's UCX progress thread alone kept ~1 core busy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import BenchmarkError, load_average, machine_info, run_main
from benchmarks.stack import cpu_seconds, free_port, stack_processes
from serving.config import default_config_path

#: The goal for the whole idle stack, in cores.
GOAL_CORES = 0.10
READY_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (as make run)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the idle window")
    p.add_argument("--settle", type=float, default=10.0, help="wait after start-up before measuring")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.settle < 0:
        p.error("--seconds must be > 0 and --settle >= 0")
    return args, args.json


def _wait_ready(proc: subprocess.Popen, port: int, lines: list[str]) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise BenchmarkError("tandem up exited before serving:\n" + "".join(lines[-30:]))
        lines.append(line)
        if line.startswith("Tandem is serving"):
            break
    else:
        raise BenchmarkError(f"tandem up did not serve within {READY_TIMEOUT_S:.0f} s")
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    if r.status_code != 200:
        raise BenchmarkError(f"GET /v1/models: {r.status_code} {r.text[:200]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serving.cli import ray_temp_dir

    port, dash = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="tandem-idle-")
    env = {**os.environ, "TANDEM_STATE_DIR": state}
    cmd = [sys.executable, "-m", "serving.cli", "up", "--config", args.config, "--port", str(port),
           "--dashboard-port", str(dash)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    try:
        _wait_ready(proc, port, lines)
        ready_s = time.monotonic() - t0
        # Keep reading its output so that a full pipe never blocks it.
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        time.sleep(args.settle)
        marker = ray_temp_dir(port)
        procs = stack_processes(proc.pid, marker)
        load = load_average()
        before = cpu_seconds(procs)
        w0 = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - w0
        after = cpu_seconds(procs)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    per_role: dict[str, float] = {}
    per_process: list[dict[str, Any]] = []
    for pid, (role, cpu) in after.items():
        if pid not in before:
            continue
        used = (cpu - before[pid][1]) / wall
        per_role[role] = per_role.get(role, 0.0) + used
        per_process.append({"pid": pid, "role": role, "cores": round(used, 4)})
    total = sum(per_role.values())
    return {
        "config": args.config,
        "window_s": round(wall, 1),
        "settle_s": args.settle,
        "ready_s": round(ready_s, 1),
        "processes": len(after),
        "load_average_before": load,
        "total_cores": round(total, 4),
        "goal_cores": GOAL_CORES,
        "goal_met": total < GOAL_CORES,
        "cores_per_role": {r: round(c, 4) for r, c in sorted(per_role.items(), key=lambda kv: -kv[1])},
        "busiest_processes": sorted(per_process, key=lambda p: -p["cores"])[:10],
        "machine": machine_info(),
    }


def format_report(r: dict[str, Any]) -> str:
    rows = [f"| {role} | {cores:.3f} |" for role, cores in r["cores_per_role"].items()]
    verdict = "met" if r["goal_met"] else "NOT met"
    return "\n".join(
        [
            f"Idle `tandem up --config {r['config']}`: {r['processes']} processes, ready in "
            f"{r['ready_s']} s, measured over {r['window_s']} s after {r['settle_s']} s of settling",
            "",
            "| process | cores |",
            "|---|---|",
            *rows,
            f"| **total** | **{r['total_cores']:.3f}** |",
            "",
            f"Goal: total < {r['goal_cores']} cores: {verdict}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
