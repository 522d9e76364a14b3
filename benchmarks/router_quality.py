"""Routing quality: prefix-cache hit rate and load balance of the router policies on a simulated fleet.

    python -m benchmarks.router_quality [--sessions 300] [--replicas 8] [--seed 0] [--json FILE]
        [trace, cluster and policy flags: see --help]

Method
------
A synthetic multi-turn agent trace is replayed, in a deterministic discrete-event simulation, through
the real router policies (`router.policy`) against a model of the decode fleet; no engine, no Ray.

**Trace** (seeded `random.Random`): `--system-prompts` shared system prompts (random token ids,
`--system-tokens` long; popularity Zipf with exponent `--prompt-zipf`) and `--tools` tool-definition
blocks (`--tool-tokens`). Each session belongs to one of `--tenants` tenants, picks one system
prompt and a subset of the tools (each with probability `--tool-p`, in a fixed order) as its fixed
prefix, and runs `--turns` turns: turn t's prompt is the prefix, then every earlier user message
(`--user-tokens`) and answer (`--answer-tokens`), then the new user message; its answer is the
turn's output. So a session's context grows turn by turn and each prompt extends the previous
one. Session starts are Poisson (`--session-rate` per second); the next turn is sent an
exponential think time (mean `--think-s`) after the previous answer finished (a closed loop per
session, so arrival times depend on how fast the fleet serves). Block keys are the real chained
hashes of `router.hashing.BlockHasher` (`--block-size`, vLLM's GPU default 16), salted per tenant
(`cache_salt=tenant`; `--no-salt` turns it off), so tenants never share blocks.

**Fleet**: `--replicas` decode replicas, each with `--slots` concurrent sequences (FCFS queue behind
them) and a prefix cache of `--capacity-blocks` blocks under LRU. When a request starts on a
replica its hit is the number of *leading* blocks of its prompt that the cache holds (a prefix
cache stops at the first miss); then all its full prompt blocks are touched/inserted, the tail
first, so that, as in vLLM, which frees a request's blocks in reverse order, a sequence's tail is
evicted before its head. Service time = `--prefill-s-per-token` x uncached prompt tokens +
`--decode-s-per-token` x output tokens; TTFT = queue wait + prefill time. The router sees
`ReplicaView`s (running, waiting, `kv_usage` = blocks of running sequences / capacity, as vLLM
reports usage) refreshed every `--stats-interval-s` of simulated time, so its stats are up to that
old (`updated_at` is the refresh time; `now` is passed to `route`). Every policy calls
`on_sent` at dispatch and `on_done` at completion; the cache-aware policy's block index is the
approximate one fed by `on_sent` (`index_budget` = the replica cache size), not the true caches.

**Policies**: `cache_aware` (`make_policy("cache_aware", ...)` with `--w-prefix/--w-load/--w-kv/
--w-session`, `--gate-ratio/--gate-slack`, `--stale-after-s`), `round_robin`, `power_of_two`,
`consistent_hash`, and two oracles written here that read the true caches and loads at routing
time: `oracle` picks the replica with the most cached leading blocks among those whose true load
(running + waiting) is <= gate ratio x mean + slack (the cache-aware gate, same parameters), ties by
lower load; `oracle_unbounded` ignores load. The oracles are greedy (they do not plan evictions),
so they are the reference a per-request router can aim at, not a proven bound (see the findings);
every policy runs on the same trace.

**Metrics**: prefix-hit rate = cached prompt tokens / prompt tokens (token-weighted; the partial
last block never hits) and cached blocks / full prompt blocks; `vs_oracle` = hit rate / the
oracle's; load balance = max/mean over replicas of requests served (**the goal's measure**), and
also of busy time, tokens served (prompt + output) and time-averaged queue length (running +
waiting; the secondary measure); p50/p99 simulated TTFT. For cache_aware also the router's own
estimate (the index match of the chosen replica) of its hit rate. Goals for cache_aware: hit rate
>= 0.95 x oracle and requests max/mean <= 1.25.

Defaults and findings
---------------------
The cache-aware policy runs with the shipped router defaults (`serving.config.RouterSpec`: weights
prefix 2, load 1, kv 0.5, session 1; gate ratio 1.25, slack 3; stats every 1 s, stale after 5 s).
The default trace (300 sessions, ~5,100 requests, 8 replicas x 8 slots, 6,144-block caches) keeps
the caches under pressure: the open sessions' blocks average ~27k (4.5x one replica's cache, 0.56x
the fleet's; peak ~47k), one infinite cache would hit 0.947 of prompt tokens, the oracle gets 0.908
and round robin 0.251. It runs in ~4 s of CPU.

Seed 0: cache_aware hits 0.900 = 0.991 x oracle with requests max/mean 1.11: both goals met. At 16
replicas (`--replicas 16 --sessions 600 --session-rate 1.6`) seeds 0-2 give 1.001 / 1.09, 1.000 /
1.13, 1.009 / 1.13 (x oracle / requests max/mean).

How the defaults were chosen (sweeps made before the router counted its own recent sends and
recorded blocks tail-first, both adopted from these findings; x oracle / requests max/mean):

* The earlier gate (ratio 1.5, slack 4) met both goals on the default trace (seeds 0-4:
  0.986-1.003 / 1.12-1.23) but missed balance at 16 replicas (1.25, 1.23, 1.32 for seeds 0-2): an
  absolute slack of 4 requests against a mean load of ~3 let a replica keep its cache affinity up
  to ~2.8x the mean. Ratio 1.25 / slack 3 met both goals on seeds 0-4 with more load, fewer slots,
  smaller caches, no salt, 4 and 16 replicas (max/mean <= 1.19, >= 0.964 x oracle) at about the
  same hit rate. Slack 2 missed the hit goal with 4,096-block caches (0.938); ratio 1.2 / slack 1
  cost absolute hit rate (0.833); 2 / 8 let queues drift (queue max/mean 1.50, TTFT p99 4.3 s).
* Weights matter less than the gate: prefix 1 (0.980 / 1.08), prefix 4 (0.993 / 1.21), session 0
  (0.999 / 1.10), kv 0 (0.990 / 1.22) all met both goals. The kv scorer (KV of running sequences)
  acts as a second load signal.
* Staler stats (`--stats-interval-s 5`) cost a little: 0.981 / 1.15, TTFT p99 3.6 s. Between two
  reports every decision saw the same loads, so bursts piled onto one replica; the policy now adds
  its own sends since the report to the reported load.
* The oracles are greedy, not optimal: without the gate, the oracle hits less (0.850) than with it,
  because piling sessions onto the replica that holds a popular prefix thrashes that replica's cache.
  With `--no-salt`, the gated oracle falls to 0.822 while cache_aware gets 0.934, most likely
  because the oracle sends every new session to the few replicas that hold the hottest prefixes.
  That is why `vs_oracle` can exceed 1.
* The router's own estimate of its hit rate (index match) was 0.892 against an actual 0.905 while
  the index recorded a request's blocks head first (evicting a prefix's head first, unlike vLLM);
  recorded tail first, it is exact (0.901 / 0.901).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from benchmarks.common import percentile
from router.hashing import BlockHasher
from router.policy import (
    Decision,
    Gate,
    Policy,
    ReplicaView,
    RoutingRequest,
    Weights,
    eligible,
    make_policy,
)
from serving.config import RouterSpec

#: The goals for cache_aware: hit rate >= HIT_GOAL x the oracle's, requests served max/mean <= BALANCE_GOAL.
HIT_GOAL = 0.95
BALANCE_GOAL = 1.25

#: The shipped router defaults (`serving.config.RouterSpec`): what the cache-aware policy runs with
#: unless flags say otherwise.
_SPEC = RouterSpec()
DEFAULT_WEIGHTS = Weights(**_SPEC.weights.model_dump())
DEFAULT_GATE = Gate(**_SPEC.gate.model_dump())

#: Policies in report order (the oracle first: the others are compared to it).
ALL_POLICIES = ("oracle", "oracle_unbounded", "cache_aware", "round_robin", "power_of_two", "consistent_hash")


# --------------------------------------------------------------------------------------------- trace


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Knobs of the synthetic agent trace (ranges are inclusive)."""

    sessions: int = 300
    seed: int = 0
    system_prompts: int = 6
    system_tokens: tuple[int, int] = (1000, 3000)
    prompt_zipf: float = 1.0
    tools: int = 4
    tool_tokens: tuple[int, int] = (500, 1500)
    tool_p: float = 0.5
    turns: tuple[int, int] = (5, 30)
    user_tokens: tuple[int, int] = (50, 400)
    answer_tokens: tuple[int, int] = (50, 300)
    session_rate: float = 0.8
    think_s: float = 5.0
    tenants: int = 4
    salt: bool = _SPEC.tenant_salt
    block_size: int = 16
    vocab: int = 32000


