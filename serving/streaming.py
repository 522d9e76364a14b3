"""Adaptive coalescing of streamed chunks.

Each hop of a stream (engine replica → ingress → HTTP) pays a fixed cost per message. When a hop
falls behind, sending each token as its own message makes it fall further behind. `coalesce`
reads the source in a background task and, whenever the consumer asks for the next item, merges
everything that is already waiting into one chunk: one token per message when the hop keeps up,
several when it does not. Nothing is delayed to wait for more tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from serving.engines.base import Chunk

_END = object()


def merge(chunks: list[Chunk]) -> Chunk:
    """One chunk carrying the text and tokens of `chunks` (none of which is an error chunk)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return Chunk(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
        route=next((c.route for c in chunks if c.route is not None), None),
    )


async def coalesce(source: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """Yield the chunks of `source`, merging those that arrive while the consumer is busy.

    Closing the returned iterator cancels the reader and closes `source` (which aborts the
    engine request). Error chunks are never merged: what came before is flushed first.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in source:
                queue.put_nowait(chunk)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            pending: list[Chunk] = []
            for item in items:
                if isinstance(item, Chunk) and item.error is None:
                    pending.append(item)
                    continue
                if pending:
                    yield merge(pending)
                    pending = []
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # an error chunk
            if pending:
                yield merge(pending)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
