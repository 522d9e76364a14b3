"""The SLO autoscaler on real vLLM-CPU engines, under Locust load (a second Serve app in the session's Ray).

The app is deployed from its Serve config (serving.app.run_app), so Serve runs Tandem's
application-level policy (serving.autoscaling): tiny-reasoning's decode pool and tiny-intent's colocated
pool may grow from 1 to 2; tiny-intent's may also go to zero. Locust runs in its own processes (as a user
runs it): for each pool in turn, a light load of one user runs in back-to-back 30 s runs the whole time,
and a heavy one of 6 users (30 s runs, until the second replica serves) drives it to 2.
The pools then come back to 1 under the light load: every request of every run must succeed.
One pool at a time: a 2-core, 24 GiB machine holds the main stack's three engines and this app's three,
plus one starting (with both pools scaling at once, and replicas removed while still starting, it ran out
of memory).

The test's autoscaler settings are short (seconds, not minutes) and its latency objectives loose (a
2-core CPU machine): the pools are sized here by requests in flight against `max_ongoing_requests` 4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

#: Each test waits on engine cold starts (2-3 min here) with the app deploy in the first one's set-up.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]
APP, PREFIX = "autoscale-test", "/as"
#: Length of one Locust run (heavy runs repeat until the scale-up is seen; the light one loops).
RUN_S = 30
#: Users of the heavy load: with the light one, 7 requests in flight, within the pool's admission limit
#: at its max (2 replicas x 4) and over one replica's 4: the demand asks for a second replica.
HEAVY_USERS = 6
#: Within this long of the heavy load starting, the pool runs 2 replicas (a cold start included: 160 s
#: measured on a warm machine, over 215 s in one CI run on a busier one, so the bound leaves room).
UP_WITHIN_S = 420
#: Within this long of the heavy load ending, the pool is back to 1 (stabilization, cooldown, drain).
DOWN_WITHIN_S = 120
SCALING = {
    "ttft_slo_s": 30.0,
    "tpot_slo_s": 5.0,
    "window_s": 8.0,
    "metrics_interval_s": 1.0,
    "warmup_s": 2.0,
    "stale_after_s": 10.0,
    "downscale_stabilization_s": 30.0,
    "downscale_cooldown_s": 20.0,
    "cold_start_s": 180.0,
    "idle_to_zero_s": 30.0,
    "drain_timeout_s": 120.0,
}


def _app_spec(stack):
    from serving.config import parse_spec

    base = stack.spec.model_dump(mode="json")
    # Tandem's own pools only: the stack's external model (engine: openai) has nothing to scale.
    base["models"] = [m for m in base["models"] if m["pools"][0]["engine"] != "openai"]
    names = {m["name"] for m in base["models"]}
    base["tiers"] = [t for t in base["tiers"] if t["model"] in names]
    for m in base["models"]:
        m["autoscaling"] = SCALING
        for p in m["pools"]:
            p["max_ongoing_requests"] = 4
            p["env"] = {
                **p["env"],
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": "1",
            }
            if p["role"] == "decode":
                p["replicas"] = {"min": 1, "max": 2}
            elif p["role"] == "colocated":
                p["replicas"] = {"min": 0, "initial": 1, "max": 2}
    base["sessions"] = {"enabled": False}
    base["admission"] = {"tenants": []}
    return parse_spec(base)


@pytest.fixture(scope="module")
def app(stack):
    from ray import serve

    from serving.app import run_app

    spec = _app_spec(stack)
    run_app(spec, APP, PREFIX)
    try:
        yield spec, f"{stack.url}{PREFIX}"
    finally:
        serve.delete(APP)


def _deployment(spec, model: str, role: str) -> str:
    from serving.config import Role

    m = spec.model(model)
    return m.deployment_name(m.pool(Role(role)))


def _replicas() -> dict[str, tuple[int, int]]:
    """deployment -> (replicas not stopping, replicas running) of the test app."""
    from ray import serve

    out = {}
    for name, d in serve.status().applications[APP].deployments.items():
        states = {getattr(s, "value", s): n for s, n in d.replica_states.items()}
        alive = sum(n for s, n in states.items() if s != "STOPPING")
        out[name] = (alive, states.get("RUNNING", 0))
    return out


WORKLOADS = {
    "tiny-reasoning": {"type": "reasoning", "max_tokens": 96, "reasoning_budget": 24, "slo": {"ttft_s": 60}},
    "tiny-intent": {
        "type": "agent",
        "model": "tiny-intent",
        "turns": 2,
        "system_tokens": 128,
        "max_tokens": 96,
    },
}


def _locust(url: str, out: Path, users: int, models: list[str], seed: int) -> subprocess.Popen:
    workload = {
        "duration_s": RUN_S,
        "shape": {"kind": "closed", "users": users},
        "seed": seed,
        "workloads": [WORKLOADS[m] for m in models],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "workload.yaml"
    path.write_text(yaml.safe_dump(workload))
    cmd = [sys.executable, "-m", "loadtests", "run", "--workload", str(path), "--host", url,
           "--no-stack", "--out", str(out / "run"), "--drain-s", "120"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    stdout, _ = proc.communicate(timeout=RUN_S + 300)
    assert proc.returncode == 0, stdout[-3000:]
    return json.loads((out / "run" / "summary.json").read_text())["runs"][0]


class Load:
    """Back-to-back Locust runs in a thread until stopped; every run's summary kept."""

    def __init__(self, url: str, out: Path, users: int, models: list[str]) -> None:
        self.url, self.out, self.users, self.models = url, out, users, models
        self.runs: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            out = self.out / f"{i}"
            self.runs.append(_finish(_locust(self.url, out, self.users, self.models, i), out))
            i += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=RUN_S + 320)


