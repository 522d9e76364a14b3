"""Adaptive coalescing: nothing lost, nothing reordered, merged only when the consumer lags."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.replicas.engines.base import Chunk, EngineError
from serving.replicas.streaming import MAX_BUFFERED_CHUNKS, coalesce


async def produce(n: int, delay: float = 0.0, error_at: int | None = None):
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        if i == error_at:
            yield Chunk(error=EngineError("boom", 503))
            return
        yield Chunk(
            text=f"<{i}>",
            token_ids=[i],
            completion_tokens=i + 1,
            prompt_tokens=7,
            finish_reason="length" if i == n - 1 else None,
        )


async def test_fast_consumer_gets_one_chunk_per_token() -> None:
    out = [c async for c in coalesce(produce(5, delay=0.005))]
    assert [c.token_ids for c in out] == [[0], [1], [2], [3], [4]]


async def test_slow_consumer_gets_merged_chunks_with_everything() -> None:
    out = []
    async for c in coalesce(produce(50)):
        out.append(c)
        await asyncio.sleep(0.002)
    assert len(out) < 50
    assert [t for c in out for t in c.token_ids] == list(range(50))
    assert "".join(c.text for c in out) == "".join(f"<{i}>" for i in range(50))
    assert out[-1].completion_tokens == 50 and out[-1].finish_reason == "length"
    assert out[-1].prompt_tokens == 7


async def test_error_chunk_is_not_merged_and_text_before_it_is_kept() -> None:
    out = []
    async for c in coalesce(produce(10, error_at=6)):
        out.append(c)
        await asyncio.sleep(0.001)
    assert out[-1].error is not None and out[-1].text == ""
    assert [t for c in out[:-1] for t in c.token_ids] == list(range(6))


async def test_closing_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                i += 1
                yield Chunk(text="x", token_ids=[i])
        finally:
            closed.set()

    gen = coalesce(endless())
    async for _ in gen:
        break
    await gen.aclose()
    assert closed.is_set()


async def test_source_exception_propagates() -> None:
    async def bad():
        yield Chunk(text="a", token_ids=[1])
        raise RuntimeError("lost replica")

    got = []
    try:
        async for c in coalesce(bad()):
            got.append(c)
    except RuntimeError as e:
        assert "lost replica" in str(e)
    else:
        raise AssertionError("exception swallowed")
    assert got[0].text == "a"


async def test_flush_window_batches_fast_tokens_but_never_the_first_or_last() -> None:
    """With flush_s, a stream whose engine steps every 1 ms sends about one message per window;
    the first token goes at once, and the finishing chunk is not held for the window."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out: list[tuple[float, Chunk]] = []
    async for c in coalesce(produce(60, delay=0.001), flush_s=0.02):
        out.append((loop.time() - t0, c))
    assert [t for _, c in out for t in c.token_ids] == list(range(60))
    assert out[0][1].token_ids == [0] and out[0][0] < 0.015  # the first token is not held
    assert len(out) <= 12  # ~60-90 ms of tokens in 20 ms windows, not 60 messages
    assert out[-1][1].finish_reason == "length" and out[-1][1].completion_tokens == 60
    gaps = [b - a for (a, _), (b, _) in zip(out[1:], out[2:], strict=False)]
    assert all(g > 0.012 for g in gaps[:-1])  # the window is kept between held messages


async def test_flush_window_does_not_hold_the_finish() -> None:
    async def two():
        yield Chunk(text="a", token_ids=[1])
        await asyncio.sleep(0.002)
        yield Chunk(text="b", token_ids=[2])
        await asyncio.sleep(0.002)
        yield Chunk(text="c", token_ids=[3], finish_reason="stop")

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = [c async for c in coalesce(two(), flush_s=5.0)]
    assert loop.time() - t0 < 1.0  # not 5 s: the finishing chunk ends the wait
    assert [c.token_ids for c in out] == [[1], [2, 3]] and out[-1].finish_reason == "stop"


