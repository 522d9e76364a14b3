"""Faults injected in the middle of Locust traffic on the live stack (real Ray Serve, real vLLM on CPU):
a prefill replica, the ingress replica and the session worker killed; an engine and a KV transfer
stalled (the engine process frozen with SIGSTOP: alive, holding its memory, answering nothing); a
tenant's bucket exhausted; a client that never reads its stream; the KV cache filled. (A decode
replica killed mid-stream: test_migration.py; the Redis server: test_store_outage.py.)

For each: what the clients saw (completed, or a clean error with a status and a reason; a hang would
show as a request past its deadline), the time to recover, tokens lost or duplicated on a greedy probe
stream, and what was left held (admission slots, pool slots, engine requests and KV, leases). Each
records its row with the `campaign` fixture (tests/faults/conftest.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.faults.conftest import AUX_KV_BLOCKS
from tests.faults.tools import (
    INTENT,
    REASONING,
    Traffic,
    chat_body,
    engine_core_pid,
    engine_deployment,
    engine_stats,
    kill_replica,
    longest,
    mix,
    outcomes,
    probe,
    replacement_timer,
    replica_names,
    settle,
    stopped,
    wait_released,
    wait_serving,
)

pytestmark = pytest.mark.integration


def clean(records: list[dict]) -> list[dict]:
    """The requests that neither completed nor ended with a status and a reason (a broken connection)."""
    return [r for r in records if r["outcome"] != "ok" and not (r["status"] and r.get("reason"))]


def test_prefill_replica_killed_under_traffic_every_request_completes(stack, campaign, tmp_path) -> None:
    """P/D requests in flight when the prefill replica dies fall back to prefilling on the decode
    engine (or retry on the replacement): all complete; the greedy probe's text is unchanged."""
    dep = engine_deployment(stack, REASONING, "prefill")
    long_prompt = " ".join(f"word{i}" for i in range(700))  # past min_prefill_tokens: prefilled remotely
    body = chat_body(REASONING, 48, long_prompt)
    want = probe(stack.url, body)
    assert want.outcome() == "completed", want

    traffic = Traffic(stack.url, mix(40), tmp_path)
    time.sleep(12)  # Locust's start, then traffic in flight
    pre = stack.engine_handle(REASONING, "prefill")
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("p", probe(stack.url, body)))
    t.start()
    deadline = time.monotonic() + 30
    while pre.stats.remote().result().running < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    t_fault = time.monotonic()
    replaced = replacement_timer(dep, kill_replica(dep))
    t.join(timeout=120)
    assert not t.is_alive(), "the probe hung after the prefill replica died"
    p = got["p"]
    recovered_s = wait_serving(stack.url, REASONING) + (time.monotonic() - t_fault)
    records = traffic.records()
    replaced_s = replaced()
    dec = settle(stack, REASONING)
    held = wait_released(stack.url)
    seen = outcomes(records)
    campaign.record(
        "fault",
        "kill prefill replica (P/D, under traffic)",
        clients=seen,
        probe=p.outcome(),
        probe_s=round(p.elapsed_s, 1),
        longest_request_s=round(longest(records), 1),
        tokens_lost=len(want.text) - len(p.text) if p.text != want.text else 0,
        served_again_s=round(recovered_s, 1),
        replacement_running_s=replaced_s,
        held=held,
        decode_running=dec.running,
        decode_kv_usage=round(dec.kv_usage, 3),
    )
    assert p.outcome() == "completed" and p.text == want.text, (p.outcome(), p.error)
    assert not clean(records), clean(records)[:3]
    assert seen.get("completed", 0) == len(records), seen  # P/D degrades to local prefill: no errors
    assert recovered_s < 60


def test_ingress_replica_killed_under_traffic_clients_see_an_end_and_serving_resumes(
    stack, campaign, tmp_path
) -> None:
    """The ingress holds the client's connection state: its streams end (the client sees the stream
    stop without [DONE], never a hang), the engine requests they held are aborted, and Serve's
    replacement takes traffic within seconds."""
    dep = "ingress"
    traffic = Traffic(stack.url, mix(30, reasoning=False), tmp_path)
    time.sleep(10)
    got: dict = {}
    body = chat_body(INTENT, 2000)
    t = threading.Thread(target=lambda: got.setdefault("p", probe(stack.url, body, timeout_s=120)))
    t.start()
    time.sleep(3)
    t_fault = time.monotonic()
    replaced = replacement_timer(dep, kill_replica(dep))
    t.join(timeout=150)
    assert not t.is_alive(), "the probe stream hung after its ingress died"
    p = got["p"]
    probe_ended_s = time.monotonic() - t_fault
    recovered_s = wait_serving(stack.url, INTENT, timeout_s=180) + (time.monotonic() - t_fault)
    replaced_s = replaced()
    records = traffic.records()
    dec = settle(stack, INTENT, timeout_s=90)  # the dead ingress's engine requests were aborted
    held = wait_released(stack.url)
    campaign.record(
        "fault",
        "kill ingress replica (under traffic)",
        clients=outcomes(records),
        probe=p.outcome(),
        probe_ended_after_s=round(probe_ended_s, 1),
        longest_request_s=round(longest(records), 1),
        replacement_running_s=replaced_s,
        served_again_s=round(recovered_s, 1),
        held=held,
        engine_running=dec.running,
    )
    assert p.outcome() != "completed" or p.text, p
    assert probe_ended_s < 30, "the client of a dead ingress waited"
    assert recovered_s < 120
    assert dec.running == 0


