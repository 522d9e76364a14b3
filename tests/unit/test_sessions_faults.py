"""Faults a takeover cannot fix end a session as failed instead of resuming it forever; a store that
does not answer for a moment is no such fault: the session is resumed."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.backends import EngineBackend
from serving.replicas.engines.base import Chunk, GenerateRequest
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.store import SQLiteStore, Status
from serving.sessions.worker import MAX_CLAIMS, SessionModel, SessionWorker
from serving.thinking import StreamFn
from tests.unit.sessions_harness import (
    TAGS,
    TOK,
    Flaky,
    close_store,
    new_store,
    prompt,
    record,
    reference_run,
    settings,
    wait_finished,
)


@pytest.fixture
def store(tmp_path):
    s = new_store(tmp_path)
    yield s
    close_store(s)


class _BrokenDecoder:
    def decode(self, ids: list[int]) -> str:
        raise RuntimeError("decoder exploded")


async def test_an_unexpected_fault_fails_the_session_with_its_log_closed(store) -> None:
    model = SessionModel("r", EngineBackend(FakeEngine("r")).stream, _BrokenDecoder(), TAGS)
    w = SessionWorker(store, {"r": model}, settings())
    store.create(record("resp_x", prompt("q"), 12, summary="full"))  # full: the reasoning is decoded
    try:
        assert await w.submit("resp_x")
        rec = await wait_finished(store, "resp_x")
    finally:
        await w.close()
    assert rec.status is Status.FAILED
    assert rec.result is not None and rec.result["error"]["code"] == "internal_error"
    assert "decoder exploded" in rec.result["error"]["message"]
    events = store.events("resp_x")
    assert events[-1].type == "response.failed"
    assert [e.seq for e in events] == list(range(len(events)))


async def test_a_session_whose_workers_keep_dying_fails_after_max_claims(store) -> None:
    store.create(record("resp_y", prompt("q"), 12))
    for i in range(MAX_CLAIMS):
        assert store.claim("resp_y", f"dead-{i}", 10.0, now=1.0 + 100 * i) is not None
    model = SessionModel("r", EngineBackend(FakeEngine("r")).stream, TOK, TAGS)
    w = SessionWorker(store, {"r": model}, settings())
    try:
        assert await w.submit("resp_y")  # the last lease (dead-9's) has lapsed long ago
        rec = await wait_finished(store, "resp_y")
    finally:
        await w.close()
    assert rec.status is Status.FAILED and rec.claims == MAX_CLAIMS + 1
    assert rec.result["error"]["code"] == "too_many_takeovers"
    assert store.tokens("resp_y") == []


class _DecoderThatBreaksLater:
    """Works for the first checkpoint, then fails: the failure path must not decode again."""

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, ids: list[int]) -> str:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("decoder exploded later")
        return "".join(f" t{i}" for i in ids)


async def test_a_fault_after_checkpoints_keeps_what_was_stored(store) -> None:
    model = SessionModel("r", EngineBackend(FakeEngine("r")).stream, _DecoderThatBreaksLater(), TAGS)
    w = SessionWorker(store, {"r": model}, settings(checkpoint_tokens=4))
    store.create(record("resp_z", prompt("q"), 40, summary="full"))
    try:
        assert await w.submit("resp_z")
        rec = await wait_finished(store, "resp_z")
    finally:
        await w.close()
    assert rec.status is Status.FAILED and rec.result["error"]["code"] == "internal_error"
    assert 0 < len(store.tokens("resp_z")) < 40
    events = store.events("resp_z")
    assert events[-1].type == "response.failed"
    assert [e.seq for e in events] == list(range(len(events)))


class _BlipStore(SQLiteStore):
    """A store whose first checkpoint after `after` calls fails as if Redis were unreachable."""

    def __init__(self, *args: Any, error: Exception, after: int = 2, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.error = error
        self.left = after
        self.failed = 0

    def checkpoint(self, *args: Any, **kw: Any) -> None:
        self.left -= 1
        if self.left == 0:
            self.failed += 1
            raise self.error
        super().checkpoint(*args, **kw)


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Connection refused"), sqlite3.OperationalError("database is locked")],
    ids=["connection", "locked"],
)
async def test_a_store_blip_mid_session_is_resumed_not_failed(tmp_path, error) -> None:
    store = _BlipStore(tmp_path / "blip.db", 3600, 100, 10**8, error=error)
    stream = EngineBackend(FakeEngine("r")).stream
    model = SessionModel("r", stream, TOK, TAGS)
    w = SessionWorker(store, {"r": model}, settings(lease_s=0.3, checkpoint_tokens=4))
    store.create(record("resp_b", prompt("q"), 24, 6))
    try:
        w.start()
        assert await w.submit("resp_b")
        rec = await wait_finished(store, "resp_b")
        assert store.failed == 1
        assert rec.status is Status.INCOMPLETE, rec.result  # it ran to its max_output_tokens
        assert rec.claims == 2  # stopped, its lease lapsed, the sweep took it again
        assert rec.result["usage"]["output_tokens"] == 24
        assert store.tokens("resp_b") == (await reference_run(stream, prompt("q"), 24, 6))[0]
    finally:
        await w.close()
        close_store(store)


# -- engines that stop answering, engine faults -------------------------------------------------------


class _StallsAfterFirstChunk:
    """Its first `times` legs send their first chunk, then nothing (an engine alive but stuck: a wedged
    scheduler, a hung collective); later legs run normally. Counts the legs closed (an abort)."""

    def __init__(self, inner: StreamFn, times: int = 10**6) -> None:
        self.inner = inner
        self.times = times
        self.calls: list[GenerateRequest] = []
        self.closed = 0

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls.append(request)
        stall = len(self.calls) <= self.times
        it = self.inner(request)
        try:
            async for chunk in it:
                yield chunk
                if stall:
                    await asyncio.sleep(3600)
        finally:
            self.closed += 1
            await it.aclose()


async def _run_stalled(store: SQLiteStore, stream: StreamFn, rid: str, **knobs: Any) -> tuple[Any, float]:
    """Run `rid` on a started worker (its lease renewed all along) with a 0.3 s stall timeout; the
    final record and how long the session took. The worker holds nothing afterwards."""
    model = SessionModel("r", stream, TOK, TAGS)
    w = SessionWorker(store, {"r": model}, settings(stall_timeout_s=0.3, **knobs))
    t0 = time.monotonic()
    try:
        w.start()
        assert await w.submit(rid)
        rec = await wait_finished(store, rid, within_s=3.0)  # without a stall timeout: never
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)  # the run's task ends after its last write
        assert w.active == []  # its slot is free...
    finally:
        await w.close()
    assert rec.owner is None  # ...and its lease released
    return rec, took


async def test_a_leg_that_stalls_after_its_first_chunk_is_resumed_to_the_same_output(store) -> None:
    p, budget, cap = prompt("stuck"), 6, 24
    stream = EngineBackend(FakeEngine("r")).stream
    stalls = _StallsAfterFirstChunk(stream, times=1)
    store.create(record("resp_stall", p, cap, budget))
    rec, took = await _run_stalled(store, stalls, "resp_stall")
    ref, _ = await reference_run(stream, p, cap, budget)
    assert rec.status is Status.INCOMPLETE, rec.result
    assert took < 1.5  # one stall timeout (0.3 s), then the rest of the run
    assert store.tokens("resp_stall") == ref  # token-exact: nothing lost or repeated
    # The stalled leg was closed (aborted at the engine), and the run went on (its forced-close leg too).
    assert len(stalls.calls) >= 2 and stalls.closed == len(stalls.calls)
    resumed = stalls.calls[1].prompt_token_ids
    assert len(resumed) > len(p) and resumed == p + ref[: len(resumed) - len(p)]
    assert rec.result["usage"]["output_tokens"] == cap


async def test_an_engine_that_keeps_stalling_fails_the_session_after_max_attempts(store) -> None:
    # Every leg sends one chunk and hangs: each resume keeps that chunk, but a leg that stalled after
    # its first chunk is no progress, so the session fails instead of creeping on a chunk per timeout.
    p = prompt("wedged")
    stream = EngineBackend(FakeEngine("r")).stream
    stalls = _StallsAfterFirstChunk(stream)
    store.create(record("resp_wedged", p, 40, 6))
    rec, took = await _run_stalled(store, stalls, "resp_wedged", max_attempts=3)
    assert rec.status is Status.FAILED
    assert rec.result["error"]["code"] == "engine_stalled"
    assert "sent nothing for 0.3s" in rec.result["error"]["message"]
    assert took < 1.5  # three stall timeouts and two short backoffs
    assert len(stalls.calls) == 3 and stalls.closed == 3
    kept = store.tokens("resp_wedged")
    ref, _ = await reference_run(stream, p, 40, 6)
    assert 3 <= len(kept) < 40 and kept == ref[: len(kept)]  # each leg resumed from the last one's ids
    assert store.events("resp_wedged")[-1].type == "response.failed"


async def test_an_engine_fault_is_not_retried_on_the_same_engine(store) -> None:
    # A 500 `engine_error` is the engine failing on this input (router.resilience.ErrorClass.ENGINE_FAULT):
    # the same input fails the same way, so the session fails at once, keeping what it generated.
    flaky = Flaky(EngineBackend(FakeEngine("r")).stream, after=2, status=500, times=99)
    model = SessionModel("r", flaky, TOK, TAGS)
    w = SessionWorker(store, {"r": model}, settings(max_attempts=3))
    store.create(record("resp_fault", prompt("poison"), 20, 5))
    try:
        assert await w.submit("resp_fault")
        rec = await wait_finished(store, "resp_fault")
    finally:
        await w.close()
    assert rec.status is Status.FAILED and rec.result["error"]["code"] == "engine_error"
    assert len(flaky.calls) == 1
    assert len(store.tokens("resp_fault")) == 2