@dataclass(slots=True)
class Turn:
    """One request of a session: its prompt is the session's first `prompt_tokens` tokens."""

    prompt_tokens: int
    output_tokens: int
    think_s: float  # wait after the previous turn's answer before this turn is sent (0 for turn 0)


@dataclass(slots=True)
class Session:
    session_id: str
    tenant: str
    start_s: float
    prefix_tokens: int  # system prompt + tools
    turns: list[Turn]
    keys: list[int]  # block keys of the last turn's prompt; turn t's are the first prompt_tokens // bs
    tokens: list[int] | None = None  # the last turn's prompt (kept only when asked: tests)


def _rand_tokens(rng: random.Random, lo_hi: tuple[int, int], vocab: int) -> list[int]:
    n = rng.randint(*lo_hi)
    return [rng.randrange(vocab) for _ in range(n)]


def generate_trace(cfg: TraceConfig, keep_tokens: bool = False) -> list[Session]:
    """The sessions of the trace, ordered by start time (deterministic for a given `cfg`)."""
    rng = random.Random(cfg.seed)
    hasher = BlockHasher(cfg.block_size)
    systems = [_rand_tokens(rng, cfg.system_tokens, cfg.vocab) for _ in range(cfg.system_prompts)]
    tools = [_rand_tokens(rng, cfg.tool_tokens, cfg.vocab) for _ in range(cfg.tools)]
    popularity = [1.0 / (i + 1) ** cfg.prompt_zipf for i in range(cfg.system_prompts)]
    tenants = [f"tenant-{i}" for i in range(cfg.tenants)]
    sessions: list[Session] = []
    t = 0.0
    for s in range(cfg.sessions):
        t += rng.expovariate(cfg.session_rate)
        tenant = tenants[rng.randrange(len(tenants))]
        tokens = list(rng.choices(systems, weights=popularity)[0])
        for tool in tools:
            if rng.random() < cfg.tool_p:
                tokens.extend(tool)
        prefix = len(tokens)
        turns: list[Turn] = []
        for i in range(rng.randint(*cfg.turns)):
            if i:
                tokens.extend(_rand_tokens(rng, (turns[-1].output_tokens,) * 2, cfg.vocab))  # its answer
            tokens.extend(_rand_tokens(rng, cfg.user_tokens, cfg.vocab))
            think = rng.expovariate(1.0 / cfg.think_s) if i and cfg.think_s > 0 else 0.0
            turns.append(Turn(len(tokens), rng.randint(*cfg.answer_tokens), think))
        keys = hasher.keys(tokens, cache_salt=tenant if cfg.salt else None)
        sessions.append(Session(f"s{s}", tenant, t, prefix, turns, keys, tokens if keep_tokens else None))
    return sessions


