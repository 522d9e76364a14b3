"""Streams that survive their engine: the stall timeout and mid-stream migration at the ingress.

`MigratingStream.stream(request)` is what a chat or text completion reads instead of its backend's
stream (under serving.thinking's run, for a reasoning model). It passes the engine's chunks through
and watches for the ways a stream breaks after its first token:

- an error chunk with a 5xx status (a replica that died mid-stream is a 503, a cut upstream a 502);
- no chunk for `resilience.streams.stall_timeout_s` (an engine that is alive but stuck: no timeout
  after the first token existed before, so the client, its pool slot and its ticket waited forever);
- the end of the stream without a finish reason, or with the engine's "abort" (the answer was cut).

Then, as `router.migration.MigrationPolicy` allows (a migration limit and the retry budget), it opens
the rest of the request on another replica of the same model, or on the next usable target of the tier's
chain with the same vocabulary, as prompt + the tokens already sent, and goes on yielding from there:
the client sees one stream, no token repeated or lost (greedy decoding continues exactly). Otherwise
the client gets an error chunk (with its status and reason) and then `[DONE]`, never a silent cut.
An error chunk that is an engine fault (a 500 `engine_error`: the engine raised on this input, see
`router.resilience.classify`) is never migrated: the continuation, the same prompt plus the tokens
sent, would fail the same way (result `engine_fault` in the metric).
What happened is in `migrations` (the API puts it in the final chunk and, unstreamed, in
`x-tandem-route`) and in `tandem_stream_migrations_total`.

The first chunk of the first leg is not watched here: `RequestPipeline.open` waits for it with the
first-token timeout and retries a failure before any token along the chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.hashing import tenant_salt
from router.migration import Failure, MigrationPolicy, resume_sampling
from router.resilience import backoff_s
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest

if TYPE_CHECKING:
    from router.admission import Ticket
    from serving.http.pipeline import Plan, RequestPipeline, ServedModel

logger = logging.getLogger(__name__)

#: The field of a completion's final chunk (or its body, unstreamed) that lists its migrations.
MIGRATIONS_FIELD = "x_tandem_migrations"


@dataclass(slots=True)
class Migration:
    """One migration of a request: why, after how many of its tokens, and where it went."""

    reason: str
    after_tokens: int
    model: str
    route: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "after_tokens": self.after_tokens,
            "model": self.model,
            "route": self.route,
        }


class MigratingStream:
    """One request's engine streams, continued elsewhere when one breaks (see the module docstring).

    Args:
        pipeline: the ingress's pipeline (models, gateway, metrics).
        plan: the request's plan (its prompt ids per model, tenant, chain).
        ticket: its admission ticket (the pool slot moves with a migration to another model).
        chain: the tier's degradation chain; `index` the target that answered first.
        first_timeout_s: how long a continuation may take to its first chunk (a replica restart fits).
    """

    def __init__(
        self,
        pipeline: RequestPipeline,
        plan: Plan,
        ticket: Ticket,
        chain: list[Any],
        index: int,
        served: ServedModel,
        first_timeout_s: float,
    ) -> None:
        self._pipeline = pipeline
        self._plan = plan
        self._detail = plan.input.route_detail  # replicas in each migration's route?
        self._ticket = ticket
        self._chain = chain
        self._index = index
        self.served = served
        cfg = pipeline.gateway.resilience.streams
        self._stall_s = cfg.stall_timeout_s
        self._policy = MigrationPolicy(cfg.migration_limit)
        self._first_timeout_s = max(first_timeout_s, self._stall_s)
        self.migrations: list[Migration] = []
        #: Tokens the request sent, across every stream (what a continuation replays).
        self.sent = 0
        #: Set once the stream answered its first chunk (before that, pipeline.open retries).
        self._started = False

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The chunks of `request` (a serving.thinking StreamFn): see the module docstring."""
        return self._run(request)

    async def _read(self, leg: AsyncIterator[Chunk], timeout_s: float | None) -> Chunk | EngineError:
        """The next chunk of `leg`, or the error that ends it (stalled, or ended without a finish)."""
        try:
            if timeout_s is None:
                return await anext(leg)
            async with asyncio.timeout(timeout_s):
                return await anext(leg)
        except StopAsyncIteration:
            if not self._started:
                return EngineError("the engine ended the stream without output", 502, "empty")
            return EngineError("the engine stream ended without a finish reason", 502, "stream_cut")
        except TimeoutError:
            self._pipeline.metrics.stream_stalls.labels(self.served.name).inc()
            return EngineError(f"the engine sent nothing for {self._stall_s:g}s", 504, "engine_stalled")

    async def _run(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        served = self.served
        base = self._base_ids(served)
        ids = request.prompt_token_ids
        # Ids of this request beyond the model's prompt (a reasoning run's later leg replays them).
        extra = ids[len(base) :] if ids[: len(base)] == base else None
        req = request
        leg = served.backend.stream(req)
        sent: list[int] = []  # ids this request's streams sent, the current one's included
        leg_start = 0  # where in `sent` the current stream started
        prompt0: int | None = None
        cached0 = 0
        ids_known = True
        # pipeline.open bounds the request's very first read; a continuation's first read may wait for
        # a replica to start; after that, the stall timeout.
        timeout: float | None = None if not self._started else self._stall_s
        deadline, tries = 0.0, 0  # a continuation's first-chunk deadline, and its tries without a chunk
        try:
            while True:
                got = await self._read(leg, timeout)
                timeout = self._stall_s
                if isinstance(got, Chunk) and got.error is None:
                    chunk = got
                    if prompt0 is None:
                        prompt0, cached0 = chunk.prompt_tokens, chunk.cached_tokens
                    sent.extend(chunk.token_ids)
                    if chunk.completion_tokens and chunk.completion_tokens != len(sent) - leg_start:
                        ids_known = False
                    if leg_start:  # a continuation: its counts are the request's
                        chunk = dataclasses.replace(
                            chunk, prompt_tokens=prompt0, completion_tokens=len(sent), cached_tokens=cached0
                        )
                    # vLLM's "abort" (not an OpenAI finish reason) means the answer was cut short.
                    aborted = chunk.finish_reason == "abort"
                    if aborted:
                        chunk = dataclasses.replace(chunk, finish_reason=None)
                    self._started = True
                    self.sent += len(chunk.token_ids)
                    if not aborted or chunk.token_ids or chunk.text:
                        yield chunk
                    if not aborted and chunk.finish_reason is not None:
                        return
                    if not aborted:
                        continue
                    error = EngineError("the engine aborted the request", 502, "stream_cut")
                    failure = Failure.CUT
                elif isinstance(got, Chunk):
                    assert got.error is not None
                    if not self._started:  # no token yet: pipeline.open retries along the chain
                        yield got
                        return
                    error, failure = got.error, Failure.ERROR
                else:
                    error = got
                    failure = Failure.STALLED if got.type == "engine_stalled" else Failure.CUT
                await asyncio.shield(leg.aclose())
                if not self._started:
                    yield Chunk(error=error)
                    return
                left = deadline - time.monotonic()
                if leg_start and len(sent) == leg_start and error.status == 503 and left > 0:
                    # The continuation found no live replica (Serve still knew the dead one, or its
                    # replacement is starting): the same continuation again, until its first-chunk
                    # timeout; these tries are not migrations (nothing more was sent).
                    tries += 1
                    r = self._pipeline.gateway.resilience
                    await asyncio.sleep(min(left, backoff_s(tries, r.backoff_base_s, r.pool_status_period_s)))
                    req = dataclasses.replace(req, request_id=f"{req.request_id.split('~')[0]}~{tries}")
                    leg = _noting_route(served.backend.stream(req), self.migrations[-1], self._detail)
                    timeout = max(deadline - time.monotonic(), 0.001)
                    continue
                continued = await self._continue(
                    request, req, failure, error, sent, leg_start, ids_known, extra
                )
                if continued is None:
                    yield Chunk(error=error)
                    return
                req, base = continued
                served = self.served
                leg = _noting_route(served.backend.stream(req), self.migrations[-1], self._detail)
                leg_start = len(sent)
                # After a death the continuation may wait for a replacement replica to start; after a
                # stall the replica is alive: its continuation gets the stall timeout to a first chunk.
                timeout = self._stall_s if failure is Failure.STALLED else self._first_timeout_s
                deadline, tries = time.monotonic() + timeout, 0
        finally:
            await asyncio.shield(leg.aclose())

    async def _continue(
        self,
        request: GenerateRequest,
        current: GenerateRequest,
        failure: Failure,
        error: EngineError,
        sent: list[int],
        leg_start: int,
        ids_known: bool,
        extra: list[int] | None,
    ) -> tuple[GenerateRequest, list[int]] | None:
        """The continuation of `request` after its stream broke with `error` (None: none is allowed)."""
        served = self.served
        m = self._pipeline.metrics
        decision = self._policy.decide(
            failure,
            error.status,
            len(self.migrations),
            ids_known and extra is not None,
            current.sampling.max_tokens - (len(sent) - leg_start),
            self._pipeline.gateway.budget,
            error_type=error.type,
            progressed=len(sent) > leg_start,
        )
        rid = request.request_id
        if not decision.migrate:
            m.stream_migrations.labels(served.name, failure.value, decision.reason).inc()
            logger.warning(
                "stream %s broke after %d tokens (%s: %s); not migrated: %s",
                rid,
                self.sent,
                failure.value,
                error.message,
                decision.reason,
            )
            return None
        assert extra is not None
        r = self._pipeline.gateway.resilience
        await asyncio.sleep(backoff_s(len(self.migrations) + 1, r.backoff_base_s, r.backoff_max_s))
        target = self._target()
        try:
            ids = await self._pipeline.prompts_for(self._plan, target)
            if target is not served:  # the pool slot moves with the request
                await self._ticket.enter_pool(target.name, None)
        except Exception as e:  # noqa: BLE001 - a continuation that cannot start ends the stream cleanly
            logger.warning("stream %s: no continuation on %s: %s", rid, target.name, e)
            m.stream_migrations.labels(served.name, failure.value, "no_target").inc()
            return None
        new_ids = ids + extra + sent
        salt = tenant_salt(self._plan.input.tenant) if target.salt_tenants else None
        req = dataclasses.replace(
            request,
            request_id=f"{rid}.m{len(self.migrations) + 1}",
            prompt_token_ids=new_ids,
            sampling=resume_sampling(request.sampling, len(sent)),
            cache_salt=salt,
            block_keys=await self._pipeline.block_keys(target, new_ids, salt),
            routing=None,
        )
        self.migrations.append(Migration(failure.value, self.sent, target.name))
        m.stream_migrations.labels(served.name, failure.value, "migrated").inc()
        logger.warning(
            "stream %s broke after %d tokens (%s: %s): continued on %s",
            rid,
            self.sent,
            failure.value,
            error.message,
            target.name,
        )
        self.served = target
        return req, ids

    def _base_ids(self, served: ServedModel) -> list[int]:
        plan = self._plan
        return plan.prompt_ids if served is plan.served else plan.prompts.ids.get(served.name, [])

    def _backoff(self) -> tuple[float, float]:
        r = self._pipeline.gateway.resilience
        return r.backoff_base_s, r.backoff_max_s

    def _target(self) -> ServedModel:
        """Where the rest goes: the same model while it has a usable replica; else the next usable
        target of the chain with the same vocabulary; else the same model again (its restarted replica
        takes the continuation: Serve holds the call until one runs, up to the first-chunk timeout)."""
        g = self._pipeline.gateway
        if g.health(self.served.name).usable:
            return self.served
        for target in self._chain[self._index + 1 :]:
            other = self._pipeline.models.get(target.model)
            if other is None or other.vocab != self.served.vocab or other.vocab is None:
                continue
            if g.health(target.model).usable:
                return other
        return self.served

    def report(self) -> str:
        """The migrations as an `x-tandem-route` part ("" when there were none)."""
        if not self.migrations:
            return ""
        parts = [f"{x.reason}@{x.after_tokens}->{x.model}" for x in self.migrations]
        return f"; migrations={len(self.migrations)}; migrated=" + ",".join(parts)


async def _noting_route(
    leg: AsyncIterator[Chunk], migration: Migration, detail: bool
) -> AsyncIterator[Chunk]:
    try:
        async for chunk in leg:
            if not migration.route and chunk.route is not None:
                migration.route = chunk.route.header(detail)
            yield chunk
    finally:
        await asyncio.shield(leg.aclose())  # type: ignore[attr-defined]
