"""A deterministic fake engine for unit tests of pure logic (ingress parsing, streaming, abort).

Never used to demonstrate a capability: integration tests and `make run` use real vLLM.
Output token i of a request is `(last_prompt_token + i + 1) % vocab_size`, rendered as " t<id>".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serving.replicas.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    GenerateRequest,
    KVHandle,
    ModelInfo,
)


class FakeEngine:
    """`Engine` that counts instead of computing.

    Args:
        model_name: served name.
        max_model_len: context length it reports.
        token_delay_s: sleep between tokens (lets tests disconnect mid-stream).
        vocab_size: ids wrap at this size.
        block_size: prefix-cache block size; a prompt sharing full blocks with an earlier one
            reports them as cached, like vLLM's prefix cache.
        prefill_delay_s: time `prefill` takes (lets tests time out a prefill).
        kv_delay_s: time `decode` waits for the "KV" before its first token (a slow transfer).
        prefill_error: HTTP status `prefill` fails with (None: it succeeds).
    """

    def __init__(
        self,
        model_name: str,
        max_model_len: int = 4096,
        token_delay_s: float = 0.0,
        vocab_size: int = 4096,
        block_size: int = 128,
        prefill_delay_s: float = 0.0,
        kv_delay_s: float = 0.0,
        prefill_error: int | None = None,
    ) -> None:
        self._name = model_name
        self._max_model_len = max_model_len
        self._delay = token_delay_s
        self._vocab = vocab_size
        self._block = block_size
        self._running: dict[str, asyncio.Event] = {}
        self._cached_blocks: set[tuple[int, ...]] = set()
        self._prefill_delay = prefill_delay_s
        self._kv_delay = kv_delay_s
        self._prefill_error = prefill_error
        self.prefilled: list[str] = []
        self.decoded: list[str] = []
        self.aborted: list[str] = []
        self.started = False

    async def start(self) -> None:
        self.started = True

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self._name, max_model_len=self._max_model_len, path="fake", block_size=self._block
        )

    async def prefill(self, request: GenerateRequest) -> KVHandle:
        self.prefilled.append(request.request_id)
        if self._prefill_delay:
            await asyncio.sleep(self._prefill_delay)
        if self._prefill_error is not None:
            return KVHandle(error=EngineError("fake prefill failure", self._prefill_error))
        ids = request.prompt_token_ids
        return KVHandle(params={"fake_request": request.request_id}, prompt_tokens=len(ids))

    async def decode(self, request: GenerateRequest, kv: KVHandle) -> AsyncIterator[Chunk]:
        self.decoded.append(request.request_id)
        if self._kv_delay:
            await asyncio.sleep(self._kv_delay)
        async for chunk in self.generate(request):
            yield chunk

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
        self.aborted.append(request_id)
        ev = self._running.get(request_id)
        if ev is not None:
            ev.set()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running))

    async def reset_prefix_cache(self) -> None:
        self._cached_blocks.clear()

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        self._running.clear()
