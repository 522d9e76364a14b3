"""The session worker (serving.sessions.worker) over each store backend (SQLite, real Redis) and the
FakeEngine: budgets and usage, hidden/summarised/full reasoning, the event log, takeover after a
graceful or abrupt stop, lease fencing, cancellation, engine errors and retries, claiming limits
and the on_finished hook."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any

import pytest

from serving.backends import EngineBackend
from serving.replicas.engines.fake import FakeEngine
from serving.sessions.events import extractive_summary, response_object
from serving.sessions.store import Event, LeaseLost, SessionRecord, SQLiteStore, Status
from serving.sessions.worker import SessionModel, SessionWorker, cancel_session
from serving.thinking import StreamFn
from tests.unit.sessions_harness import (
    END,
    EOS,
    START,
    TAGS,
    TOK,
    Flaky,
    Gate,
    Recorder,
    StopAt,
    check_event_log,
    close_store,
    dump,
    ids_in_text,
    new_store,
    prompt,
    record,
    reference_run,
    settings,
    split_ids,
    wait_finished,
    wait_until,
)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    """The worker runs over either backend: a SQLite file, or a real redis-server (tests/unit/conftest.py)."""
    if request.param == "redis":
        import redis

        from serving.sessions.store_redis import RedisStore

        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        s = RedisStore(url, ttl_s=3600, max_sessions_per_tenant=100, max_bytes_per_tenant=10**8)
    else:
        s = new_store(tmp_path)
    yield s
    close_store(s)


def engine_stream(token_delay_s: float = 0.0) -> tuple[FakeEngine, StreamFn]:
    eng = FakeEngine("r", token_delay_s=token_delay_s)
    return eng, EngineBackend(eng).stream


def make_worker(
    store: Any,
    stream: StreamFn,
    owner: str | None = None,
    on_finished: Any = None,
    **knobs: Any,
) -> SessionWorker:
    models = {
        "r": SessionModel("r", stream, TOK, TAGS),
        "plain": SessionModel("plain", stream, TOK, None),
    }
    return SessionWorker(store, models, settings(**knobs), owner, on_finished)


@asynccontextmanager
async def started(*workers: SessionWorker):
    for w in workers:
        w.start()
    try:
        yield workers
    finally:
        for w in workers:
            await w.close()


async def run_one(
    store: SQLiteStore, rec: SessionRecord, stream: StreamFn | None = None, **knobs: Any
) -> tuple[SessionRecord, list[Event]]:
    """Create `rec`, let a fresh worker run it to the end; (final record, event log)."""
    if stream is None:
        stream = engine_stream()[1]
    store.create(rec)
    w = make_worker(store, stream, **knobs)
    async with started(w):
        assert await w.submit(rec.id)
        final = await wait_finished(store, rec.id)
    return final, store.events(rec.id)


# -- budgets, usage and output ------------------------------------------------------------------------


async def test_budget_and_max_output_tokens_give_incomplete_with_exact_usage(store) -> None:
    p, budget, cap = prompt("why"), 6, 20
    final, events = await run_one(store, record("resp_1", p, cap, budget))
    ref, reason = await reference_run(engine_stream()[1], p, cap, budget)
    assert reason == "length"
    assert ref[:budget] == list(range(START + 1, START + 1 + budget)) and ref[budget] == END  # forced

    res = final.result
    assert final.status is Status.INCOMPLETE and res["status"] == "incomplete"
    assert res["incomplete_details"] == {"reason": "max_output_tokens"}
    assert res["error"] is None
    u = res["usage"]
    assert u["output_tokens"] == cap
    assert u["output_tokens_details"]["reasoning_tokens"] == budget
    assert u["input_tokens"] == len(p)
    assert u["input_tokens"] + u["output_tokens"] == u["total_tokens"]
    assert store.tokens("resp_1") == ref

    reasoning_ids, answer_ids = split_ids(p, ref)
    assert len(reasoning_ids) == budget
    kinds = [item["type"] for item in res["output"]]
    assert kinds == ["reasoning", "message"]
    rs, msg = res["output"]
    assert rs["summary"] == [] and "content" not in rs  # hidden by default
    assert msg["role"] == "assistant" and msg["status"] == "completed"
    assert msg["content"][0]["text"] == TOK.decode(answer_ids)
    check_event_log(events, res)


async def test_a_stop_completes_the_session(store) -> None:
    p, budget = prompt("stop"), 4
    stream = StopAt(engine_stream()[1])
    final, events = await run_one(store, record("resp_stop", p, 50, budget), stream)
    ref, reason = await reference_run(StopAt(engine_stream()[1]), p, 50, budget)
    assert reason == "stop" and ref[-1] == EOS
    assert final.status is Status.COMPLETED
    assert final.result["incomplete_details"] is None
    assert final.result["usage"]["output_tokens"] == len(ref)
    assert store.tokens("resp_stop") == ref
    check_event_log(events, final.result)


async def test_plain_model_has_no_reasoning_item(store) -> None:
    p = prompt("plain")
    final, events = await run_one(store, record("resp_plain", p, 7, model="plain"))
    ref, _ = await reference_run(engine_stream()[1], p, 7, None, None)
    res = final.result
    assert [item["type"] for item in res["output"]] == ["message"]
    assert res["output"][0]["content"][0]["text"] == TOK.decode(ref)
    assert res["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    assert not any(e.type.startswith("response.reasoning") for e in events)
    check_event_log(events, res)


# -- reasoning visibility -----------------------------------------------------------------------------


async def test_summary_full_streams_the_whole_reasoning(store) -> None:
    p, budget, cap = prompt("full"), 9, 16
    final, events = await run_one(store, record("resp_full", p, cap, budget, summary="full"))
    reasoning_ids, answer_ids = split_ids(p, store.tokens("resp_full"))
    assert len(reasoning_ids) == budget
    text = TOK.decode(reasoning_ids)
    rs = final.result["output"][0]
    assert rs["type"] == "reasoning" and rs["content"] == [{"type": "reasoning_text", "text": text}]
    deltas = check_event_log(events, final.result)
    assert deltas["reasoning"] == text
    done = [e.data for e in events if e.type == "response.reasoning_text.done"]
    assert len(done) == 1 and done[0]["text"] == text
    assert deltas["answer"] == TOK.decode(answer_ids)
    # The reasoning deltas all come before the reasoning item is done, before the message opens.
    types = [e.type for e in events]
    last_delta = max(i for i, t in enumerate(types) if t == "response.reasoning_text.delta")
    assert last_delta < types.index("response.content_part.added")


@pytest.mark.parametrize("mode", ["auto", "concise"])
async def test_summary_modes_send_an_extractive_summary_only(store, mode: str) -> None:
    p, budget, cap = prompt(mode), 8, 14
    final, events = await run_one(store, record("resp_sum", p, cap, budget, summary=mode))
    reasoning_ids, _ = split_ids(p, store.tokens("resp_sum"))
    text = TOK.decode(reasoning_ids)
    expected = extractive_summary(text, {"auto": 400, "concise": 200}[mode])
    rs = final.result["output"][0]
    assert rs["summary"] == [{"type": "summary_text", "text": expected}] and expected
    assert "content" not in rs
    deltas = check_event_log(events, final.result)
    assert deltas["reasoning"] == ""
    summary_events = [e.data for e in events if e.type == "response.reasoning_summary_text.done"]
    assert [d["text"] for d in summary_events] == [expected]


async def test_reasoning_is_hidden_by_default(store) -> None:
    p, budget, cap = prompt("hidden"), 7, 12
    final, events = await run_one(store, record("resp_hid", p, cap, budget))
    reasoning_ids, answer_ids = split_ids(p, store.tokens("resp_hid"))
    assert len(reasoning_ids) == budget
    blob = dump([e.data for e in events]) + dump(final.result)
    seen = ids_in_text(blob)
    assert not seen & set(reasoning_ids), "reasoning text leaked"
    assert set(answer_ids) <= seen  # the answer is there
    assert not any(e.type.startswith("response.reasoning") for e in events)
    assert final.result["output"][0] == {
        "type": "reasoning",
        "id": final.result["output"][0]["id"],
        "summary": [],
        "status": "completed",
    }


# -- the event log ------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint_tokens", [1, 3, 1000])
async def test_event_log_is_contiguous_with_one_terminal_event(store, checkpoint_tokens: int) -> None:
    p, budget, cap = prompt("events"), 5, 17
    final, events = await run_one(
        store,
        record("resp_ev", p, cap, budget, summary="full"),
        checkpoint_tokens=checkpoint_tokens,
        checkpoint_interval_s=60.0,
    )
    deltas = check_event_log(events, final.result)
    types = [e.type for e in events]
    assert types.count("response.output_item.added") == 2 and types.count("response.output_item.done") == 2
    assert types[-1] == "response.incomplete"
    reasoning_ids, answer_ids = split_ids(p, store.tokens("resp_ev"))
    assert deltas["answer"] == TOK.decode(answer_ids)
    assert deltas["reasoning"] == TOK.decode(reasoning_ids)
    if checkpoint_tokens == 1:  # one delta per token
        assert types.count("response.output_text.delta") == len(answer_ids)


# -- takeover -----------------------------------------------------------------------------------------


async def _takeover(store: SQLiteStore, abrupt: bool, phase: str) -> None:
    """A runs the session until the log holds some reasoning (or some answer), then stops; B ends it."""
    p, budget, cap = prompt("takeover"), 30, 70
    rid = "resp_take"
    store.create(record(rid, p, cap, budget, summary="full"))
    eng_a, stream_a = engine_stream(token_delay_s=0.01)
    rec_b = Recorder(engine_stream(token_delay_s=0.001)[1])
    a = make_worker(store, stream_a, owner="A", lease_s=0.3)
    b = make_worker(store, rec_b, owner="B", lease_s=0.3)
    a.start()
    try:
        assert await a.submit(rid)
        at_least = 8 if phase == "reasoning" else budget + 5
        await wait_until(lambda: len(store.tokens(rid)) >= at_least)
        if abrupt:
            # A dies: its loops stop (no renewal, no sweep), its session task stops without a
            # word to the store, and its lease is left to lapse.
            for t in a._loops:
                t.cancel()
            for act in list(a._active.values()):
                act.lost = True
                act.task.cancel()
            await asyncio.gather(*a._loops, return_exceptions=True)
            await wait_until(lambda: not a.active)
            held = store.get(rid, "a")
            assert held.owner == "A" and held.status is Status.IN_PROGRESS
        else:
            await a.close()
            assert store.get(rid, "a").lease_until < time.time()  # handed back at once
        stored_at_stop = len(store.tokens(rid))
        events_at_stop = store.last_seq(rid)
        t0 = time.monotonic()
        async with started(b):
            final = await wait_finished(store, rid)
            took = rec_b.requests[0]
        assert eng_a.stats().running == 0
        if not abrupt:
            assert time.monotonic() - t0 < 1.0
    finally:
        await a.close()

    ref, _ = await reference_run(engine_stream()[1], p, cap, budget)
    assert final.claims == 2 and b.resumed == 1 and a.resumed == 0
    assert final.status is Status.INCOMPLETE
    assert store.tokens(rid) == ref
    # B resumed from the log (its first leg replays the stored ids), it did not start over.
    assert took.request_id == f"{rid}-2"
    assert took.prompt_token_ids == p + ref[:stored_at_stop]
    assert stored_at_stop >= at_least and events_at_stop > 2
    assert (stored_at_stop <= budget) == (phase == "reasoning")
    events = store.events(rid)
    deltas = check_event_log(events, final.result)
    reasoning_ids, answer_ids = split_ids(p, ref)
    assert deltas["reasoning"] == TOK.decode(reasoning_ids)
    assert deltas["answer"] == TOK.decode(answer_ids)
    types = [e.type for e in events]
    assert types.count("response.created") == 1 and types.count("response.in_progress") == 1
    assert types.count("response.output_item.added") == 2
    assert final.result["usage"]["output_tokens_details"]["reasoning_tokens"] == budget


@pytest.mark.parametrize("phase", ["reasoning", "answer"])
async def test_graceful_close_hands_the_session_to_another_worker(store, phase: str) -> None:
    await _takeover(store, abrupt=False, phase=phase)


@pytest.mark.parametrize("phase", ["reasoning", "answer"])
async def test_abrupt_death_is_taken_over_after_the_lease_lapses(store, phase: str) -> None:
    await _takeover(store, abrupt=True, phase=phase)


async def test_a_stalled_worker_that_lost_its_lease_writes_nothing(store) -> None:
    p, budget, cap = prompt("fence"), 30, 60
    rid = "resp_fence"
    store.create(record(rid, p, cap, budget))
    gate = Gate(engine_stream()[1], after=6)
    a = make_worker(store, gate, owner="A", lease_s=0.3, checkpoint_tokens=4)
    b = make_worker(store, engine_stream(token_delay_s=0.02)[1], owner="B", lease_s=0.3)
    a.start()
    try:
        assert await a.submit(rid)
        await asyncio.wait_for(gate.waiting.wait(), 2)
        # A stalls (its engine call hangs) and its lease loop stops: it keeps its task but not its lease.
        for t in a._loops:
            t.cancel()
        await asyncio.gather(*a._loops, return_exceptions=True)
        assert len(store.tokens(rid)) == 4
        async with started(b):
            await wait_until(lambda: store.get(rid, "a").owner == "B")
            await wait_until(lambda: len(store.tokens(rid)) >= 12)
            # A late checkpoint by A is refused, and nothing of it is written.
            tokens, events = store.tokens(rid), store.events(rid)
            with pytest.raises(LeaseLost):
                store.checkpoint(
                    rid, "A", len(tokens), [7, 7], [Event(events[-1].seq + 1, "x", {"type": "x"})]
                )
            assert store.tokens(rid) == tokens and store.events(rid) == events
            # A wakes up: its own next checkpoint hits the fence and its task ends.
            gate.release()
            await wait_until(lambda: not a.active, within_s=2)
            assert gate.tokens_after_release > 0
            assert store.get(rid, "a").owner == "B"
            final = await wait_finished(store, rid)
    finally:
        await a.close()
    ref, _ = await reference_run(engine_stream()[1], p, cap, budget)
    assert store.tokens(rid) == ref
    assert final.claims == 2 and b.resumed == 1
    assert a.completed == {} and b.completed == {"incomplete": 1}
    check_event_log(store.events(rid), final.result)


# -- cancellation -------------------------------------------------------------------------------------


async def test_cancel_a_running_session(store) -> None:
    rid = "resp_cancel"
    p = prompt("cancel")
    store.create(record(rid, p, 400, 300, summary="full"))
    eng, stream = engine_stream(token_delay_s=0.005)
    finished: list[dict] = []
    w = make_worker(store, stream, on_finished=lambda rec, obj: finished.append(obj))
    async with started(w):
        assert await w.submit(rid)
        await wait_until(lambda: len(store.tokens(rid)) >= 8)
        t0 = time.monotonic()
        rec = await asyncio.to_thread(cancel_session, store, rid, "a")
        assert rec is not None and rec.cancel_requested and rec.status is Status.IN_PROGRESS
        final = await wait_finished(store, rid, within_s=1.0)
        assert time.monotonic() - t0 < 1.0
        await wait_until(lambda: not w.active)
    assert final.status is Status.CANCELLED and final.result["status"] == "cancelled"
    assert f"{rid}-1" in eng.aborted and eng.stats().running == 0
    events = store.events(rid)
    assert events[-1].type == "response.cancelled"
    deltas = check_event_log(events, final.result)
    # What was generated before the cancel is kept, and the log says the same.
    ids = store.tokens(rid)
    assert 8 <= len(ids) < 300
    assert deltas["reasoning"] == TOK.decode(ids)
    assert final.result["usage"]["output_tokens"] == len(ids)
    assert finished == [final.result] and w.completed == {"cancelled": 1}


async def test_cancel_a_queued_session_nobody_holds(store) -> None:
    rid = "resp_q"
    store.create(record(rid, prompt("q"), 10, 4))
    rec = await asyncio.to_thread(cancel_session, store, rid, "a")
    assert rec is not None and rec.status is Status.CANCELLED and rec.owner is None
    events = store.events(rid)
    assert [e.type for e in events] == ["response.cancelled"] and events[0].seq == 0
    assert events[0].data["response"]["status"] == "cancelled"
    assert rec.result is not None and rec.result["status"] == "cancelled"
    assert response_object(rec)["status"] == "cancelled"
    # No worker takes it afterwards, and cancelling again changes nothing.
    w = make_worker(store, engine_stream()[1])
    assert await w.sweep() == 0 and not await w.submit(rid)
    again = await asyncio.to_thread(cancel_session, store, rid, "a")
    assert again.status is Status.CANCELLED and len(store.events(rid)) == 1
    assert await asyncio.to_thread(cancel_session, store, rid, "b") is None  # another tenant


# -- engine errors ------------------------------------------------------------------------------------


async def test_a_503_mid_session_is_resumed_to_the_same_output(store) -> None:
    p, budget, cap = prompt("flaky"), 8, 24
    flaky = Flaky(engine_stream()[1], after=5, status=503, times=1)
    final, events = await run_one(store, record("resp_503", p, cap, budget), flaky)
    ref, _ = await reference_run(engine_stream()[1], p, cap, budget)
    assert final.status is Status.INCOMPLETE
    assert store.tokens("resp_503") == ref
    assert len(flaky.calls) >= 2
    assert flaky.calls[1].prompt_token_ids == p + ref[:5]  # resumed after the 5 tokens it had
    deltas = check_event_log(events, final.result)
    assert deltas["answer"] == TOK.decode(split_ids(p, ref)[1])
    assert final.result["usage"]["output_tokens"] == cap


async def test_a_400_fails_the_session_with_its_code(store) -> None:
    flaky = Flaky(engine_stream()[1], after=3, status=400, times=99, type_="invalid_request_error")
    final, events = await run_one(store, record("resp_400", prompt("bad"), 20, 5), flaky)
    assert final.status is Status.FAILED
    assert final.result["error"]["code"] == "invalid_request_error"
    assert final.result["error"]["message"] == "fake 400"
    assert len(flaky.calls) == 1  # not retried
    assert len(store.tokens("resp_400")) == 3  # what was generated is kept
    assert events[-1].type == "response.failed"
    check_event_log(
        events, final.result, items=False
    )  # see test_sessions_without_an_answer_log_only_their_items


async def test_repeated_503_without_progress_fails_after_max_attempts(store) -> None:
    flaky = Flaky(engine_stream()[1], after=0, status=503, times=99, type_="engine_unavailable")
    final, events = await run_one(store, record("resp_down", prompt("down"), 20, 5), flaky, max_attempts=3)
    assert final.status is Status.FAILED
    assert final.result["error"]["code"] == "engine_unavailable"
    assert len(flaky.calls) == 3
    assert store.tokens("resp_down") == []
    check_event_log(
        events, final.result, items=False
    )  # see test_sessions_without_an_answer_log_only_their_items


async def test_progress_resets_the_attempt_count(store) -> None:
    # Three failures in a row, each after 2 new tokens: never "without progress", so it goes on.
    p = prompt("progress")
    flaky = Flaky(engine_stream()[1], after=2, status=503, times=3)
    final, _ = await run_one(store, record("resp_prog", p, 15, 5), flaky, max_attempts=2)
    ref, _ = await reference_run(engine_stream()[1], p, 15, 5)
    assert final.status is Status.INCOMPLETE and store.tokens("resp_prog") == ref
    assert len(flaky.calls) == 4


async def test_unknown_model_fails(store) -> None:
    final, events = await run_one(store, record("resp_nomodel", prompt("x"), 10, None, model="gone"))
    assert final.status is Status.FAILED
    assert final.result["error"]["code"] == "model_not_served"
    assert final.result["usage"] is None and final.result["output"] == []
    assert events[-1].type == "response.failed" and events[-1].data["response"] == final.result
    assert [e.seq for e in events] == list(range(len(events)))


@pytest.mark.parametrize(
    "case",
    [
        "400_in_reasoning",
        "503_no_progress",
        "length_in_reasoning",
        "unknown_model",
    ],
)
async def test_sessions_without_an_answer_log_only_their_items(store, case: str) -> None:
    """A session that ends with no answer text (failed, or max_output_tokens reached inside the
    reasoning) has a well-formed log whose items are exactly the final object's output."""
    stream = engine_stream()[1]
    rec = record("resp_items", prompt("items"), 20, 5)
    if case == "400_in_reasoning":
        stream = Flaky(stream, after=3, status=400, times=99)
    elif case == "503_no_progress":
        stream = Flaky(stream, after=0, status=503, times=99)
    elif case == "length_in_reasoning":
        rec = record("resp_items", prompt("items"), 5, 5)
    else:
        rec = record("resp_items", prompt("items"), 10, None, model="gone")
    final, events = await run_one(store, rec, stream)
    assert not any(item["type"] == "message" for item in final.result["output"])
    check_event_log(events, final.result)


