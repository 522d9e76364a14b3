"""Types that cross a process boundary between the router and the replicas (pure; no Ray).

Both sides import them from here, so a field renamed on one side cannot silently drift from the other:

- `Role`: what a pool's replicas do (the spec's `pools[].role`, the router's filter);
- `DisaggMode`: the client's or the model's prefill/decode choice (`x-tandem-disagg`, `disaggregation.mode`);
- `ServeMode`: how a request was in fact served (`mode=` of the `x-tandem-route` header);
- `ReplicaStats`: what an engine replica reports to its router (`record_routing_stats`, every
  `router.stats_period_s`). On the wire it is the dict Ray Serve carries (`as_dict` / `from_dict`);
- `RouteFeedback`: what the router tells the replica it chose about its own choice (the replica
  reports it in `x-tandem-route`, and a decode replica reads its matched blocks for the P/D decision).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """What a pool's replicas do with a request."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


class DisaggMode(StrEnum):
    """Prefill/decode disaggregation choice (the `x-tandem-disagg` request header overrides the model's)."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


class ServeMode(StrEnum):
    """How a request was served: its prompt prefilled on another replica (disagg) or on its own."""

    DISAGG = "disagg"
    COLOCATED = "colocated"


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """An engine replica's load as its router sees it.

    Attributes:
        role: the replica's pool role.
        running: requests the engine is running.
        waiting: requests queued in the engine.
        kv_usage: fraction of KV-cache blocks in use (0..1).
        ts: unix time of the snapshot (stale stats degrade gracefully in the policy).
        kv_events: ZMQ endpoint of the engine's KV events (None: the engine publishes none).
    """

    role: Role
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    ts: float = 0.0
    kv_events: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The dict `record_routing_stats` returns (what Ray Serve carries to the router)."""
        return {
            "role": self.role.value,
            "running": self.running,
            "waiting": self.waiting,
            "kv_usage": self.kv_usage,
            "ts": self.ts,
            "kv_events": self.kv_events,
        }

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any] | None, role: Role) -> ReplicaStats:
        """Parse what a replica reported; a replica that has not reported yet (None or {}) is idle
        with stats of time 0 (stale). `role` is the router's own: one router serves one pool."""
        if not stats:
            return cls(role)
        return cls(
            role,
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            ts=float(stats.get("ts", 0.0)),
            kv_events=stats.get("kv_events") or None,
        )


@dataclass(frozen=True, slots=True)
class RouteFeedback:
    """The router's view of one candidate replica for one request.

    Attributes:
        matched_blocks: leading prompt blocks the router believes the replica holds (its block index,
            fed by the engines' KV events); None when the policy keeps no index (round robin, ...).
        score: the candidate's weighted score.
    """

    matched_blocks: int | None
    score: float
