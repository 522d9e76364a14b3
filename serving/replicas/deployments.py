"""Engine replicas: one `Engine` inside one Ray Serve replica, in one of three roles.

- `EngineServer` (colocated): prefill and decode on the same engine.
- `PrefillServer`: runs prompts only (`prefill` → `KVHandle`); its KV waits for a decode engine.
- `DecodeServer`: the ingress calls it. Per request it decides (router.pd) whether to prefill here
  or on a prefill replica, orchestrates the remote prefill, and streams the answer while its engine
  pulls the KV straight from the prefill engine (NIXL). KV never passes through Ray, the router or
  the ingress: only the small `KVHandle` does.

Why decode-side orchestration (as ray.serve.llm does since Ray 2.5x) rather than a proxy: the decode
replica is where the request ends up anyway, so the hand-off costs one Ray call (decode → prefill)
and no extra hop for the token stream; the decider needs the decode replica's cache state, which is
local there; and fallback (prefill here) needs no second routing decision.

The classes are plain Python; `serving.app` wraps them with `serve.deployment(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from autoscaler.meters import ReplicaMeter
from router.contracts import DisaggMode, ReplicaStats, Role, RouteFeedback, ServeMode
from router.pd import PDDecision, PrefixTracker, decide
from router.resilience import Fail, NextTarget, classify
from serving.config import AutoscalingSpec, Disaggregation, EngineKind
from serving.replicas.engines import make_engine
from serving.replicas.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    GenerateRequest,
    KVHandle,
    ModelInfo,
    Route,
)
from serving.replicas.ports import listen_port
from serving.replicas.streaming import coalesce

logger = logging.getLogger(__name__)

#: `kv_events_config.endpoint` placeholder: the replica picks a free port of its own (serving.replicas.ports).
KV_EVENTS_ANY_PORT = "tcp://*:0"
#: Remembered blocks per decode replica when the engine does not report its KV block count.
_DEFAULT_TRACKED_BLOCKS = 4096
#: Smallest block the decode replica's prefix tracker hashes (engines with 1-token pages).
_MIN_TRACKED_BLOCK = 16


def replica_name() -> str:
    """`<deployment>#<replica id>` of the calling Serve replica ("local" outside Serve)."""
    try:
        ctx = serve.get_replica_context()
    except RayServeException:
        return "local"
    return f"{ctx.deployment}#{ctx.replica_id.unique_id}"


def _unique_id(name: str) -> str:
    """The replica id part of `replica_name()` (what the router knows replicas by)."""
    return name.rsplit("#", 1)[-1]


def _free_port() -> int:
    """A port for the engine to bind later (serving.replicas.ports: outside the ephemeral range)."""
    return listen_port()


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests): loopback
        return "127.0.0.1"


def _kv_transfer_setup(engine: EngineKind, role: Role, engine_args: dict[str, Any]) -> dict[str, Any]:
    """Give this replica's KV-transfer endpoint its own address; returns the engine args to use.

    Every engine on a node needs its own port, and replicas of one pool share their env and
    args, so the port is picked here (unless the pool pins it). The host is the node's IP so
    that decode engines on other nodes can reach it.

    - vLLM: `VLLM_NIXL_SIDE_CHANNEL_PORT` / `VLLM_NIXL_SIDE_CHANNEL_HOST` (both roles).
    - SGLang: the prefill engine's `disaggregation_bootstrap_port`, and `SGLANG_HOST_IP`.
    """
    if role is Role.COLOCATED:
        return engine_args
    if engine is EngineKind.VLLM:
        os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", _node_ip())
        os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(_free_port()))
    elif engine is EngineKind.SGLANG:
        os.environ.setdefault("SGLANG_HOST_IP", _node_ip())
        if role is Role.PREFILL and "disaggregation_bootstrap_port" not in engine_args:
            return {**engine_args, "disaggregation_bootstrap_port": _free_port()}
    return engine_args


def _gang() -> Any:
    """This replica's Serve gang context (None outside a gang or outside Serve)."""
    try:
        return serve.get_replica_context().gang_context
    except RayServeException:
        return None


