"""Routing policies over plain data: filters → weighted scorers (each in [0, 1]) → picker.

Nothing here imports Ray or an engine. A `RoutingRequest` carries what the ingress knows (block
keys of the tokenized prompt, tenant, session); a `ReplicaView` what a replica last reported
(queue, running, KV usage) and when. Policies return *ranked groups* of replica ids, the shape
Ray Serve's `RequestRouter.choose_replicas` returns: Serve tries the first group, then the next.

The cache-aware policy:

1. **filters** keep replicas of the wanted role that are healthy;
2. **scorers**: `prefix` (leading blocks held / prompt blocks), `load` (1 − load / fleet max),
   `kv` (1 − KV usage), `session` (1 on the replica the session last used);
3. the **imbalance gate** is decided per candidate: a candidate whose load exceeds
   `ratio × mean + slack` loses its prefix and session scores (cache affinity must not pile
   more work on it), while every other candidate keeps them. One hot replica never switches
   cache routing off for the fleet;
4. the **picker** ranks by weighted score (ties: lower load, then a seeded RNG).

Fresh stats are topped up with the requests this router sent to the replica after the report (so a
burst between two reports does not pile onto one replica). Stats older than `stale_after_s` degrade
gracefully: that replica's load becomes the router's own count of requests it has in flight there,
and its KV score a neutral 0.5.

Baselines, selectable by config: round robin, power of two choices, consistent hash on the session.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.contracts import Role
from router.index import BlockIndex


@dataclass(slots=True)
class RoutingRequest:
    """What a policy may know about a request."""

    request_id: str
    block_keys: list[int] = field(default_factory=list)
    tenant: str = ""
    session_id: str | None = None
    role: Role = Role.DECODE


@dataclass(slots=True)
class ReplicaView:
    """A replica as the router sees it (`updated_at`: when its stats were reported)."""

    replica_id: str
    role: Role = Role.DECODE
    healthy: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Weights:
    """Scorer weights (a weight of 0 turns a scorer off)."""

    prefix: float
    load: float
    kv: float
    session: float


@dataclass(frozen=True, slots=True)
class Gate:
    """Per-candidate imbalance gate: load > ratio × mean load + slack disables cache affinity there."""

    ratio: float
    slack: float


@dataclass(slots=True)
class Decision:
    """A routing decision: ranked groups of replica ids, and why the first was chosen."""

    ranked: list[list[str]]
    matched_blocks: int = 0
    total_blocks: int = 0
    score: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    #: Leading prompt blocks each candidate holds, where any (cache-aware policy only; a gated
    #: candidate's count is 0; read with `.get(replica, 0)`).
    matched: dict[str, int] = field(default_factory=dict)

    @property
    def chosen(self) -> str | None:
        return self.ranked[0][0] if self.ranked and self.ranked[0] else None


class Policy(ABC):
    """Base: `route` ranks candidates; `on_sent` / `on_done` keep the policy's own book."""

    @abstractmethod
    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        """Ranked groups of eligible replica ids for `req` (empty when none is eligible)."""

    def on_sent(self, req: RoutingRequest, replica: str) -> None:  # noqa: B027 - an optional hook, a no-op unless a policy keeps state
        """The request went to `replica`."""

    def on_done(self, req: RoutingRequest, replica: str) -> None:  # noqa: B027 - an optional hook, a no-op unless a policy keeps state
        """The request finished on `replica`."""

    def drop_replica(self, replica: str) -> None:  # noqa: B027 - an optional hook, a no-op unless a policy keeps state
        """`replica` left the pool."""