def trace_stats(trace: Sequence[Session], block_size: int) -> dict[str, Any]:
    """Size of the trace: requests, tokens, distinct blocks."""
    distinct: set[int] = set()
    for s in trace:
        distinct.update(s.keys)
    requests = sum(len(s.turns) for s in trace)
    # Hit rate of one infinite cache (sessions replayed in start order): only first sightings miss.
    seen: set[int] = set()
    hit = 0
    for s in sorted(trace, key=lambda s: s.start_s):
        for t in s.turns:
            keys = s.keys[: t.prompt_tokens // block_size]
            for k in keys:
                if k not in seen:
                    break
                hit += 1
            seen.update(keys)
    prompt_tokens = sum(t.prompt_tokens for s in trace for t in s.turns)
    return {
        "sessions": len(trace),
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": sum(t.output_tokens for s in trace for t in s.turns),
        "distinct_blocks": len(distinct),
        "mean_turns": requests / max(1, len(trace)),
        "mean_final_context_tokens": sum(s.turns[-1].prompt_tokens for s in trace) / max(1, len(trace)),
        "last_session_start_s": trace[-1].start_s if trace else 0.0,
        "infinite_cache_hit_rate": hit * block_size / prompt_tokens if prompt_tokens else 0.0,
    }


# --------------------------------------------------------------------------------------------- fleet


class LRUCache:
    """A replica's prefix cache: block keys under LRU, at most `capacity` of them."""

    __slots__ = ("capacity", "_lru")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def hits(self, keys: Sequence[int]) -> int:
        """Leading blocks of `keys` held (prefix semantics: counting stops at the first miss)."""
        lru = self._lru
        n = 0
        for k in keys:
            if k not in lru:
                break
            n += 1
        return n

    def insert(self, keys: Sequence[int]) -> None:
        """Insert or touch `keys`, the tail first (so a sequence's head is the most recently used)."""
        lru = self._lru
        for k in reversed(keys):
            if k in lru:
                lru.move_to_end(k)
            else:
                lru[k] = None
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def __contains__(self, key: int) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    replicas: int = 8
    slots: int = 8
    capacity_blocks: int = 6144
    prefill_s_per_token: float = 0.0001
    decode_s_per_token: float = 0.02
    stats_interval_s: float = _SPEC.stats_period_s


@dataclass(slots=True)
class _Job:
    req: RoutingRequest
    session: Session
    turn: int
    arrived: float
    blocks: int = 0  # KV blocks it pins while running


@dataclass(slots=True)
class Replica:
    """One decode replica: slots, an FCFS queue, an LRU prefix cache and its own tallies."""

    replica_id: str
    cache: LRUCache
    running: int = 0
    queue: deque[_Job] = field(default_factory=deque)
    pinned_blocks: int = 0
    served: int = 0
    busy_s: float = 0.0
    tokens: int = 0
    queue_area: float = 0.0
    last_t: float = 0.0

    @property
    def load(self) -> int:
        return self.running + len(self.queue)

    def advance(self, now: float) -> None:
        """Integrate the queue length up to `now` (call before the load changes)."""
        self.queue_area += self.load * (now - self.last_t)
        self.last_t = now


class Cluster:
    """The true state of the fleet (what the oracles read)."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.replicas = [Replica(f"decode-{i}", LRUCache(cfg.capacity_blocks)) for i in range(cfg.replicas)]
        self.by_id = {r.replica_id: r for r in self.replicas}

    def views(self, now: float) -> list[ReplicaView]:
        cap = self.cfg.capacity_blocks
        return [
            ReplicaView(
                r.replica_id,
                role="decode",
                running=r.running,
                waiting=len(r.queue),
                kv_usage=min(1.0, r.pinned_blocks / cap),
                updated_at=now,
            )
            for r in self.replicas
        ]


class OraclePolicy(Policy):
    """Reads the true caches and loads: most cached leading blocks among replicas within the gate
    (`gate=None`: all replicas), ties by lower load, then replica order."""

    def __init__(self, cluster: Cluster, gate: Gate | None) -> None:
        self.cluster = cluster
        self.gate = gate

    def route(self, req: RoutingRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        cands = [self.cluster.by_id[r.replica_id] for r in eligible(req, replicas)]
        if not cands:
            return Decision(ranked=[], total_blocks=len(req.block_keys))
        loads = {r.replica_id: r.load for r in cands}
        allowed = cands
        if self.gate is not None:
            mean = sum(loads.values()) / len(loads)
            limit = self.gate.ratio * mean + self.gate.slack
            allowed = [r for r in cands if loads[r.replica_id] <= limit] or cands
        hits = {r.replica_id: r.cache.hits(req.block_keys) for r in allowed}
        order = sorted(hits, key=lambda rid: (-hits[rid], loads[rid]))
        rest = sorted((r.replica_id for r in cands if r.replica_id not in hits), key=lambda rid: loads[rid])
        order += rest
        return Decision(
            ranked=[[rid] for rid in order],
            matched_blocks=hits[order[0]],
            total_blocks=len(req.block_keys),
        )


# ----------------------------------------------------------------------------------------- simulate

_STATS, _FINISH, _ARRIVE = 0, 1, 2  # at equal times: refresh stats, then free slots, then route


def _max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else float("nan")


#: The live working set is sampled every this many stats refreshes.
WS_SAMPLE_TICKS = 10


def _working_set(current: Iterable[tuple[Session, int]], block_size: int) -> int:
    """Distinct blocks of the open sessions' latest prompts (shared prefixes counted once)."""
    shared: set[int] = set()
    private = 0
    for s, n in current:
        p = min(n, s.prefix_tokens // block_size)
        shared.update(s.keys[:p])
        private += n - p
    return len(shared) + private


def simulate(
    trace: Sequence[Session],
    policy: Policy | None,
    cfg: ClusterConfig,
    block_size: int,
    oracle_gate: Gate | None = None,
) -> dict[str, Any]:
    """Replay `trace` through `policy` on a fresh fleet (`policy=None`: an `OraclePolicy` with
    `oracle_gate` over this fleet) and return the metrics."""
    cluster = Cluster(cfg)
    if policy is None:
        policy = OraclePolicy(cluster, oracle_gate)
    views = cluster.views(0.0)
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, kind, seq, payload))
        seq += 1

    for s in trace:
        push(s.start_s, _ARRIVE, (s, 0))
    if cfg.stats_interval_s > 0:
        push(cfg.stats_interval_s, _STATS, None)
    open_sessions = len(trace)
    current: dict[str, tuple[Session, int]] = {}  # session -> (session, its latest turn's blocks)
    ws_samples: list[int] = []
    ticks = 0
    hit_tokens = prompt_tokens = hit_blocks = full_blocks = predicted_blocks = 0
    ttfts: list[float] = []
    now = 0.0

    def start(rep: Replica, job: _Job, now: float) -> None:
        nonlocal hit_tokens, prompt_tokens, hit_blocks, full_blocks
        turn = job.session.turns[job.turn]
        keys = job.req.block_keys
        hit = rep.cache.hits(keys)
        rep.cache.insert(keys)
        hit_tokens += hit * block_size
        prompt_tokens += turn.prompt_tokens
        hit_blocks += hit
        full_blocks += len(keys)
        prefill = (turn.prompt_tokens - hit * block_size) * cfg.prefill_s_per_token
        service = prefill + turn.output_tokens * cfg.decode_s_per_token
        ttfts.append(now - job.arrived + prefill)
        job.blocks = -(-(turn.prompt_tokens + turn.output_tokens) // block_size)
        rep.running += 1
        rep.pinned_blocks += job.blocks
        rep.served += 1
        rep.busy_s += service
        rep.tokens += turn.prompt_tokens + turn.output_tokens
        push(now + service, _FINISH, (rep, job))

    while heap:
        now, kind, _, payload = heapq.heappop(heap)
        if kind == _STATS:
            views = cluster.views(now)
            ticks += 1
            if ticks % WS_SAMPLE_TICKS == 0 and current:
                ws_samples.append(_working_set(current.values(), block_size))
            if open_sessions:
                push(now + cfg.stats_interval_s, _STATS, None)
        elif kind == _ARRIVE:
            session, i = payload
            n = session.turns[i].prompt_tokens // block_size
            current[session.session_id] = (session, n)
            req = RoutingRequest(
                request_id=f"{session.session_id}/{i}",
                block_keys=session.keys[:n],
                tenant=session.tenant,
                session_id=session.session_id,
                role="decode",
            )
            if cfg.stats_interval_s <= 0:
                views = cluster.views(now)
            decision = policy.route(req, views, now)
            rid = decision.chosen
            if rid is None:
                raise RuntimeError(f"{type(policy).__name__} chose no replica")
            predicted_blocks += decision.matched_blocks
            policy.on_sent(req, rid)
            rep = cluster.by_id[rid]
            rep.advance(now)
            job = _Job(req, session, i, now)
            if rep.running < cfg.slots:
                start(rep, job, now)
            else:
                rep.queue.append(job)
        else:
            rep, job = payload
            rep.advance(now)
            rep.running -= 1
            rep.pinned_blocks -= job.blocks
            policy.on_done(job.req, rep.replica_id)
            if rep.queue:
                start(rep, rep.queue.popleft(), now)
            session = job.session
            if job.turn + 1 < len(session.turns):
                push(now + session.turns[job.turn + 1].think_s, _ARRIVE, (session, job.turn + 1))
            else:
                open_sessions -= 1
                del current[session.session_id]

    for rep in cluster.replicas:
        rep.advance(now)
    makespan = now
    reps = cluster.replicas
    return {
        "requests": sum(r.served for r in reps),
        "hit_rate": hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        "block_hit_rate": hit_blocks / full_blocks if full_blocks else 0.0,
        "predicted_hit_rate": predicted_blocks / full_blocks if full_blocks else 0.0,
        "balance": {
            "requests": _max_over_mean([r.served for r in reps]),
            "busy_time": _max_over_mean([r.busy_s for r in reps]),
            "tokens": _max_over_mean([r.tokens for r in reps]),
            "queue_len": _max_over_mean([r.queue_area for r in reps]),
        },
        "per_replica": {
            r.replica_id: {
                "requests": r.served,
                "busy_s": round(r.busy_s, 3),
                "tokens": r.tokens,
                "mean_queue_len": round(r.queue_area / makespan, 3) if makespan else 0.0,
            }
            for r in reps
        },
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "utilization": sum(r.busy_s for r in reps) / (makespan * cfg.slots * len(reps)) if makespan else 0.0,
        "makespan_s": makespan,
        "working_set_blocks_mean": sum(ws_samples) / len(ws_samples) if ws_samples else 0.0,
        "working_set_blocks_peak": max(ws_samples, default=0),
    }


# --------------------------------------------------------------------------------------------- main


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"bad range {text!r} (want LO-HI)")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    d, c = TraceConfig(), ClusterConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.router_quality",
        description="Prefix-hit rate and load balance of the router policies on a simulated agent trace.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--json", type=Path, help="write the results here (parent dirs are created)")
    p.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma-separated subset")
    t = p.add_argument_group("trace")
    t.add_argument("--sessions", type=int, default=d.sessions)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--system-prompts", type=int, default=d.system_prompts)
    t.add_argument("--system-tokens", type=_range, default=d.system_tokens, help="LO-HI")
    t.add_argument("--prompt-zipf", type=float, default=d.prompt_zipf, help="system prompt popularity")
    t.add_argument("--tools", type=int, default=d.tools)
    t.add_argument("--tool-tokens", type=_range, default=d.tool_tokens, help="LO-HI")
    t.add_argument("--tool-p", type=float, default=d.tool_p, help="chance a session uses each tool")
    t.add_argument("--turns", type=_range, default=d.turns, help="LO-HI")
    t.add_argument("--user-tokens", type=_range, default=d.user_tokens, help="LO-HI")
    t.add_argument("--answer-tokens", type=_range, default=d.answer_tokens, help="LO-HI")
    t.add_argument("--session-rate", type=float, default=d.session_rate, help="session starts per second")
    t.add_argument("--think-s", type=float, default=d.think_s, help="mean think time between turns")
    t.add_argument("--tenants", type=int, default=d.tenants)
    t.add_argument("--no-salt", dest="salt", action="store_false", help="tenants share blocks")
    t.add_argument("--block-size", type=int, default=d.block_size)
    f = p.add_argument_group("fleet")
    f.add_argument("--replicas", type=int, default=c.replicas)
    f.add_argument("--slots", type=int, default=c.slots, help="concurrent sequences per replica")
    f.add_argument("--capacity-blocks", type=int, default=c.capacity_blocks, help="prefix cache per replica")
    f.add_argument("--prefill-s-per-token", type=float, default=c.prefill_s_per_token)
    f.add_argument("--decode-s-per-token", type=float, default=c.decode_s_per_token)
    f.add_argument("--stats-interval-s", type=float, default=c.stats_interval_s)
    r = p.add_argument_group("cache_aware policy (the gate is also the oracle's)")
    r.add_argument("--w-prefix", type=float, default=DEFAULT_WEIGHTS.prefix)
    r.add_argument("--w-load", type=float, default=DEFAULT_WEIGHTS.load)
    r.add_argument("--w-kv", type=float, default=DEFAULT_WEIGHTS.kv)
    r.add_argument("--w-session", type=float, default=DEFAULT_WEIGHTS.session)
    r.add_argument("--gate-ratio", type=float, default=DEFAULT_GATE.ratio)
    r.add_argument("--gate-slack", type=float, default=DEFAULT_GATE.slack)
    r.add_argument("--stale-after-s", type=float, default=_SPEC.stale_after_s)
    r.add_argument(
        "--session-memory", type=int, default=_SPEC.sessions, help="sessions remembered for affinity"
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the trace, simulate every policy asked for, and return the report."""
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_POLICIES))
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(unknown)} (choose from {', '.join(ALL_POLICIES)})")
    tcfg = TraceConfig(
        **{f.name: getattr(args, f.name) for f in fields(TraceConfig) if hasattr(args, f.name)}
    )
    ccfg = ClusterConfig(**{f.name: getattr(args, f.name) for f in fields(ClusterConfig)})
    weights = Weights(prefix=args.w_prefix, load=args.w_load, kv=args.w_kv, session=args.w_session)
    gate = Gate(ratio=args.gate_ratio, slack=args.gate_slack)
    t0 = time.perf_counter()
    trace = generate_trace(tcfg)
    stats = trace_stats(trace, tcfg.block_size)
    stats["fleet_capacity_blocks"] = ccfg.capacity_blocks * ccfg.replicas
    stats["generate_s"] = round(time.perf_counter() - t0, 3)
    results: dict[str, dict[str, Any]] = {}
    ws = None
    for name in names:
        t1 = time.perf_counter()
        if name == "oracle":
            res = simulate(trace, None, ccfg, tcfg.block_size, oracle_gate=gate)
        elif name == "oracle_unbounded":
            res = simulate(trace, None, ccfg, tcfg.block_size, oracle_gate=None)
        else:
            policy = make_policy(
                name,
                index_budget=ccfg.capacity_blocks,
                weights=weights,
                gate=gate,
                stale_after_s=args.stale_after_s,
                sessions=args.session_memory,
                rng=random.Random(f"{args.seed}:{name}"),
            )
            res = simulate(trace, policy, ccfg, tcfg.block_size)
        if name != "cache_aware":
            res.pop("predicted_hit_rate")
        res["sim_s"] = round(time.perf_counter() - t1, 3)
        if ws is None and res["working_set_blocks_mean"]:
            ws = (name, res["working_set_blocks_mean"], res["working_set_blocks_peak"])
        results[name] = res
    if ws is not None:
        stats["working_set_from"], stats["working_set_blocks_mean"], stats["working_set_blocks_peak"] = ws
    oracle_hit = results["oracle"]["hit_rate"] if "oracle" in results else None
    for res in results.values():
        res["vs_oracle"] = res["hit_rate"] / oracle_hit if oracle_hit else None
    goals: dict[str, Any] = {
        "hit_vs_oracle_min": HIT_GOAL,
        "balance_max": BALANCE_GOAL,
        "measure": "requests",
    }
    ca = results.get("cache_aware")
    if ca is not None and ca["vs_oracle"] is not None:
        hit_ok = ca["vs_oracle"] >= HIT_GOAL
        bal_ok = ca["balance"]["requests"] <= BALANCE_GOAL
        goals.update(
            cache_aware_vs_oracle=ca["vs_oracle"],
            cache_aware_balance=ca["balance"]["requests"],
            hit_met=hit_ok,
            balance_met=bal_ok,
            met=hit_ok and bal_ok,
        )
    return {
        "benchmark": "router_quality",
        "config": {
            "trace": asdict(tcfg),
            "fleet": asdict(ccfg),
            "cache_aware": {
                "weights": asdict(weights),
                "gate": asdict(gate),
                "stale_after_s": args.stale_after_s,
                "sessions": args.session_memory,
                "index_budget": ccfg.capacity_blocks,
            },
        },
        "trace": stats,
        "policies": results,
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    """The human-readable table."""
    cfg, st = report["config"], report["trace"]
    w, g = cfg["cache_aware"]["weights"], cfg["cache_aware"]["gate"]
    cap, ws_mean = cfg["fleet"]["capacity_blocks"], st.get("working_set_blocks_mean", 0.0)
    lines = [
        f"trace: {st['sessions']} sessions, {st['requests']} requests, "
        f"{st['prompt_tokens'] / 1e6:.2f}M prompt tokens, {st['distinct_blocks']} distinct blocks, "
        f"mean final context {st['mean_final_context_tokens']:.0f} tokens; one infinite cache would hit "
        f"{st['infinite_cache_hit_rate']:.3f}",
        f"cache: {cfg['fleet']['replicas']} replicas x {cap} blocks = {st['fleet_capacity_blocks']}; live "
        f"working set (open sessions' blocks, {st.get('working_set_from', '-')} run) mean {ws_mean:.0f} "
        f"({ws_mean / cap:.1f}x a replica's cache, {ws_mean / st['fleet_capacity_blocks']:.2f}x the "
        f"fleet's), peak {st.get('working_set_blocks_peak', 0)}",
        f"cache_aware: weights prefix={w['prefix']:g} load={w['load']:g} kv={w['kv']:g} "
        f"session={w['session']:g}; gate ratio={g['ratio']:g} slack={g['slack']:g} "
        f"(oracle gated the same); stats every {cfg['fleet']['stats_interval_s']:g}s",
        "",
        f"{'policy':<17}{'hit':>7}{'blk hit':>8}{'vs orc':>8}{'req m/m':>9}{'busy m/m':>9}"
        f"{'tok m/m':>8}{'queue m/m':>10}{'ttft p50':>9}{'ttft p99':>9}{'util':>6}",
    ]
    for name, r in report["policies"].items():
        b = r["balance"]
        lines.append(
            f"{name:<17}{r['hit_rate']:>7.3f}{r['block_hit_rate']:>8.3f}{_fmt(r['vs_oracle'], '.3f'):>8}"
            f"{b['requests']:>9.3f}{b['busy_time']:>9.3f}{b['tokens']:>8.3f}{b['queue_len']:>10.3f}"
            f"{r['ttft_p50_s']:>9.3f}{r['ttft_p99_s']:>9.3f}{r['utilization']:>6.2f}"
        )
    lines.append(
        "hit: cached / prompt tokens; blk hit: cached / full prompt blocks; vs orc: hit / oracle's; "
        "m/m: max/mean over replicas of requests served (the goal's measure), busy time, tokens served, "
        "time-averaged queue length (running + waiting); ttft in simulated s; util: busy / slot time"
    )
    ca = report["policies"].get("cache_aware")
    if ca is not None:
        lines.append(
            f"cache_aware router's own estimate of its hit rate (index match): "
            f"{ca['predicted_hit_rate']:.3f} (block-weighted; actual {ca['block_hit_rate']:.3f})"
        )
    goals = report["goals"]
    if "met" in goals:
        lines.append(
            f"goal (cache_aware): hit >= {HIT_GOAL} x oracle: {goals['cache_aware_vs_oracle']:.3f} "
            f"{'MET' if goals['hit_met'] else 'MISSED'}; requests max/mean <= {BALANCE_GOAL}: "
            f"{goals['cache_aware_balance']:.3f} {'MET' if goals['balance_met'] else 'MISSED'}"
        )
    lines.append(f"elapsed {report['elapsed_s']:.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
