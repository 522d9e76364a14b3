"""The Locust project against the local stack: each workload's token metrics in Locust's own CSV, agent
sessions hitting the prefix cache on later turns, a small tenant's 429s by reason in the report, and
two Locust workers sending exactly what one sends.

Locust runs in its own processes (`python -m loadtests run`, as a user runs it): this test process
imports Ray for the stack, and Locust patches the standard library with gevent."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl"


def loadtest(stack, tmp_path: Path, workload: dict, *extra: str) -> tuple[dict, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    path = tmp_path / "workload.yaml"
    path.write_text(yaml.safe_dump(workload))
    cmd = [sys.executable, "-m", "loadtests", "run", "--workload", str(path), "--host", stack.url,
           "--no-stack", "--out", str(out), "--drain-s", "90", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    logs = "".join(p.read_text()[-3000:] for p in out.glob("locust*.log")) if out.exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + logs
    return json.loads((out / "summary.json").read_text()), out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def locust_rows(out: Path) -> dict[tuple[str, str], dict]:
    with (out / "locust_stats.csv").open() as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


EVERY_TYPE = {
    "duration_s": 12,
    "shape": {"kind": "constant", "rate": 1.5},
    "seed": 4,
    "workloads": [
        {"type": "intent", "slo": {"ttft_s": 30}},
        {"type": "agent", "model": "tiny-intent", "turns": 3, "system_tokens": 256, "max_tokens": 16},
        {"type": "reasoning", "max_tokens": 48, "reasoning_budget": 16},
        {"type": "responses", "max_output_tokens": 48, "reasoning_budget": 16, "follow": "stream"},
        {"type": "fanout", "width": 3, "max_tokens": 8},
        {"type": "trace", "path": str(TRACE), "token_scale": 0.125, "max_output_tokens": 16, "limit": 40},
    ],
}


def test_every_workload_completes_and_its_token_metrics_are_in_locusts_csv(stack, tmp_path) -> None:
    doc, out = loadtest(stack, tmp_path, EVERY_TYPE)
    run = doc["runs"][0]
    assert set(run["by_type"]) == {"intent", "agent", "reasoning", "responses", "fanout", "trace"}
    for name, t in run["by_type"].items():
        assert t["failed"] == 0 and t["rejected"] == 0, (name, t["failed_by_reason"], t["rejected_by_reason"])
        assert t["tokens"]["input"] > 0 and t["tokens"]["output"] > 0, name
        assert t["latency"]["e2e"]["count"] == t["requests"], name
    assert run["by_type"]["reasoning"]["tokens"]["reasoning"] > 0
    assert run["by_type"]["fanout"]["requests"] % 3 == 0  # every task sent its 3 calls
    rows = locust_rows(out)
    for name in ("intent", "agent", "reasoning", "fanout", "trace"):
        assert int(rows[("TTFT", name)]["Request Count"]) == run["by_type"][name]["requests"]
        assert int(rows[("TPOT", name)]["Request Count"]) > 0
        assert int(rows[("ITL", name)]["Request Count"]) > 0
        assert float(rows[("TOKENS", f"{name} input")]["Average Response Time"]) > 0
    assert int(rows[("TTFT", "responses")]["Request Count"]) > 0  # followed by streaming its events
    assert (out / "index.html").exists() and (out / "locust.html").exists()
    # The generator reports its own pacing and overhead next to the server's latencies.
    assert run["pacing"]["late_p99_s"] < 1.0 and run["client_overhead_s"]["count"] == run["requests"]


def test_agent_sessions_report_cached_tokens_on_later_turns(stack, tmp_path) -> None:
    workload = {
        "duration_s": 8,
        "shape": {"kind": "constant", "rate": 0.5},
        "workloads": [{"type": "agent", "model": "tiny-intent", "turns": 3, "system_prompts": 1,
                       "system_tokens": 512, "max_tokens": 16}],
    }  # fmt: skip
    _, out = loadtest(stack, tmp_path, workload)
    turns = defaultdict(dict)
    for r in records(out):
        assert r["outcome"] == "ok", r
        turns[r["tags"]["session"]][r["tags"]["turn"]] = r
    assert len(turns) == 4 and all(len(t) == 3 for t in turns.values())
    for t in turns.values():
        # Each later turn's prompt starts with the whole conversation so far: most of it is cached.
        for k in (1, 2):
            assert t[k]["cached"] >= 0.5 * t[k]["input"], t[k]
    assert sum(t[0]["cached"] for t in turns.values()) > 0  # the shared system prompt, after the first


def test_a_small_tenant_gets_429s_by_reason_apart_from_failures(stack, tmp_path) -> None:
    workload = {
        "duration_s": 8,
        "shape": {"kind": "constant", "rate": 6},
        "tenant": "burst-a",  # 20 tokens/s, a burst of 1,500 (tests/stack.py)
        "workloads": [{"type": "intent", "prompt_tokens": 64, "max_tokens": 16}],
    }
    doc, out = loadtest(stack, tmp_path, workload)
    run = doc["runs"][0]
    assert run["requests"] == 48 and run["failed"] == 0
    assert run["rejected"] > 10 and run["ok"] > 5
    assert set(run["rejected_by_reason"]) == {"tenant_rate_limited"} and run["rejected"] == sum(
        run["rejected_by_reason"].values()
    )
    rows = locust_rows(out)
    reason = next(iter(run["rejected_by_reason"]))
    assert int(rows[("429", f"intent {reason}")]["Request Count"]) == run["rejected_by_reason"][reason]
    assert int(rows[("429", f"intent {reason}")]["Failure Count"]) == 0  # counted apart, not failures
    assert int(rows[("chat", "intent")]["Failure Count"]) == 0
    assert reason in (out / "index.html").read_text()


def test_two_locust_workers_send_what_one_sends(stack, tmp_path) -> None:
    workload = {"duration_s": 6, "shape": {"kind": "poisson", "rate": 2}, "seed": 9,
                "workloads": [{"type": "intent", "max_tokens": 4}]}  # fmt: skip
    one, _ = loadtest(stack, tmp_path / "one", workload, "--no-report")
    two, out = loadtest(stack, tmp_path / "two", workload, "--workers", "2", "--no-report")
    assert one["runs"][0]["requests"] == two["runs"][0]["requests"] == 12
    gen = json.loads((out / "generator.json").read_text())
    assert sorted(w["worker"] for w in gen["workers"]) == [0, 1] and gen["all_done"]
    assert sum(w["jobs"] for w in gen["workers"]) == 12
