"""One run's per-request records, and the JSON summary other tools read (pure; no Locust, no I/O).

A **record** is one request as the load generator saw it (a dict, one JSON line in `records.jsonl`):

| key | meaning |
|---|---|
| `name`, `type` | the workload's report name and its request type |
| `endpoint` | the API path it was sent to |
| `due`, `sent` | seconds from the run's start when it was due (open loop; closed loop: = `sent`) and sent |
| `outcome` | `ok`, `rejected` (a 429), or `failed` (any other error, a broken stream) |
| `status`, `reason` | HTTP status (0: no response); the 429's reason or the error |
| `ttft`, `tpot`, `e2e` | seconds (None where undefined: no output, one output token) |
| `itl` | the gaps between output events (seconds) |
| `input`, `cached`, `output`, `reasoning` | token counts from the server's usage |
| `slo_met` | whether it met its workload's SLOs (a rejected or failed request never does) |
| `overhead` | seconds of the generator's own CPU spent on this request (building, parsing, recording) |
| `tags` | optional: what the workload adds (an agent turn's `session` and `turn`) |

The **summary** (`SCHEMA`) is what the report plots and what the simulator calibrates on:

```json
{"schema": "tandem.loadtest/1", "runs": [RUN, ...], "search": null | {...}, "meta": {...}}
```

where a RUN is `summarize_run(...)`: offered and achieved rate, counts by outcome, rejections by
reason, SLO attainment and goodput, latency percentiles (TTFT, TPOT, ITL, E2E), token totals and
rates, the same per request type under `by_type`, the generator's pacing error and overhead, and a
time series in `window_s` buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SCHEMA = "tandem.loadtest/1"
#: Percentiles every latency is reported at.
PERCENTILES = (50, 90, 99)
TOKEN_KINDS = ("input", "cached", "output", "reasoning")
LATENCIES = ("ttft", "tpot", "itl", "e2e")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The `p`-th percentile by linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean and the `PERCENTILES` of `values`."""
    out: dict[str, float | int | None] = {
        "count": len(values),
        "mean": sum(values) / len(values) if values else None,
    }
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def _latencies(records: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    ok = [r for r in records if r["outcome"] == "ok"]
    out = {k: distribution([r[k] for r in ok if r.get(k) is not None]) for k in ("ttft", "tpot", "e2e")}
    out["itl"] = distribution([g for r in ok for g in r.get("itl") or ()])
    return out


def _counts(records: Sequence[Mapping[str, Any]], duration_s: float) -> dict[str, Any]:
    outcomes = Counter(r["outcome"] for r in records)
    met = sum(1 for r in records if r.get("slo_met"))
    n = len(records)
    tokens = {k: sum(int(r.get(k) or 0) for r in records if r["outcome"] == "ok") for k in TOKEN_KINDS}
    return {
        "requests": n,
        "ok": outcomes["ok"],
        "rejected": outcomes["rejected"],
        "failed": outcomes["failed"],
        "rejected_by_reason": dict(
            Counter(r.get("reason") or "unknown" for r in records if r["outcome"] == "rejected")
        ),
        "failed_by_reason": dict(
            Counter(r.get("reason") or "unknown" for r in records if r["outcome"] == "failed")
        ),
        "slo_met": met,
        "slo_fraction": met / n if n else 0.0,
        "goodput_rps": met / duration_s if duration_s > 0 else 0.0,
        "throughput_rps": outcomes["ok"] / duration_s if duration_s > 0 else 0.0,
        "tokens": tokens,
        "output_tokens_per_s": tokens["output"] / duration_s if duration_s > 0 else 0.0,
        "input_tokens_per_s": tokens["input"] / duration_s if duration_s > 0 else 0.0,
        "cached_fraction": tokens["cached"] / tokens["input"] if tokens["input"] else 0.0,
        "latency": _latencies(records),
    }


def timeseries(records: Sequence[Mapping[str, Any]], window_s: float) -> dict[str, list]:
    """Per `window_s` bucket of send time: requests sent, completed ok, rejected, failed, output
    tokens per second, and TTFT p50 / p99 of the requests sent in it. Tokens and TTFT count only the
    ok requests, as the run's totals do, so the series adds up to them."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, not {window_s}")
    if not records:
        return {"t": [], "sent": [], "ok": [], "rejected": [], "failed": [], "output_tokens_per_s": [],
                "ttft_p50": [], "ttft_p99": []}  # fmt: skip
    buckets = int(max(r["sent"] for r in records) // window_s) + 1
    rows: list[list[Mapping[str, Any]]] = [[] for _ in range(buckets)]
    for r in records:
        rows[int(r["sent"] // window_s)].append(r)
    ttfts = [[r["ttft"] for r in row if r["outcome"] == "ok" and r.get("ttft") is not None] for row in rows]
    return {
        "t": [i * window_s for i in range(buckets)],
        "sent": [len(row) for row in rows],
        "ok": [sum(r["outcome"] == "ok" for r in row) for row in rows],
        "rejected": [sum(r["outcome"] == "rejected" for r in row) for row in rows],
        "failed": [sum(r["outcome"] == "failed" for r in row) for row in rows],
        "output_tokens_per_s": [
            sum(int(r.get("output") or 0) for r in row if r["outcome"] == "ok") / window_s for row in rows
        ],
        "ttft_p50": [percentile(t, 50) for t in ttfts],
        "ttft_p99": [percentile(t, 99) for t in ttfts],
    }


def summarize_run(
    records: Sequence[Mapping[str, Any]],
    *,
    duration_s: float,
    offered_rate: float | None = None,
    slos: Mapping[str, Mapping[str, float | None]] | None = None,
    window_s: float = 5.0,
    label: str | None = None,
) -> dict[str, Any]:
    """The summary of one run (one trial of a search) from its records.

    `duration_s` is the span the load was offered over; `offered_rate` what the schedule asked for
    (None for a closed loop: the rate achieved is then the only rate there is).
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, not {duration_s}")
    n = len(records)
    sent_rate = n / duration_s
    late = [max(0.0, r["sent"] - r["due"]) for r in records]
    overhead = [r["overhead"] for r in records if r.get("overhead") is not None]
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    run = {
        "label": label,
        "duration_s": duration_s,
        "offered_rate": offered_rate if offered_rate is not None else sent_rate,
        "sent_rate": sent_rate,
        **_counts(records, duration_s),
        "pacing": {
            "late_mean_s": sum(late) / n if n else 0.0,
            "late_p99_s": percentile(late, 99) or 0.0,
            "late_max_s": max(late, default=0.0),
            "late_over_10ms": sum(1 for x in late if x > 0.010),
        },
        "client_overhead_s": distribution(overhead),
        "slos": {k: dict(v) for k, v in (slos or {}).items()},
        "by_type": {
            name: {"type": rows[0]["type"], **_counts(rows, duration_s)}
            for name, rows in sorted(by_name.items())
        },
        "timeseries": timeseries(records, window_s),
    }
    return run


def summary(
    runs: Iterable[Mapping[str, Any]], *, search: Mapping[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    """The whole JSON document: every run, the search (if one ran), and `meta` (host, workload, ...)."""
    return {"schema": SCHEMA, "meta": meta, "runs": list(runs), "search": dict(search) if search else None}


def check_summary(doc: Mapping[str, Any]) -> None:
    """Raise ValueError unless `doc` is a summary this code can read."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"not a Tandem load-test summary (a JSON {type(doc).__name__}, not an object)")
    if doc.get("schema") != SCHEMA:
        raise ValueError(
            f"not a Tandem load-test summary (schema {doc.get('schema')!r}, expected {SCHEMA!r})"
        )
    if not doc.get("runs"):
        raise ValueError("the summary has no runs")


def search_section(result: Any) -> dict[str, Any]:
    """A `search.SearchResult` as the summary's `search` entry."""
    return {
        "target": result.target,
        "capacity_rps": result.capacity,
        "first_failing_rps": result.first_failing,
        "points": [
            {
                "rate": p.rate,
                "trials": len(p.trials),
                "requests": p.requests,
                "met_slo": p.met_slo,
                "fraction": p.fraction,
                "ci95": list(p.interval),
                "passed": p.requests > 0 and p.fraction >= result.target,
            }
            for p in result.points
        ],
    }
