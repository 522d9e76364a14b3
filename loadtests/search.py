"""Capacity search: the highest offered rate at which enough requests meet their SLOs (pure).

`search(run_trial, ...)` grows the offered rate geometrically from `start_rate` while it passes, then
bisects between the last rate that passed and the first that failed until they are within
`rel_tolerance` of each other. Each rate is run `repeats` times (`run_trial(rate)` is one bounded trial:
an open-loop run at that rate, or anything that says how many requests it sent and how many met their
SLOs); a rate **passes** when the pooled fraction of requests meeting their SLOs is at least `target`
(0.99 by default). Every rate reports a Wilson 95 % interval of that fraction, and the capacity is
reported with the bracket it lies in: `[capacity, first_failing_rate)`.

`progress` (if given) is called with one line per trial, so a long search shows where it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Trial:
    """One bounded run at one offered rate."""

    rate: float
    requests: int
    met_slo: int


@dataclass(slots=True)
class RatePoint:
    """Every trial at one rate, pooled."""

    rate: float
    trials: list[Trial] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.trials)

    @property
    def met_slo(self) -> int:
        return sum(t.met_slo for t in self.trials)

    @property
    def fraction(self) -> float:
        return self.met_slo / self.requests if self.requests else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95 % interval of the fraction meeting the SLOs."""
        return wilson(self.met_slo, self.requests)


@dataclass(slots=True)
class SearchResult:
    """The capacity (highest passing rate; 0 if none passed) and every rate tried, in order."""

    capacity: float
    #: The lowest rate that failed (None: the search stopped while still passing).
    first_failing: float | None
    target: float
    points: list[RatePoint]

    @property
    def bracket(self) -> tuple[float, float | None]:
        return self.capacity, self.first_failing


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def search(
    run_trial: Callable[[float], Trial],
    *,
    target: float = 0.99,
    start_rate: float = 1.0,
    growth: float = 2.0,
    rel_tolerance: float = 0.05,
    repeats: int = 3,
    max_rates: int = 30,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Find the highest rate whose requests meet their SLOs at least `target` of the time."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], not {target!r}")
    if not start_rate > 0 or not growth > 1 or not rel_tolerance > 0 or repeats < 1 or max_rates < 2:
        raise ValueError("start_rate > 0, growth > 1, rel_tolerance > 0, repeats >= 1, max_rates >= 2")
    points: list[RatePoint] = []

    def passes(rate: float) -> bool:
        point = RatePoint(rate)
        for i in range(repeats):
            trial = run_trial(rate)
            point.trials.append(trial)
            if progress is not None:
                met = f"{trial.met_slo}/{trial.requests}"
                progress(f"rate {rate:.3g}/s trial {i + 1}/{repeats}: {met} met the SLOs")
        points.append(point)
        ok = point.requests > 0 and point.fraction >= target
        if progress is not None:
            lo, hi = point.interval
            verdict = "pass" if ok else "fail"
            progress(f"rate {rate:.3g}/s: {point.fraction:.1%} (95 % CI {lo:.1%}-{hi:.1%}) -> {verdict}")
        return ok

    lo, hi = 0.0, None
    rate = start_rate
    while len(points) < max_rates:
        if not passes(rate):
            hi = rate
            break
        lo, rate = rate, rate * growth
    if hi is None:
        return SearchResult(lo, None, target, points)
    # Bisect [lo, hi): lo passed (or is 0: nothing passed yet), hi failed.
    floor = start_rate / growth**4  # below the start rate, search down to a few halvings
    while len(points) < max_rates:
        if lo > 0 and (hi - lo) / lo <= rel_tolerance:
            break
        if lo == 0 and hi <= floor:
            break
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, target, points)
