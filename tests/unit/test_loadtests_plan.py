"""loadtests.plan: the open-loop plan every worker computes, and how workers share it."""

from __future__ import annotations

from collections import Counter

import pytest

from loadtests.plan import arrivals, offsets, share
from loadtests.workload import parse_workload


def wf(**shape):
    return parse_workload(
        {
            "duration_s": 100,
            "shape": shape,
            "seed": 3,
            "workloads": [{"type": "intent", "weight": 3}, {"type": "agent", "weight": 1}],
        }
    )


def test_the_plan_is_the_same_every_time_and_mixes_by_weight() -> None:
    a, b = arrivals(wf(kind="poisson", rate=20)), arrivals(wf(kind="poisson", rate=20))
    assert a == b and len(a) == 2000
    assert all(x.due <= y.due for x, y in zip(a, a[1:], strict=False))
    mix = Counter(x.workload for x in a)
    assert mix[0] / len(a) == pytest.approx(0.75, abs=0.03)
    # Each workload counts its own jobs (a trace workload replays its item-th request).
    assert [x.item for x in a if x.workload == 1] == list(range(mix[1]))


def test_workers_share_the_plan_exactly() -> None:
    plan = arrivals(wf(kind="constant", rate=7))
    parts = [share(plan, i, 3) for i in range(3)]
    assert sorted((x for p in parts for x in p), key=lambda x: x.index) == plan
    assert {len(p) for p in parts} <= {len(plan) // 3, len(plan) // 3 + 1}
    with pytest.raises(ValueError, match="worker index 3 of 3"):
        share(plan, 3, 3)


def test_a_rate_override_turns_a_closed_loop_into_poisson_arrivals() -> None:
    closed = wf(kind="closed", users=4)
    with pytest.raises(ValueError, match="closed loop has no schedule"):
        offsets(closed)
    due = offsets(closed, rate=5, duration_s=10)
    assert len(due) == 50 and max(due) < 10


def test_a_trace_shape_replays_the_trace_within_the_duration(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"timestamp": {t}, "input_length": 10, "output_length": 2}}\n' for t in
                            (0, 500, 1000, 9000, 20000)))  # fmt: skip
    w = parse_workload(
        {
            "duration_s": 10,
            "shape": {"kind": "trace"},
            "workloads": [{"type": "trace", "path": str(path), "time_scale": 2}],
        }
    )
    assert offsets(w) == [0.0, 0.25, 0.5, 4.5]  # ms to s, twice as fast, the 10 s at 20 s cut
