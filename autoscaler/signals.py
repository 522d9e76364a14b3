"""What the autoscaler sees: typed samples from the engine replicas and the ingress, with their age.

Pure data (no Ray): the Ray Serve adapter (serving/autoscaling.py) builds these from the metrics the
replicas publish with `record_autoscaling_stats`, and the simulator (loadtests/sim) from its engines.
A sample carries how old it is (`age_s`) and how long its replica has been up (`uptime_s`): the
policy ignores stale samples and replicas still warming up (an engine that just started has an empty
prefix cache and no latency history: it is not yet a sample of the pool's load).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Metric names of a replica's `record_autoscaling_stats` dict (floats, as Ray Serve requires).
REPLICA_FIELDS = (
    "uptime_s",
    "running",
    "waiting",
    "prefill_tokens_queued",
    "kv_usage",
    "input_tokens_per_s",
    "output_tokens_per_s",
    "ttft_s",
    "tpot_s",
)
#: Metric names the ingress publishes per model, prefixed `<model>:`.
INGRESS_FIELDS = (
    "queued",
    "queue_wait_s",
    "rejected_per_s",
    "arrivals_per_s",
    "input_tokens_per_s",
    "output_tokens_per_s",
)
#: A latency figure of -1 in a metrics dict means "no request finished in the window".
NO_VALUE = -1.0


def p90(values: list[float]) -> float | None:
    """The 90th percentile (nearest rank) of `values`; None when there are none."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, math.ceil(0.9 * len(v)) - 1)]


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One engine replica's load over the recent window.

    Args:
        replica: replica id.
        age_s: seconds since the sample was taken.
        uptime_s: seconds since the replica became ready.
        running: requests the engine is running.
        waiting: requests waiting in the engine's queue.
        prefill_tokens_queued: prompt tokens of waiting requests not yet computed.
        kv_usage: fraction of KV-cache blocks in use (0 to 1).
        input_tokens_per_s: prompt tokens computed per second (cache hits excluded).
        output_tokens_per_s: tokens generated per second.
        ttft_s: p90 time to first token of requests that started in the window (None: none did).
        tpot_s: p90 time per output token of requests that finished in the window (None: none did).
    """

    replica: str
    age_s: float
    uptime_s: float
    running: float = 0.0
    waiting: float = 0.0
    prefill_tokens_queued: float = 0.0
    kv_usage: float = 0.0
    input_tokens_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def from_metrics(cls, replica: str, age_s: float, m: Mapping[str, float]) -> ReplicaSample:
        """From a replica's `record_autoscaling_stats` dict (missing fields are 0, -1 latency is None)."""
        lat = {k: (None if m.get(k, NO_VALUE) < 0 else float(m[k])) for k in ("ttft_s", "tpot_s")}
        return cls(
            replica,
            age_s,
            float(m.get("uptime_s", 0.0)),
            float(m.get("running", 0.0)),
            float(m.get("waiting", 0.0)),
            float(m.get("prefill_tokens_queued", 0.0)),
            float(m.get("kv_usage", 0.0)),
            float(m.get("input_tokens_per_s", 0.0)),
            float(m.get("output_tokens_per_s", 0.0)),
            **lat,
        )


@dataclass(frozen=True, slots=True)
class IngressSample:
    """What the ingress replicas (together) saw of one model over the recent window.

    Args:
        age_s: seconds since the oldest ingress replica's sample was taken.
        queued: requests waiting at the ingress for a pool slot (or for a replica of a pool at zero).
        queue_wait_s: p90 wait of the requests that left the queue in the window.
        rejected_per_s: requests rejected for capacity (pool saturated, queue full, predicted to miss
            the TTFT objective) per second; tenants' own rate limits are not counted.
        arrivals_per_s: requests arriving per second.
        input_tokens_per_s: prompt tokens arriving per second.
        output_tokens_per_s: output tokens the arriving requests reserve (max_tokens) per second.
    """

    age_s: float
    queued: float = 0.0
    queue_wait_s: float = 0.0
    rejected_per_s: float = 0.0
    arrivals_per_s: float = 0.0
    input_tokens_per_s: float = 0.0
    output_tokens_per_s: float = 0.0

    @classmethod
    def merge(cls, parts: list[tuple[float, Mapping[str, float]]]) -> IngressSample | None:
        """Sum of several ingress replicas' `(age_s, metrics)`; the wait is the worst of them."""
        if not parts:
            return None
        total = {k: sum(float(m.get(k, 0.0)) for _, m in parts) for k in INGRESS_FIELDS}
        total["queue_wait_s"] = max(float(m.get("queue_wait_s", 0.0)) for _, m in parts)
        return cls(max(a for a, _ in parts), **total)


@dataclass(frozen=True, slots=True)
class PoolSignals:
    """One pool of a model: its replica counts and bounds, and its replicas' samples.

    Args:
        pool: pool name.
        role: colocated, prefill or decode.
        current: replicas the pool is meant to have now (its current target).
        running: replicas up and serving (fewer than `current` while some start).
        min_replicas: fewest replicas allowed.
        max_replicas: most replicas allowed.
        max_ongoing: requests one replica takes at once (the load fallback when no capacity is known).
        samples: the replicas' samples (any age; the policy filters).
    """

    pool: str
    role: str
    current: int
    running: int
    min_replicas: int
    max_replicas: int
    max_ongoing: int
    samples: tuple[ReplicaSample, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """Every pool of one model at one instant, and what the ingress saw of it."""

    model: str
    now: float
    pools: Mapping[str, PoolSignals]
    ingress: IngressSample | None = None
    #: Pools whose signals could not be read (the adapter says why): the policy holds them.
    missing: Mapping[str, str] = field(default_factory=dict)
