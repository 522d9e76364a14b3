"""loadtests.summary: percentiles, SLO attainment and goodput, rejections by reason, the time series."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from loadtests.search import Trial, search
from loadtests.summary import (
    SCHEMA,
    check_summary,
    distribution,
    percentile,
    search_section,
    summarize_run,
    summary,
    timeseries,
)


def rec(sent: float = 0.0, outcome: str = "ok", **kw: Any) -> dict[str, Any]:
    """One record with the keys `loadtests.client` emits; an ok one meets its SLO unless told."""
    ok = outcome == "ok"
    base = {
        "name": "chat",
        "type": "chat",
        "due": sent,
        "sent": sent,
        "outcome": outcome,
        "status": 200 if ok else 429 if outcome == "rejected" else 500,
        "reason": None,
        "ttft": 0.1 if ok else None,
        "tpot": 0.02 if ok else None,
        "e2e": 0.5,
        "itl": [0.02, 0.02] if ok else [],
        "input": 100,
        "cached": 40,
        "output": 10 if ok else 0,
        "reasoning": 0,
        "slo_met": ok,
        "overhead": 0.001,
    }
    return {**base, **kw}


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_is_numpys_linear_interpolation(n: int) -> None:
    xs = [random.Random(n).lognormvariate(0, 1) for _ in range(n)]
    for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)
    assert percentile([], 50) is None
    d = distribution(xs)
    assert d["count"] == n and d["mean"] == pytest.approx(float(np.mean(xs)))
    assert d["p99"] == pytest.approx(float(np.percentile(xs, 99)))
    assert distribution([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def test_slo_fraction_goodput_and_rejections_by_reason() -> None:
    records = (
        [rec(i * 0.5) for i in range(6)]  # ok, met
        + [rec(3.0, slo_met=False, ttft=2.0)]  # ok, too slow
        + [rec(3.5, "rejected", reason="overloaded"), rec(4.0, "rejected", reason="overloaded")]
        + [rec(4.2, "rejected", reason="tenant_quota"), rec(4.4, "rejected")]  # no reason: unknown
        + [rec(4.5, "failed", reason="stream_error", output=3)]
    )
    run = summarize_run(records, duration_s=5.0, offered_rate=2.5, slos={"chat": {"ttft_s": 0.5}})
    assert (run["requests"], run["ok"], run["rejected"], run["failed"]) == (12, 7, 4, 1)
    assert run["rejected_by_reason"] == {"overloaded": 2, "tenant_quota": 1, "unknown": 1}
    assert run["failed_by_reason"] == {"stream_error": 1}
    # Rejected and failed requests count against attainment: 6 of all 12 met their SLO.
    assert run["slo_met"] == 6 and run["slo_fraction"] == pytest.approx(0.5)
    assert run["goodput_rps"] == pytest.approx(6 / 5) and run["throughput_rps"] == pytest.approx(7 / 5)
    assert run["offered_rate"] == 2.5 and run["sent_rate"] == pytest.approx(12 / 5)
    # Tokens and latencies are the ok requests' only (the failed one's 3 output tokens are not).
    assert run["tokens"] == {"input": 700, "cached": 280, "output": 70, "reasoning": 0}
    assert run["output_tokens_per_s"] == pytest.approx(14.0) and run["cached_fraction"] == pytest.approx(0.4)
    assert run["latency"]["ttft"]["count"] == 7 and run["latency"]["itl"]["count"] == 14
    assert run["latency"]["ttft"]["p50"] == pytest.approx(0.1)
    assert run["by_type"]["chat"]["requests"] == 12 and run["slos"] == {"chat": {"ttft_s": 0.5}}
    # A closed loop (no offered rate) offers what it sent.
    assert summarize_run(records, duration_s=5.0)["offered_rate"] == pytest.approx(12 / 5)
    with pytest.raises(ValueError, match="duration_s"):
        summarize_run(records, duration_s=0)


def test_pacing_overhead_and_types() -> None:
    records = [rec(0.0), rec(1.02, due=1.0), rec(2.0, due=2.005, name="agent", type="agent", overhead=0.003)]
    run = summarize_run(records, duration_s=3.0)
    pacing = run["pacing"]
    # Early is not late: lateness is max(0, sent - due).
    assert pacing["late_max_s"] == pytest.approx(0.02) and pacing["late_over_10ms"] == 1
    assert pacing["late_mean_s"] == pytest.approx(0.02 / 3)
    assert run["client_overhead_s"]["p50"] == pytest.approx(0.001)
    assert set(run["by_type"]) == {"agent", "chat"} and run["by_type"]["agent"]["type"] == "agent"
    assert run["by_type"]["chat"]["requests"] == 2


def test_timeseries_buckets_by_send_time_and_adds_up_to_the_run() -> None:
    records = [
        rec(0.0, ttft=0.1),
        rec(0.9, ttft=0.3),
        rec(1.0, "rejected", reason="overloaded"),
        rec(3.5, "failed", reason="stream_error", output=7, ttft=0.05),
        rec(4.0, ttft=0.2),
    ]
    ts = timeseries(records, 1.0)
    assert ts["t"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ts["sent"] == [2, 1, 0, 1, 1]
    assert (ts["ok"], ts["rejected"], ts["failed"]) == ([2, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0])
    assert ts["ttft_p50"] == [pytest.approx(0.2), None, None, None, pytest.approx(0.2)]
    assert ts["ttft_p99"][0] == pytest.approx(0.298)
    # Output tokens per second are the ok requests', as the run's total: the series sums to it.
    assert ts["output_tokens_per_s"] == [20.0, 0.0, 0.0, 0.0, 10.0]
    run = summarize_run(records, duration_s=5.0, window_s=2.0)
    assert run["timeseries"]["t"] == [0.0, 2.0, 4.0]
    assert sum(run["timeseries"]["output_tokens_per_s"]) * 2.0 == run["tokens"]["output"]
    assert timeseries([], 1.0)["t"] == []
    with pytest.raises(ValueError, match="window_s"):
        timeseries(records, 0)


def test_summary_document_search_section_and_check_summary() -> None:
    result = search(lambda rate: Trial(rate, 100, 100 if rate <= 3 else 90), start_rate=1.0, repeats=2)
    section = search_section(result)
    assert section["capacity_rps"] == result.capacity and 3 <= result.capacity < 3.2
    assert [p["passed"] for p in section["points"]] == [p.rate <= 3 for p in result.points]
    first = section["points"][0]
    assert first["trials"] == 2 and first["requests"] == 200 and first["met_slo"] == 200
    assert first["ci95"][0] < 1.0 and first["ci95"][1] == pytest.approx(1.0)
    doc = summary([summarize_run([rec()], duration_s=1.0)], search=section, host="h", workload="w")
    assert doc["schema"] == SCHEMA and doc["meta"] == {"host": "h", "workload": "w"}
    check_summary(json.loads(json.dumps(doc)))  # survives the round trip through its file
    check_summary(summary([summarize_run([rec()], duration_s=1.0)]))
    with pytest.raises(ValueError, match="schema 'other'"):
        check_summary({**doc, "schema": "other"})
    with pytest.raises(ValueError, match="no runs"):
        check_summary({**doc, "runs": []})
    with pytest.raises(ValueError, match="not a Tandem load-test summary"):
        check_summary([doc])  # type: ignore[arg-type]