def eligible(req: RoutingRequest, replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
    """The filters: role and health (one router serves one model's pool, so no tier filter)."""
    return [r for r in replicas if r.role == req.role and r.healthy]


class CacheAwarePolicy(Policy):
    """Prefix overlap from the block index, balanced against load (see the module docstring).

    Args:
        index: the block index (shared with the KV-event consumer).
        weights: scorer weights.
        gate: the per-candidate imbalance gate.
        stale_after_s: stats older than this are not trusted.
        sessions: sessions remembered for affinity (LRU).
        rng: tie-breaking randomness (seed it in tests).
    """

    def __init__(
        self,
        index: BlockIndex,
        weights: Weights,
        gate: Gate,
        stale_after_s: float,
        sessions: int,
        rng: random.Random,
    ) -> None:
        self.index = index
        self._w = weights
        self._gate = gate
        self._stale = stale_after_s
        self._rng = rng
        self._session_cap = sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._inflight: dict[str, int] = {}
        # Send times per replica since its last stats report: fresh stats do not count them yet.
        self._recent: dict[str, deque[float]] = {}
        self._now = 0.0

    def _load(self, r: ReplicaView, now: float) -> tuple[float, float | None]:
        """(load, kv_usage or None when stale)."""
        if now - r.updated_at > self._stale:
            return float(self._inflight.get(r.replica_id, 0)), None
        return float(r.running + r.waiting), r.kv_usage

    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = eligible(req, replicas)
        total = len(req.block_keys)
        if not cands:
            return Decision(ranked=[], total_blocks=total)
        self._now = now
        w = self._w
        matched = self.index.match(req.block_keys) if total and w.prefix else {}
        # One pass for loads (stale stats: our own in-flight count, neutral KV score).
        # NOTE(speed): this runs per request over every candidate (a thousand in a large pool), so
        # the loops avoid per-candidate calls and tuples where a plain comparison will do.
        stale_before = now - self._stale
        inflight = self._inflight
        loads: list[float] = []
        kv_scores: list[float] = []
        recent = self._recent
        for r in cands:
            ts = r.updated_at
            if ts < stale_before:
                loads.append(float(inflight.get(r.replica_id, 0)))
                kv_scores.append(0.5)
            else:
                sent = recent.get(r.replica_id)
                if sent:
                    while sent and sent[0] <= ts:
                        sent.popleft()
                    loads.append(float(r.running + r.waiting + len(sent)))
                else:
                    loads.append(float(r.running + r.waiting))
                kv = r.kv_usage
                kv_scores.append(0.0 if kv >= 1.0 else 1.0 if kv <= 0.0 else 1.0 - kv)
        peak = max(loads)
        limit = self._gate.ratio * (sum(loads) / len(loads)) + self._gate.slack
        sticky = self._sessions.get(_session_key(req)) if req.session_id else None
        inv_total = 1.0 / total if total else 0.0
        inv_peak = 1.0 / peak if peak > 0 else 0.0
        wp, wl, wk, ws = w.prefix * inv_total, w.load, w.kv, w.session
        scores: dict[str, float] = {}
        held: dict[str, int] = {}
        # The two best as (score, -load, tiebreak, id); every candidate draws its tiebreak, in order.
        best: list[tuple[float, float, float, str]] = []
        second = (-math.inf, -math.inf, 0.0, "")
        rand = self._rng.random
        for r, load, kv in zip(cands, loads, kv_scores, strict=True):
            rid = r.replica_id
            score = wl * (1.0 - load * inv_peak) + wk * kv
            if load <= limit:  # the per-candidate gate: a hot replica gets no cache pull
                if matched:
                    n = matched.get(rid, 0)
                    if n:
                        held[rid] = n
                        score += wp * n
                if rid == sticky:
                    score += ws
            scores[rid] = score
            tiebreak = rand()
            if score < second[0] and len(best) == 2:
                continue
            item = (score, -load, tiebreak, rid)
            if len(best) < 2:
                best.append(item)
                best.sort(reverse=True)
                if len(best) == 2:
                    second = best[1]
            elif item > second:
                best[1] = item
                best.sort(reverse=True)
                second = best[1]
        top = [b[3] for b in best]
        rest = [r.replica_id for r in cands if r.replica_id not in top]
        ranked = [[t] for t in top] + ([rest] if rest else [])
        first = top[0]
        return Decision(
            ranked=ranked,
            matched_blocks=held.get(first, 0),
            total_blocks=total,
            score=scores[first],
            scores=scores,
            matched=held,
        )

    def on_sent(self, req: RoutingRequest, replica: str) -> None:
        # Approximate index: the engine will hold these blocks once it has prefilled them. Recorded
        # last block first, so the LRU evicts a prefix's tail before its head, as the engine does.
        if req.block_keys:
            self.index.add(replica, reversed(req.block_keys))
        self._recent.setdefault(replica, deque()).append(self._now)
        if req.session_id:
            key = _session_key(req)
            self._sessions[key] = replica
            self._sessions.move_to_end(key)
            while len(self._sessions) > self._session_cap:
                self._sessions.popitem(last=False)
        self._inflight[replica] = self._inflight.get(replica, 0) + 1

    def on_done(self, req: RoutingRequest, replica: str) -> None:
        n = self._inflight.get(replica, 0)
        if n > 0:
            self._inflight[replica] = n - 1

    def drop_replica(self, replica: str) -> None:
        self.index.drop_replica(replica)
        self._inflight.pop(replica, None)
        self._recent.pop(replica, None)
        for s in [s for s, r in self._sessions.items() if r == replica]:
            del self._sessions[s]


def _session_key(req: RoutingRequest) -> str:
    """Sessions are per tenant: another tenant's session id never pulls toward this one's replica."""
    return f"{req.tenant}\x00{req.session_id}"


def _groups(order: list[str]) -> list[list[str]]:
    """Ranked groups as Serve's router takes them: the best, the runner-up, then everyone else."""
    if len(order) <= 2:
        return [[r] for r in order]
    return [[order[0]], [order[1]], order[2:]]


class RoundRobinPolicy(Policy):
    """Baseline: each request to the next eligible replica."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = sorted(r.replica_id for r in eligible(req, replicas))
        if not cands:
            return Decision(ranked=[])
        i = self._next % len(cands)
        self._next += 1
        return Decision(ranked=_groups(cands[i:] + cands[:i]), total_blocks=len(req.block_keys))


class PowerOfTwoPolicy(Policy):
    """Baseline: the less loaded of two random eligible replicas (Ray Serve's default)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = eligible(req, replicas)
        if not cands:
            return Decision(ranked=[])
        pair = self._rng.sample(cands, min(2, len(cands)))
        pair.sort(key=lambda r: r.running + r.waiting)
        return Decision(ranked=[[r.replica_id] for r in pair], total_blocks=len(req.block_keys))


class ConsistentHashPolicy(Policy):
    """Baseline: rendezvous hashing on the session id (else the first block, else the request id)."""

    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = [r.replica_id for r in eligible(req, replicas)]
        if not cands:
            return Decision(ranked=[])
        key = req.session_id or (str(req.block_keys[0]) if req.block_keys else req.request_id)

        def weight(rid: str) -> bytes:
            return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

        return Decision(
            ranked=_groups(sorted(cands, key=weight, reverse=True)), total_blocks=len(req.block_keys)
        )


#: Policy names accepted by the deployment spec.
POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash")


def make_policy(
    name: str,
    *,
    index_budget: int,
    weights: Weights,
    gate: Gate,
    stale_after_s: float,
    sessions: int,
    rng: random.Random,
    index_factory: Callable[[int], BlockIndex] = BlockIndex,
) -> Policy:
    """The policy called `name` (ValueError naming the choices otherwise)."""
    if name == "cache_aware":
        return CacheAwarePolicy(index_factory(index_budget), weights, gate, stale_after_s, sessions, rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "consistent_hash":
        return ConsistentHashPolicy()
    raise ValueError(f"policy: {name!r} is not one of {', '.join(POLICIES)}")
