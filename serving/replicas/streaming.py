"""Adaptive coalescing of streamed chunks.

Each hop of a stream (engine replica → ingress → HTTP) pays a fixed cost per message. When a hop
falls behind, sending each token as its own message makes it fall further behind. `coalesce`
reads the source in a background task and, whenever the consumer asks for the next item, merges
everything that is already waiting into one chunk: one token per message when the hop keeps up,
several when it does not.

With `flush_s > 0` (the engine replica, `PoolSpec.stream_flush_ms`) it also holds tokens for up to
`flush_s` after the previous message, so that a stream sends at most one message per `flush_s`
however fast its engine steps. NOTE(why): the hop after the replica (Ray's transport to the
ingress, then the ingress's SSE framing) costs about the same per message whatever the message
carries, and a replica's consumer never lags (Ray queues what it is given), so adaptive merging
alone never merges there: measured on tiny-intent at c=16, the ingress spent ~450 µs of CPU per
token. The first chunk, a finishing chunk and an error are never held: TTFT and E2E do not move;
only the spacing of the tokens in between does (ITL up to `flush_s`; TPOT, a mean, does not).

The reader keeps at most `max_buffered` items waiting (`MAX_BUFFERED_CHUNKS`): past it, it stops
reading the source until the consumer takes some, so a consumer that stops reading (a client that no
longer reads its stream) stops the engine's output there instead of buffering all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from serving.replicas.engines.base import Chunk

_END = object()

#: Items `coalesce` keeps waiting for a consumer before it stops reading its source (backpressure).
#: Ample for a consumer that merely lags (it takes them all, merged, at its next read): 256 chunks are
#: ~256 tokens, seconds of output even at thousands of tokens per second.
MAX_BUFFERED_CHUNKS = 256


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


def _urgent(item: object) -> bool:
    """Sent at once, never held for `flush_s`: the end, an exception, an error or a finishing chunk."""
    return not isinstance(item, Chunk) or item.error is not None or item.finish_reason is not None


async def coalesce(
    source: AsyncIterator[Chunk], flush_s: float = 0.0, max_buffered: int = MAX_BUFFERED_CHUNKS
) -> AsyncIterator[Chunk]:
    """Yield the chunks of `source`, merging those that arrive while the consumer is busy.

    With `flush_s > 0`, after each message the next one waits until `flush_s` has passed (or an
    urgent item arrives: see `_urgent`), and carries everything received meanwhile.

    At most `max_buffered` items wait for the consumer; then `source` is not read until it takes
    some. The end of `source` or its exception waits its turn too (nothing is lost or reordered).

    Closing the returned iterator cancels the reader and closes `source` (which aborts the
    engine request). Error chunks are never merged: what came before is flushed first.
    """
    if max_buffered < 1:
        raise ValueError(f"max_buffered must be at least 1, got {max_buffered}")
    queue: asyncio.Queue = asyncio.Queue(maxsize=max_buffered)
    urgent = asyncio.Event()

    async def put(item: object) -> None:
        await queue.put(item)  # waits while the consumer does not read (backpressure)
        if flush_s > 0 and _urgent(item):
            urgent.set()

    async def pump() -> None:
        try:
            async for chunk in source:
                await put(chunk)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # NOTE(why): cancelled by `_stop`: the consumer has left and nobody will read this, so
                # it must not wait for room (the `await task` in `_stop` would never end).
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(e)
                raise
            await put(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            await put(_END)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    sent_at: float | None = None  # the first message is never held
    try:
        while True:
            items = [await queue.get()]
            if sent_at is not None and not urgent.is_set() and not _urgent(items[0]):
                wait = sent_at + flush_s - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(urgent.wait(), wait)
            while not queue.empty():
                items.append(queue.get_nowait())
            if flush_s > 0:
                urgent.clear()
                sent_at = loop.time()
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
                    try:
                        raise item
                    finally:
                        # NOTE(why): this frame is in the exception's traceback: holding it here too
                        # would be a cycle, keeping the source's frames alive until the cycle collector runs.
                        item = items = None  # noqa: F841
                yield item  # an error chunk
            if pending:
                yield merge(pending)
    finally:
        # NOTE(why): shielded, in a task of its own. A client that leaves cancels the HTTP request under
        # an anyio cancel scope (Starlette), which cancels every later await of this `finally` again:
        # awaited here, the reader's cancellation and `source.aclose()` were cut short and an external
        # server's request kept generating (tests/unit/test_streaming.py, the live vllm serve test).
        await asyncio.shield(_stop(task, source, queue))


async def _stop(task: asyncio.Task, source: AsyncIterator[Chunk], queue: asyncio.Queue) -> None:
    """Cancel the reader, close `source` (which aborts the engine request) and drop what nobody read."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
    # NOTE(why): the reader's cancellation is left in the queue, and its traceback holds the reader's
    # frame, which holds the queue: a cycle that kept the source's frames (a Serve stream and its Ray
    # object refs) alive until the cycle collector ran, which in a long-lived ingress can be minutes
    # (the soak in tests/faults/test_soak.py saw ~1 pair of refs per 20 requests left after the load).
    while not queue.empty():
        queue.get_nowait()
