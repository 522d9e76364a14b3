"""Fault injection on the live stack (tests/stack.py): Serve replicas and their vLLM engine processes,
Locust traffic in its own process, greedy probe streams, and what is left held afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]
INTENT = "tiny-intent"
REASONING = "tiny-reasoning"


# --- Serve replicas and their engines -----------------------------------------------------------


def replica_names(deployment: str) -> list[str]:
    """Names of the live Serve replica actors of `deployment` (app `tandem`)."""
    import ray

    prefix = f"SERVE_REPLICA::tandem#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )


def engine_deployment(stack, model: str, role: str | None = None) -> str:
    from serving.app import deployment_name
    from serving.config import Role

    m = stack.spec.model(model)
    return deployment_name(m, m.serving_pool if role is None else m.pool(Role(role)))


def kill_replica(deployment: str) -> str:
    """Kill `deployment`'s (only) replica actor as a crash would (Serve starts a replacement)."""
    import ray

    names = replica_names(deployment)
    assert names, f"no live replica of {deployment}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def state_address() -> str:
    """This session's cluster for Ray's state API (which otherwise guesses, and refuses when another
    Ray instance runs on the machine)."""
    import ray

    return ray.get_runtime_context().gcs_address


def actor_pid(name: str) -> int:
    from ray.util.state import list_actors

    found = list_actors(
        address=state_address(), filters=[("name", "=", name), ("state", "=", "ALIVE")], detail=True
    )
    assert found, f"actor {name} is not alive"
    return int(found[0]["pid"])


def engine_core_pid(replica: str) -> int:
    """The vLLM EngineCore process under Serve replica actor `replica`."""
    proc = psutil.Process(actor_pid(replica))
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child.pid
    raise AssertionError(f"no EngineCore process under {replica}")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process is frozen (SIGSTOP: alive, holding its memory, answering nothing) until the block
    ends: a wedged engine, as a hung collective or a stuck scheduler leaves one."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def wait_replaced(deployment: str, old: str, timeout_s: float = 240) -> float:
    """Seconds until Serve runs a replica of `deployment` other than the killed `old`: a new replica
    actor exists and the deployment has a RUNNING replica and none STARTING (right after the kill,
    Serve may still count the dead one as running)."""
    from ray import serve

    t0 = time.monotonic()
    while True:
        with contextlib.suppress(Exception):  # the controller may be busy
            if any(n != old for n in replica_names(deployment)):
                states = {
                    getattr(st, "value", st): n
                    for st, n in serve.status()
                    .applications["tandem"]
                    .deployments[deployment]
                    .replica_states.items()
                }
                if states.get("RUNNING", 0) >= 1 and not states.get("STARTING", 0):
                    return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"{deployment}: no replacement for {old} after {timeout_s}s"
        time.sleep(0.5)