async def test_flush_window_does_not_hold_an_error() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = [c async for c in coalesce(produce(10, delay=0.001, error_at=5), flush_s=5.0)]
    assert loop.time() - t0 < 1.0
    assert out[-1].error is not None
    assert [t for c in out[:-1] for t in c.token_ids] == list(range(5))


async def test_a_consumer_cancelled_by_an_anyio_cancel_scope_still_closes_the_source() -> None:
    # Starlette cancels a request whose client left under an anyio cancel scope, which cancels every
    # await of the cleanup again. A source whose own cleanup awaits (an HTTP response to close) must
    # still get to finish it.
    import anyio

    cleaned: list[str] = []

    async def source() -> AsyncIterator[Chunk]:
        try:
            for i in range(10_000):
                await asyncio.sleep(0.001)
                yield Chunk(text=str(i), completion_tokens=i + 1)
        finally:
            await asyncio.sleep(0.01)  # e.g. httpx closing the upstream response
            cleaned.append("closed")

    stream = coalesce(source())

    async def consume() -> None:
        async for _ in stream:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    for _ in range(100):
        if cleaned:
            break
        await asyncio.sleep(0.01)
    assert cleaned == ["closed"]


@pytest.mark.parametrize("bound", [16, MAX_BUFFERED_CHUNKS])
async def test_a_consumer_that_stops_reading_stops_the_source_at_the_bound(bound: int) -> None:
    # A client that reads one chunk and then no more: the reader buffers at most `max_buffered` items
    # and then stops reading the engine, instead of buffering its whole output (10,000 chunks here).
    produced = 0
    closed = asyncio.Event()

    async def fast() -> AsyncIterator[Chunk]:
        nonlocal produced
        try:
            for i in range(10_000):
                produced += 1
                yield Chunk(text=f"<{i}>", token_ids=[i], completion_tokens=i + 1)
                await asyncio.sleep(0)  # a fast engine: a step, then the next token at once
        finally:
            closed.set()

    stream = coalesce(fast(), max_buffered=bound)
    first = await anext(stream)
    await asyncio.sleep(0.2)  # the consumer stops reading; the source could run to its end meanwhile
    buffered = produced - len(first.token_ids)
    # The bound, plus the chunk the reader holds waiting for room and the one the source is making.
    assert buffered <= bound + 2, (produced, len(first.token_ids))
    assert produced < 10_000
    # What waited is all there, in order, when the consumer reads again.
    again = await anext(stream)
    assert again.token_ids == list(range(len(first.token_ids), len(first.token_ids) + len(again.token_ids)))
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    await stream.aclose()
    assert closed.is_set()  # the source was closed (the engine request aborted)
    assert all(t.done() for t in tasks)  # the reader was cancelled, not left behind
    assert produced < 10_000


async def test_the_bound_keeps_the_end_and_an_error_behind_a_full_buffer() -> None:
    # A source that ends (or fails) while the buffer is full: its end and its error still arrive,
    # after everything before them.
    async def ends_with(error: bool) -> AsyncIterator[Chunk]:
        for i in range(50):
            yield Chunk(text=f"<{i}>", token_ids=[i])
        if error:
            yield Chunk(error=EngineError("boom", 503))
        else:
            yield Chunk(text="", token_ids=[50], finish_reason="stop")

    for error in (False, True):
        stream = coalesce(ends_with(error), max_buffered=4)
        out = []
        async for c in stream:
            out.append(c)
            await asyncio.sleep(0.001)  # a slow consumer: the reader keeps waiting for room
        ids = [t for c in out for t in c.token_ids]
        assert ids == list(range(50 if error else 51))
        assert (out[-1].error is not None) if error else out[-1].finish_reason == "stop"

    async def raises() -> AsyncIterator[Chunk]:
        for i in range(50):
            yield Chunk(text=f"<{i}>", token_ids=[i])
        raise RuntimeError("lost replica")

    got: list[int] = []
    try:
        async for c in coalesce(raises(), max_buffered=4):
            got.extend(c.token_ids)
            await asyncio.sleep(0.001)
    except RuntimeError as e:
        assert "lost replica" in str(e)
    else:
        raise AssertionError("exception swallowed")
    assert got == list(range(50))


