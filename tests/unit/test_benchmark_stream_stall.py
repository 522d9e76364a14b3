"""benchmarks/stream_stall.py: the request mix and the stall rule (the stack run itself is the benchmark)."""

from __future__ import annotations

from benchmarks.stream_stall import requests_for, stalled, summary


def test_requests_alternate_endpoints_and_pd_modes_and_are_fresh() -> None:
    reqs = requests_for("m", 4, 16, pd=True, seed=1)
    assert len(reqs) == 5  # one warm-up
    assert [p for p, _, _ in reqs] == ["/v1/completions", "/v1/chat/completions"] * 2 + ["/v1/completions"]
    assert [h["x-tandem-disagg"] for _, _, h in reqs] == ["on", "on", "off", "off", "on"]
    prompts = [b.get("prompt") or b["messages"][0]["content"] for _, b, _ in reqs]
    assert len(set(prompts)) == 5
    assert all(b["stream"] and b["ignore_eos"] and b["max_tokens"] == 16 for _, b, _ in reqs)
    assert requests_for("m", 2, 16, pd=False, seed=1)[0][2] == {}


def test_a_stall_is_many_events_with_late_headers() -> None:
    assert stalled(30, 0.95, 1.0)
    assert not stalled(30, 0.2, 1.0)  # streamed
    assert not stalled(3, 0.95, 1.0)  # a short answer arrives at once anyway
    rows = [
        {"headers_ms": 900, "first_event_ms": 900, "e2e_ms": 1000, "stalled": True},
        {"headers_ms": 100, "first_event_ms": 110, "e2e_ms": 800, "stalled": False},
    ]
    s = summary(rows)
    assert s["requests"] == 2 and s["stalled"] == 1 and s["first_event_max_ms"] == 900
