"""Shared helpers of the session tests (test_sessions.py, test_responses_api.py): a tiny reversible
tokenizer, stream-function wrappers (record, stop, fail, gate), reference runs and event-log checks.

Token layout with the FakeEngine ("next id = last id + 1"): a chat prompt ends with the opening tag
START, so the reasoning block is open from the first generated token; the reasoning ids are
START+1, START+2, … and never reach END (far away), so only the budget closes the block. After the
forced END the answer continues END+1, END+2, … (and `StopAt(EOS)` ends it with a stop).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from router.resilience import RetryPolicy
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest, SamplingOptions
from serving.sessions.events import TERMINAL_EVENTS
from serving.sessions.store import Event, SessionRecord, SQLiteStore, Status
from serving.sessions.worker import WorkerSettings
from serving.thinking import StreamFn, ThinkingRun, ThinkTags, split_generated

START, END = 100, 4000
TAGS = ThinkTags(START, END)
VOCAB = 4096
#: An answer id that `StopAt` turns into a stop (the 10th answer token after a forced END).
EOS = END + 10
_ROLES = {"system": 4, "developer": 5, "user": 6, "assistant": 7, "tool": 8}
_TOKEN = re.compile(r"^t(\d+)$")


class Tok:
    """Reversible on generated text: id i decodes to " t<i>", and the word "t<i>" encodes to i. Other
    words get ids in 10..89. A chat prompt is [1] + per message [role, words…, 3] + [START]."""

    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            m = _TOKEN.match(word)
            out.append(int(m.group(1)) if m else 10 + sum(map(ord, word)) % 80)
        return out

    def encode_chat(self, messages: list[Any]) -> list[int]:
        ids = [1]
        for m in messages:
            ids += [_ROLES[m.role], *self.encode(m.text()), 3]
        return ids + [START]

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


TOK = Tok()


def prompt(*words: str) -> list[int]:
    """A prompt that opens the reasoning block (ends with START)."""
    return [1, 6, *(10 + sum(map(ord, w)) % 80 for w in words), 3, START]


def close_store(store: SQLiteStore) -> None:
    """Close the store (SQLiteStore.close waits for calls still running in threads: a cancelled
    worker task may leave one behind)."""
    store.close()


def settings(**kw: Any) -> WorkerSettings:
    """Fast worker knobs for tests."""
    base: dict[str, Any] = {
        "checkpoint_tokens": 4,
        "checkpoint_interval_s": 0.05,
        "lease_s": 2.0,
        "sweep_interval_s": 0.05,
        "cancel_poll_s": 0.02,
        "max_active": 8,
    }
    retry = {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
    for k in retry:
        if k in kw:
            retry[k] = kw.pop(k)
    base.update(kw)
    return WorkerSettings(**base, retry=RetryPolicy(**retry))


def new_store(tmp_path: Any) -> SQLiteStore:
    return SQLiteStore(
        tmp_path / "sessions.db", ttl_s=3600, max_sessions_per_tenant=100, max_bytes_per_tenant=10**8
    )


def record(
    rid: str,
    prompt_ids: list[int],
    max_output_tokens: int,
    budget: int | None = None,
    summary: str | None = None,
    model: str = "r",
    tenant: str = "a",
) -> SessionRecord:
    """A session record as the /v1/responses route stores it."""
    return SessionRecord(
        id=rid,
        tenant=tenant,
        model=model,
        request={
            "prompt_ids": prompt_ids,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "seed": None},
            "max_output_tokens": max_output_tokens,
            "max_output_tokens_asked": max_output_tokens,
            "reasoning_budget": budget,
            "summary": summary,
            "cache_salt": None,
            "block_keys": [],
            "background": True,
            "instructions": None,
            "metadata": {},
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": summary, "max_tokens": budget},
            "messages": [],
        },
    )


async def wait_until(pred: Callable[[], Any], within_s: float = 5.0, step_s: float = 0.01) -> Any:
    """Poll `pred` until it is truthy (its value) or fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(step_s)


async def wait_finished(
    store: SQLiteStore, rid: str, tenant: str = "a", within_s: float = 5.0
) -> SessionRecord:
    def done() -> SessionRecord | None:
        rec = store.get(rid, tenant)
        return rec if rec is not None and rec.status.finished else None

    return await wait_until(done, within_s)


# -- stream functions ---------------------------------------------------------------------------------


class Recorder:
    """A stream function that records each leg's request and passes it on."""

    def __init__(self, inner: StreamFn) -> None:
        self.inner = inner
        self.requests: list[GenerateRequest] = []
        self.running = 0
        self.peak = 0

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        self.running += 1
        self.peak = max(self.peak, self.running)
        it = self.inner(request)
        try:
            async for chunk in it:
                yield chunk
        finally:
            self.running -= 1
            await it.aclose()


class StopAt:
    """Ends a leg with finish_reason "stop" at token `eos` (like an engine's EOS)."""

    def __init__(self, inner: StreamFn, eos: int = EOS) -> None:
        self.inner = inner
        self.eos = eos

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        it = self.inner(request)
        try:
            async for chunk in it:
                if self.eos in chunk.token_ids:
                    yield Chunk(
                        text=chunk.text,
                        token_ids=chunk.token_ids,
                        finish_reason="stop",
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens,
                    )
                    return
                yield chunk
        finally:
            await it.aclose()