def _text(result: dict) -> str:
    """A response's reasoning and answer text."""
    return "".join(c.get("text", "") for item in result["output"] for c in item.get("content") or ())


def _session_text(stack, rid: str, headers: dict, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{stack.url}/v1/responses/{rid}", headers=headers, timeout=30)
        if r.status_code == 200 and r.json()["status"] not in ("queued", "in_progress"):
            return _text(r.json())
        assert time.monotonic() < deadline, f"{rid} not finished"
        time.sleep(0.3)


def test_session_worker_killed_under_traffic_sessions_finish(stack, campaign, tmp_path) -> None:
    """Background sessions whose worker dies are taken over from the store (token-exact: see
    tests/integration/test_sessions.py) and finish; no lease is left."""
    from serving.sessions.store import SQLiteStore

    s = stack.spec.sessions
    store = SQLiteStore(s.store.path, s.ttl_s, s.max_sessions_per_tenant, s.max_bytes_per_tenant)
    workload = {
        "duration_s": 30,
        "shape": {"kind": "constant", "rate": 0.5},
        "seed": 3,
        "workloads": [
            {
                "type": "responses",
                "max_output_tokens": 96,
                "reasoning_budget": 48,
                "follow": "poll",
                "slo": {"ttft_s": 120},
            }
        ],
    }
    headers = {"x-tandem-tenant": "faults-sessions"}
    body = {
        "model": REASONING,
        "input": "Plan the week.",
        "max_output_tokens": 256,
        "reasoning": {"max_tokens": 96},
        "temperature": 0,
        "background": True,
    }
    ref = httpx.post(f"{stack.url}/v1/responses", json=body, headers=headers, timeout=60).json()["id"]
    want = _session_text(stack, ref, headers, 240)
    traffic = Traffic(stack.url, workload, tmp_path)
    rids = [
        httpx.post(f"{stack.url}/v1/responses", json=body, headers=headers, timeout=60).json()["id"]
        for _ in range(3)
    ]
    deadline = time.monotonic() + 60
    while not any(len(store.tokens(r)) >= 8 for r in rids):
        assert time.monotonic() < deadline, "no session started"
        time.sleep(0.1)
    t_fault = time.monotonic()
    replaced = replacement_timer("sessions", kill_replica("sessions"))
    done: dict[str, str] = {}
    texts: dict[str, str] = {}
    deadline = time.monotonic() + 240
    while len(done) < len(rids):
        for rid in rids:
            if rid in done:
                continue
            try:
                r = httpx.get(f"{stack.url}/v1/responses/{rid}", headers=headers, timeout=10)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and r.json()["status"] not in ("queued", "in_progress"):
                done[rid] = r.json()["status"]
                texts[rid] = _text(r.json())
        assert time.monotonic() < deadline, f"sessions not finished: {done}"
        time.sleep(0.5)
    finished_s = time.monotonic() - t_fault
    records = traffic.records()
    replaced_s = replaced()
    leases = [r for r in rids if (rec := store.get_any(r)) is not None and rec.owner]
    taken_over = sum((rec := store.get_any(r)) is not None and rec.claims >= 2 for r in rids)
    for rid in rids:  # the event log of a resumed session has no gap and no repeat
        events = store.events(rid)
        assert [e.seq for e in events] == list(range(len(events))), rid
    campaign.record(
        "fault",
        "kill session worker (under traffic)",
        clients=outcomes(records),
        sessions=dict(Counter(done.values())),
        sessions_exact=f"{sum(t == want for t in texts.values())}/{len(rids)}",
        taken_over=taken_over,
        sessions_finished_s=round(finished_s, 1),
        replacement_running_s=replaced_s,
        leases_held=len(leases),
    )
    assert set(done.values()) <= {"completed", "incomplete"}, done  # incomplete: max_output_tokens
    assert all(t == want for t in texts.values()), (
        "a resumed session's text differs from an uninterrupted run's"
    )
    assert not clean(records), clean(records)[:3]
    assert taken_over >= 1, "no session was taken over from the killed worker"
    assert not leases


def test_stalled_engine_gives_clean_errors_and_serves_again_when_it_resumes(
    stack, campaign, tmp_path
) -> None:
    """An engine that is alive but sends nothing: streams already running end after the stall timeout
    (migrated, or a clean error event), new requests end at their first-token timeout or are refused
    by the health state machine; nothing hangs, and once the engine runs again so does the model."""
    stall_s = stack.spec.resilience.streams.stall_timeout_s
    replica = replica_names(engine_deployment(stack, INTENT))[0]
    pid = engine_core_pid(replica)
    got: dict = {}
    body = chat_body(INTENT, 3000)
    first: dict[str, float] = {}

    def run_probe() -> None:
        got["p"] = probe(
            stack.url, body, on_event=lambda n: first.setdefault("t", time.monotonic()), timeout_s=300
        )

    t = threading.Thread(target=run_probe)
    t.start()
    deadline = time.monotonic() + 60
    while "t" not in first:
        assert time.monotonic() < deadline, "the probe never started"
        time.sleep(0.05)
    time.sleep(1)
    traffic = None
    with stopped(pid):
        t_fault = time.monotonic()
        traffic = Traffic(stack.url, mix(20, rate=1.0, reasoning=False), tmp_path)
        t.join(timeout=stall_s + 120)
        assert not t.is_alive(), "the probe hung on a stalled engine"
        p = got["p"]
        probe_end_s = time.monotonic() - t_fault
        records = traffic.records(timeout_s=400)
    resumed = time.monotonic()
    recovered_s = wait_serving(stack.url, INTENT)
    dec = settle(stack, INTENT)
    held = wait_released(stack.url)
    seen = outcomes(records)
    campaign.record(
        "fault",
        "stall engine (SIGSTOP, under traffic)",
        stall_timeout_s=stall_s,
        probe=p.outcome(),
        probe_ended_after_s=round(probe_end_s, 1),
        migrations=len(p.migrations),
        clients=seen,
        longest_request_s=round(longest(records), 1),
        recovered_after_resume_s=round(time.monotonic() - resumed, 1),
        held=held,
        engine_running=dec.running,
    )
    assert p.outcome() != "completed" or p.migrations, p.outcome()
    assert p.error is None or p.error.get("code") or p.error.get("type"), p.error
    assert not clean(records), clean(records)[:3]
    assert recovered_s < 60


def test_stalled_kv_transfer_falls_back_and_completes(stack, campaign, tmp_path) -> None:
    """The prefill engine frozen with its KV not yet pulled: the decode side's KV-transfer and prefill
    timeouts end the wait and it prefills itself; every request completes, nothing stays held."""
    d = stack.spec.model(REASONING).disaggregation
    replica = replica_names(engine_deployment(stack, REASONING, "prefill"))[0]
    pid = engine_core_pid(replica)
    long_prompt = " ".join(f"token{i}" for i in range(700))
    body = {**chat_body(REASONING, 32, long_prompt), "stream": False}
    body.pop("stream_options")
    with stopped(pid):
        t_fault = time.monotonic()
        traffic = Traffic(stack.url, mix(20, rate=1.0), tmp_path)
        r = httpx.post(
            f"{stack.url}/v1/chat/completions", json=body, headers={"x-tandem-disagg": "on"}, timeout=180
        )
        probe_s = time.monotonic() - t_fault
        records = traffic.records(timeout_s=400)
    route = r.headers.get("x-tandem-route", "")
    dec = settle(stack, REASONING)
    pre = settle(stack, REASONING, "prefill")
    held = wait_released(stack.url)
    seen = outcomes(records)
    campaign.record(
        "fault",
        "stall KV transfer (prefill engine SIGSTOP, under traffic)",
        probe=f"{r.status_code}",
        probe_s=round(probe_s, 1),
        route=route[:120],
        clients=seen,
        longest_request_s=round(longest(records), 1),
        bound_s=d.prefill_attempts * d.prefill_timeout_s + d.kv_transfer_timeout_s,
        held=held,
        decode_running=dec.running,
        prefill_running=pre.running,
    )
    assert r.status_code == 200, r.text
    assert "fallback" in route or "colocated" in route or "local" in route, route
    assert probe_s < d.prefill_attempts * d.prefill_timeout_s + d.kv_transfer_timeout_s + 30
    assert not clean(records), clean(records)[:3]
    assert seen.get("completed", 0) == len(records), seen


def test_exhausted_bucket_gives_429_with_retry_after_and_refills(stack, campaign) -> None:
    """A tenant past its token bucket gets 429 `rate_limited` with Retry-After; honouring it gets it
    served again; other tenants are not affected; no slot is left held."""
    tenant = {"x-tandem-tenant": "burst-a"}  # 20 tokens/s, burst 1,500 (tests/stack.py)
    body = {"model": INTENT, "messages": [{"role": "user", "content": "hello " * 60}], "max_tokens": 64}
    statuses, retry = [], None
    for _ in range(40):
        r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=tenant, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry = float(r.headers["retry-after"])
            reason = r.json()["error"]["code"]
            break
    assert retry is not None, statuses
    other = httpx.post(
        f"{stack.url}/v1/chat/completions", json=body, headers={"x-tandem-tenant": "bystander"}, timeout=60
    )
    time.sleep(retry)
    again = None
    for _ in range(5):  # Retry-After is when enough tokens are back for a request of that size
        again = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=tenant, timeout=60)
        if again.status_code == 200:
            break
        time.sleep(float(again.headers.get("retry-after", 1)))
    held = wait_released(stack.url)
    campaign.record(
        "fault",
        "exhaust a tenant's bucket",
        served_before_429=statuses.count(200),
        reason=reason,
        retry_after_s=retry,
        bystander=other.status_code,
        after_retry_after=again.status_code,
        held=held,
    )
    assert reason in ("rate_limited", "tenant_rate_limited", "bucket_empty") or "rate" in reason, reason
    assert other.status_code == 200
    assert again.status_code == 200


