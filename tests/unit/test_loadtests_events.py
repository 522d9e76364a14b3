"""loadtests.locust_events: a record as the rows Locust's UI, CSV and HTML report show."""

from __future__ import annotations

from loadtests.locust_events import RequestFailed, SloMissed, events_of


def record(**kw):
    base = {"name": "agent", "type": "agent", "endpoint": "/v1/chat/completions", "outcome": "ok",
            "status": 200, "reason": None, "ttft": 0.2, "tpot": 0.01, "e2e": 0.5, "itl": [0.01, 0.02],
            "input": 300, "cached": 256, "output": 31, "reasoning": 0, "slo_met": True}  # fmt: skip
    return {**base, **kw}


def rows(evs):
    return {(e["request_type"], e["name"]): e for e in evs}


def test_a_completed_request_reports_latencies_slo_and_tokens() -> None:
    r = rows(events_of(record()))
    assert r[("chat", "agent")]["response_time"] == 500 and r[("chat", "agent")]["exception"] is None
    assert r[("TTFT", "agent")]["response_time"] == 200
    assert r[("TPOT", "agent")]["response_time"] == 10
    assert r[("SLO", "agent")]["exception"] is None
    assert r[("TOKENS", "agent cached")]["response_time"] == 256
    assert r[("TOKENS", "agent output")]["response_time"] == 31
    itl = [e for e in events_of(record()) if e["request_type"] == "ITL"]
    assert [e["response_time"] for e in itl] == [10, 20]


def test_a_missed_slo_is_a_failure_of_the_slo_row_only() -> None:
    r = rows(events_of(record(slo_met=False)))
    assert isinstance(r[("SLO", "agent")]["exception"], SloMissed)
    assert r[("chat", "agent")]["exception"] is None


def test_a_429_is_its_own_row_by_reason_and_not_a_failure() -> None:
    evs = events_of(record(outcome="rejected", status=429, reason="tokens", e2e=0.003))
    assert [(e["request_type"], e["name"], e["exception"]) for e in evs] == [("429", "agent tokens", None)]


def test_a_failure_fails_the_request_row_and_the_slo() -> None:
    r = rows(events_of(record(outcome="failed", status=503, reason="overloaded", endpoint="/v1/completions")))
    assert isinstance(r[("completions", "agent")]["exception"], RequestFailed)
    assert "503 overloaded" in str(r[("completions", "agent")]["exception"])
    assert isinstance(r[("SLO", "agent")]["exception"], SloMissed)
