"""One request pipeline for every endpoint: plan → admit → open.

1. `RequestPipeline.plan(PlanInput) -> Plan`: the tier and model (router.tiers), the prompt ids
   (tokenized once per model), the context and max-tokens checks (400 naming the endpoint's field),
   the output tokens reserved for admission, the tenant's cache salt and the prompt's block keys.
2. `RequestPipeline.admit(Plan) -> Ticket`: router.admission (token bucket, fan-out, pool queue);
   a rejection is an `ApiError` (429/503 with Retry-After and the reason as `code`).
3. `RequestPipeline.open(Plan, Ticket, ...) -> Opened`: walks the tier's degradation chain. Per
   target: skip it if terminal or if the request does not fit its context; take a pool slot; open the
   engine stream and wait for its first chunk. After a failure the pure
   `router.resilience.RetryPolicy.next_step` says: retry here (after its delay), the next target, or fail.

`/v1/chat/completions` and `/v1/completions` (serving.http.api) run all three and stream what `open`
returned; `/v1/responses` (serving.http.responses) runs `plan` and `admit` and stores the plan as a
`SessionRequest` that a session worker opens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.admission import AdmissionRequest, Rejected, Ticket
from router.contracts import DisaggMode
from router.hashing import BlockHasher, tenant_salt
from router.resilience import ErrorClass, Fail, Retry, classify
from router.tiers import RequestShape, Resolution, TierError
from serving.backends import Backend
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.protocol import PRIORITY_HEADER, ApiError, usage
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest, SamplingOptions
from serving.thinking import ThinkingRun, ThinkTags

logger = logging.getLogger(__name__)

#: Prompts longer than this are hashed in a worker thread (SHA-256 per block).
_INLINE_HASH_TOKENS = 2048


class Tokenizer(Protocol):
    """Tokenizer used at the ingress (see serving.tokenizer.PromptTokenizer)."""

    def encode_chat(self, messages: list[Any]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(slots=True)
class ServedModel:
    """A model as the API sees it."""

    name: str
    max_model_len: int
    tokenizer: Tokenizer
    backend: Backend
    created: int = 0
    #: Block hasher with the engine's block size (router.hashing); None: no routing keys.
    hasher: BlockHasher | None = None
    #: Salt prefix-cache blocks per tenant (engine and router alike).
    salt_tenants: bool = True
    #: Token ids of the reasoning tags (reasoning models); None: a plain model.
    tags: ThinkTags | None = None
    #: Reasoning budget of a request that sets none.
    default_reasoning_budget: int | None = None

    def open_stream(
        self, request: GenerateRequest, budget: int | None, chat: bool = True
    ) -> AsyncIterator[Chunk]:
        """The backend stream; for chat with a reasoning model, through a ThinkingRun: the budget, the
        reasoning token count, and `text` (the answer) split from `reasoning_text`. A text
        completion is raw text: nothing is split or hidden."""
        if self.tags is None or not chat:
            return self.backend.stream(request)
        budget = budget or self.default_reasoning_budget
        # The answer and the reasoning are decoded here from the ids, split at the tags.
        text = getattr(self.tokenizer, "decode_stream", None)
        run = ThinkingRun(
            self.backend.stream, request, request.sampling.max_tokens, budget, self.tags, text=text
        )
        return run.chunks()

    def usage(self, last: Chunk, chat: bool = True) -> dict:
        """The usage block of a finished request (reasoning tokens: chat with a reasoning model)."""
        reasoning = last.reasoning_tokens if self.tags is not None and chat else None
        return usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens, reasoning)


@dataclass(slots=True)
class PlanInput:
    """What an endpoint knows about a request before the pipeline runs.

    Args:
        model: the body's `model` (a served model or the `auto` alias).
        tenant: from the API key (serving.http.auth).
        encode: the prompt's token ids for a model (each model is tokenized at most once).
        requested_max_tokens: the client's output limit (None: the rest of the context).
        prompt_param / max_tokens_param: the fields a 400 names when the prompt or the limit does not fit.
        first_usable: plan on the chain's first usable target (a session, which is not opened here)
            rather than on the resolved model (whose chain `open` walks).
    """

    model: str
    tenant: str
    encode: Callable[[ServedModel], Awaitable[list[int]]]
    requested_max_tokens: int | None
    prompt_param: str
    max_tokens_param: str
    task: str | None = None
    task_id: str | None = None
    rank: int | None = None
    session_id: str | None = None
    disagg: DisaggMode = DisaggMode.AUTO
    reasoning_effort: str | None = None
    tools: bool = False
    reasoning_budget: int | None = None
    budget_param: str = "max_reasoning_tokens"
    first_usable: bool = False


@dataclass(slots=True)
class Prompts:
    """A request's prompt ids per model, each model tokenized at most once."""

    encode: Callable[[ServedModel], Awaitable[list[int]]]
    ids: dict[str, list[int]] = field(default_factory=dict)

    async def for_model(self, served: ServedModel) -> list[int]:
        ids = self.ids.get(served.name)
        if ids is None:
            ids = self.ids[served.name] = await self.encode(served)
        return ids


