"""loadtests.search against synthetic servers whose capacity is known."""

from __future__ import annotations

import random

import pytest

from loadtests.search import Trial, search, wilson


def synthetic(capacity: float, seed: int = 0, n: int = 200):
    """A server that meets the SLO for 99.9 % of requests up to `capacity` req/s, and ever fewer above."""
    rng = random.Random(seed)
    calls: list[float] = []

    def run(rate: float) -> Trial:
        calls.append(rate)
        p = 0.999 if rate <= capacity else max(0.0, 1.0 - 3.0 * (rate - capacity) / capacity)
        return Trial(rate, n, sum(rng.random() < p for _ in range(n)))

    return run, calls


@pytest.mark.parametrize("capacity", [0.7, 3.0, 13.0, 250.0])
def test_finds_a_known_capacity_within_10_percent(capacity: float) -> None:
    run, calls = synthetic(capacity, seed=int(capacity))
    lines: list[str] = []
    r = search(run, start_rate=1.0, rel_tolerance=0.05, repeats=3, progress=lines.append)
    assert abs(r.capacity - capacity) / capacity < 0.10
    assert r.first_failing is not None and r.capacity < r.first_failing
    assert (r.first_failing - r.capacity) / r.capacity <= 0.05 + 1e-9
    # Every rate was run 3 times and reported; the passing ones pooled >= 99 %.
    assert len(calls) == 3 * len(r.points) and len(lines) == 4 * len(r.points)
    assert all(p.fraction >= 0.99 for p in r.points if p.rate <= r.capacity)
    assert "rate" in lines[0] and ("pass" in lines[3] or "fail" in lines[3])


def test_nothing_passes_and_the_search_is_bounded() -> None:
    def never(rate: float) -> Trial:
        return Trial(rate, 100, 50)

    r = search(never, start_rate=1.0, max_rates=10)
    assert r.capacity == 0.0 and r.first_failing is not None and len(r.points) <= 10

    def always(rate: float) -> Trial:
        return Trial(rate, 100, 100)

    r = search(always, start_rate=1.0, max_rates=5)
    assert r.capacity == 16.0 and r.first_failing is None and len(r.points) == 5


def test_wilson_interval_and_argument_checks() -> None:
    lo, hi = wilson(99, 100)
    assert lo < 0.99 < hi and 0.94 < lo and hi <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(100, 100)[1] == pytest.approx(1.0) and wilson(100, 100)[0] > 0.95
    with pytest.raises(ValueError, match="target"):
        search(lambda r: Trial(r, 1, 1), target=1.5)
    with pytest.raises(ValueError, match="growth"):
        search(lambda r: Trial(r, 1, 1), growth=1.0)
