"""The engine replica: one `Engine` inside one Ray Serve replica.

The class is plain Python; `serving.app` wraps it with `serve.deployment(...)` and the pool's
options, so tests can also drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from serving.config import EngineKind
from serving.engines import make_engine
from serving.engines.base import Chunk, EngineStats, GenerateRequest, ModelInfo
from serving.streaming import coalesce

logger = logging.getLogger(__name__)


class EngineServer:
    """Serves one model from one engine; streamed calls come from the ingress's handle.

    Args:
        model_name: served model name.
        model_path: weights to load.
        engine: engine kind.
        engine_args: passed through to the engine.
        pool: pool name (for logs and status).
    """

    async def __init__(
        self,
        model_name: str,
        model_path: str,
        engine: EngineKind,
        engine_args: dict[str, Any],
        pool: str,
    ) -> None:
        self._pool = pool
        self._engine = make_engine(engine, model_name, model_path, engine_args)
        await self._engine.start()
        logger.info("replica of %s/%s ready", model_name, pool)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream chunks for `request`; a cancelled stream aborts the engine request."""
        gen = coalesce(self._engine.generate(request))
        try:
            async for chunk in gen:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # NOTE: the client went away (Ray Serve cancels the streaming call). vLLM aborts on
            # cancellation itself, but an explicit abort also covers engines that do not, and
            # abort is idempotent.
            await asyncio.shield(self._engine.abort(request.request_id))
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

    async def check_health(self) -> None:
        """Ray Serve's health probe: raises (replica restarted) when the engine is dead."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        await self._engine.shutdown()
