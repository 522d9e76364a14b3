"""A deterministic fake engine for unit tests of pure logic (ingress parsing, streaming, abort).

Never used to demonstrate a capability: integration tests and `make run` use real vLLM.
Output token i of a request is `(last_prompt_token + i + 1) % vocab_size`, rendered as " t<id>".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serving.engines.base import Chunk, EngineError, EngineStats, GenerateRequest, ModelInfo


class FakeEngine:
    """`Engine` that counts instead of computing.

    Args:
        model_name: served name.
        max_model_len: context length it reports.
        token_delay_s: sleep between tokens (lets tests disconnect mid-stream).
        vocab_size: ids wrap at this size.
        block_size: prefix-cache block size; a prompt sharing full blocks with an earlier one
            reports them as cached, like vLLM's prefix cache.
    """

    def __init__(
        self,
        model_name: str,
        max_model_len: int = 4096,
        token_delay_s: float = 0.0,
        vocab_size: int = 4096,
        block_size: int = 128,
    ) -> None:
        self._name = model_name
        self._max_model_len = max_model_len
        self._delay = token_delay_s
        self._vocab = vocab_size
        self._block = block_size
        self._running: dict[str, asyncio.Event] = {}
        self._cached_blocks: set[tuple[int, ...]] = set()
        self.started = False

    async def start(self) -> None:
        self.started = True

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self._name, max_model_len=self._max_model_len, path="fake")

    def _cached_prefix(self, ids: list[int]) -> int:
        cached = 0
        for end in range(self._block, len(ids) + 1, self._block):
            key = tuple(ids[:end])
            if key in self._cached_blocks:
                cached = end
            self._cached_blocks.add(key)
        return cached

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        ids = request.prompt_token_ids
        opts = request.sampling
        if len(ids) + opts.max_tokens > self._max_model_len:
            yield Chunk(error=EngineError("prompt too long", 400, "invalid_request_error"))
            return
        aborted = asyncio.Event()
        self._running[request.request_id] = aborted
        cached = self._cached_prefix(ids)
        last = ids[-1] if ids else 0
        try:
            for i in range(opts.max_tokens):
                if aborted.is_set():
                    yield Chunk(
                        finish_reason="abort",
                        prompt_tokens=len(ids),
                        completion_tokens=i,
                        cached_tokens=cached,
                    )
                    return
                if self._delay:
                    await asyncio.sleep(self._delay)
                tok = (last + i + 1) % self._vocab
                done = i == opts.max_tokens - 1
                yield Chunk(
                    text=f" t{tok}",
                    token_ids=[tok],
                    finish_reason="length" if done else None,
                    prompt_tokens=len(ids),
                    completion_tokens=i + 1,
                    cached_tokens=cached,
                )
        finally:
            self._running.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        ev = self._running.get(request_id)
        if ev is not None:
            ev.set()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running))

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        self._running.clear()
