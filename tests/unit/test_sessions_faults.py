"""Faults a takeover cannot fix end a session as failed instead of resuming it forever."""

from __future__ import annotations

import pytest

from serving.backends import EngineBackend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.store import Status
from serving.sessions.worker import MAX_CLAIMS, SessionModel, SessionWorker
from tests.unit.sessions_harness import (
    TAGS,
    TOK,
    close_store,
    new_store,
    prompt,
    record,
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
