"""Where a model's requests go: the one module both the ingress and the session workers call.

- `HandleBackend`: a model's engine deployment through a Ray Serve streaming handle (production:
  `serving.http.ingress` and `serving.sessions.server`). A full queue is a 429 chunk, a dead replica
  a 503 chunk; closing the stream cancels the Serve call, which aborts the engine request.
- `EngineBackend`: an in-process `Engine` (unit tests and benchmarks).
- `ExternalPool` (serving.replicas.external): an `engine: openai` model's external server, called over
  HTTP from the ingress (and the session workers), routed over its endpoints; `external_pool` builds it.

Ray is imported only when a `HandleBackend` streams, so the HTTP API stays importable without it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest
from serving.replicas.streaming import coalesce

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from serving.config import ModelSpec
    from serving.replicas.external import ExternalPool

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where a model's requests go."""

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Engine chunks for `request`; closing the iterator aborts the request."""

    async def probe(self) -> None:
        """Raise unless the model's pool answers (a recovery probe of a terminal target)."""


class EngineBackend:
    """A backend that calls an in-process `Engine` directly (benchmarks, unit tests)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        done = False
        try:
            async for chunk in self._engine.generate(request):
                # A finished request needs no abort, even if the consumer stops reading here.
                done = done or chunk.finish_reason is not None
                yield chunk
            done = True
        finally:
            if not done:
                await self._engine.abort(request.request_id)

    async def probe(self) -> None:
        await self._engine.check_health()


class HandleBackend:
    """Streams a model's requests to its engine deployment through a Ray Serve handle."""

    def __init__(self, handle: DeploymentHandle, backpressure_retry_s: float = 1.0) -> None:
        self._plain = handle
        self._handle = handle.options(stream=True)
        self._backpressure_retry_s = backpressure_retry_s

    async def probe(self) -> None:
        """The pool answers when one of its replicas passes its own health check."""
        await self._plain.check_health.remote()

    def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # Merge chunks that pile up while the ingress is busy (see serving.replicas.streaming).
        return coalesce(self._stream(request))

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError

        gen = self._handle.generate.remote(request)
        done = False  # the Serve stream ended (exhausted, or failed)
        try:
            async for chunk in gen:
                yield chunk
            done = True
        except BackPressureError as e:
            # Every replica's queue is full (max_queued_requests): overload, not a failure.
            yield Chunk(
                error=EngineError(str(e), 429, "engine_overloaded", retry_after_s=self._backpressure_retry_s)
            )
            done = True
        except RayError as e:
            # A replica that died mid-stream is a clean 503, never a hang or a 500.
            logger.warning("engine call for %s failed: %s", request.request_id, e)
            yield Chunk(
                error=EngineError(
                    f"engine replica unavailable: {type(e).__name__}", 503, "engine_unavailable"
                )
            )
            done = True
        finally:
            if not done:
                # NOTE: the consumer stopped early (client disconnect, or it had the finishing chunk
                # and closed us before the stream's end arrived): cancelling the Serve call cancels
                # the replica's generator (a finished one has nothing left to abort) and frees the
                # call's object refs, which an unfinished Serve stream otherwise keeps in this
                # process (the soak in tests/faults/test_soak.py counted ~1 per 8 requests).
                gen.cancel()


def external_pool(
    model: ModelSpec,
    tokenizer: Any,
    metrics: Any | None = None,
    on_status: Any | None = None,
) -> ExternalPool:
    """The backend of an `engine: openai` model (not started: `await pool.start()` gives its ModelInfo).

    `tokenizer` (serving.tokenizer.PromptTokenizer) turns prompt ids back into text for servers that take
    no token ids, and streamed text into ids for servers that send none; `on_status(n)` hears the
    number of healthy endpoints whenever it changes (0: the pool is down)."""
    from serving.replicas.external import ExternalPool

    upstream = model.external
    assert upstream is not None, f"{model.name} is not an engine: openai model"
    return ExternalPool(
        model.name,
        upstream,
        model.router,
        decode_prompt=tokenizer.decode_prompt,
        encode_text=tokenizer.encode_text,
        metrics=metrics,
        on_status=on_status,
    )