def test_client_that_never_reads_its_stream_is_cut_off_and_releases_everything(stack, campaign) -> None:
    """A client that opens a long stream and stops reading: when it goes away (here: closes the socket
    after 5 s without reading), the engine request is aborted and every slot is given back."""
    import socket

    host, port = stack.url.removeprefix("http://").split(":")
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"x-tandem-tenant: slow-reader\r\ncontent-length: %d\r\n\r\n"
    )
    import json as _json

    payload = _json.dumps(chat_body(INTENT, 3000)).encode()
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(raw % len(payload) + payload)
    deadline = time.monotonic() + 30
    while engine_stats(stack, INTENT).running < 1:
        assert time.monotonic() < deadline, "the slow reader's request never reached the engine"
        time.sleep(0.1)
    time.sleep(5)  # the engine generates; nothing is read
    during = engine_stats(stack, INTENT).running
    t0 = time.monotonic()
    s.close()
    dec = settle(stack, INTENT, timeout_s=30)
    aborted_s = time.monotonic() - t0
    held = wait_released(stack.url)
    campaign.record(
        "fault",
        "client never reads its stream, then leaves",
        engine_running_while_unread=during,
        aborted_after_close_s=round(aborted_s, 2),
        held=held,
        engine_running=dec.running,
    )
    assert aborted_s < 5


