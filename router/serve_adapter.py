"""The one Ray-aware file of the router: Tandem's policies as a Ray Serve `RequestRouter`.

Serve builds one router per deployment handle (in the ingress for decode/colocated pools, in each
decode replica for its prefill pool) and calls `choose_replicas` per request with the live
replicas; it tries the returned groups in order. Inputs come from:

- the request: `GenerateRequest` (first positional argument) carries the block keys the ingress
  computed once (router.hashing, salted per tenant), the tenant and the session id;
- the replicas: `record_routing_stats` on each engine replica (a `router.contracts.ReplicaStats`:
  running, waiting, KV usage, timestamp, KV-event endpoint), delivered by Serve every `stats_period_s`;
- the engines' KV events (router.kv_events), subscribed per replica, applied before each decision:
  the precise feed of the block index, next to the approximate one (the router's own decisions).

The decision is written back into the request (`GenerateRequest.routing`: a
`router.contracts.RouteFeedback` per candidate: matched blocks and score) before Serve sends it; Ray
Serve has no other channel from a router to the replica it picks. The replica reports it in
`x-tandem-route`, and a decode replica takes the matched blocks as its cached prefix in the P/D decision.
Decision latency and prefix hits go to Ray's metrics (Prometheus via the Ray
metrics export) as `tandem_router_decision_seconds` and `tandem_router_prefix_blocks_total`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.contracts import ReplicaStats, Role, RouteFeedback
from router.kv_events import KVEventSubscriber, apply_events
from router.policy import Gate, Policy, ReplicaView, RoutingRequest, Weights, make_policy

logger = logging.getLogger(__name__)

#: KV events applied per routing decision at most (the rest wait for the next one).
_EVENTS_PER_DECISION = 5_000
#: Import path for `request_router_config.request_router_class`.
ROUTER_CLASS = "router.serve_adapter:TandemRequestRouter"


def _routing_request(pending: PendingRequest | None, role: Role) -> RoutingRequest:
    req = pending.args[0] if pending is not None and pending.args else None
    if req is None or not hasattr(req, "block_keys"):
        rid = pending.metadata.request_id if pending is not None else ""
        return RoutingRequest(rid, role=role)
    return RoutingRequest(
        req.request_id,
        list(req.block_keys),
        tenant=req.tenant,
        session_id=req.session_id,
        role=role,
    )


class TandemRequestRouter(RequestRouter):
    """Ray Serve request router running a Tandem policy (`request_router_kwargs` = the spec's router)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._role = Role(kwargs.get("role", Role.DECODE))
        weights = Weights(**kwargs["weights"])
        gate = Gate(**kwargs["gate"])
        self._policy: Policy = make_policy(
            kwargs["policy"],
            index_budget=int(kwargs["block_budget"]),
            weights=weights,
            gate=gate,
            stale_after_s=float(kwargs["stale_after_s"]),
            sessions=int(kwargs["sessions"]),
            rng=random.Random(),
        )
        self._sent: dict[str, tuple[RoutingRequest, str]] = {}
        self._known: set[str] = set()
        self._subscribers: dict[str, KVEventSubscriber] = {}
        self._metrics = _Metrics(kwargs.get("deployment", ""))

    @property
    def policy(self) -> Policy:
        return self._policy

    def _stats(self, replica: RunningReplica) -> ReplicaStats:
        # One router serves one deployment: every candidate has this router's role.
        return ReplicaStats.from_dict(replica.routing_stats, self._role)

    def _view(self, replica: RunningReplica) -> ReplicaView:
        s = self._stats(replica)
        return ReplicaView(
            replica.replica_id.unique_id,
            role=s.role,
            running=s.running,
            waiting=s.waiting,
            kv_usage=s.kv_usage,
            updated_at=s.ts,
        )

    def _sync_kv_events(self, replicas: list[RunningReplica]) -> None:
        """Subscribe to new replicas' KV events; apply what arrived (on this loop, so the index
        has one writer)."""
        index = getattr(self._policy, "index", None)
        if index is None:
            return
        for r in replicas:
            rid = r.replica_id.unique_id
            endpoint = self._stats(r).kv_events
            sub = self._subscribers.get(rid)
            if endpoint and (sub is None or sub.endpoint != endpoint):
                if sub is not None:
                    sub.stop()
                self._subscribers[rid] = KVEventSubscriber(rid, endpoint).start()
        for rid, sub in self._subscribers.items():
            apply_events(index, rid, sub.drain(_EVENTS_PER_DECISION))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._sync_kv_events(candidate_replicas)
        t0 = time.perf_counter()
        req = _routing_request(pending_request, self._role)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = [self._view(r) for r in candidate_replicas]
        decision = self._policy.route(req, views, time.time())
        self._metrics.observe(time.perf_counter() - t0, decision.matched_blocks, decision.total_blocks)
        if (
            pending_request is not None
            and pending_request.args
            and hasattr(pending_request.args[0], "routing")
        ):
            # Only what the serving replica needs: its matched blocks (None without an index) and score.
            indexed = getattr(self._policy, "index", None) is not None
            matched = decision.matched
            pending_request.args[0].routing = {
                rid: RouteFeedback(matched.get(rid, 0) if indexed else None, decision.scores.get(rid, 0.0))
                for group in decision.ranked[:2]
                for rid in group
            }
        ranked = [[by_id[rid] for rid in group if rid in by_id] for group in decision.ranked]
        return [g for g in ranked if g] or [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        req = _routing_request(pending_request, self._role)
        rid = replica_id.unique_id
        self._policy.on_sent(req, rid)
        self._sent[pending_request.metadata.internal_request_id] = (req, rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        sent = self._sent.pop(internal_request_id, None)
        if sent is not None:
            self._policy.on_done(sent[0], sent[1])

    def _forget(self, rid: str) -> None:
        self._policy.drop_replica(rid)
        sub = self._subscribers.pop(rid, None)
        if sub is not None:
            sub.stop()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._forget(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        current = {r.replica_id.unique_id for r in replicas}
        for gone in self._known - current:
            self._forget(gone)
        self._known = current
        super().update_replicas(replicas)


class _Metrics:
    """Ray metrics of one router (exported through Ray's Prometheus endpoint)."""

    def __init__(self, deployment: str) -> None:
        try:
            from ray.util.metrics import Counter, Histogram

            self._latency = Histogram(
                "tandem_router_decision_seconds",
                description="Time to choose a replica (filters, index match, scorers, ranking).",
                boundaries=[25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3],
                tag_keys=("deployment",),
            )
            self._blocks = Counter(
                "tandem_router_prefix_blocks_total",
                description="Prompt blocks routed, by whether the chosen replica held them (hit) or not.",
                tag_keys=("deployment", "result"),
            )
            self._tags = {"deployment": deployment}
        except Exception:  # noqa: BLE001 - metrics are best effort outside a Ray worker
            self._latency = self._blocks = None

    def observe(self, seconds: float, matched: int, total: int) -> None:
        if self._latency is None:
            return
        self._latency.observe(seconds, tags=self._tags)
        if matched:
            self._blocks.inc(matched, tags={**self._tags, "result": "hit"})
        if total - matched:
            self._blocks.inc(total - matched, tags={**self._tags, "result": "miss"})