class Flaky:
    """Fails its first `times` calls with an error chunk (`status`) after `after` tokens."""

    def __init__(
        self, inner: StreamFn, after: int, status: int, times: int, type_: str = "engine_error"
    ) -> None:
        self.inner = inner
        self.after = after
        self.status = status
        self.times = times
        self.type = type_
        self.calls: list[GenerateRequest] = []

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls.append(request)
        fail = len(self.calls) <= self.times
        n = 0
        it = self.inner(request)
        try:
            if not (fail and self.after == 0):
                async for chunk in it:
                    yield chunk
                    n += len(chunk.token_ids)
                    if fail and n >= self.after:
                        break
            if fail:
                yield Chunk(error=EngineError(f"fake {self.status}", self.status, self.type))
        finally:
            await it.aclose()


class Gate:
    """Passes `after` tokens, then holds the leg until `release()` (a stalled but living worker)."""

    def __init__(self, inner: StreamFn, after: int) -> None:
        self.inner = inner
        self.after = after
        self.open = asyncio.Event()
        self.waiting = asyncio.Event()
        self.tokens_after_release = 0

    def release(self) -> None:
        self.open.set()

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        n = 0
        it = self.inner(request)
        try:
            async for chunk in it:
                if n >= self.after and not self.open.is_set():
                    self.waiting.set()
                    await self.open.wait()
                if self.open.is_set():
                    self.tokens_after_release += len(chunk.token_ids)
                yield chunk
                n += len(chunk.token_ids)
        finally:
            await it.aclose()


# -- references and checks ----------------------------------------------------------------------------


async def reference_run(
    stream: StreamFn,
    prompt_ids: list[int],
    max_tokens: int,
    budget: int | None,
    tags: ThinkTags | None = TAGS,
) -> tuple[list[int], str | None]:
    """The ids (and finish reason) of an uninterrupted ThinkingRun."""
    req = GenerateRequest("reference", list(prompt_ids), SamplingOptions(max_tokens=max_tokens))
    run = ThinkingRun(stream, req, max_tokens, budget, tags)
    async for _ in run.chunks():
        pass  # only the run's final state is wanted
    return run.generated, run.finish_reason


def split_ids(
    prompt_ids: list[int], generated: list[int], tags: ThinkTags | None = TAGS
) -> tuple[list[int], list[int]]:
    """(reasoning ids without the closing tag, answer ids)."""
    r, a = split_generated(prompt_ids, generated, tags)
    reasoning = generated[r:a]
    if tags is not None and reasoning and reasoning[-1] == tags.end:
        reasoning = reasoning[:-1]
    return reasoning, generated[a:]


def event_data(events: list[Event] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e.data if isinstance(e, Event) else e for e in events]


def check_event_log(
    events: list[Event] | list[dict[str, Any]], result: dict[str, Any] | None = None, items: bool = True
) -> dict[str, str]:
    """Assert a session's whole event log is well formed; returns the concatenated deltas by kind.

    Sequence numbers 0..n-1 in order; response.created then response.in_progress; exactly one terminal
    event, the last, carrying `result`; the items the log opens and closes are the final object's
    output (unless not `items`); the message's deltas concatenate to its final text.
    """
    data = event_data(events)
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    types = [d["type"] for d in data]
    assert types[:2] == ["response.created", "response.in_progress"], types[:3]
    terminal = [i for i, t in enumerate(types) if t in TERMINAL_EVENTS]
    assert terminal == [len(data) - 1], types
    final = data[-1]["response"]
    if result is not None:
        assert final == result
    assert final["status"] == types[-1].removeprefix("response.")
    added = [d["item"]["id"] for d in data if d["type"] == "response.output_item.added"]
    done = [d["item"] for d in data if d["type"] == "response.output_item.done"]
    assert [item["id"] for item in done] == added, "every item opened is closed once, in order"
    if items:
        assert done == final["output"], "the items of the log are the final output"
    answer = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    reasoning = "".join(d["delta"] for d in data if d["type"] == "response.reasoning_text.delta")
    messages = [item for item in final["output"] if item["type"] == "message"]
    if messages:
        assert messages[0]["content"][0]["text"] == answer
        text_done = [d for d in data if d["type"] == "response.output_text.done"]
        assert len(text_done) == 1 and text_done[0]["text"] == answer
    else:
        assert answer == ""
    return {"answer": answer, "reasoning": reasoning}


def ids_in_text(text: str) -> set[int]:
    """Token ids rendered as " t<id>" anywhere in `text` (an event log dumped as JSON)."""
    return {int(m) for m in re.findall(r"(?<![\w])t(\d+)", text)}


def dump(obj: Any) -> str:
    return json.dumps(obj)


def status_of(store: SQLiteStore, rid: str, tenant: str = "a") -> Status | None:
    rec = store.get(rid, tenant)
    return None if rec is None else rec.status