def _assert_clean(runs: list[dict]) -> int:
    assert runs
    for run in runs:
        assert run["failed"] == 0, run["failed_by_reason"]
        assert run["rejected"] == 0, run["rejected_by_reason"]
    return sum(r["requests"] for r in runs)


def _messages() -> dict[str, str]:
    """deployment -> Serve's status and message (a replica slow to start or failing names itself here)."""
    from ray import serve

    deps = serve.status().applications[APP].deployments.items()
    return {name: f"{getattr(d.status, 'value', d.status)}: {d.message}" for name, d in deps}


def _until(pred, within_s: float, what: str, timeline: list) -> float:
    t0 = time.monotonic()
    while not pred(_replicas()):
        timeline.append((round(time.monotonic() - t0), _replicas()))
        assert time.monotonic() - t0 < within_s, f"{what} not within {within_s}s:\n" + "\n".join(
            [*map(str, timeline), *(f"{k}: {v}" for k, v in _messages().items())]
        )
        time.sleep(2)
    return time.monotonic() - t0


@pytest.mark.parametrize(("model", "role"), [("tiny-intent", "colocated"), ("tiny-reasoning", "decode")])
def test_a_pool_scales_up_under_load_and_back_without_a_failed_request(app, tmp_path, model, role) -> None:
    spec, url = app
    dep = _deployment(spec, model, role)
    timeline: list = []
    with Load(url, tmp_path / "light", 1, [model]) as light:
        # (A pool idle since the app started may be at zero: the light load brings it back.)
        _until(lambda r: r[dep] == (1, 1), 180, f"{dep} at 1 replica", timeline)
        with Load(url, tmp_path / "heavy", HEAVY_USERS, [model]) as heavy:
            up_s = _until(lambda r: r[dep][1] >= 2, UP_WITHIN_S, f"{dep} at 2 replicas", timeline)
        down_s = _until(lambda r: r[dep] == (1, 1), DOWN_WITHIN_S, f"{dep} back to 1 replica", timeline)
    n = _assert_clean(heavy.runs) + _assert_clean(light.runs)
    print(
        f"{dep}: 2 replicas running {up_s:.0f}s after the heavy load began, back to 1 {down_s:.0f}s after it "
        f"ended; {n} requests, none failed"
    )


def test_a_pool_at_zero_serves_its_first_request_after_the_cold_start(app) -> None:
    spec, url = app
    coloc = _deployment(spec, "tiny-intent", "colocated")
    deadline = time.monotonic() + SCALING["idle_to_zero_s"] + SCALING["downscale_cooldown_s"] + 60
    while _replicas()[coloc] != (0, 0):
        assert time.monotonic() < deadline, f"tiny-intent did not go to zero: {_replicas()}"
        time.sleep(2)
    t0 = time.monotonic()
    body = {"model": "tiny-intent", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert _replicas()[coloc][1] == 1
    print(f"first request at zero answered after {waited:.1f}s (cold start)")
