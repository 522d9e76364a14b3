"""The Redis server behind background sessions killed (SIGKILL) in the middle of Locust traffic, then
started again from its AOF log (tests/faults/conftest.py `aux`: a second app whose sessions live on
a real redis-server).

While it is down, calls that need the store get 503 `store_unavailable` with Retry-After in bounded
time, chat completions (no store) are still served, and session workers stop as if their lease were
lost; once it is back, every session resumes from its checkpoint and finishes with the same greedy
tokens as an uninterrupted run, and no lease is left held."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.tools import INTENT, Traffic, longest, outcomes

pytestmark = pytest.mark.integration

TENANT = {"x-tandem-tenant": "faults-redis"}
REQUEST = {
    "model": INTENT,
    "input": "Write a long story about a lighthouse keeper and the sea.",
    "max_output_tokens": 400,
    "temperature": 0,
    "background": True,
}


def _store(aux):
    from serving.sessions.stores import open_store

    return open_store(aux.spec.sessions)


def _wait_done(url: str, rid: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(f"{url}/v1/responses/{rid}", headers=TENANT, timeout=10)
            if r.status_code == 200 and r.json()["status"] not in ("queued", "in_progress"):
                return r.json()
        except httpx.HTTPError:
            pass  # one read lost to the store's recovery: poll again until the deadline
        assert time.monotonic() < deadline, f"{rid} not finished after {timeout_s}s"
        time.sleep(0.3)


def _text(result: dict) -> str:
    return "".join(
        c["text"] for item in result["output"] if item["type"] == "message" for c in item["content"]
    )


def test_redis_killed_under_traffic_sessions_resume_exactly_and_clients_get_clean_503s(
    aux, campaign, tmp_path
) -> None:
    url = aux.url
    ref = httpx.post(f"{url}/v1/responses", json=REQUEST, headers=TENANT, timeout=60)
    assert ref.status_code == 200, ref.text
    want = _wait_done(url, ref.json()["id"], 240)
    assert want["status"] in ("completed", "incomplete"), want  # incomplete: max_output_tokens

    load = {"duration_s": 30, "shape": {"kind": "constant", "rate": 1.0}, "seed": 5, "workloads": [
        {"type": "intent", "weight": 2, "model": INTENT, "slo": {"ttft_s": 30}},
        {"type": "responses", "weight": 1, "model": INTENT, "max_output_tokens": 48, "reasoning_budget": None,
         "follow": "poll", "slo": {"ttft_s": 120}}]}  # fmt: skip
    traffic = Traffic(url, load, tmp_path)
    time.sleep(8)
    rids = []
    for _ in range(3):
        r = httpx.post(f"{url}/v1/responses", json=REQUEST, headers=TENANT, timeout=60)
        assert r.status_code == 200, r.text
        rids.append(r.json()["id"])
    store = _store(aux)
    deadline = time.monotonic() + 60
    while not all(len(store.tokens(r)) >= 16 for r in rids):
        assert time.monotonic() < deadline, "the sessions never started"
        time.sleep(0.1)
    store.close()

    aux.redis.kill()
    t_fault = time.monotonic()
    t0 = time.monotonic()
    create = httpx.post(f"{url}/v1/responses", json=REQUEST, headers=TENANT, timeout=60)
    create_s = time.monotonic() - t0
    t0 = time.monotonic()
    read = httpx.get(f"{url}/v1/responses/{rids[0]}", headers=TENANT, timeout=60)
    read_s = time.monotonic() - t0
    hi = {"model": INTENT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    chat = httpx.post(f"{url}/v1/chat/completions", json=hi, timeout=60)
    time.sleep(5)
    aux.redis.start()
    restarted_s = time.monotonic() - t_fault
    results = [_wait_done(url, rid, 300) for rid in rids]
    finished_s = time.monotonic() - t_fault
    records = traffic.records()
    store = _store(aux)
    leases = [rid for rid in rids if (rec := store.get_any(rid)) is not None and rec.owner]
    store.close()
    same = sum(_text(r) == _text(want) for r in results)
    campaign.record(
        "fault", "kill Redis (session store, under traffic)",
        create_during=f"{create.status_code} {create.json().get('error', {}).get('code')}",
        create_answered_s=round(create_s, 2), read_during=read.status_code, read_answered_s=round(read_s, 2),
        chat_during=chat.status_code, down_s=round(restarted_s, 1), sessions_finished_s=round(finished_s, 1),
        sessions_exact=f"{same}/{len(results)}", clients=outcomes(records),
        longest_request_s=round(longest(records), 1),
        leases_held=len(leases),
    )  # fmt: skip
    assert create.status_code == 503 and create.json()["error"]["code"] == "store_unavailable", create.text
    assert int(create.headers["retry-after"]) > 0
    assert create_s < 5 and read_s < 5
    assert read.status_code == 503
    assert chat.status_code == 200
    assert [r["status"] for r in results] == [want["status"]] * len(rids)
    assert same == len(results), "a resumed session's text differs from the uninterrupted run's"
    assert not leases
    broken = [r for r in records if r["outcome"] != "ok" and not (r["status"] and r.get("reason"))]
    assert not broken, broken[:3]