def test_filled_kv_cache_queues_then_completes_everything(aux, campaign) -> None:
    """Ten times more concurrent long requests than the engine's KV cache holds: vLLM queues (and
    preempts) them; all complete with their full output, and every KV block is free afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    url, handle = aux.url, aux.engine()
    import random

    n = 10
    # Token-id prompts (/v1/completions): exactly 1,800 prompt tokens each, none shared (no prefix hit).
    rng = random.Random(3)
    bodies = [{"model": INTENT, "prompt": [rng.randrange(16, 4000) for _ in range(1800)], "max_tokens": 64,
               "temperature": 0, "ignore_eos": True} for _ in range(n)]  # fmt: skip
    peak = {"kv": 0.0, "waiting": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            s = handle.stats.remote().result(timeout_s=30)
            peak["kv"] = max(peak["kv"], s.kv_usage)
            peak["waiting"] = max(peak["waiting"], s.waiting)
            time.sleep(0.1)

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=600), bodies))
    took = time.monotonic() - t0
    stop.set()
    w.join()
    deadline = time.monotonic() + 30
    while (s := handle.stats.remote().result(timeout_s=30)).running or s.waiting:
        assert time.monotonic() < deadline, s
        time.sleep(0.5)
    held = wait_released(url)
    statuses = sorted({r.status_code for r in results})
    tokens = [r.json()["usage"]["completion_tokens"] for r in results if r.status_code == 200]
    campaign.record(
        "fault",
        f"fill the KV cache ({n} x 1,800-token prompts, {AUX_KV_BLOCKS} blocks = 5,120 tokens)",
        statuses=statuses,
        completed=len(tokens),
        peak_kv_usage=round(peak["kv"], 2),
        peak_waiting=peak["waiting"],
        took_s=round(took, 1),
        kv_usage_after=round(s.kv_usage, 3),
        held=held,
    )
    assert statuses == [200], [r.text[:200] for r in results if r.status_code != 200]
    assert tokens == [64] * n
    assert peak["waiting"] >= 1 and peak["kv"] > 0.5, peak  # the cache was full: requests had to wait
    assert s.kv_usage < 0.01
