"""Open-loop arrival schedules and the generator's own pacing error (pure; no Locust, no I/O).

An open-loop test sends request k at `start + offsets[k]` whatever happened to the requests before it:
the schedule is absolute, so a request sent late does not push the ones after it back (the failure of a
closed loop, or of "sleep 1/rate after each send", is to let a slow server lower its own offered load).

- `constant(rate, n)`: evenly spaced, `1/rate` apart;
- `poisson(rate, n, rng)`: a Poisson process of intensity `rate` (exponential gaps);
- `gamma(rate, n, cv, rng)`: gamma gaps of coefficient of variation `cv` (burstier than Poisson for
  cv > 1, smoother for cv < 1), as GuideLLM and vLLM's `--burstiness` do;

Both random schedules hold exactly `rate` over their span: a schedule is the offered load of one trial,
and a capacity search must not mistake a sample's luck for the server's.
- `ramp(start_rate, end_rate, duration_s)`: a rate growing linearly over `duration_s` (arrivals at the
  inverse of the cumulative intensity, so the instantaneous rate is exact);
- `from_timestamps(ts, time_scale)`: a trace's own arrival times, compressed by `time_scale`.

`pacing(offsets, sent)` compares when requests were due with when the generator really sent them: the
lateness a load report must show next to its latencies (a generator that cannot keep up measures
itself, not the server).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


def _check(rate: float, n: int) -> None:
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests per second, not {rate!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")


def constant(rate: float, n: int) -> list[float]:
    """`n` arrivals `1/rate` seconds apart, the first at 0."""
    _check(rate, n)
    return [k / rate for k in range(n)]


def poisson(rate: float, n: int, rng: random.Random) -> list[float]:
    """`n` arrivals of a Poisson process of intensity `rate`, conditioned on `n` arrivals in `n / rate`
    seconds: sorted uniform times on that span (the order statistics of a Poisson process given its
    count), so the mean rate is exactly `rate` and no part of the schedule drifts."""
    _check(rate, n)
    span = n / rate
    return sorted(rng.uniform(0.0, span) for _ in range(n))


def gamma(rate: float, n: int, cv: float, rng: random.Random) -> list[float]:
    """`n` arrivals with gamma-distributed gaps of coefficient of variation `cv`, rescaled so that the
    `n` gaps span exactly `n / rate` seconds (a finite sample otherwise misses the rate by ~cv/√n)."""
    _check(rate, n)
    if not cv > 0:
        raise ValueError(f"cv must be > 0, not {cv!r}")
    shape = 1.0 / (cv * cv)
    gaps = [rng.gammavariate(shape, 1.0) for _ in range(n)]
    k = (n / rate) / sum(gaps) if n else 1.0
    out, t = [], 0.0
    for g in gaps:
        t += g * k
        out.append(t)
    return out


def ramp(start_rate: float, end_rate: float, duration_s: float) -> list[float]:
    """Arrivals whose rate grows (or falls) linearly from `start_rate` to `end_rate` over `duration_s`.

    The k-th arrival is at the time the cumulative intensity Λ(t) = a t + (b − a) t² / (2 T) reaches k.
    """
    if start_rate < 0 or end_rate < 0 or not start_rate + end_rate > 0 or not duration_s > 0:
        raise ValueError("ramp: rates must be >= 0 (not both 0) and duration_s > 0")
    a, b, T = start_rate, end_rate, duration_s
    total = (a + b) * T / 2.0
    slope = (b - a) / T
    out = []
    for k in range(int(math.floor(total + 1e-9))):
        if abs(slope) < 1e-12:
            out.append(k / a)
        else:  # solve slope/2 t² + a t − k = 0 for t >= 0
            out.append((-a + math.sqrt(a * a + 2.0 * slope * k)) / slope)
    return out


def from_timestamps(ts: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """A trace's arrival times (seconds, any origin) as offsets from its first, divided by `time_scale`
    (2.0 replays an hour in half an hour)."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, not {time_scale!r}")
    if not ts:
        return []
    t0 = min(ts)
    return [(t - t0) / time_scale for t in ts]


@dataclass(frozen=True, slots=True)
class Pacing:
    """How far the generator was from its schedule (seconds; late > 0)."""

    requests: int
    late_mean_s: float
    late_p99_s: float
    late_max_s: float
    #: Requests sent more than `tolerance_s` after they were due.
    late_requests: int
    #: Offered rate the schedule asked for, and the rate the sends achieved (requests / span).
    scheduled_rate: float
    achieved_rate: float


def pacing(offsets: Sequence[float], sent: Sequence[float], tolerance_s: float = 0.01) -> Pacing:
    """Compare due times `offsets` with send times `sent` (both relative to the same start)."""
    if len(offsets) != len(sent):
        raise ValueError("offsets and sent must have one entry per request")
    n = len(offsets)
    if n == 0:
        return Pacing(0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
    late = sorted(s - o for o, s in zip(offsets, sent, strict=True))
    p99 = late[min(n - 1, math.ceil(0.99 * n) - 1)]

    def rate(ts: Sequence[float]) -> float:
        span = max(ts) - min(ts)
        return (n - 1) / span if n > 1 and span > 0 else 0.0

    return Pacing(
        n,
        sum(late) / n,
        p99,
        late[-1],
        sum(1 for x in late if x > tolerance_s),
        rate(offsets),
        rate(sent),
    )