# -- the ingress's Serve stream (serving.backends.HandleBackend) -------------------------------------


class _ServeStream:
    """A Serve DeploymentResponseGenerator's stand-in: `chunks`, then the end after `end_delay_s`."""

    def __init__(self, chunks: list[Chunk], end_delay_s: float) -> None:
        self.chunks, self.end_delay_s = list(chunks), end_delay_s
        self.cancelled = False

    def __aiter__(self) -> _ServeStream:
        return self

    async def __anext__(self) -> Chunk:
        if self.chunks:
            return self.chunks.pop(0)
        await asyncio.sleep(self.end_delay_s)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, end_delay_s: float) -> None:
        self.end_delay_s = end_delay_s
        self.streams: list[_ServeStream] = []
        self.generate = self

    def options(self, **_: object) -> _Handle:
        return self

    def remote(self, _request: object) -> _ServeStream:
        chunks = [Chunk(text="a", token_ids=[1]), Chunk(text="b", token_ids=[2], finish_reason="stop")]
        self.streams.append(_ServeStream(chunks, self.end_delay_s))
        return self.streams[-1]


async def _read_to_finish(backend) -> list[Chunk]:
    from serving.replicas.engines.base import GenerateRequest, SamplingOptions

    stream = backend.stream(GenerateRequest("r1", [1, 2], SamplingOptions(max_tokens=2)))
    got = []
    async for chunk in stream:
        got.append(chunk)
        if chunk.finish_reason is not None:
            break  # as the pipeline does: it has the answer and closes the stream
    await stream.aclose()
    return got


async def test_a_serve_stream_closed_after_its_finishing_chunk_is_cancelled_so_its_refs_are_freed() -> None:
    """The finishing chunk arrives before the stream's end: the reader closes it in between. An
    unfinished Serve stream keeps its object refs in the ingress (the soak's leak), so it is cancelled."""
    from serving.backends import HandleBackend

    handle = _Handle(end_delay_s=0.5)
    got = await _read_to_finish(HandleBackend(handle))
    assert "".join(c.text for c in got) == "ab"
    assert handle.streams[0].cancelled


async def test_a_serve_stream_read_to_its_end_is_not_cancelled() -> None:
    from serving.backends import HandleBackend

    handle = _Handle(end_delay_s=0.0)
    backend = HandleBackend(handle)
    from serving.replicas.engines.base import GenerateRequest, SamplingOptions

    chunks = [c async for c in backend.stream(GenerateRequest("r1", [1, 2], SamplingOptions(max_tokens=2)))]
    assert "".join(c.text for c in chunks) == "ab"
    assert not handle.streams[0].cancelled


# -- nothing a stream held outlives it waiting for Python's cycle collector --------------------------


@pytest.fixture
def no_cycle_collector():
    """Freed by reference counting alone: a long-lived ingress runs its cycle collector rarely, and what
    a cycle holds (a Serve stream's Ray object refs) stays held until then."""
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_serve_stream_closed_after_its_finishing_chunk_is_freed_at_once(no_cycle_collector) -> None:
    import weakref

    from serving.backends import HandleBackend

    handle = _Handle(end_delay_s=3600)
    got = await _read_to_finish(HandleBackend(handle))
    assert "".join(c.text for c in got) == "ab" and handle.streams[0].cancelled
    freed = weakref.ref(handle.streams.pop())
    await asyncio.sleep(0)
    assert freed() is None, "the cancelled stream is held by a reference cycle"


async def test_a_source_that_raises_is_freed_once_the_consumer_drops_the_error(no_cycle_collector) -> None:
    import weakref

    class Held:
        pass

    refs = []

    async def lost_replica():
        held = Held()
        refs.append(weakref.ref(held))
        yield Chunk(text="a", token_ids=[1])
        raise RuntimeError("lost replica")

    got = []
    with pytest.raises(RuntimeError, match="lost replica"):
        async for c in coalesce(lost_replica()):
            got.append(c)
    await asyncio.sleep(0)
    assert got[0].text == "a"
    assert refs[0]() is None, "the source's frame is held by a reference cycle"
