"""Streams that break after their first token (serving.http.migration, router.migration): continued on
another replica from prompt + the tokens already sent, with no token repeated or lost; or, past the
migration limit, an error event and [DONE], never a silent cut or a hang, and every slot given back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from router.migration import Decision, Failure, MigrationPolicy, resume_sampling
from router.resilience import RetryBudget
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest, SamplingOptions
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_gateway_api import CountingBackend, chat, route, stack

# -- the pure policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "migrations", "ids_known", "remaining", "want"),
    [
        (Failure.ERROR, 503, 0, True, 5, Decision(True, "error")),
        (Failure.STALLED, None, 1, True, 5, Decision(True, "stalled")),
        (Failure.CUT, None, 0, True, 5, Decision(True, "cut")),
        (Failure.ERROR, 400, 0, True, 5, Decision(False, "client_error")),
        (Failure.ERROR, 503, 2, True, 5, Decision(False, "limit")),
        (Failure.ERROR, 503, 0, False, 5, Decision(False, "ids_unknown")),
        (Failure.ERROR, 503, 0, True, 0, Decision(False, "nothing_left")),
    ],
)
def test_policy_decides_from_the_failure_the_limit_and_what_is_known(
    failure, status, migrations, ids_known, remaining, want
) -> None:
    assert MigrationPolicy(2).decide(failure, status, migrations, ids_known, remaining, None) == want


def test_policy_spends_the_retry_budget_only_on_a_migration() -> None:
    budget = RetryBudget(ratio=0.0, initial=1.0)
    policy = MigrationPolicy(3)
    assert policy.decide(Failure.ERROR, 400, 0, True, 5, budget).reason == "client_error"
    assert budget.balance == 1.0  # nothing spent on a stream that would not migrate anyway
    assert policy.decide(Failure.ERROR, 503, 0, True, 5, budget).migrate
    assert policy.decide(Failure.ERROR, 503, 1, True, 5, budget) == Decision(False, "budget")
    assert MigrationPolicy(0).decide(Failure.ERROR, 503, 0, True, 5, None) == Decision(False, "disabled")


@pytest.mark.parametrize(
    ("status", "error_type", "want"),
    [
        (500, "engine_error", Decision(False, "engine_fault")),  # the engine raised on this input
        (500, "cache_salt_unsupported", Decision(True, "error")),  # a 500 of another type: a server error
        (500, None, Decision(True, "error")),  # type unknown: as before, a server error
        (502, "kv_transfer", Decision(True, "error")),
        (503, "engine_error", Decision(True, "error")),  # only a 500 is an engine fault
    ],
)
def test_policy_never_migrates_an_engine_fault(status: int, error_type: str | None, want: Decision) -> None:
    budget = RetryBudget(ratio=0.0, initial=5.0)
    got = MigrationPolicy(2).decide(Failure.ERROR, status, 0, True, 5, budget, error_type=error_type)
    assert got == want
    assert budget.balance == (5.0 if not want.migrate else 4.0)  # an engine fault spends no retry


def test_resumed_sampling_lowers_the_limits_by_what_was_sent() -> None:
    out = resume_sampling(SamplingOptions(max_tokens=10, min_tokens=4, temperature=0.0), 6)
    assert (out.max_tokens, out.min_tokens, out.temperature) == (4, 0, 0.0)


# -- over HTTP -----------------------------------------------------------------------------------


class BreakingBackend(CountingBackend):
    """A FakeEngine whose first `breaks` streams break after `after` tokens: `mode` error (a 503, as a
    replica that died), stall (nothing more, ever) or cut (the stream just ends)."""

    def __init__(
        self,
        mode: str,
        after: int = 3,
        breaks: int = 1,
        status: int = 503,
        dead_for: int = 0,
        err_type: str = "engine_unavailable",
        stuck: bool = False,
    ) -> None:
        super().__init__(FakeEngine("small", max_model_len=256))
        #: Streams after the breaking ones send nothing, ever (the only replica is wedged).
        self.stuck = stuck
        self.mode, self.after, self.breaks, self.status = mode, after, breaks, status
        self.err_type = err_type
        #: Streams after the first break that fail at once (a replica not yet replaced).
        self.dead_for = dead_for
        self.requests: list[GenerateRequest] = []
        self.closed = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        breaking = len(self.requests) <= self.breaks
        if self.breaks < len(self.requests) <= self.breaks + self.dead_for:
            self.closed += 1
            yield Chunk(error=EngineError("no replica", 503, "engine_unavailable"))
            return
        if self.stuck and not breaking:
            try:
                await asyncio.Event().wait()
            finally:
                self.closed += 1
        n = 0
        try:
            async for chunk in super().stream(request):
                if breaking and n == self.after:
                    if self.mode == "error":
                        yield Chunk(error=EngineError("replica died", self.status, self.err_type))
                    elif self.mode == "stall":
                        await asyncio.Event().wait()
                    return
                n += 1
                yield chunk
        finally:
            self.closed += 1


def _sse(text: str) -> tuple[list[dict], bool]:
    events, done = [], False
    for line in text.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


async def _reference(max_tokens: int) -> tuple[str, list[int]]:
    """The uninterrupted run's text (and usage) on a plain FakeEngine."""
    async with stack() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=max_tokens))
        assert r.status_code == 200
        body = r.json()
        return body["choices"][0]["message"]["content"], [
            body["usage"]["prompt_tokens"],
            body["usage"]["completion_tokens"],
        ]


