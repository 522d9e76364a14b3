"""Tiers, admission and degradation on the local stack (real vLLM-CPU engines behind Ray Serve).

Auth is off in configs/local.yaml, so the x-tandem-tenant header picks the tenant; the test tenants
(tests/stack.py) have small limits.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

INTENT, REASONING = "tiny-intent", "tiny-reasoning"


def _route(r: httpx.Response) -> dict[str, str]:
    return dict(part.split("=", 1) for part in r.headers["x-tandem-route"].split("; "))


def _chat(url: str, headers: dict[str, str], timeout: float = 120, **body) -> httpx.Response:
    payload = {
        "model": INTENT,
        "messages": [{"role": "user", "content": "classify: where is my order"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    payload.update(body)
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=timeout)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(url: str, name: str, **labels: str) -> float | None:
    return _metrics(url).get((name, tuple(sorted(labels.items()))))


def test_tenant_over_its_bucket_gets_429_while_another_tenant_is_served(stack) -> None:
    a = {"x-tandem-tenant": "burst-a"}
    b = {"x-tandem-tenant": "tenant-b"}
    # Each call reserves ~230 tokens (prompt + max_tokens 200); burst-a's bucket holds 1500.
    with ThreadPoolExecutor(16) as pool:
        a_futs = [pool.submit(_chat, stack.url, a, max_tokens=200) for _ in range(12)]
        b_futs = [pool.submit(_chat, stack.url, b, max_tokens=200) for _ in range(4)]
        a_resps = [f.result() for f in a_futs]
        b_resps = [f.result() for f in b_futs]
    assert [r.status_code for r in b_resps] == [200] * 4, [r.text for r in b_resps]
    ok = [r for r in a_resps if r.status_code == 200]
    limited = [r for r in a_resps if r.status_code == 429]
    assert len(ok) + len(limited) == 12, [r.text for r in a_resps]
    assert 1 <= len(ok) <= 9 and limited, (len(ok), len(limited))
    for r in limited:
        err = r.json()["error"]
        assert err["code"] == "tenant_rate_limited" and "burst-a" in err["message"], err
        assert int(r.headers["retry-after"]) >= 1
    rejected = _metric(
        stack.url, "tandem_admission_rejections_total", reason="tenant_rate_limited", model=INTENT
    )
    assert rejected is not None and rejected >= len(limited)
    # Coming back after Retry-After works.
    time.sleep(max(int(r.headers["retry-after"]) for r in limited))
    again = _chat(stack.url, a, max_tokens=200)
    assert again.status_code == 200, again.text


def test_fan_out_of_20_calls_with_width_4_never_has_more_than_4_at_the_engine(stack) -> None:
    engine = stack.engine_handle(INTENT)
    headers = {"x-tandem-tenant": "agent", "x-tandem-task-id": "task-fanout-1"}
    done = threading.Event()
    seen: list[int] = []

    def watch() -> None:
        while not done.is_set():
            s = engine.stats.remote().result()
            seen.append(s.running + s.waiting)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            futs = [
                pool.submit(_chat, stack.url, headers, max_tokens=48, ignore_eos=True, timeout=300)
                for _ in range(20)
            ]
            resps = [f.result() for f in futs]
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in resps] == [200] * 20, [r.text for r in resps if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in resps)
    print(f"engine in-flight samples: {len(seen)}, max {max(seen)}")
    assert max(seen) <= 4, max(seen)
    assert max(seen) >= 2, "the calls never overlapped: the test proves nothing"
    assert not _metric(stack.url, "tandem_admission_fanout_in_use", tenant="agent")


def test_disconnected_client_gives_back_its_tokens_and_fanout_slot(stack) -> None:
    headers = {"x-tandem-tenant": "leaver", "x-tandem-task-id": "task-leave-1"}
    body = {
        "model": INTENT,
        "messages": [{"role": "user", "content": "write a long story"}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    engine = stack.engine_handle(INTENT)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            frames = 0
            for line in lines:
                if line.startswith("data: "):
                    frames += 1
                if frames >= 5:
                    break
            # Mid-stream: 3000 output tokens are reserved and the task's slot is taken.
            level = _metric(stack.url, "tandem_admission_bucket_tokens", tenant="leaver")
            assert level is not None and level < 10_000 - 3000, level
            assert _metric(stack.url, "tandem_admission_fanout_in_use", tenant="leaver") == 1
            # Leave without reading the rest.
    deadline = time.monotonic() + 10
    while True:
        level = _metric(stack.url, "tandem_admission_bucket_tokens", tenant="leaver")
        in_use = _metric(stack.url, "tandem_admission_fanout_in_use", tenant="leaver")
        in_flight = _metric(stack.url, "tandem_admission_tenant_in_flight", tenant="leaver")
        if not in_use and not in_flight and level is not None and level > 9000:
            break
        assert time.monotonic() < deadline, (level, in_use, in_flight)
        time.sleep(0.2)
    # Only the prompt and the tokens generated before the disconnect stay spent.
    print(f"bucket after the disconnect: {level:.0f} of 10000")
    s = engine.stats.remote().result()
    assert s.running == 0 and s.waiting == 0, s


def test_intent_goes_to_the_small_model_and_reasoning_to_the_large_one(stack) -> None:
    auto = {"model": "auto"}
    r = _chat(stack.url, {"x-tandem-task": "intent"}, **auto)
    assert r.status_code == 200 and r.json()["model"] == INTENT
    assert _route(r)["tier"] == "intent" and _route(r)["how"] == "task"
    r = _chat(stack.url, {"x-tandem-task": "reasoning"}, **auto)
    assert r.status_code == 200 and r.json()["model"] == REASONING
    assert _route(r)["tier"] == "reasoning" and _route(r)["how"] == "task"
    # No header: the rules look at the request's shape.
    r = _chat(stack.url, {}, reasoning_effort="high", **auto)
    assert r.json()["model"] == REASONING and _route(r)["how"] == "rule:0"
    r = _chat(stack.url, {}, **auto)
    assert r.json()["model"] == INTENT and _route(r)["how"] == "default"
    bad = _chat(stack.url, {"x-tandem-task": "poetry"}, **auto)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-tandem-task"
    served = _metric(stack.url, "tandem_tier_requests_total", tier="reasoning", model=REASONING, how="task",
                     degraded="false")  # fmt: skip
    assert served is not None and served >= 1


def test_reasoning_degrades_to_intent_while_its_pool_is_down_then_recovers(stack) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    decode = stack.engine_handle(REASONING)
    replica = decode.replica.remote().result()
    actor = ray.get_actor(f"SERVE_REPLICA::tandem#{replica}", namespace="serve")
    cpus = stack.spec.model(REASONING).serving_pool.cpus_per_replica
    # Take every free CPU, then the killed replica's, so Serve cannot start a replacement: the
    # reasoning pool stays down until the test gives them back.
    holds = []
    free = ray.available_resources().get("CPU", 0)
    if free > 0:
        holds.append(placement_group([{"CPU": free}]))
        ray.get(holds[-1].ready(), timeout=60)
    reasoning = {"x-tandem-task": "reasoning"}
    try:
        ray.kill(actor, no_restart=True)
        holds.append(placement_group([{"CPU": cpus}]))
        # Serve may start the replacement on the freed CPU before the group gets it: kill that one too
        # until the group holds the CPU (then no replacement can be placed).
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.get(holds[-1].ready(), timeout=5)
                break
            except ray.exceptions.GetTimeoutError:
                assert time.monotonic() < deadline, "the killed replica's CPU never came free"
                prefix = f"SERVE_REPLICA::tandem#{replica.split('#')[0]}#"
                for a in ray.util.list_named_actors(all_namespaces=True):
                    if a["namespace"] == "serve" and a["name"].startswith(prefix):
                        ray.kill(ray.get_actor(a["name"], namespace="serve"), no_restart=True)

        t0 = time.monotonic()
        r = _chat(stack.url, reasoning, model="auto")
        first_s = time.monotonic() - t0
        assert r.status_code == 200, r.text
        route = _route(r)
        print(f"first call after the kill: {first_s:.1f}s route={route}")
        assert r.json()["model"] == INTENT
        assert route["tier"] == "intent" and route["degraded_from"] == "reasoning", route
        assert first_s < 40, "the pool watcher should end the wait before the first-token timeout"
        # While the pool is down, reasoning calls go straight down the chain.
        t0 = time.monotonic()
        r = _chat(stack.url, reasoning, model="auto")
        assert r.json()["model"] == INTENT and _route(r)["degraded_from"] == "reasoning"
        assert time.monotonic() - t0 < 10
        # Explicit model names degrade as well, and say so.
        r = _chat(stack.url, {}, model=REASONING)
        assert r.json()["model"] == INTENT and _route(r)["degraded_from"] == "reasoning"
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert _metric(stack.url, "tandem_target_health", model=REASONING) == 2
        degraded = _metric(stack.url, "tandem_tier_requests_total", tier="intent", model=INTENT, how="task",
                           degraded="true")  # fmt: skip
        assert degraded is not None and degraded >= 2
    finally:
        for pg in holds:
            remove_placement_group(pg)
    # Serve starts a replacement; a recovery probe brings the tier back.
    deadline = time.monotonic() + 240
    while True:
        r = _chat(stack.url, reasoning, model="auto")
        if r.status_code == 200 and r.json()["model"] == REASONING:
            break
        assert time.monotonic() < deadline, f"reasoning never recovered: {r.status_code} {r.headers}"
        time.sleep(3)
    assert "degraded_from" not in _route(r)
    assert _metric(stack.url, "tandem_target_health", model=REASONING) == 0
    assert (_metric(stack.url, "tandem_health_probes_total", model=REASONING, result="ok") or 0) >= 1
