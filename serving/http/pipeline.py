"""One request pipeline for every endpoint: plan → admit → open.

1. `RequestPipeline.plan(PlanInput) -> Plan`: the tier and model (router.tiers), the prompt template
   of a chat-shaped request (router.templates: put first, so it is a shared cached prefix), the prompt
   ids (tokenized once per model, and only once the prompt's size fits: `_check_size`), the context
   and max-tokens checks (400 naming the endpoint's
   field) with the opt-in overflow handling (router.truncation drops the oldest turns;
   `x-tandem-max-tokens: clamp` lowers max_tokens to what fits), the output tokens reserved for
   admission, the tenant's cache salt and the prompt's block keys.
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
from router.resilience import ErrorClass, Fail, Retry, classify, strike_key
from router.templates import Choice, common_prefix, compose, merged_stop, sampling_defaults
from router.tiers import RequestShape, Resolution, TierError
from router.truncation import NothingToDrop, fewest_to_drop, plan_units
from serving.backends import Backend
from serving.config import HttpSpec
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.migration import MigratingStream
from serving.http.protocol import (
    MAX_TOKENS_HEADER,
    PRIORITY_HEADER,
    TRUNCATION_HEADER,
    ApiError,
    ChatMessage,
    usage,
)
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
    #: Digest of the tokenizer's vocabulary (None: unknown): a stream may migrate between two models
    #: only when theirs are equal (serving.http.migration).
    vocab: str | None = None

    @classmethod
    def from_spec(
        cls, spec: Any, name: str, tokenizer: Tokenizer, backend: Backend, info: Any
    ) -> ServedModel:
        """Model `name` of the deployment spec, served through `backend`; `info` is the engine's
        `ModelInfo` (context length, KV block size)."""
        from serving.thinking import reasoning_tags

        model = spec.model(name)
        return cls(
            name=name,
            max_model_len=info.max_model_len,
            tokenizer=tokenizer,
            backend=backend,
            hasher=BlockHasher(info.block_size),
            salt_tenants=model.router.tenant_salt,
            tags=reasoning_tags(spec, name, tokenizer),
            default_reasoning_budget=model.reasoning.default_max_tokens if model.reasoning else None,
            vocab=tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None,
        )

    def open_stream(
        self,
        request: GenerateRequest,
        budget: int | None,
        chat: bool = True,
        stream: Callable[[GenerateRequest], AsyncIterator[Chunk]] | None = None,
    ) -> AsyncIterator[Chunk]:
        """The backend stream (or `stream`'s: a migrating one, serving.http.migration); for chat with a
        reasoning model, through a ThinkingRun: the budget, the reasoning token count, and `text` (the
        answer) split from `reasoning_text`. A text completion is raw text: nothing is split or hidden."""
        open_leg = stream or self.backend.stream
        if self.tags is None or not chat:
            return open_leg(request)
        budget = budget or self.default_reasoning_budget
        # The answer and the reasoning are decoded here from the ids, split at the tags.
        text = getattr(self.tokenizer, "decode_stream", None)
        run = ThinkingRun(open_leg, request, request.sampling.max_tokens, budget, self.tags, text=text)
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
        encode: the prompt's token ids for a model (each model is tokenized at most once); None for a
            chat-shaped request, whose `messages` the pipeline renders with each model's chat template.
        requested_max_tokens: the client's output limit (None: the rest of the context).
        prompt_param / max_tokens_param: the fields a 400 names when the prompt or the limit does not fit.
        messages: a chat-shaped request's conversation (chat completions, /v1/responses): it gets the
            prompt template of its tier / task type / tenant, and may be truncated.
        check: validates the request against a model before it is tokenized (e.g. stop_token_ids).
        truncate: drop the oldest turns when the conversation does not fit (router.truncation).
        clamp: lower max_tokens to what fits rather than answer 400 (x-tandem-max-tokens: clamp).
        sampling_set: the sampling fields the client set (a template's defaults fill the others).
        first_usable: plan on the chain's first usable target (a session, which is not opened here)
            rather than on the resolved model (whose chain `open` walks).
        prompt: a text completion's prompt (its string or token ids), measured before `encode` runs
            (a chat-shaped request is measured from `messages`).
        allowed_models: the models and tiers the caller's key may call (None: every one; a 403
            `model_not_allowed` otherwise).
        route_detail: whether x-tandem-route names the replicas and the router's scores (a key with
            the `debug` scope, or auth off); otherwise it says only how the request was served.
    """

    model: str
    tenant: str
    encode: Callable[[ServedModel], Awaitable[list[int]]] | None
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
    messages: list[ChatMessage] | None = None
    check: Callable[[ServedModel], None] | None = None
    truncate: bool = False
    clamp: bool = False
    sampling_set: frozenset[str] = frozenset()
    prompt: str | list[int] | None = None
    allowed_models: frozenset[str] | None = None
    route_detail: bool = True


def _prompt_size(inp: PlanInput) -> tuple[int, bool]:
    """The client's prompt as (its length, whether in token ids): a token-id prompt's ids, else the
    characters of its text (every message's, the instructions of a response among them)."""
    if inp.messages is not None:
        return sum(len(m.text()) for m in inp.messages), False
    if isinstance(inp.prompt, list):
        return len(inp.prompt), True
    return len(inp.prompt or ""), False


#: How a conversation too long for the context may still be served (the 400's hint).
_TRUNCATION_HINT = (
    ', or let the oldest turns be dropped (truncation: "auto" on '
    f"/v1/responses, header {TRUNCATION_HEADER}: auto on chat completions)"
)


def _too_long(inp: PlanInput, served: ServedModel, what: str, hint: str = "") -> ApiError:
    """The 400 of a prompt that does not fit `served`'s context (`what`: its size, told the client)."""
    return ApiError(
        400,
        f"{inp.prompt_param}: the prompt is {what}; model `{served.name}` has a context of "
        f"{served.max_model_len} tokens. Shorten the prompt{hint}.",
        "invalid_request_error",
        inp.prompt_param,
        code="context_length_exceeded",
    )


def _chat_encoder(
    messages: list[ChatMessage], check: Callable[[ServedModel], None] | None
) -> Callable[[ServedModel], Awaitable[list[int]]]:
    async def encode(served: ServedModel) -> list[int]:
        if check is not None:
            check(served)
        return await asyncio.to_thread(served.tokenizer.encode_chat, messages)

    return encode


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
    #: The prompt template chosen for the request (router.templates) and its tokens at the prompt's start.
    template: Choice = field(default_factory=lambda: Choice(None))
    template_tokens: int = 0
    #: Truncation: messages and prompt tokens dropped; max_tokens before it was clamped (None: not).
    dropped_items: int = 0
    dropped_tokens: int = 0
    clamped_from: int | None = None
    #: The output limit asked for: the client's, else the template's default (None: neither).
    requested: int | None = None

    @property
    def template_ref(self) -> str | None:
        """`name@version` of the template put in (None: none was)."""
        t = self.template
        return t.template.ref if t.template is not None and t.applied else None

    def truncation_header(self) -> str | None:
        """The `x-tandem-truncated` response header: what overflow handling did (None: nothing)."""
        parts = []
        if self.dropped_items:
            parts.append(f"dropped_items={self.dropped_items}; dropped_tokens={self.dropped_tokens}")
        if self.clamped_from is not None:
            parts.append(f"max_tokens={self.clamped_from}->{self.max_tokens}")
        return "; ".join(parts) or None

    def sampling(self, opts: SamplingOptions) -> SamplingOptions:
        """`opts` with the template's stop sequences added and its defaults for fields not set."""
        t = self.template.template if self.template.applied else None
        if t is None:
            return opts
        opts.stop = merged_stop(t, opts.stop)
        for k, v in sampling_defaults(t, self.input.sampling_set).items():
            if k == "top_k":
                opts.top_k = None if v in (-1, 0) else v
            elif k != "max_tokens":  # planned: Plan.max_tokens
                setattr(opts, k, v)
        return opts

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
    #: The stream's migrations after its first token (serving.http.migration).
    migration: MigratingStream | None = None


class RequestPipeline:
    """plan → admit → open for one ingress replica's models (see the module docstring)."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        gateway: Gateway,
        metrics: IngressMetrics,
        http: HttpSpec | None = None,
    ) -> None:
        self.models = models
        self.gateway = gateway
        self.metrics = metrics
        self.retry = gateway.resilience.retry_policy()
        #: The edge's limits (the spec's `http`): max_prompt_chars_per_token here.
        self.http = http or HttpSpec()

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
        """Tier, model, template, prompt ids, limits, salt and block keys (ApiError 4xx naming the field)."""
        g = self.gateway
        encode = inp.encode
        if encode is None:
            assert inp.messages is not None, "a request without `encode` is chat-shaped"
            encode = _chat_encoder(inp.messages, inp.check)
        prompts = Prompts(encode)
        size = _prompt_size(inp)
        try:
            shape = None
            if g.tiers.needs_shape(inp.model, inp.task):
                probe = self.model(g.tiers.tier(g.tiers.default_tier()).model)
                # The probe only measures the prompt for the tier rules, which may send a long one to a
                # model with a larger context: bounded here by the largest context served.
                self._check_size(inp, size, max(self.models.values(), key=lambda m: m.max_model_len))
                n = len(await prompts.for_model(probe))
                shape = RequestShape(n, inp.requested_max_tokens, inp.reasoning_effort, inp.tools)
            res = g.tiers.resolve(inp.model, inp.task, shape)
            g.tiers.check_allowed(res, inp.allowed_models)
        except TierError as e:
            type_ = {404: "not_found_error", 403: "permission_error"}.get(e.status, "invalid_request_error")
            code = "model_not_allowed" if e.status == 403 else None
            raise ApiError(e.status, str(e), type_, e.param, code=code) from None
        served = self.model(res.model)
        if inp.first_usable:
            served = self._first_usable(res)
        self._check_size(inp, size, served)
        if inp.reasoning_budget is not None and served.tags is None:
            raise ApiError(
                400,
                f"{inp.budget_param}: model `{served.name}` is not a reasoning model; omit it",
                "invalid_request_error",
                inp.budget_param,
            )
        messages = inp.messages
        choice = Choice(None)
        if messages is not None:
            template = g.templates.library.select(inp.tenant, res.tier, res.task)
            messages, choice = compose(template, messages, _role, _text, _message)
            if choice.applied:
                prompts = Prompts(_chat_encoder(messages, inp.check))
            if choice.template is not None:
                applied = str(choice.applied).lower()
                self.metrics.templates.labels(served.name, choice.template.ref, applied).inc()
        requested, defaulted = inp.requested_max_tokens, False
        if requested is None and choice.applied:
            requested = dict(choice.template.sampling).get("max_tokens")  # type: ignore[union-attr]
            defaulted = requested is not None
        ids = await prompts.for_model(served)
        dropped = (0, 0)
        if messages is not None and inp.truncate:
            need = self._output_need(inp, requested, defaulted)
            if served.max_model_len - len(ids) < need:
                messages, ids, dropped = await self._truncate(served, inp, messages, ids, need)
                prompts = Prompts(_chat_encoder(messages, inp.check), {served.name: ids})
                self.metrics.truncations.labels(served.name, "items").inc()
                self.metrics.truncated_tokens.labels(served.name).inc(dropped[1])
        max_tokens, clamped_from = self._max_tokens(served, inp, len(ids), requested, defaulted)
        if clamped_from is not None:
            self.metrics.truncations.labels(served.name, "max_tokens").inc()
        reserved = requested or min(max_tokens, g.default_reserved_tokens)
        reserved = min(reserved, max_tokens)
        salt = tenant_salt(inp.tenant) if served.salt_tenants else None
        keys = await block_keys(served, ids, salt)
        template_tokens = await self._template_tokens(served, choice, ids) if choice.applied else 0
        return Plan(
            inp, res, served, ids, max_tokens, reserved, salt, keys, prompts,
            template=choice, template_tokens=template_tokens,
            dropped_items=dropped[0], dropped_tokens=dropped[1], clamped_from=clamped_from,
            requested=requested,
        )  # fmt: skip

    def _output_need(self, inp: PlanInput, requested: int | None, defaulted: bool) -> int:
        """Output tokens truncation makes room for: the max_tokens asked, or (none asked, or clamping
        allowed) `truncation.min_output_tokens`."""
        least = self.gateway.truncation.min_output_tokens
        if requested is None:
            return least
        if inp.clamp or defaulted:
            return min(requested, least)
        return requested

    async def _truncate(
        self, served: ServedModel, inp: PlanInput, messages: list[ChatMessage], ids: list[int], need: int
    ) -> tuple[list[ChatMessage], list[int], tuple[int, int]]:
        """The conversation with its fewest oldest turns dropped so that `need` output tokens fit
        (router.truncation), its ids, and (messages dropped, prompt tokens dropped). 400 if even the
        instructions and the last turn alone do not leave room."""
        units = plan_units([m.role for m in messages])
        ctx = served.max_model_len
        encoded: dict[int, list[int]] = {0: ids}

        def candidate(k: int) -> list[int]:
            if k not in encoded:
                encoded[k] = served.tokenizer.encode_chat([messages[i] for i in units.without(k)])
            return encoded[k]

        def search() -> int:
            return fewest_to_drop(len(units.turns), lambda k: ctx - len(candidate(k)) >= need)

        try:
            k = await asyncio.to_thread(search)
        except NothingToDrop:
            n = len(units.turns)
            kept = len(encoded.get(n) or await asyncio.to_thread(candidate, n))
            raise ApiError(
                400,
                f"{inp.prompt_param}: the conversation is {len(ids)} tokens and model `{served.name}` has a "
                f"context of {ctx} tokens. Truncation dropped all {n} earlier turns "
                f"({units.dropped(n)} messages), but the instructions and the last turn alone are {kept} "
                f"tokens, which leaves {max(0, ctx - kept)} for output where {need} are needed. Shorten "
                f"the last turn or the instructions, or lower {inp.max_tokens_param}.",
                "invalid_request_error",
                inp.prompt_param,
            ) from None
        new = candidate(k)
        return [messages[i] for i in units.without(k)], new, (units.dropped(k), len(ids) - len(new))

    async def _template_tokens(self, served: ServedModel, choice: Choice, ids: list[int]) -> int:
        """Leading prompt tokens that are the template's (its shared, cached prefix)."""
        t = choice.template
        assert t is not None
        key = (served.name, t)  # the content, not the ref: a reload may change a version in place
        cache = self.gateway.template_prefix
        if len(cache) > 1024:
            cache.clear()
        alone = cache.get(key)
        if alone is None:
            head, _ = compose(t, [], _role, _text, _message)
            alone = await asyncio.to_thread(served.tokenizer.encode_chat, head) if head else []
            cache[key] = alone
        return common_prefix(alone, ids)

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

    def _check_size(self, inp: PlanInput, size: tuple[int, bool], served: ServedModel) -> None:
        """400 `context_length_exceeded` when the client's prompt cannot fit `served`, told before it is
        tokenized: token ids beyond its context, or more characters than its context times
        http.max_prompt_chars_per_token.

        NOTE(why): tokenizing is what a huge prompt costs the ingress (seconds of CPU and GBs, in the
        thread pool that every request's tokenization and store call shares), and the 400 that follows
        is charged nothing: a request rejected here never reaches admission either."""
        n, ids = size
        ctx = served.max_model_len
        if ids:
            if n >= ctx:  # as `_max_tokens` would, after the ids were checked one by one
                raise _too_long(inp, served, f"{n} tokens")
            return
        per_token = self.http.max_prompt_chars_per_token
        truncating = inp.messages is not None and inp.truncate
        contexts = self.http.max_truncated_contexts if truncating else 1
        limit = ctx * per_token * contexts
        if n > limit:
            if truncating:
                hint = (
                    ". Truncation tokenizes the turns it drops, so a conversation may be at most "
                    f"{contexts} contexts long (http.max_truncated_contexts): send fewer turns"
                )
            elif inp.messages is not None and n <= limit * self.http.max_truncated_contexts:
                hint = _TRUNCATION_HINT
            else:
                hint = ""
            raise _too_long(
                inp,
                served,
                f"{n} characters, more than {limit} ({contexts} x the context at most "
                f"{per_token} characters a token, http.max_prompt_chars_per_token)",
                hint,
            )

    @staticmethod
    def _max_tokens(
        served: ServedModel, inp: PlanInput, prompt_len: int, asked: int | None, defaulted: bool = False
    ) -> tuple[int, int | None]:
        """Output tokens on `served` and, when they were clamped to fit, what was asked."""
        room = served.max_model_len - prompt_len
        chat = inp.messages is not None
        if room <= 0:
            hint = _TRUNCATION_HINT if chat and not inp.truncate else ""
            raise _too_long(inp, served, f"{prompt_len} tokens", hint)
        if asked is None:
            return room, None
        if asked > room:
            if defaulted:  # the template's default is an upper bound, not the client's ask
                return room, None
            if inp.clamp:
                return room, asked
            field_ = inp.max_tokens_param
            raise ApiError(
                400,
                f"{field_} is {asked} but the prompt is {prompt_len} tokens and model "
                f"`{served.name}` has a context of {served.max_model_len} tokens: at most "
                f"{room} tokens can be generated. Lower {field_} or shorten the prompt (or send "
                f"{MAX_TOKENS_HEADER}: clamp to get at most what fits).",
                "invalid_request_error",
                field_,
            )
        return asked, None

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
        requested = plan.requested
        # The least output a fallback target must fit: all the client asked for, or one token when it
        # asked for none (a template's default is an upper bound) or lets it be clamped.
        least = 1 if inp.clamp or inp.requested_max_tokens is None else requested
        skipped: list[str] = []
        # Targets given up on an engine fault, and whether any failed otherwise (see the end).
        faulted: list[str] = []
        failed_otherwise = False
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
                if room < least:
                    skipped.append(
                        f"{target.model}: context window {served.max_model_len} cannot hold "
                        f"{len(ids)} prompt + {least} output tokens"
                    )
                    continue
                out_tokens = min(requested, room) if requested else room
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
                    plan.sampling(sampling(out_tokens)),
                    disagg=inp.disagg,
                    cache_salt=salt,
                    block_keys=keys,
                    tenant=inp.tenant,
                    session_id=inp.session_id,
                )
                migrating = MigratingStream(self, plan, ticket, chain, i, served, timeout)
                stream = served.open_stream(req, inp.reasoning_budget, chat, migrating.stream)
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
                    route = self._route(plan, chain, i, skipped, first)
                    return Opened(served, first, stream, route, migrating)
                await stream.aclose()
                ticket.leave_pool()
                cls = classify(err.status if err else None, timed_out, err.type if err else None)
                self.metrics.attempt_failures.labels(target.model, cls.value).inc()
                reason = f"timeout after {timeout:g}s" if timed_out else f"{err.status} {err.type}"
                if cls.strikes:  # one strike per request (per tenant for an engine fault)
                    # A timeout while the pool is saturated is overload, not death (NOTE(strikes)).
                    busy = timed_out and g.admission.pool(target.model).busy
                    health.on_failure(reason, now, key=strike_key(cls, rid, inp.tenant), overloaded=busy)
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
                if cls is ErrorClass.ENGINE_FAULT:
                    faulted.append(target.model)
                else:
                    failed_otherwise = True
                break
        if faulted and not failed_otherwise:
            # Every target tried failed on this very input: a 500 for this request, not a 503 that
            # tells the client (and the autoscaler) the pool is down. No engine text is echoed.
            raise ApiError(
                500,
                f"the engine failed on this request ({', '.join(faulted)}: 500 engine_error); it was not "
                "retried there, as the same input fails the same way. Check the request's parameters; "
                f"if it persists, report request id {rid}.",
                "server_error",
                code="engine_error",
            )
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
        route = f"tier={target.tier or '-'}; model={target.model}; how={res.how}" + _shaping(plan)
        if degraded:
            route += f"; degraded_from={chain[0].tier or chain[0].model}; degraded_reason="
            route += skipped[0].split(": ", 1)[1].replace(";", ",") if skipped else "unknown"
        if first.route is not None:
            route += "; " + first.route.header(plan.input.route_detail)
        return route

    async def prompts_for(self, plan: Plan, served: ServedModel) -> list[int]:
        """The request's prompt ids on `served` (tokenized once per model)."""
        return plan.prompt_ids if served is plan.served else await plan.prompts.for_model(served)

    async def block_keys(self, served: ServedModel, ids: list[int], salt: str | None) -> list[int]:
        """The routing keys of `ids` on `served` (see `block_keys`)."""
        return await block_keys(served, ids, salt)

    def session_route(self, plan: Plan) -> str:
        """The `x-tandem-route` header of a /v1/responses request (the session worker serves it)."""
        res = plan.resolution
        route = f"tier={res.tier or '-'}; model={plan.served.name}; how={res.how}"
        return route + _shaping(plan) + "; mode=session"


def _shaping(plan: Plan) -> str:
    """The task type and template parts of `x-tandem-route`."""
    out = f"; task={plan.resolution.task}" if plan.resolution.task else ""
    if plan.template_ref:
        out += f"; template={plan.template_ref}; template_tokens={plan.template_tokens}"
    elif plan.template.template is not None:
        out += f"; template_skipped={plan.template.template.ref}:{plan.template.skipped}"
    return out


def _role(m: ChatMessage) -> str:
    return m.role


def _text(m: ChatMessage) -> str:
    return m.text()


def _message(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


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
