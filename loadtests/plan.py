"""What a run sends and when: the arrivals of an open loop, and how workers share them (pure).

An open-loop run is planned in full before it starts: `arrivals(workload)` gives every job (one
intent call, one agent session, one fan-out task, one trace request) its due time and its workload,
drawn from the workload's seed. Every Locust worker computes the same plan and sends the jobs
`k % workers == index` (`share`), so N workers offer exactly the load one would, and a run's request
count does not depend on how many workers sent it.

The rate of a synthetic shape counts jobs: an agent job is a session of `turns` calls and a fan-out
job `width` calls. The summary reports requests per second next to it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from loadtests import schedule, traces
from loadtests.workload import TraceWorkload, WorkloadFile


@dataclass(frozen=True, slots=True)
class Arrival:
    """Job `index` of the run: due `due` seconds after the start, of workload `workload` (its position
    in the file); `item` counts that workload's jobs (a trace workload replays its item-th request)."""

    index: int
    due: float
    workload: int
    item: int


def trace_requests(w: TraceWorkload) -> list[traces.TraceRequest]:
    """A trace workload's requests, token-scaled and limited as the file says."""
    reqs = traces.scale(traces.read_trace(w.path), w.token_scale, w.max_input_tokens, w.max_output_tokens)
    return reqs[: w.limit] if w.limit else reqs


def offsets(
    wf: WorkloadFile,
    rate: float | None = None,
    duration_s: float | None = None,
    loaded: Mapping[str, list[traces.TraceRequest]] | None = None,
) -> list[float]:
    """Due times of an open-loop run (`rate`/`duration_s` override the file's, as a search does).
    `loaded`: the trace workloads' requests by path, if already read (else read here)."""
    shape, duration = wf.shape, duration_s or wf.duration_s
    rng = random.Random(wf.seed)
    r = rate or shape.rate
    kind = shape.kind if not (rate and shape.kind in {"closed", "ramp", "trace"}) else "poisson"
    if kind == "closed":
        raise ValueError("a closed loop has no schedule: its users send as fast as they are answered")
    if kind == "ramp":
        return schedule.ramp(shape.start_rate or 0.0, shape.end_rate or 0.0, duration)
    if kind == "trace":
        (w,) = wf.workloads
        assert isinstance(w, TraceWorkload)
        reqs = loaded[w.path] if loaded is not None else trace_requests(w)
        ts = schedule.from_timestamps([q.t_s for q in reqs], w.time_scale)
        return [t for t in ts if t < duration]
    n = max(1, round(r * duration))
    if kind == "constant":
        return schedule.constant(r, n)
    if kind == "poisson":
        return schedule.poisson(r, n, rng)
    return schedule.gamma(r, n, shape.cv, rng)


def picker(wf: WorkloadFile, rng: random.Random) -> Iterator[int]:
    """An endless supply of workload positions, drawn by weight."""
    weights = [w.weight for w in wf.workloads]
    positions = list(range(len(weights)))
    while True:
        yield from rng.choices(positions, weights, k=256)


def arrivals(
    wf: WorkloadFile,
    rate: float | None = None,
    duration_s: float | None = None,
    loaded: Mapping[str, list[traces.TraceRequest]] | None = None,
) -> list[Arrival]:
    """Every job of an open-loop run, in due order (`loaded` as for `offsets`)."""
    due = offsets(wf, rate, duration_s, loaded)
    pick = picker(wf, random.Random(wf.seed + 1))
    items = [0] * len(wf.workloads)
    out = []
    for k, t in enumerate(due):
        w = next(pick)
        out.append(Arrival(k, t, w, items[w]))
        items[w] += 1
    return out


def share(plan: list[Arrival], index: int, workers: int) -> list[Arrival]:
    """The jobs worker `index` of `workers` sends."""
    if workers < 1 or not 0 <= index < workers:
        raise ValueError(f"worker index {index} of {workers} workers")
    return plan[index::workers]