@dataclass(slots=True)
class Plan:
    """A planned request: where it goes first and what admission charges for it."""

    input: PlanInput
    resolution: Resolution
    served: ServedModel
    prompt_ids: list[int]
    #: Output tokens on `served` (the client's limit, else the rest of its context).
    max_tokens: int
    #: Output tokens the admission bucket reserves until the real count is known.
    reserved: int
    salt: str | None
    block_keys: list[int]
    prompts: Prompts

    @property
    def reasoning_budget(self) -> int | None:
        """The reasoning budget on `served`: the request's, else the model's default (reasoning models)."""
        if self.served.tags is None:
            return None
        return self.input.reasoning_budget or self.served.default_reasoning_budget


@dataclass(slots=True)
class Opened:
    """A stream that produced its first chunk: the target that answered and the route it took."""

    served: ServedModel
    first: Chunk
    stream: AsyncIterator[Chunk]
    route: str


class RequestPipeline:
    """plan → admit → open for one ingress replica's models (see the module docstring)."""

    def __init__(self, models: dict[str, ServedModel], gateway: Gateway, metrics: IngressMetrics) -> None:
        self.models = models
        self.gateway = gateway
        self.metrics = metrics
        self.retry = gateway.resilience.retry_policy()

    # -- lookups -------------------------------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        """The served model `name` (404 naming `model` otherwise)."""
        served = self.models.get(name)
        if served is None:
            raise ApiError(
                404,
                f"The model `{name}` is not served here. Available: {sorted(self.models)}",
                "not_found_error",
                "model",
            )
        return served

    def priority_rank(self, value: str | None) -> int | None:
        """The request's priority class (`x-tandem-priority`, capped by the tenant's); 400 if unknown."""
        try:
            return self.gateway.priority_rank(value)
        except ValueError:
            raise ApiError(
                400,
                f"header {PRIORITY_HEADER}: {value!r} is not one of interactive, standard, batch",
                "invalid_request_error",
                PRIORITY_HEADER,
            ) from None

    def rejected(self, e: Rejected, model: str) -> ApiError:
        """An admission or overload rejection as the client sees it (counted by reason)."""
        self.metrics.rejections.labels(e.reason, model).inc()
        self.gateway.autoscaling.rejected(model, e.reason)
        headers = {}
        retry = e.retry_after_header()
        if retry is not None:
            headers["retry-after"] = retry
        if e.status == 429:
            type_ = "rate_limit_error"
        elif e.status == 503:
            type_ = "service_unavailable_error"
        else:
            type_ = "invalid_request_error"
        param = "max_tokens" if e.reason == "request_too_large" else None
        return ApiError(e.status, e.message, type_, param, code=e.reason, headers=headers)

    # -- 1. plan -------------------------------------------------------------------------------

    async def plan(self, inp: PlanInput) -> Plan:
        """Tier, model, prompt ids, limits, salt and block keys (ApiError 4xx naming the field)."""
        g = self.gateway
        prompts = Prompts(inp.encode)
        try:
            shape = None
            if g.tiers.needs_shape(inp.model, inp.task):
                probe = self.model(g.tiers.tier(g.tiers.default_tier()).model)
                n = len(await prompts.for_model(probe))
                shape = RequestShape(n, inp.requested_max_tokens, inp.reasoning_effort, inp.tools)
            res = g.tiers.resolve(inp.model, inp.task, shape)
        except TierError as e:
            type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
            raise ApiError(e.status, str(e), type_, e.param) from None
        served = self.model(res.model)
        if inp.first_usable:
            served = self._first_usable(res)
        if inp.reasoning_budget is not None and served.tags is None:
            raise ApiError(
                400,
                f"{inp.budget_param}: model `{served.name}` is not a reasoning model; omit it",
                "invalid_request_error",
                inp.budget_param,
            )
        ids = await prompts.for_model(served)
        max_tokens = self._max_tokens(served, inp, len(ids))
        reserved = inp.requested_max_tokens or min(max_tokens, g.default_reserved_tokens)
        salt = tenant_salt(inp.tenant) if served.salt_tenants else None
        keys = await block_keys(served, ids, salt)
        return Plan(inp, res, served, ids, max_tokens, reserved, salt, keys, prompts)

    def _first_usable(self, res: Resolution) -> ServedModel:
        """The first model along the tier's chain that is served here and usable (503 if none)."""
        skipped = []
        for target in self.gateway.tiers.chain(res):
            served = self.models.get(target.model)
            if served is None:
                continue
            health = self.gateway.health(target.model)
            if health.usable:
                return served
            skipped.append(f"{target.model}: {health.state.value}")
        raise ApiError(
            503,
            "no model along the tier's degradation chain is available: " + "; ".join(skipped),
            "service_unavailable_error",
            code="pool_down",
        )

    @staticmethod
    def _max_tokens(served: ServedModel, inp: PlanInput, prompt_len: int) -> int:
        room = served.max_model_len - prompt_len
        if room <= 0:
            raise ApiError(
                400,
                f"{inp.prompt_param}: the prompt is {prompt_len} tokens; model `{served.name}` has a "
                f"context of {served.max_model_len} tokens. Shorten the prompt.",
                "invalid_request_error",
                inp.prompt_param,
            )
        asked = inp.requested_max_tokens
        if asked is None:
            return room
        if asked > room:
            field_ = inp.max_tokens_param
            raise ApiError(
                400,
                f"{field_} is {asked} but the prompt is {prompt_len} tokens and model "
                f"`{served.name}` has a context of {served.max_model_len} tokens: at most "
                f"{room} tokens can be generated. Lower {field_} or shorten the prompt.",
                "invalid_request_error",
                field_,
            )
        return asked

    # -- 2. admit ------------------------------------------------------------------------------

    async def admit(self, plan: Plan) -> Ticket:
        """Admission's ticket for `plan` (ApiError 429/503 with Retry-After when rejected)."""
        inp = plan.input
        self.gateway.autoscaling.arrived(plan.served.name, len(plan.prompt_ids), plan.reserved)
        try:
            return await self.gateway.admission.admit(
                AdmissionRequest(inp.tenant, len(plan.prompt_ids), plan.reserved, inp.task_id, inp.rank)
            )
        except Rejected as e:
            raise self.rejected(e, plan.served.name) from None

    # -- 3. open -------------------------------------------------------------------------------

    async def open(
        self,
        plan: Plan,
        ticket: Ticket,
        request_id: str,
        sampling: Callable[[int], SamplingOptions],
        chat: bool,
    ) -> Opened:
        """The first chunk of the first target along the chain that answers.

        `sampling(max_tokens)` gives the engine's sampling options for a target's output limit. Raises
        ApiError: the engine's own 4xx as is, 429 when the target stays rate limited, 503 when no
        target could serve. The caller owns `ticket` (it is released by whoever ends the stream).
        """
        rid = request_id
        g = self.gateway
        inp = plan.input
        g.budget.on_request()
        chain = g.tiers.chain(plan.resolution)
        requested = inp.requested_max_tokens
        skipped: list[str] = []
        for i, target in enumerate(chain):
            served = self.models.get(target.model)
            if served is None:
                skipped.append(f"{target.model}: not served here")
                continue
            health = g.health(target.model)
            if not health.usable:
                skipped.append(f"{target.model}: {health.state.value} ({health.reason})")
                continue
            if served is plan.served:
                ids, salt, keys, out_tokens = plan.prompt_ids, plan.salt, plan.block_keys, plan.max_tokens
            else:
                ids = await plan.prompts.for_model(served)
                room = served.max_model_len - len(ids)
                if room < (requested or 1):
                    skipped.append(
                        f"{target.model}: context window {served.max_model_len} cannot hold "
                        f"{len(ids)} prompt + {requested or 1} output tokens"
                    )
                    continue
                out_tokens = requested or room
                salt = tenant_salt(inp.tenant) if served.salt_tenants else None
                keys = await block_keys(served, ids, salt)
            tier = g.tiers.tier(target.tier) if target.tier else None
            slo = tier.ttft_slo_s if tier else None
            timeout = (tier.first_token_timeout_s if tier else None) or g.resilience.first_token_timeout_s
            timeout += g.cold_start_s.get(target.model, 0.0)  # a pool at zero starts a replica first
            attempt = 0
            while True:
                attempt += 1
                queued_at = time.monotonic()
                try:
                    await ticket.enter_pool(target.model, slo)
                except Rejected as e:  # the pool's queue is full, too slow for the SLO, or timed out
                    raise self.rejected(e, plan.served.name) from None
                g.autoscaling.waited(target.model, time.monotonic() - queued_at)
                req = GenerateRequest(
                    rid if i == 0 and attempt == 1 else f"{rid}-{i}.{attempt}",
                    ids,
                    sampling(out_tokens),
                    disagg=inp.disagg,
                    cache_salt=salt,
                    block_keys=keys,
                    tenant=inp.tenant,
                    session_id=inp.session_id,
                )
                stream = served.open_stream(req, inp.reasoning_budget, chat)
                err: EngineError | None = None
                timed_out = False
                try:
                    first, why = await first_chunk(stream, timeout, g.terminal_event(target.model))
                    if first is not None:
                        err = first.error
                    elif why == "timeout":
                        timed_out = True
                    else:
                        err = EngineError(f"pool went down while waiting: {health.reason}", 503, why)
                except BaseException:
                    ticket.leave_pool()
                    await asyncio.shield(stream.aclose())
                    raise
                now = time.monotonic()
                if first is not None and err is None:
                    health.on_success(now)
                    return Opened(served, first, stream, self._route(plan, chain, i, skipped, first))
                await stream.aclose()
                ticket.leave_pool()
                cls = classify(err.status if err else None, timed_out)
                self.metrics.attempt_failures.labels(target.model, cls.value).inc()
                reason = f"timeout after {timeout:g}s" if timed_out else f"{err.status} {err.type}"
                if cls in (ErrorClass.SERVER, ErrorClass.TIMEOUT):
                    health.on_failure(reason, now)
                step = self.retry.next_step(
                    cls,
                    attempt,
                    retry_after_s=err.retry_after_s if err is not None else None,
                    usable=health.usable,
                    budget=g.budget,
                )
                if isinstance(step, Retry):
                    self.metrics.retries.labels(target.model, cls.value).inc()
                    await asyncio.sleep(step.delay_s)
                    continue
                if isinstance(step, Fail):
                    assert err is not None
                    if cls is ErrorClass.CLIENT:
                        raise ApiError(err.status, err.message, err.type)
                    overloaded = Rejected("engine_overloaded", err.message, step.retry_after_s or 0.0)
                    raise self.rejected(overloaded, plan.served.name)
                skipped.append(f"{target.model}: {reason}")
                break
        down = Rejected(
            "pool_down",
            "no model along the degradation chain could serve this request: " + "; ".join(skipped),
            g.resilience.probe_interval_s,
            status=503,
        )
        raise self.rejected(down, plan.served.name)

    def _route(self, plan: Plan, chain: list[Any], i: int, skipped: list[str], first: Chunk) -> str:
        """The `x-tandem-route` header: tier, model, how it was chosen, degradation, the replicas."""
        target, res = chain[i], plan.resolution
        degraded = i > 0
        labels = (target.tier or "", target.model, res.how, str(degraded).lower())
        self.metrics.tier_requests.labels(*labels).inc()
        route = f"tier={target.tier or '-'}; model={target.model}; how={res.how}"
        if degraded:
            route += f"; degraded_from={chain[0].tier or chain[0].model}; degraded_reason="
            route += skipped[0].split(": ", 1)[1].replace(";", ",") if skipped else "unknown"
        if first.route is not None:
            route += "; " + first.route.header()
        return route