def replacement_timer(deployment: str, old: str) -> Callable[[], float]:
    """Start timing Serve's replacement of the killed replica `old` now; the returned call waits for
    it (asserting it comes) and gives the seconds from now until it was RUNNING."""
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def run() -> None:
        with contextlib.suppress(AssertionError):
            wait_replaced(deployment, old)
            done["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> float:
        thread.join(timeout=300)
        assert "at" in done, f"{deployment}: {old} was not replaced"
        return round(done["at"] - t0, 1)

    return result


def engine_stats(stack, model: str, role: str | None = None):
    return stack.engine_handle(model, role).stats.remote().result(timeout_s=30)


def settle(stack, model: str, role: str | None = None, timeout_s: float = 60) -> Any:
    """The engine's stats once nothing runs or waits on it (asserts it gets there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):  # a replica may still be starting
            s = engine_stats(stack, model, role)
            if s.running == 0 and s.waiting == 0:
                return s
        assert time.monotonic() < deadline, f"{model}/{role}: requests still held after {timeout_s}s"
        time.sleep(0.5)


# --- The ingress's view ---------------------------------------------------------------------------


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the ingress's /metrics: (name, labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=30)
    r.raise_for_status()
    out: dict[tuple[str, frozenset], float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def held(url: str) -> dict[str, float]:
    """What the ingress holds now: requests in flight, pool slots, queued requests, tenants' slots."""
    m = metrics(url)

    def total(name: str) -> float:
        return sum(v for (n, _), v in m.items() if n == name)

    return {
        "in_flight": total("tandem_requests_in_flight"),
        "pool_slots": total("tandem_admission_pool_in_flight"),
        "queued": total("tandem_admission_queue_depth"),
        "tenant_slots": total("tandem_admission_tenant_in_flight"),
    }


def wait_released(url: str, timeout_s: float = 30) -> dict[str, float]:
    """`held` once the ingress holds nothing (asserts it gets there within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            h = held(url)
            if not any(h.values()):
                return h
        assert time.monotonic() < deadline, f"still held after {timeout_s}s: {h}"
        time.sleep(0.5)


def wait_serving(url: str, model: str, timeout_s: float = 240, headers: dict | None = None) -> float:
    """Seconds until a short chat on `model` completes (200)."""
    t0 = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    while True:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=30)
            if r.status_code == 200 and r.json().get("model") == model:
                return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"{model} not serving after {timeout_s}s"
        time.sleep(1)


# --- Greedy probe streams ----------------------------------------------------------------------------


@dataclass
class Probe:
    """One streamed chat as a client saw it."""

    status: int = 0
    text: str = ""
    events: list[dict] = field(default_factory=list)
    error: dict | None = None
    done: bool = False
    longest_gap_s: float = 0.0
    elapsed_s: float = 0.0
    exception: str | None = None

    @property
    def final(self) -> dict | None:
        finals = [e for e in self.events if e.get("choices") and e["choices"][0].get("finish_reason")]
        return finals[-1] if finals else None

    @property
    def usage(self) -> dict:
        return next((e["usage"] for e in reversed(self.events) if e.get("usage")), {})

    @property
    def migrations(self) -> list[dict]:
        f = self.final
        return (f or {}).get("x_tandem_migrations") or []

    def outcome(self) -> str:
        if self.exception:
            return f"broken ({self.exception})"
        if self.status != 200:
            return f"error {self.status}"
        if self.error:
            return f"error event {self.error.get('code') or self.error.get('type')}"
        return "completed" if self.done and self.final else "cut"


def chat_body(model: str, tokens: int, content: str = "Count slowly and tell me about the sea.") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def probe(url: str, body: dict, on_event: Callable[[int], None] | None = None, timeout_s: float = 300,
          headers: dict | None = None) -> Probe:  # fmt: skip
    """Stream `body`; `on_event(n)` after each event. Never raises: a broken connection is recorded."""
    p = Probe()
    t0 = prev = time.monotonic()
    text: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers or {},
                          timeout=timeout_s) as r:  # fmt: skip
            p.status = r.status_code
            if r.status_code != 200:
                r.read()
                with contextlib.suppress(ValueError):
                    p.error = r.json().get("error")
                return p
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                p.longest_gap_s = max(p.longest_gap_s, now - prev)
                prev = now
                if line == "data: [DONE]":
                    p.done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    p.error = ev["error"]
                    continue
                p.events.append(ev)
                if ev.get("choices"):
                    text.append(ev["choices"][0]["delta"].get("content") or "")
                if on_event is not None:
                    on_event(len(p.events))
    except httpx.HTTPError as e:
        p.exception = type(e).__name__
    finally:
        p.text = "".join(text)
        p.elapsed_s = time.monotonic() - t0
    return p


# --- Locust traffic ----------------------------------------------------------------------------------


class Traffic:
    """A bounded headless Locust run against the stack, in its own process (`python -m loadtests run`:
    Locust patches the standard library with gevent; this process imports Ray)."""

    def __init__(self, url: str, workload: dict, out: Path, drain_s: float = 90) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out / "out"
        path = out / "workload.yaml"
        path.write_text(yaml.safe_dump(workload))
        cmd = [sys.executable, "-m", "loadtests", "run", "--workload", str(path), "--host", url,
               "--no-stack", "--no-report", "--out", str(self.out), "--drain-s", str(drain_s)]  # fmt: skip
        self._log = (out / "run.log").open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def records(self, timeout_s: float = 600) -> list[dict]:
        """Wait for the run to end; every request it sent."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        log = (self.out.parent / "run.log").read_text()[-3000:]
        assert rc == 0, log
        path = self.out / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def mix(duration_s: float, rate: float = 1.5, seed: int = 7, reasoning: bool = True) -> dict:
    """The traffic every fault lands in: intent calls, 2-turn agent sessions, reasoning calls (P/D)."""
    workloads = [
        {"type": "intent", "weight": 2, "slo": {"ttft_s": 30}},
        {
            "type": "agent",
            "weight": 1,
            "model": INTENT,
            "turns": 2,
            "system_tokens": 256,
            "max_tokens": 16,
            "slo": {"ttft_s": 30},
        },
    ]
    if reasoning:
        workloads.append(
            {
                "type": "reasoning",
                "weight": 1,
                "max_tokens": 32,
                "reasoning_budget": 16,
                "slo": {"ttft_s": 60},
            }
        )
    return {
        "duration_s": duration_s,
        "shape": {"kind": "constant", "rate": rate},
        "seed": seed,
        "workloads": workloads,
    }


def outcomes(records: list[dict]) -> dict[str, Any]:
    """What the Locust clients saw: completed; clean errors by status and reason; broken (no status)."""
    by = Counter()
    for r in records:
        if r["outcome"] == "ok":
            by["completed"] += 1
        elif r["status"]:
            by[f"{r['status']} {r.get('reason') or ''}".strip()] += 1
        else:
            by[f"broken {r.get('reason') or ''}".strip()] += 1
    return {"requests": len(records), **dict(sorted(by.items()))}


def longest(records: list[dict]) -> float:
    """The longest request (seconds): a hang would show here."""
    return max((r.get("e2e") or 0.0 for r in records), default=0.0)
