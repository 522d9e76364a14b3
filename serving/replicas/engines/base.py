"""The Engine protocol and the plain data types that cross it.

Requests reach an engine as token ids (the ingress tokenizes once). An engine streams `Chunk`s;
errors inside a stream are values (a chunk with `error` set), never exceptions, so a Ray Serve
streaming call always ends cleanly and the ingress decides how to report it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from router.contracts import DisaggMode, RouteFeedback, ServeMode


@dataclass(slots=True)
class SamplingOptions:
    """Sampling parameters, engine-neutral (mapped to vLLM SamplingParams / SGLang params)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(slots=True)
class GenerateRequest:
    """One generation: token ids in, a stream of chunks out.

    `disagg` is the client's prefill/decode choice (`x-tandem-disagg`: on | off | auto); only
    a decode deployment reads it.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    disagg: DisaggMode = DisaggMode.AUTO
    #: Per-tenant prefix-cache salt (vLLM and SGLang `cache_salt`): tenants never share cache entries.
    cache_salt: str | None = None
    #: Routing inputs computed once at the ingress: 64-bit keys of the prompt's full blocks
    #: (router.hashing, same scheme and salt as the engine), tenant and session.
    block_keys: list[int] = field(default_factory=list)
    tenant: str = ""
    session_id: str | None = None
    #: Set by the router when it picks a replica (router.serve_adapter): per candidate replica id.
    routing: dict[str, RouteFeedback] | None = None


@dataclass(slots=True)
class EngineError:
    """An error that ended a stream. `status` is the HTTP status the client should see."""

    message: str
    status: int = 500
    type: str = "engine_error"
    #: For a 429: when the client (or the ingress) may try again.
    retry_after_s: float | None = None


@dataclass(slots=True)
class KVHandle:
    """A prefilled prompt, ready for a decode engine to pull its KV (the KV itself never travels here).

    `params` is engine-specific: vLLM's `kv_transfer_params` (remote engine id, block ids, side
    channel host/port), or SGLang's bootstrap host / port / room.
    """

    params: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    error: EngineError | None = None


@dataclass(slots=True)
class Route:
    """How a request was served; replicas are Serve replica ids."""

    mode: ServeMode
    decode: str
    prefill: str = ""
    reason: str = ""
    #: The router's view of the decode replica: leading prompt blocks it held, and its score.
    matched_blocks: int | None = None
    score: float | None = None

    def header(self, detail: bool = True) -> str:
        """The `x-tandem-route` response header value; without `detail`, only the mode: the
        deployments, replica ids, scores and P/D reason are the operator's (a `debug` key's)."""
        parts = [f"mode={self.mode}"]
        if not detail:
            return parts[0]
        if self.prefill:
            parts.append(f"prefill={self.prefill}")
        parts.append(f"decode={self.decode}")
        if self.matched_blocks is not None:
            parts.append(f"matched_blocks={self.matched_blocks}")
        if self.score is not None:
            parts.append(f"score={self.score:.3f}")
        if self.reason:
            parts.append(f"reason={self.reason}")
        return "; ".join(parts)


@dataclass(slots=True)
class Chunk:
    """A streamed piece of output. Token counts are cumulative for the request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: EngineError | None = None
    route: Route | None = None
    #: Of completion_tokens, those inside the reasoning block (set by serving.thinking).
    reasoning_tokens: int = 0
    #: The reasoning text of this chunk, when serving.thinking splits it from `text` (the answer).
    reasoning_text: str = ""


@dataclass(slots=True)
class EngineStats:
    """A snapshot of an engine's load, plus cumulative prompt-token and KV-transfer counters."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    #: prompt tokens by source (vLLM's `prompt_tokens_by_source`): computed here, found in the
    #: local prefix cache, received from a remote engine.
    prompt_tokens_computed: int = 0
    prompt_tokens_local_cache: int = 0
    prompt_tokens_external: int = 0
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_s: float = 0.0
    kv_transfer_failures: int = 0
    kv_expired: int = 0


@dataclass(slots=True)
class ModelInfo:
    """What the ingress needs to know about the model an engine serves."""

    name: str
    max_model_len: int
    path: str
    block_size: int = 16
    num_kv_blocks: int = 0
    #: Whether the engine applies `GenerateRequest.cache_salt` to its prefix cache (vLLM always;
    #: SGLang when its `Engine.async_generate` takes a salt). With `router.tenant_salt` a replica
    #: refuses to start on an engine that does not (serving.replicas.deployments.EngineServer).
    cache_salt: bool = True


@runtime_checkable
class Engine(Protocol):
    """An inference engine living inside one replica."""

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream the output of `request`. Cancelling the iteration aborts the request."""

    async def prefill(self, request: GenerateRequest) -> KVHandle:
        """Run the prompt only, keep its KV for a decode engine to pull.

        Returns once a decode engine can start pulling (vLLM: after the prefill step; SGLang:
        once the bootstrap room is registered). Failures come back as `KVHandle.error`.
        """

    def decode(self, request: GenerateRequest, kv: KVHandle) -> AsyncIterator[Chunk]:
        """Stream `request`'s output, pulling the prompt's KV from the prefill engine named by `kv`."""

    async def abort(self, request_id: str) -> None:
        """Stop `request_id` and free its KV blocks (no-op if unknown or finished)."""

    def stats(self) -> EngineStats:
        """Current load; cheap, never blocks."""

    def model_info(self) -> ModelInfo:
        """Model facts (context length, ...) once started."""

    async def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block (blocks in use stay)."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    async def shutdown(self) -> None:
        """Release the engine's processes and memory."""