async def first_chunk(
    stream: AsyncIterator[Chunk], max_wait_s: float, down: asyncio.Event
) -> tuple[Chunk | None, str]:
    """The stream's first chunk, or None and why not: "timeout", "pool_down" (the target went terminal
    while waiting, e.g. its last replica died), or "empty" (the stream ended without a chunk)."""
    first = asyncio.ensure_future(anext(stream))
    went_down = asyncio.ensure_future(down.wait())
    try:
        done, _ = await asyncio.wait(
            {first, went_down}, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        went_down.cancel()
        if not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
    if first in done:
        try:
            return first.result(), "ok"
        except StopAsyncIteration:
            return Chunk(error=EngineError("the engine ended the stream without output", 502, "empty")), "ok"
        except Exception as e:  # a backend that raises instead of yielding an error chunk: a 5xx
            logger.warning("backend stream raised %s: %s", type(e).__name__, e)
            return Chunk(error=EngineError(f"backend error: {type(e).__name__}", 502, "backend_error")), "ok"
    return None, "pool_down" if went_down in done else "timeout"


async def block_keys(served: ServedModel, ids: list[int], salt: str | None) -> list[int]:
    """The prompt's chained block hashes for the router (long prompts hashed in a thread)."""
    if served.hasher is None:
        return []
    if len(ids) > _INLINE_HASH_TOKENS:
        return await asyncio.to_thread(served.hasher.keys, ids, salt)
    return served.hasher.keys(ids, salt)
