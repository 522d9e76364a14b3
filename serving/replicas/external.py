"""The ingress-side backend of an `engine: openai` pool: cache-aware routing over external endpoints.

An external pool has no Ray Serve replicas: each endpoint of `UpstreamSpec.endpoints` (one vllm serve,
SGLang, ... process) is one replica, reached with an `OpenAIEngine`. `ExternalPool` is the `Backend`
the ingress and the session workers stream through, and it does, without Ray, what
router/serve_adapter.py and Serve's router do for in-process pools:

- the repo's own pure policy (router.policy, `make_policy`) ranks the HEALTHY endpoints per request,
  from their last load reports (`refresh_stats` every `router.stats_period_s`) and the block index,
  fed by the routing decisions (`on_sent`) and, when `upstream.kv_events` names each endpoint's vLLM
  publisher, by its KV events (drained and applied before each decision, as serve_adapter does);
- health: one loop per endpoint GETs its health path every `health_period_s`; a failed check, or a
  request that cannot reach the endpoint, takes it out of routing at once, and the next check that
  answers brings it back. `on_status(n_healthy)` reports each change (0: the pool is down) and
  `IngressMetrics.upstream_up` mirrors it;
- failover: when an endpoint fails BEFORE its first chunk with a 5xx (refused, 503, 500, ...), the next
  ranked healthy endpoint is tried at once, each endpoint at most once per request (Serve's router
  skipping a dead replica); one that could not be reached or said 503 is also marked down. 4xx and 429
  are the request's answer and go back as they are.

The first chunk carries `Route(decode=<endpoint id>)`, so `x-tandem-route` names the upstream
(`host:port`). Nothing here blocks the event loop: all I/O is httpx's, and KV events arrive on a
subscriber thread's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from router.contracts import Role, ServeMode
from router.kv_events import KVEventSubscriber, apply_events
from router.policy import Decision, Gate, Policy, ReplicaView, RoutingRequest, Weights, make_policy
from serving.config import RouterSpec, UpstreamSpec
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest, ModelInfo, Route
from serving.replicas.engines.openai_engine import ErrorKind, OpenAIEngine
from serving.replicas.streaming import coalesce
from serving.upstreams import PROFILES

logger = logging.getLogger(__name__)

#: KV events applied per routing decision at most (the rest wait for the next one), as serve_adapter.
_EVENTS_PER_DECISION = 5_000

EngineFactory = Callable[..., OpenAIEngine]


@dataclass(slots=True)
class _Endpoint:
    """One endpoint of the pool and what the pool knows about it."""

    id: str
    url: str
    engine: OpenAIEngine
    up: bool = False
    last_error: str = ""
    subscriber: KVEventSubscriber | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def endpoint_ids(urls: list[str]) -> list[str]:
    """Short stable ids (`host:port`) of the endpoint URLs; a repeated one gets `#i` appended."""
    ids: list[str] = []
    for i, url in enumerate(urls):
        eid = urlsplit(url).netloc or url
        ids.append(eid if eid not in ids else f"{eid}#{i}")
    return ids


def _retriable(err: EngineError) -> bool:
    """Another endpoint may serve what this one failed before its first chunk (not a 4xx or a 429)."""
    return err.status >= 500


def _unreachable(err: EngineError) -> bool:
    """The endpoint itself is out (refused, no connection, or its own 503), not just this request.

    NOTE(why): only these take an endpoint out of routing before its next health check. A 500 may
    be this request's doing; marking the endpoint down for it would let one bad request take a
    one-endpoint pool down (on_status(0)) until the health check brings it back.
    """
    return err.type == "upstream_unavailable"


class ExternalPool:
    """`Backend` of an external OpenAI-compatible server's endpoints (see the module docstring).

    Args:
        model: Tandem's model name.
        upstream: the pool's `UpstreamSpec`.
        router: the model's `RouterSpec` (policy, weights, gate, index budget, stats period).
        decode_prompt / encode_text: the tokenizer callbacks `OpenAIEngine` needs for servers that
            take text prompts or stream no token ids.
        metrics: the ingress's metrics (`upstream_up`, `upstream_errors`); None: none.
        on_status: called with the number of healthy endpoints whenever it changes (0: pool down).
        clock: wall clock for load timestamps and routing decisions.
        rng: the policy's tie-breaking randomness.
        engine_factory: builds each endpoint's engine from `OpenAIEngine`'s keyword arguments (tests).
    """

    def __init__(
        self,
        model: str,
        upstream: UpstreamSpec,
        router: RouterSpec,
        *,
        decode_prompt: Callable[[list[int]], str] | None = None,
        encode_text: Callable[[str], list[int]] | None = None,
        metrics: Any = None,
        on_status: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        engine_factory: EngineFactory = OpenAIEngine,
    ) -> None:
        self.model = model
        self._spec = upstream
        self._router = router
        self._metrics = metrics
        self._on_status = on_status
        self._clock = clock
        self.policy: Policy = make_policy(
            router.policy.value,
            index_budget=router.block_budget,
            weights=Weights(**router.weights.model_dump()),
            gate=Gate(**router.gate.model_dump()),
            stale_after_s=router.stale_after_s,
            sessions=router.sessions,
            rng=rng or random.Random(),
        )
        profile = PROFILES[upstream.server]
        api_key = upstream.api_key()
        self._endpoints: dict[str, _Endpoint] = {}
        for eid, url in zip(endpoint_ids(upstream.endpoints), upstream.endpoints, strict=True):
            engine = engine_factory(
                model_name=model,
                base_url=url,
                profile=profile,
                upstream_model=upstream.model,
                api_key=api_key,
                connect_timeout_s=upstream.connect_timeout_s,
                stall_timeout_s=upstream.stall_timeout_s,
                max_model_len=upstream.max_model_len,
                block_size=upstream.block_size,
                decode_prompt=decode_prompt,
                encode_text=encode_text,
                on_error=self._error_counter(eid),
                clock=clock,
            )
            self._endpoints[eid] = _Endpoint(eid, url, engine)
        self._healthy = -1  # unknown until the first round of health checks
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> ModelInfo:
        """Start the engines, check every endpoint once, then keep checking in the background.

        Endpoints that are down are not an error (they join when their health answers).
        """
        eps = list(self._endpoints.values())
        await asyncio.gather(*(self._start_one(ep) for ep in eps))
        info = self.model_info()
        self._report()
        index = getattr(self.policy, "index", None)
        if self._spec.kv_events and self._router.kv_events and index is not None:
            for ep, address in zip(eps, self._spec.kv_events, strict=True):
                ep.subscriber = KVEventSubscriber(ep.id, address).start()
        for ep in eps:
            ep.tasks.append(asyncio.create_task(self._health_loop(ep), name=f"upstream-health-{ep.id}"))
        self._tasks.append(asyncio.create_task(self._stats_loop(), name=f"upstream-stats-{self.model}"))
        return info

    async def _start_one(self, ep: _Endpoint) -> None:
        await ep.engine.start()
        await self._check(ep)
        if ep.up:
            await ep.engine.refresh_stats()

    def model_info(self) -> ModelInfo:
        """The pool's model, with the spec's context length (`upstream.max_model_len`, required so that
        the ingress starts while every endpoint is down); endpoints that report another are logged."""
        mml = self._spec.max_model_len
        other = sorted(
            {n for ep in self._endpoints.values() if (n := ep.engine.reported_max_model_len) and n != mml}
        )
        if other:
            logger.warning(
                "model %s: upstream.max_model_len is %d but endpoints report %s in /v1/models; requests are "
                "planned for %d (a server with less context clips max_tokens silently)",
                self.model,
                mml,
                other,
                mml,
            )
        return ModelInfo(name=self.model, max_model_len=mml, path="", block_size=self._spec.block_size)

    async def close(self) -> None:
        """Stop the loops and the KV-event subscribers, shut the engines down."""
        tasks = self._tasks + [t for ep in self._endpoints.values() for t in ep.tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for ep in self._endpoints.values():
            ep.tasks = []
            if ep.subscriber is not None:
                ep.subscriber.stop()
                ep.subscriber = None
            await ep.engine.shutdown()

    # -- health and load -------------------------------------------------------------------------

    async def _check(self, ep: _Endpoint) -> bool:
        try:
            await ep.engine.check_health()
        except Exception as e:  # noqa: BLE001 - any failure of the check means down
            self._mark(ep, False, str(e))
            return False
        if not ep.up and ep.engine.upstream_model is None:
            await ep.engine.refresh_info()  # it was down at start: learn its model now
        self._mark(ep, True)
        return True

    async def _health_loop(self, ep: _Endpoint) -> None:
        period = self._spec.health_period_s
        while True:
            await asyncio.sleep(period)
            try:
                await self._check(ep)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                logger.exception("health check of %s failed", ep.id)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self._router.stats_period_s)
            up = [ep for ep in self._endpoints.values() if ep.up]
            await asyncio.gather(*(ep.engine.refresh_stats() for ep in up), return_exceptions=True)

    def _mark(self, ep: _Endpoint, up: bool, error: str = "") -> None:
        """Set `ep` up or down; a change updates the metrics and calls `on_status`."""
        if error:
            ep.last_error = error
        changed = ep.up != up
        ep.up = up
        if changed:
            if up:
                logger.info("upstream %s of %s is up", ep.id, self.model)
            else:
                logger.warning("upstream %s of %s is down: %s", ep.id, self.model, error)
                # Its cache may be gone (a restart): forget what the index believed it held.
                self.policy.drop_replica(ep.id)
        if self._metrics is not None:
            self._metrics.upstream_up.labels(self.model, ep.id).set(1 if up else 0)
        if changed and self._healthy >= 0:
            self._report()

    def _report(self) -> None:
        n = sum(1 for ep in self._endpoints.values() if ep.up)
        if n == self._healthy:
            return
        self._healthy = n
        if self._on_status is not None:
            try:
                self._on_status(n)
            except Exception:  # noqa: BLE001 - the callback's failure must not stop health checks
                logger.exception("on_status callback failed")

    def _error_counter(self, eid: str) -> Callable[[ErrorKind, EngineError], None]:
        def count(kind: ErrorKind, err: EngineError) -> None:
            ep = self._endpoints.get(eid)
            if ep is not None:
                ep.last_error = f"{err.status} {err.type}: {err.message}"
            if self._metrics is not None:
                self._metrics.upstream_errors.labels(self.model, eid, kind.value).inc()

        return count

    async def probe(self) -> None:
        """Raise unless at least one endpoint's health answers (the gateway's recovery probe)."""
        eps = list(self._endpoints.values())
        results = await asyncio.gather(*(self._check(ep) for ep in eps))
        if not any(results):
            raise RuntimeError(
                f"no endpoint of model {self.model} answers: "
                + "; ".join(f"{ep.id}: {ep.last_error}" for ep in eps)
            )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: up, load (running, waiting, kv_usage, whether read) and the last error."""
        out = {}
        for ep in self._endpoints.values():
            s = ep.engine.stats()
            out[ep.id] = {
                "url": ep.url,
                "up": ep.up,
                "running": s.running,
                "waiting": s.waiting,
                "kv_usage": s.kv_usage,
                "stats_known": ep.engine.stats_known,
                "last_error": ep.last_error,
            }
        return out

    @property
    def healthy(self) -> int:
        """Endpoints that are up now."""
        return sum(1 for ep in self._endpoints.values() if ep.up)

    # -- routing and streaming -------------------------------------------------------------------

    def _views(self) -> list[ReplicaView]:
        views = []
        for ep in self._endpoints.values():
            s, eng = ep.engine.stats(), ep.engine
            views.append(
                ReplicaView(
                    ep.id,
                    role=Role.COLOCATED,
                    healthy=ep.up,
                    running=s.running,
                    waiting=s.waiting,
                    kv_usage=s.kv_usage,
                    updated_at=eng.stats_at if eng.stats_known else 0.0,
                )
            )
        return views

    def _sync_kv_events(self) -> None:
        index = getattr(self.policy, "index", None)
        if index is None:
            return
        for ep in self._endpoints.values():
            if ep.subscriber is not None:
                apply_events(index, ep.id, ep.subscriber.drain(_EVENTS_PER_DECISION))

    def route(self, request: GenerateRequest) -> tuple[RoutingRequest, Decision]:
        """The policy's decision for `request` over the endpoints (the healthy ones are eligible)."""
        self._sync_kv_events()
        req = RoutingRequest(
            request.request_id,
            list(request.block_keys),
            tenant=request.tenant,
            session_id=request.session_id,
            role=Role.COLOCATED,
        )
        return req, self.policy.route(req, self._views(), self._clock())

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Chunks of `request` from the best healthy endpoint (failing over before the first chunk);
        closing the iterator closes the upstream request."""
        # Merge chunks that pile up while the ingress is busy, as HandleBackend does
        # (serving.replicas.streaming).
        return coalesce(self._stream(request))

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        rreq, decision = self.route(request)
        order = [rid for group in decision.ranked for rid in group]
        if not order:
            yield self._all_down()
            return
        indexed = getattr(self.policy, "index", None) is not None
        failures: list[str] = []
        last: EngineError | None = None
        for rank, eid in enumerate(order):
            ep = self._endpoints[eid]
            if not ep.up:
                continue  # marked down by an earlier attempt's failure meanwhile
            route = Route(
                mode=ServeMode.COLOCATED,
                decode=eid,
                reason="failover" if rank else "",
                matched_blocks=decision.matched.get(eid, 0) if indexed else None,
                score=decision.scores.get(eid),
            )
            self.policy.on_sent(rreq, eid)
            gen = ep.engine.generate(request)
            try:
                first = await anext(gen, None)
                if first is None:
                    first = Chunk(
                        error=EngineError(f"upstream {eid} sent nothing", 502, "upstream_incomplete")
                    )
                err = first.error
                if err is not None and _retriable(err):
                    last = err
                    failures.append(f"{eid}: {err.status} {err.type}")
                    if _unreachable(err):
                        self._mark(ep, False, f"{err.status} {err.type}: {err.message}")
                    continue
                first.route = route
                yield first
                if first.error is not None or first.finish_reason is not None:
                    return
                async for chunk in gen:
                    yield chunk
                return
            finally:
                self.policy.on_done(rreq, eid)
                await asyncio.shield(gen.aclose())  # see OpenAIEngine._generate: a cancelled client's cleanup
        if last is not None and len(failures) == 1:
            yield Chunk(error=last)
        elif failures:
            message = f"model {self.model}: every endpoint failed: " + "; ".join(failures)
            yield Chunk(error=EngineError(message, 503, "upstream_unavailable"))
        else:
            yield self._all_down()

    def _all_down(self) -> Chunk:
        down = "; ".join(f"{ep.id} ({ep.last_error or 'not answering'})" for ep in self._endpoints.values())
        return Chunk(
            error=EngineError(f"model {self.model}: no healthy endpoint: {down}", 503, "upstream_unavailable")
        )