def _kv_events_setup(engine_args: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Give the engine's KV-event publisher a free port; returns the args and the address the
    router subscribes to (None when the engine publishes no events).

    NOTE(why `*`): the publisher binds every interface, not just the node IP the router connects
    to. vLLM's `ZmqEventPublisher` (0.32, `_is_bind_endpoint`) binds only an endpoint with `*` (or
    `::`, ipc, inproc) and CONNECTS to any other, so `tcp://<node ip>:<port>` would leave nobody
    bound and no events flowing; its `tcp://*:0` does bind the node IP, but to a port only the
    engine process learns. Binding the node IP would not make the feed private anyway: it is
    plain, unauthenticated ZMQ, and vLLM 0.32's `BlockStored` carries each block's `token_ids` and
    its `extra_keys` (the cache salt itself), not just hashes. Only the network can protect it:
    the KV-event ports must be reachable from the Ray pods (where the routers run) and nothing else.
    """
    cfg = engine_args.get("kv_events_config")
    if not cfg or not cfg.get("enable_kv_cache_events"):
        return engine_args, None
    endpoint = cfg.get("endpoint", KV_EVENTS_ANY_PORT)
    if endpoint == KV_EVENTS_ANY_PORT:
        endpoint = f"tcp://*:{_free_port()}"
    port = endpoint.rsplit(":", 1)[-1]
    return {**engine_args, "kv_events_config": {**cfg, "endpoint": endpoint}}, f"tcp://{_node_ip()}:{port}"


async def _data_parallel_args(
    engine_args: dict[str, Any], gang: Any
) -> tuple[dict[str, Any], tuple[str, int] | None, Any]:
    """For a replica in a Serve gang: the engine args with its vLLM DP rank and the group's address
    filled in, that address, and the rendezvous actor (keep it alive). Outside a gang: unchanged."""
    if gang is None:
        if int(engine_args.get("data_parallel_size", 1)) > 1:
            raise RuntimeError("a data-parallel pool must run as a Serve gang (gang_scheduling_config)")
        return engine_args, None, None
    from serving.replicas.dp import rendezvous

    (address, port), actor = await rendezvous(gang.gang_id, gang.rank, _node_ip, _free_port)
    if int(engine_args.get("data_parallel_size", 1)) <= 1:  # e.g. the fake engine
        return engine_args, (address, port), actor
    args = {
        **engine_args,
        "data_parallel_rank": gang.rank,
        "data_parallel_address": address,
        "data_parallel_rpc_port": port,
    }
    return args, (address, port), actor


class _EngineGauges:
    """The engine's load as Ray metrics, refreshed with the routing stats (every `stats_period_s`).

    `ray.serve.metrics` adds the `deployment`, `replica` and `application` labels; Ray's metrics agent
    exports them as `ray_tandem_engine_*`.
    """

    def __init__(self, role: str) -> None:
        from ray.serve.metrics import Gauge

        self._kv = Gauge(
            "tandem_engine_kv_cache_usage",
            description="Fraction of the engine's KV-cache blocks in use (0 to 1).",
            tag_keys=("role",),
        )
        self._running = Gauge(
            "tandem_engine_running_requests",
            description="Requests the engine is running.",
            tag_keys=("role",),
        )
        self._waiting = Gauge(
            "tandem_engine_waiting_requests",
            description="Requests waiting in the engine's queue.",
            tag_keys=("role",),
        )
        for g in (self._kv, self._running, self._waiting):
            g.set_default_tags({"role": role})

    def record(self, s: EngineStats) -> None:
        self._kv.set(s.kv_usage)
        self._running.set(s.running)
        self._waiting.set(s.waiting)


class EngineServer:
    """Serves one model from one engine (colocated role; base of the P/D roles).

    Args:
        model_name: served model name.
        model_path: weights to load.
        engine: engine kind.
        engine_args: passed through to the engine.
        pool: pool name (for logs and status).
        role: the pool's role.
        stream_flush_ms: the pool's `stream_flush_ms` (serving.replicas.streaming.coalesce).
        meter_window_s: the model's `autoscaling.window_s` (the autoscaler's view of this replica).
        tenant_salt: the model's `router.tenant_salt`: the replica refuses to start on an engine that
            cannot salt its prefix cache per tenant (`ModelInfo.cache_salt`).
    """

    async def __init__(
        self,
        model_name: str,
        model_path: str,
        engine: EngineKind,
        engine_args: dict[str, Any],
        pool: str,
        role: Role = Role.COLOCATED,
        stream_flush_ms: float = 0.0,
        meter_window_s: float = AutoscalingSpec.model_fields["window_s"].default,
        *,
        tenant_salt: bool = False,
    ) -> None:
        self._pool = pool
        self._meter = ReplicaMeter(time.monotonic, meter_window_s)
        self._role = Role(role)
        self._flush_s = stream_flush_ms / 1000.0
        self._replica = replica_name()
        args = _kv_transfer_setup(EngineKind(engine), self._role, engine_args)
        args, self._kv_events = _kv_events_setup(args)
        args, self._dp_address, self._dp_rendezvous = await _data_parallel_args(args, _gang())
        self._engine = make_engine(EngineKind(engine), model_name, model_path, args, role=self._role)
        await self._engine.start()
        if tenant_salt and not self._engine.model_info().cache_salt:
            await self._engine.shutdown()
            kind = EngineKind(engine)
            why = " (its Engine.async_generate takes neither cache_salt nor extra_key)"
            raise RuntimeError(
                f"router.tenant_salt: the {kind.value} engine of {model_name} cannot salt its prefix "
                f"cache per tenant{why if kind is EngineKind.SGLANG else ''}, so tenants would share "
                "cache entries (a timing side channel); upgrade the engine, or set "
                "router.tenant_salt: false for this model to accept that"
            )
        self._gauges = _EngineGauges(self._role.value)
        logger.info("replica %s of %s/%s ready", self._replica, model_name, pool)

    def _route(self, request: GenerateRequest) -> Route:
        route = Route(mode=ServeMode.COLOCATED, decode=self._replica)
        self._stamp(route, request)
        return route

    def _feedback(self, request: GenerateRequest) -> RouteFeedback | None:
        """What the router said about this replica when it chose it (None: no Tandem router did)."""
        return (request.routing or {}).get(_unique_id(self._replica))

    def _stamp(self, route: Route, request: GenerateRequest) -> None:
        """Add the router's matched blocks and score for this replica (when a router chose it)."""
        mine = self._feedback(request)
        if mine is not None:
            route.matched_blocks, route.score = mine.matched_blocks, mine.score

    def record_routing_stats(self) -> dict[str, Any]:
        """Load snapshot for the request router (Ray Serve calls this every stats period): a
        `router.contracts.ReplicaStats` in the dict form Serve carries."""
        s = self._engine.stats()
        gauges = getattr(self, "_gauges", None)
        if gauges is not None:
            gauges.record(s)
        stats = ReplicaStats(self._role, s.running, s.waiting, s.kv_usage, time.time(), self._kv_events)
        return stats.as_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load for the SLO autoscaler (Ray Serve pushes it to the controller every
        `autoscaling.metrics_interval_s`): autoscaler.signals.REPLICA_FIELDS."""
        s = self._engine.stats()
        return self._meter.snapshot(s.running, s.waiting, s.kv_usage, s.prompt_tokens_computed)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream chunks for `request`; the first carries the route. Cancelling aborts the engine request.
        The replica's meter sees its start, first token and end (TTFT and TPOT as served here)."""
        rid, meter = request.request_id, self._meter
        meter.started(rid, len(request.prompt_token_ids))
        tokens = 0
        first = True
        try:
            async for chunk in self._generate(request):
                if first:
                    meter.first_token(rid)
                    first = False
                tokens = max(tokens, chunk.completion_tokens)
                yield chunk
        finally:
            meter.finished(rid, tokens)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        first = True
        async for chunk in self._guarded(request.request_id, self._engine.generate(request)):
            if first:
                chunk.route = self._route(request)
                first = False
            yield chunk

    async def _guarded(self, request_id: str, source: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """`source` coalesced; a cancelled stream aborts `request_id` at the engine."""
        gen = coalesce(source, self._flush_s)
        try:
            async for chunk in gen:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # NOTE: the client went away (Ray Serve cancels the streaming call). vLLM aborts on
            # cancellation itself, but an explicit abort also covers engines that do not, and
            # abort is idempotent.
            await asyncio.shield(self._engine.abort(request_id))
            raise
        finally:
            await gen.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort `request_id` at the engine."""
        await self._engine.abort(request_id)

    def model_info(self) -> ModelInfo:
        """Context length and name of the served model."""
        return self._engine.model_info()

    def stats(self) -> EngineStats:
        """Engine load snapshot."""
        return self._engine.stats()

    async def reset_prefix_cache(self) -> None:
        """Drop the engine's cached prefixes (operations, and tests that need a cold cache)."""
        await self._engine.reset_prefix_cache()

    def replica(self) -> str:
        """This replica's name (`<deployment>#<id>`)."""
        return self._replica

    def placement(self) -> dict[str, Any]:
        """Where this replica runs: node, placement group, and its rank in a DP gang (if any)."""
        import ray

        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        gang = _gang()
        return {
            "dp_address": list(self._dp_address) if self._dp_address else None,
            "replica": self._replica,
            "node_id": ctx.get_node_id(),
            "placement_group_id": pg,
            "gang_id": gang.gang_id if gang else None,
            "gang_rank": gang.rank if gang else None,
            "gang_size": gang.world_size if gang else None,
        }

    async def check_health(self) -> None:
        """Ray Serve's health probe: raises (replica restarted) when the engine is dead."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        await self._engine.shutdown()


class PrefillServer(EngineServer):
    """A prefill replica: runs prompts and keeps their KV for decode engines to pull."""

    async def prefill(self, request: GenerateRequest) -> KVHandle:
        """Prefill `request`'s prompt; the handle names this replica. Cancelling aborts it."""
        rid = request.request_id
        self._meter.started(rid, len(request.prompt_token_ids))
        try:
            kv = await self._engine.prefill(request)
        except asyncio.CancelledError:
            await asyncio.shield(self._engine.abort(request.request_id))
            raise
        finally:
            self._meter.first_token(rid)  # a prefill's TTFT is its whole time here
            self._meter.finished(rid, 0)
        kv.replica = self._replica
        return kv


class DecodeServer(EngineServer):
    """A decode replica that orchestrates prefill (see the module docstring).

    Args:
        prefill: handle of the model's prefill deployment.
        disaggregation: the model's `Disaggregation` settings (as a dict).
        tenant_salt: as for `EngineServer`.
    """

    async def __init__(
        self,
        model_name: str,
        model_path: str,
        engine: EngineKind,
        engine_args: dict[str, Any],
        pool: str,
        role: Role = Role.DECODE,
        stream_flush_ms: float = 0.0,
        meter_window_s: float = AutoscalingSpec.model_fields["window_s"].default,
        *,
        prefill: Any,
        disaggregation: dict[str, Any],
        tenant_salt: bool = False,
    ) -> None:
        await super().__init__(
            model_name, model_path, engine, engine_args, pool, role, stream_flush_ms, meter_window_s,
            tenant_salt=tenant_salt,
        )  # fmt: skip
        self._prefill = prefill
        self._d = Disaggregation.model_validate(disaggregation)
        # NOTE: an SGLang decode engine only serves requests whose KV comes from a prefill engine
        # (it rejects requests without a bootstrap room), so it can never prefill locally.
        self._local_prefill = EngineKind(engine) is not EngineKind.SGLANG
        info = self._engine.model_info()
        # Track at least 16-token blocks: SGLang's page size is 1 token.
        block = max(info.block_size, _MIN_TRACKED_BLOCK)
        blocks = info.num_kv_blocks * info.block_size // block if info.num_kv_blocks else 0
        self._prefix = PrefixTracker(block, blocks or _DEFAULT_TRACKED_BLOCKS)
        self._keyed = block == info.block_size

    async def reset_prefix_cache(self) -> None:
        await super().reset_prefix_cache()
        self._prefix.clear()

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Decide, prefill (remotely or here), then stream. The first chunk carries the route."""
        ids = request.prompt_token_ids
        wanted = request.disagg if request.disagg != DisaggMode.AUTO else self._d.mode
        # The ingress's salted, engine-identical block keys when their block size is ours.
        keys = request.block_keys if self._keyed else []
        if self._local_prefill:
            cached = self._cached_tokens(request, keys)
            decision = decide(wanted, len(ids), cached, self._d.min_prefill_tokens)
        else:
            decision = PDDecision(ServeMode.DISAGG, "engine_needs_remote_prefill")
        route = Route(mode=decision.mode, decode=self._replica, reason=decision.reason)
        self._stamp(route, request)
        output: list[int] = []
        source: AsyncIterator[Chunk] | None = None
        kv: KVHandle | None = None
        if decision.mode is ServeMode.DISAGG:
            kv, why = await self._remote_prefill(request)
            if kv is not None and kv.error is not None:  # the request's own fault: no retry
                yield Chunk(error=kv.error)
                return
            if kv is None and not self._local_prefill:
                yield Chunk(error=EngineError(f"no prefill replica could serve the request ({why})", 503,
                                              "prefill_unavailable"))  # fmt: skip
                return
            if kv is None:
                route.mode, route.reason = ServeMode.COLOCATED, f"fallback:{why}"
            else:
                route.prefill = kv.replica
                source = await self._pull(request, kv, route)
        if source is None:
            source = self._guarded(request.request_id, self._engine.generate(request))
        # The prompt tokens the client is not charged compute for: on a remote prefill, the
        # prefill engine's cache hits (the decode engine counts transferred tokens as external).
        remote_cached = kv.cached_tokens if route.mode is ServeMode.DISAGG and kv is not None else 0
        first = True
        try:
            async for chunk in source:
                if first:
                    chunk.route = route
                    first = False
                chunk.cached_tokens = max(chunk.cached_tokens, remote_cached)
                output.extend(chunk.token_ids)
                yield chunk
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            if keys:
                self._prefix.record_keys(keys)
            else:
                self._prefix.record(ids + output, request.cache_salt)

    def _cached_tokens(self, request: GenerateRequest, keys: list[int]) -> int:
        """Prompt tokens this replica's engine holds: the router's block match when its policy keeps a
        block index (fed by this engine's KV events, so it knows evictions too) and the keys are the
        engine's; else this replica's own `PrefixTracker`."""
        mine = self._feedback(request)
        if keys and mine is not None and mine.matched_blocks is not None:
            return min(mine.matched_blocks, len(keys)) * self._prefix.block_size
        if keys:
            return self._prefix.cached_keys(keys)
        # NOTE: salted like the engine's cache (and the ingress's keys): the decision and the
        # `short_suffix:<n>` it reports in x-tandem-route must not show another tenant's prompts.
        return self._prefix.cached_tokens(request.prompt_token_ids, request.cache_salt)

    async def _remote_prefill(self, request: GenerateRequest) -> tuple[KVHandle | None, str]:
        """A `KVHandle` from a prefill replica, or (None, why) when the retry policy gives up.

        Each attempt has its own timeout; a dead replica (RayError), a timeout or an engine error is
        retried (Serve's router avoids replicas it saw die). A 4xx from the prefill engine is returned
        as is: the same request would fail here too. An attempt that times out, or that this request
        stops waiting for (the client went away), is cancelled at the prefill replica.
        """
        policy = self._d.prefill_retry_policy()
        attempt = 0
        while True:
            attempt += 1
            req = dataclasses.replace(request, request_id=f"{request.request_id}-p{attempt - 1}")
            status: int | None = None
            timed_out = False
            response = self._prefill.prefill.remote(req)
            try:
                kv: KVHandle = await asyncio.wait_for(response, timeout=self._d.prefill_timeout_s)
            except TimeoutError:
                _cancel(response)
                why, timed_out = "prefill_timeout", True
                logger.warning("prefill of %s timed out (attempt %d)", request.request_id, attempt)
            except asyncio.CancelledError:
                _cancel(response)
                raise
            except RayError as e:
                why = "prefill_replica_died"
                logger.warning("prefill of %s failed (attempt %d): %s", request.request_id, attempt, e)
            else:
                if kv.error is None:
                    return kv, ""
                why, status = "prefill_error", kv.error.status
                logger.warning("prefill of %s: %s", request.request_id, kv.error.message)
            step = policy.next_step(classify(status, timed_out), attempt)
            if isinstance(step, Fail):
                return kv, "prefill_rejected"
            if isinstance(step, NextTarget):
                return None, why
            await asyncio.sleep(step.delay_s)

    async def _pull(self, request: GenerateRequest, kv: KVHandle, route: Route) -> AsyncIterator[Chunk]:
        """Start decoding with `kv`; the stream to serve, falling back to a local prefill when the
        KV does not arrive within `kv_transfer_timeout_s` or the transfer fails before any token."""
        rid = f"{request.request_id}-d"
        dec = dataclasses.replace(request, request_id=rid)
        stream = self._guarded(rid, self._engine.decode(dec, kv))
        try:
            first = await asyncio.wait_for(anext(stream), timeout=self._d.kv_transfer_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            first = None
            reason = "kv_transfer_timeout"
        else:
            reason = "kv_transfer_error"
        if first is not None and first.error is None:
            return _prepend(first, stream)
        # NOTE: nothing was sent to the client yet, so a local prefill is invisible to it. The
        # decode request is aborted (its blocks freed); the prefill engine frees the blocks it
        # holds for this request when their lease (kv_lease_s) runs out.
        await stream.aclose()
        with contextlib.suppress(Exception):
            await self._engine.abort(rid)
        if not self._local_prefill:
            logger.warning("KV pull for %s failed (%s)", rid, reason)
            err = first.error if first is not None and first.error is not None else None
            return _single(Chunk(error=err or EngineError("KV transfer timed out", 504, "kv_transfer")))
        logger.warning("KV pull for %s failed (%s); prefilling on the decode replica", rid, reason)
        route.mode, route.prefill, route.reason = ServeMode.COLOCATED, "", f"fallback:{reason}"
        return self._guarded(request.request_id, self._engine.generate(request))


def _cancel(response: Any) -> None:
    """Cancel an abandoned prefill call at its replica (best effort).

    NOTE(why): `asyncio.wait_for` cancels only our await of a Ray Serve `DeploymentResponse`, not
    the call (Ray Serve 2.60 `DeploymentResponse.__await__` never calls `cancel()`), so without this
    the prefill replica keeps running an attempt nobody waits for and then holds its KV for
    `kv_lease_s`, while the retry prefills the same prompt again: double work and pinned KV, under
    exactly the load that causes the timeouts. `cancel()` withdraws a call not yet assigned, else
    `ray.cancel`s it: `PrefillServer.prefill` sees CancelledError and aborts it at its engine. It
    does not wait for the replica (the abort lands shortly after; nothing here depends on it).
    """
    cancel = getattr(response, "cancel", None)
    if not callable(cancel):  # not a DeploymentResponse (a plain awaitable in tests)
        return
    try:
        cancel()
    except Exception:  # noqa: BLE001 - best effort: the prefill engine's KV lease frees it anyway
        logger.warning("cancelling an abandoned prefill failed", exc_info=True)


async def _single(chunk: Chunk) -> AsyncIterator[Chunk]:
    yield chunk


async def _prepend(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
