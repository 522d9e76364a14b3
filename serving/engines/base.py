"""The Engine protocol and the plain data types that cross it.

Requests reach an engine as token ids (the ingress tokenizes once). An engine streams `Chunk`s;
errors inside a stream are values (a chunk with `error` set), never exceptions, so a Ray Serve
streaming call always ends cleanly and the ingress decides how to report it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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
    """One generation: token ids in, a stream of chunks out."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions


@dataclass(slots=True)
class EngineError:
    """An error that ended a stream. `status` is the HTTP status the client should see."""

    message: str
    status: int = 500
    type: str = "engine_error"


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


@dataclass(slots=True)
class EngineStats:
    """A snapshot of an engine's load."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass(slots=True)
class ModelInfo:
    """What the ingress needs to know about the model an engine serves."""

    name: str
    max_model_len: int
    path: str


@runtime_checkable
class Engine(Protocol):
    """An inference engine living inside one replica."""

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream the output of `request`. Cancelling the iteration aborts the request."""

    async def abort(self, request_id: str) -> None:
        """Stop `request_id` and free its KV blocks (no-op if unknown or finished)."""

    def stats(self) -> EngineStats:
        """Current load; cheap, never blocks."""

    def model_info(self) -> ModelInfo:
        """Model facts (context length, ...) once started."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    async def shutdown(self) -> None:
        """Release the engine's processes and memory."""