# -- claiming -----------------------------------------------------------------------------------------


async def test_max_active_is_respected(store) -> None:
    rec = Recorder(engine_stream(token_delay_s=0.002)[1])
    ids = [f"resp_{i}" for i in range(5)]
    for rid in ids:
        store.create(record(rid, prompt(rid), 20, 5))
    w = make_worker(store, rec, max_active=2)
    assert await w.submit(ids[0]) and await w.submit(ids[1])
    assert not await w.submit(ids[2])  # full
    assert store.get(ids[2], "a").owner is None
    peak = 0
    async with started(w):
        while not all(store.get(rid, "a").status.finished for rid in ids):
            peak = max(peak, len(w.active))
            await asyncio.sleep(0.002)
    assert peak == 2 and rec.peak <= 2
    assert w.completed == {"incomplete": 5}


async def test_sweep_claims_orphans(store) -> None:
    for rid in ("resp_o1", "resp_o2"):
        store.create(record(rid, prompt(rid), 10, 3))
    # An in-progress session whose owner's lease ran out is an orphan too.
    store.create(record("resp_o3", prompt("o3"), 10, 3))
    assert store.claim("resp_o3", "dead", 0.01) is not None
    await asyncio.sleep(0.03)
    w = make_worker(store, engine_stream()[1])
    try:
        assert await w.sweep() == 3
        for rid in ("resp_o1", "resp_o2", "resp_o3"):
            assert (await wait_finished(store, rid)).status is Status.INCOMPLETE
    finally:
        await w.close()
    assert store.get("resp_o3", "a").claims == 2 and w.resumed == 1
    assert await w.sweep() == 0