async def _started(backend: BreakingBackend) -> None:
    await backend.engine.start()


@pytest.mark.parametrize(("mode", "failure"), [("error", "error"), ("stall", "stalled"), ("cut", "cut")])
async def test_a_stream_that_breaks_after_n_tokens_continues_with_the_same_text(
    mode: str, failure: str
) -> None:
    want, usage = await _reference(12)
    backend = BreakingBackend(mode, after=4)
    await _started(backend)
    streams = {"stall_timeout_s": 0.2}
    async with stack({"small": backend}, resilience={"streams": streams}) as s:
        body = chat(model="small", max_tokens=12, stream=True, stream_options={"include_usage": True})
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        events, done = _sse(r.text)
        assert done
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
        assert text == want  # no token repeated, none lost
        final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
        assert final["x_tandem_migrations"] == [
            {"reason": failure, "after_tokens": 4, "model": "small", "route": ""}
        ]
        assert [events[-1]["usage"]["prompt_tokens"], events[-1]["usage"]["completion_tokens"]] == usage
        # The continuation is the prompt plus the 4 tokens sent, for the 8 tokens left.
        first, second = backend.requests
        sent = [int(w[1:]) for w in want.split()[:4]]  # the fake's tokens are " t<id>"
        assert second.prompt_token_ids == first.prompt_token_ids + sent
        assert second.sampling.max_tokens == 8 and second.request_id.endswith(".m1")
        assert (
            s.sample("tandem_stream_migrations_total", model="small", failure=failure, result="migrated") == 1
        )
        assert backend.closed == 2
        pools = s.gateway.admission.snapshot()["pools"]
        assert all(p["in_use"] == 0 for p in pools.values())


async def test_unstreamed_answer_after_a_migration_is_whole_and_says_so_in_the_route() -> None:
    want, _ = await _reference(10)
    backend = BreakingBackend("error", after=2)
    await _started(backend)
    async with stack({"small": backend}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=10))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == want
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert route(r)["migrations"] == "1" and route(r)["migrated"] == "error@2->small"
        assert r.json()["x_tandem_migrations"][0]["after_tokens"] == 2


async def test_text_completions_migrate_too() -> None:
    backend = BreakingBackend("error", after=3)
    await _started(backend)
    async with stack({"small": backend}) as s:
        body = {"model": "small", "prompt": "hello world", "max_tokens": 8}
        r = await s.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert route(r)["migrations"] == "1"
        assert len(backend.requests) == 2


async def test_past_the_migration_limit_the_client_gets_an_error_event_and_done_and_slots_are_free() -> None:
    backend = BreakingBackend("error", after=2, breaks=10)
    await _started(backend)
    async with stack({"small": backend}, resilience={"streams": {"migration_limit": 2}}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=20, stream=True))
        events, done = _sse(r.text)
        assert done and events[-1]["error"]["code"] == 503
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
        assert len(text.split()) == 6  # 2 tokens per stream, 3 streams, none repeated
        assert len(set(text.split())) == 6
        assert s.sample("tandem_stream_migrations_total", model="small", failure="error", result="limit") == 1
        assert s.sample("tandem_requests_in_flight", model="small") == 0
        pools = s.gateway.admission.snapshot()["pools"]
        assert all(p["in_use"] == 0 for p in pools.values())


async def test_a_stall_without_migration_ends_in_a_504_event_within_the_timeout_and_frees_the_slot() -> None:
    backend = BreakingBackend("stall", after=1)
    await _started(backend)
    streams = {"stall_timeout_s": 0.3, "migration_limit": 0}
    async with stack({"small": backend}, resilience={"streams": streams}) as s:
        t0 = time.monotonic()
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=20, stream=True))
        elapsed = time.monotonic() - t0
        events, done = _sse(r.text)
        assert done and events[-1]["error"]["code"] == 504
        assert "sent nothing for 0.3s" in events[-1]["error"]["message"]
        assert elapsed < 1.5
        assert backend.closed == 1  # the stuck engine stream was closed (its request aborted)
        assert s.sample("tandem_stream_stalls_total", model="small") == 1
        pools = s.gateway.admission.snapshot()["pools"]
        assert all(p["in_use"] == 0 for p in pools.values())


