"""The admission benchmark's pure parts: objective, capacity, arrivals, burst summary, spec, transport."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest

from benchmarks import admission as ba
from benchmarks.asgi import StreamingASGITransport
from serving.config import load_spec

ROOT = Path(__file__).resolve().parents[2]


def test_slo_and_wait_budget() -> None:
    assert ba.slo_s(0.010) == pytest.approx(0.015)
    assert ba.wait_budget_s(0.015, 0.006) == pytest.approx(0.009)
    assert ba.wait_budget_s(0.005, 0.006) == pytest.approx(0.001)  # floored: the field must be > 0


def _level(c: int, rps: float, p99: float) -> dict:
    return {"concurrency": c, "requests_per_s": rps, "ttft_p99_s": p99}


def test_pick_capacity_takes_the_fastest_level_within_the_limit() -> None:
    levels = [_level(1, 20, 0.008), _level(2, 35, 0.012), _level(4, 60, 0.014), _level(8, 90, 0.030)]
    best, ok = ba.pick_capacity(levels, 0.015)
    assert ok and best["concurrency"] == 4
    # A faster level that misses the limit never wins; a slower one that meets it may.
    levels = [_level(1, 20, 0.008), _level(2, 35, 0.020), _level(4, 30, 0.014)]
    best, ok = ba.pick_capacity(levels, 0.015)
    assert ok and best["concurrency"] == 4


def test_pick_capacity_falls_back_to_the_lowest_level() -> None:
    best, ok = ba.pick_capacity([_level(4, 60, 0.5), _level(1, 20, 0.2)], 0.015)
    assert not ok and best["concurrency"] == 1
    with pytest.raises(ValueError):
        ba.pick_capacity([], 1.0)


def test_uniform_arrivals() -> None:
    times = ba.arrival_times(4.0, 2.0)
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    assert ba.arrival_times(0.0, 2.0) == [] and ba.arrival_times(3.0, 0.0) == []
    assert len(ba.arrival_times(1.5, 2.0)) == 3  # 0, 0.67, 1.33


def test_poisson_arrivals_are_seeded_and_near_the_rate() -> None:
    a = ba.arrival_times(50.0, 100.0, "poisson", seed=1)
    assert a == ba.arrival_times(50.0, 100.0, "poisson", seed=1)
    assert a != ba.arrival_times(50.0, 100.0, "poisson", seed=2)
    assert all(0 <= t < 100.0 for t in a) and a == sorted(a)
    assert 4500 < len(a) < 5500
    with pytest.raises(ValueError):
        ba.arrival_times(1.0, 1.0, "bursty")


def test_summarize_burst_counts_goodput_and_goals() -> None:
    ok = ba.Outcome(200, 0.010, True, admission_wait_s=0.001, pool_wait_s=0.002, lateness_s=0.001)
    slow = ba.Outcome(200, 0.050, True)
    rejected = ba.Outcome(429, None, False, "predicted_wait", "1", response_s=0.004)
    timeout = ba.Outcome(429, None, False, "fanout_timeout", "1", response_s=0.3)
    waiting = ba.Outcome(None, None, False, ba.UNFINISHED)
    streaming = ba.Outcome(200, 0.040, False, ba.UNFINISHED)
    broken = ba.Outcome(200, 0.012, False, "short_stream")
    outcomes = [ok] * 8 + [slow, rejected, rejected, timeout, waiting, streaming, broken]
    s = ba.summarize_burst(outcomes, duration_s=2.0, slo=0.020, capacity_rps=5.0)
    assert s["offered"] == 15 and s["offered_rps"] == 7.5
    assert s["admitted"] == 11  # the 200s, finished or not
    assert s["rejected"] == 3
    assert s["rejected_by_reason"] == {"429 predicted_wait": 2, "429 fanout_timeout": 1}
    assert s["retry_after_s"] == {"1": 3}
    assert s["unfinished"] == 2 and s["failed_in_stream"] == 1
    assert s["completed"] == 9 and s["good"] == 8
    assert s["goodput_rps"] == 4.0 and s["goodput_over_capacity"] == pytest.approx(0.8)
    assert s["admitted_ttft_p50_s"] == pytest.approx(0.010)
    assert s["admitted_ttft_p99_s"] > 0.040
    assert s["goal_met"] == {"admitted_p99_ttft": False, "goodput": False}
    assert s["admitted_breakdown"]["rest_p50_s"] == pytest.approx(0.006)
    assert s["rejection_latency_p99_s"] > 0.2


def test_summarize_burst_goals_met_and_empty() -> None:
    good = [ba.Outcome(200, 0.010, True)] * 20
    s = ba.summarize_burst(good, duration_s=2.0, slo=0.020, capacity_rps=10.0)
    assert s["goodput_rps"] == 10.0
    assert s["goal_met"] == {"admitted_p99_ttft": True, "goodput": True}
    s = ba.summarize_burst([ba.Outcome(429, None, False, "queue_full", "2")], 1.0, 0.02, 10.0)
    assert math.isnan(s["admitted_ttft_p99_s"])
    assert s["goal_met"] == {"admitted_p99_ttft": False, "goodput": False}


def test_bench_spec_trims_to_the_model_and_sets_admission() -> None:
    spec = load_spec(ROOT / "configs" / "local.yaml")
    model = spec.model("tiny-intent")
    params = ba.Params(
        config="",
        model=model.name,
        unloaded_requests=8,
        concurrency=(1, 2),
        duration_s=5,
        load=2.0,
        fanout=10,
        fanout_width=4,
        arrivals="uniform",
        seed=0,
        drain_timeout_s=10,
        prompt_tokens=128,
        max_tokens=32,
        engine_multiprocessing=False,
        gc_freeze=True,
    )
    adm = ba.admission_on(spec, model.name, params, pool_limit=3, offered_rps=50.0)
    out = ba.bench_spec(spec, model, adm, tier_slo_s=0.012)
    assert [m.name for m in out.models] == ["tiny-intent"]
    assert [(t.name, t.ttft_slo_s) for t in out.tiers] == [("intent", 0.012)]
    assert out.routing.rules == [] and out.server.ingress_replicas == 1
    a = out.admission
    assert a.enabled and [(p.model, p.max_concurrency) for p in a.pool_limits] == [("tiny-intent", 3)]
    assert a.default_tenant.fanout_width == 4
    # 10x the offered token rate: 50 req/s x (128 + 32) tokens x 10.
    assert a.default_tenant.tokens_per_s == 80_000 and a.default_tenant.burst_tokens == 80_000
    assert a.queue_timeout_s == spec.admission.queue_timeout_s and a.max_queue == spec.admission.max_queue
    off = ba.bench_spec(spec, model, ba.admission_off(), None)
    assert not off.admission.enabled and off.tiers[0].ttft_slo_s == spec.tier("intent").ttft_slo_s


async def _app(scope, receive, send) -> None:
    """Streams three chunks 50 ms apart; records a disconnect."""
    assert (await receive())["type"] == "http.request"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
    try:
        for i in range(3):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except (OSError, asyncio.CancelledError):
        _app.disconnected = True  # type: ignore[attr-defined]
        raise


async def test_streaming_transport_delivers_chunks_as_sent() -> None:
    async with httpx.AsyncClient(transport=StreamingASGITransport(_app), base_url="http://t") as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with c.stream("POST", "/x", json={}) as r:
            assert r.status_code == 200 and r.headers["x-a"] == "1"
            arrivals = []
            async for line in r.aiter_lines():
                if line:
                    arrivals.append((line, loop.time() - t0))
    assert [a for a, _ in arrivals] == ["data: 0", "data: 1", "data: 2"]
    assert arrivals[0][1] < 0.04  # the first chunk did not wait for the whole body
    assert arrivals[2][1] >= 0.09


async def test_streaming_transport_closing_early_disconnects_the_app() -> None:
    _app.disconnected = False  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=StreamingASGITransport(_app), base_url="http://t") as c:
        async with c.stream("POST", "/x", json={}) as r:
            async for line in r.aiter_lines():
                if line:
                    break
    assert _app.disconnected  # type: ignore[attr-defined]


async def test_streaming_transport_app_error_before_response() -> None:
    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    async with httpx.AsyncClient(transport=StreamingASGITransport(broken), base_url="http://t") as c:
        with pytest.raises(RuntimeError, match="boom"):
            await c.post("/x", json={})