async def test_on_finished_is_called_once_with_the_final_object(store) -> None:
    calls: list[tuple[str, dict]] = []
    rid = "resp_hook"
    store.create(record(rid, prompt("hook"), 12, 4))
    w = make_worker(store, engine_stream()[1], on_finished=lambda rec, obj: calls.append((rec.id, obj)))
    async with started(w):
        assert await w.submit(rid)
        final = await wait_finished(store, rid)
        await asyncio.sleep(0.1)  # sweeps come and go: nothing more
    assert calls == [(rid, final.result)]
    assert w.completed == {"incomplete": 1}


async def test_concurrent_submits_of_one_session_claim_it_once(store) -> None:
    rid = "resp_twice"
    rec = Recorder(engine_stream()[1])
    store.create(record(rid, prompt("twice"), 8, 3))
    w = make_worker(store, rec)
    try:
        results = await asyncio.gather(w.submit(rid), w.submit(rid))
        await wait_finished(store, rid)
        await asyncio.sleep(0.05)
    finally:
        await w.close()
    assert sorted(results) == [False, True]
    assert len([r for r in rec.requests if r.request_id == f"{rid}-1"]) == 1


async def test_concurrent_submits_respect_max_active(store) -> None:
    for rid in ("resp_m1", "resp_m2"):
        store.create(record(rid, prompt(rid), 8, 3))
    w = make_worker(store, engine_stream(token_delay_s=0.005)[1], max_active=1)
    try:
        results = await asyncio.gather(w.submit("resp_m1"), w.submit("resp_m2"))
        peak = len(w.active)
        async with started(w):
            await wait_finished(store, "resp_m1")
            await wait_finished(store, "resp_m2")
    finally:
        await w.close()
    assert sorted(results) == [False, True] and peak == 1