async def test_a_cut_stream_is_never_a_silent_success() -> None:
    backend = BreakingBackend("cut", after=2)
    await _started(backend)
    async with stack({"small": backend}, resilience={"streams": {"migration_limit": 0}}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=8))
        assert r.status_code == 502 and r.json()["error"]["code"] == 502
        assert "without a finish reason" in r.json()["error"]["message"]


async def test_a_client_error_mid_stream_is_not_migrated() -> None:
    backend = BreakingBackend("error", after=2, status=400)
    await _started(backend)
    async with stack({"small": backend}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=8, stream=True))
        events, done = _sse(r.text)
        assert done and events[-1]["error"]["code"] == 400
        assert len(backend.requests) == 1


async def test_a_continuation_that_finds_no_replica_yet_is_tried_again_without_counting_a_migration() -> None:
    want, _ = await _reference(10)
    backend = BreakingBackend("error", after=3, dead_for=4)
    await _started(backend)
    async with stack({"small": backend}, resilience={"streams": {"migration_limit": 1}}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=10))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        assert route(r)["migrations"] == "1"
        assert len(backend.requests) == 6  # the break, 4 tries on no replica, the continuation
        ids = [q.request_id.rsplit(".", 1)[-1] for q in backend.requests[1:]]
        assert ids == ["m1", "m1~1", "m1~2", "m1~3", "m1~4"]


async def test_an_engine_fault_mid_stream_is_not_migrated_and_ends_as_without_migration() -> None:
    # A 500 engine_error: the engine raised on this input; the continuation (the same prompt plus the
    # tokens sent) would fail the same way, so the client gets the error event and [DONE] at once.
    seen = []
    for limit in (3, 0):
        backend = BreakingBackend("error", after=2, status=500, err_type="engine_error")
        await _started(backend)
        async with stack({"small": backend}, resilience={"streams": {"migration_limit": limit}}) as s:
            body = chat(model="small", max_tokens=8, stream=True)
            r = await s.client.post("/v1/chat/completions", json=body)
            events, done = _sse(r.text)
            assert done and events[-1]["error"]["code"] == 500
            assert len(backend.requests) == 1  # no continuation
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
            assert len(text.split()) == 2
            # Classified before the limit, as a client error is (the request's own doing either way).
            labels = {"model": "small", "failure": "error"}
            assert s.sample("tandem_stream_migrations_total", **labels, result="engine_fault") == 1
            assert not s.sample("tandem_stream_migrations_total", **labels, result="migrated")
            pools = s.gateway.admission.snapshot()["pools"]
            assert all(p["in_use"] == 0 for p in pools.values())
            seen.append(events[-1]["error"])
    assert seen[0] == seen[1]  # what the client sees is what it would without migration


def test_policy_does_not_migrate_a_continuation_that_stalled_before_its_first_chunk() -> None:
    policy = MigrationPolicy(3)
    assert policy.decide(Failure.STALLED, None, 1, True, 5, None, progressed=False) == Decision(
        False, "no_progress"
    )
    assert policy.decide(Failure.STALLED, None, 1, True, 5, None, progressed=True) == Decision(
        True, "stalled"
    )
    # A continuation that found a dead replica (503) is not a stall: the replacement may still start.
    assert policy.decide(Failure.ERROR, 503, 1, True, 5, None, progressed=False) == Decision(True, "error")


async def test_a_stall_whose_continuation_stalls_too_ends_after_two_stall_timeouts_not_more() -> None:
    """The only replica is wedged: the stream stalls, its continuation lands on the same engine and
    sends nothing either. The client gets a 504 after about two stall timeouts (not one first-token
    timeout per allowed migration), and every slot is free."""
    backend = BreakingBackend("stall", after=2, stuck=True)
    await _started(backend)
    streams = {"stall_timeout_s": 0.3, "migration_limit": 3}
    async with stack({"small": backend}, resilience={"streams": streams}) as s:
        t0 = time.monotonic()
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=20, stream=True))
        elapsed = time.monotonic() - t0
        events, done = _sse(r.text)
        assert done and events[-1]["error"]["code"] == 504, events[-1]
        assert len(backend.requests) == 2  # the request and one continuation, no more
        assert elapsed < 3.0
        assert (
            s.sample("tandem_stream_migrations_total", model="small", failure="stalled", result="migrated")
            == 1
        )
        assert (
            s.sample("tandem_stream_migrations_total", model="small", failure="stalled", result="no_progress")
            == 1
        )
        pools = s.gateway.admission.snapshot()["pools"]
        assert all(p["in_use"] == 0 for p in pools.values())
