"""A simulated run's results in the load-test summary's shape, in memory bounded by the run's length
in time, not its request count.

Small runs keep every record and summarise them with `loadtests.summary.summarize_run`, the very code
a Locust run's summary comes from. Large runs (a million requests) stream: counts and sums are exact,
percentiles come from log-spaced histograms (buckets 1 % apart, so a percentile is within 0.5 % of
the exact one) and the time series from one histogram per window.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from loadtests.summary import PERCENTILES, TOKEN_KINDS, summarize_run

#: Ratio between consecutive histogram bucket bounds.
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)


class Histogram:
    """Counts of positive values in log-spaced buckets (zero and below in their own bucket)."""

    __slots__ = ("buckets", "count", "total", "zeros")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.zeros = 0

    def add(self, value: float, weight: int = 1) -> None:
        self.count += weight
        self.total += value * weight
        if value <= 0:
            self.zeros += weight
        else:
            self.buckets[math.floor(math.log(value) / _LOG_GROWTH)] += weight

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total
        self.zeros += other.zeros

    def percentile(self, p: float) -> float | None:
        """The `p`-th percentile (the geometric middle of its bucket); None when empty."""
        if not self.count:
            return None
        rank = (self.count - 1) * p / 100
        seen = self.zeros
        if rank < seen:
            return 0.0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if rank < seen:
                return GROWTH ** (b + 0.5)
        return GROWTH ** (max(self.buckets) + 0.5)

    def distribution(self) -> dict[str, float | int | None]:
        """Like `loadtests.summary.distribution`."""
        out: dict[str, float | int | None] = {
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
        }
        for p in PERCENTILES:
            out[f"p{p}"] = self.percentile(p)
        return out


class _Counts:
    """What `loadtests.summary._counts` reports, accumulated one record at a time."""

    def __init__(self) -> None:
        self.n = 0
        self.outcomes: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.met = 0
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)
        self.lat = {k: Histogram() for k in ("ttft", "tpot", "e2e", "itl")}

    def add(self, r: Mapping[str, Any]) -> None:
        self.n += 1
        outcome = r["outcome"]
        self.outcomes[outcome] += 1
        if outcome == "rejected":
            self.rejected[r.get("reason") or "unknown"] += 1
        elif outcome == "failed":
            self.failed[r.get("reason") or "unknown"] += 1
        if r.get("slo_met"):
            self.met += 1
        if outcome == "ok":
            for k in TOKEN_KINDS:
                self.tokens[k] += int(r.get(k) or 0)
            for k in ("ttft", "tpot", "e2e"):
                v = r.get(k)
                if v is not None:
                    self.lat[k].add(v)

    def doc(self, duration_s: float) -> dict[str, Any]:
        n, ok, tokens = self.n, self.outcomes["ok"], self.tokens
        return {
            "requests": n,
            "ok": ok,
            "rejected": self.outcomes["rejected"],
            "failed": self.outcomes["failed"],
            "rejected_by_reason": dict(self.rejected),
            "failed_by_reason": dict(self.failed),
            "slo_met": self.met,
            "slo_fraction": self.met / n if n else 0.0,
            "goodput_rps": self.met / duration_s,
            "throughput_rps": ok / duration_s,
            "tokens": dict(tokens),
            "output_tokens_per_s": tokens["output"] / duration_s,
            "input_tokens_per_s": tokens["input"] / duration_s,
            "cached_fraction": tokens["cached"] / tokens["input"] if tokens["input"] else 0.0,
            "latency": {k: h.distribution() for k, h in self.lat.items()},
        }


class Recorder:
    """Collects a simulated run's records (see the module docstring).

    Args:
        keep_records: keep every record (exact summary) instead of streaming.
        window_s: time-series bucket.
    """

    def __init__(self, keep_records: bool, window_s: float = 5.0) -> None:
        self.keep = keep_records
        self.window_s = window_s
        self.records: list[dict[str, Any]] = []
        self._all = _Counts()
        self._by_name: dict[str, tuple[str, _Counts]] = {}
        self._windows: dict[int, list] = {}
        self._late: list[float] = []
        #: ITL samples come from engine steps, per model: (step seconds, sequences in it).
        self.itl: dict[str, Histogram] = {}
        self.model_of: dict[str, str] = {}
        self._by_model: dict[str, _Counts] = {}

    def add(self, r: dict[str, Any]) -> None:
        model = r.get("model")
        if model is not None:
            counts = self._by_model.get(model)
            if counts is None:
                counts = self._by_model[model] = _Counts()
            counts.add(r)
        if self.keep:
            self.records.append(r)
            return
        self._all.add(r)
        name = r["name"]
        entry = self._by_name.get(name)
        if entry is None:
            entry = self._by_name[name] = (r["type"], _Counts())
        entry[1].add(r)
        w = self._windows.get(int(r["sent"] // self.window_s))
        if w is None:
            w = self._windows[int(r["sent"] // self.window_s)] = [0, 0, 0, 0, 0, Histogram()]
        w[0] += 1
        outcome = r["outcome"]
        if outcome == "ok":
            w[1] += 1
            w[4] += int(r.get("output") or 0)
            if r.get("ttft") is not None:
                w[5].add(r["ttft"])
        elif outcome == "rejected":
            w[2] += 1
        else:
            w[3] += 1

    def by_model_doc(self, duration_s: float) -> dict[str, Any]:
        """Counts and latencies per served model (histogram percentiles, whatever `keep`)."""
        return {m: c.doc(duration_s) for m, c in sorted(self._by_model.items())}

    def itl_sink(self, model: str):
        h = self.itl.setdefault(model, Histogram())

        def sink(step_s: float, n: int) -> None:
            h.add(step_s, n)

        return sink

    def summarize(
        self, *, duration_s: float, offered_rate: float | None, slos: Mapping[str, Any], label: str | None
    ) -> dict[str, Any]:
        """The run's summary, shaped as `loadtests.summary.summarize_run`'s."""
        if self.keep:
            run = summarize_run(
                self.records, duration_s=duration_s, offered_rate=offered_rate, slos=slos,
                window_s=self.window_s, label=label,
            )  # fmt: skip
        else:
            run = self._streamed(duration_s, offered_rate, slos, label)
        # A simulated request's tokens arrive a step apart: ITL is the engines' step time.
        all_itl = Histogram()
        for h in self.itl.values():
            all_itl.merge(h)
        run["latency"]["itl"] = all_itl.distribution()
        for name, row in run["by_type"].items():
            h = self.itl.get(self.model_of.get(name, ""))
            row["latency"]["itl"] = h.distribution() if h is not None else Histogram().distribution()
        return run

    def _streamed(
        self, duration_s: float, offered_rate: float | None, slos: Mapping[str, Any], label: str | None
    ) -> dict[str, Any]:
        n = self._all.n
        buckets = max(self._windows, default=-1) + 1
        rows = [self._windows.get(i, [0, 0, 0, 0, 0, Histogram()]) for i in range(buckets)]
        return {
            "label": label,
            "duration_s": duration_s,
            "offered_rate": offered_rate if offered_rate is not None else n / duration_s,
            "sent_rate": n / duration_s,
            **self._all.doc(duration_s),
            "pacing": {"late_mean_s": 0.0, "late_p99_s": 0.0, "late_max_s": 0.0, "late_over_10ms": 0},
            "client_overhead_s": Histogram().distribution(),
            "slos": {k: dict(v) for k, v in slos.items()},
            "by_type": {
                name: {"type": t, **c.doc(duration_s)} for name, (t, c) in sorted(self._by_name.items())
            },
            "timeseries": {
                "t": [i * self.window_s for i in range(buckets)],
                "sent": [w[0] for w in rows],
                "ok": [w[1] for w in rows],
                "rejected": [w[2] for w in rows],
                "failed": [w[3] for w in rows],
                "output_tokens_per_s": [w[4] / self.window_s for w in rows],
                "ttft_p50": [w[5].percentile(50) for w in rows],
                "ttft_p99": [w[5].percentile(99) for w in rows],
            },
        }