class _SlowFinishStore(SQLiteStore):
    """finish() takes a while (a busy database): a cancel request can arrive while it runs."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.finishing = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def finish(self, *args: Any, **kw: Any) -> None:
        self._loop.call_soon_threadsafe(self.finishing.set)
        time.sleep(0.3)
        super().finish(*args, **kw)


async def test_on_finished_survives_a_cancel_that_races_the_finish(tmp_path) -> None:
    store = _SlowFinishStore(tmp_path / "slow.db", 3600, 100, 10**8)
    calls: list[dict] = []
    rid = "resp_race"
    store.create(record(rid, prompt("race"), 10, 3))
    w = make_worker(store, engine_stream()[1], on_finished=lambda rec, obj: calls.append(obj))
    try:
        async with started(w):
            assert await w.submit(rid)
            await asyncio.wait_for(store.finishing.wait(), 2)
            await asyncio.to_thread(cancel_session, store, rid, "a")
            final = await wait_finished(store, rid)
            await wait_until(lambda: not w.active)
        assert final.status is Status.INCOMPLETE  # the finish won the race
        assert calls == [final.result]
    finally:
        close_store(store)


# -- fairness across tenants --------------------------------------------------------------------------


async def test_a_tenant_that_queued_a_hundred_does_not_hold_back_another(store) -> None:
    for i in range(100):
        store.create(record(f"resp_a{i:03}", prompt("a"), 2, tenant="a"))
    store.create(record("resp_b", prompt("b"), 2, tenant="b"))
    legs = Recorder(engine_stream()[1])
    w = make_worker(store, legs, max_active=1)
    try:
        for _ in range(5):  # one session at a time, claimed by the sweep
            await w.sweep()
            await wait_until(lambda: not w.active)
    finally:
        await w.close()
    started = [r.request_id.rsplit("-", 1)[0] for r in legs.requests]
    assert store.get("resp_b", "b").status.finished
    assert started.index("resp_b") == 1  # a's oldest, then b's, then a's next: not after a's 100th
    assert started[:5] == ["resp_a000", "resp_b", "resp_a001", "resp_a002", "resp_a003"]


async def test_a_worker_runs_at_most_max_active_per_tenant_of_one_tenant(store) -> None:
    gate = Gate(engine_stream()[1], after=1)
    a = [f"resp_a{i}" for i in range(4)]
    for rid in a:
        store.create(record(rid, prompt(rid), 6, tenant="a"))
    store.create(record("resp_b", prompt("b"), 6, tenant="b"))
    w = make_worker(store, gate, max_active=4, max_active_per_tenant=2)
    try:
        assert await w.submit(a[0]) and await w.submit(a[1])
        assert not await w.submit(a[2])  # a's bound here, though the worker has room
        rec = store.get(a[2], "a")
        assert rec.owner is None and rec.claims == 0  # never claimed (a claim given back would count)
        assert await w.sweep() == 1  # b's, not a's others
        assert sorted(store.get_any(sid).tenant for sid in w.active) == ["a", "a", "b"]
        gate.release()
        async with started(w):
            for rid in a:
                await wait_finished(store, rid)
    finally:
        await w.close()
    assert w.completed == {"incomplete": 5}
