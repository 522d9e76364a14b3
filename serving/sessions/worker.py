"""Background reasoning sessions: a worker that owns each session until it is done.

A session is one `/v1/responses` request. The ingress stores it (serving.sessions.store) and tells a
worker; from then on the session belongs to a **worker** (a detached Serve replica, see
serving.sessions.server.SessionServer), not to any HTTP connection:

- the worker **claims** the session with a lease in the store and renews it while it runs; a worker
  that dies stops renewing, and any worker's sweep claims the orphan once the lease lapses;
- it generates through the model's engine deployment in legs (serving.thinking: reasoning budget,
  forced `</think>`), and **checkpoints** every `checkpoint_tokens` tokens (or `checkpoint_interval_s`):
  the new token ids and the stream events they produce go to the store in one transaction, fenced by
  the lease (a worker that lost its lease writes nothing);
- a claim **resumes** from the log: the stored ids are replayed as prompt (re-prefill) and the
  events already stored are not produced again, so no token or event is lost or duplicated;
- readers (the ingress) only ever read the store: polling, resuming a stream from an event number,
  or waiting for the end all work whatever happens to the ingress or the worker;
- cancel is a flag in the store; the owner polls it every `cancel_poll_s`, stops the engine call
  (which aborts the request at the engine) and finishes the session as cancelled;
- an engine leg that sends nothing for `resilience.streams.stall_timeout_s` after its first chunk (an
  engine alive but stuck) is closed, which aborts it, and fails like an error chunk: the session
  resumes from the ids it has, within its retry limits, or ends failed with `engine_stalled`;
- fairness: a worker runs at most `max_active_per_tenant` sessions of one tenant, and its sweep claims
  orphans round-robin across tenants (the store's `orphans` order);
- a store that does not answer (serving.sessions.store.store_unavailable) stops the run as a lost
  lease does: nothing is marked failed, the lease lapses and a sweep resumes the session from its
  last checkpoint once the store answers again.

What a session stores and readers see (response objects, numbered events) is shaped by
serving.sessions.events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from router.resilience import Retry, RetryPolicy, classify
from serving.replicas.engines.base import EngineError, GenerateRequest, SamplingOptions
from serving.sessions.events import (
    SUMMARY_MODES,
    TERMINAL_EVENTS,
    EventWriter,
    response_object,
)
from serving.sessions.request import SessionRequest
from serving.sessions.store import (
    Event,
    LeaseLost,
    SessionRecord,
    SessionStore,
    Status,
    StoreError,
    head_of,
    store_unavailable,
)
from serving.thinking import ReasoningState, StreamFn, ThinkingRun, ThinkTags, split_generated

logger = logging.getLogger(__name__)

#: Takeovers after which a session is failed rather than resumed again (its workers keep dying).
MAX_CLAIMS = 10
#: How often a worker deletes finished sessions past their TTL.
PURGE_PERIOD_S = 300.0


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(slots=True)
class SessionModel:
    """What a worker needs to generate for one model."""

    name: str
    stream: StreamFn
    decoder: Decoder
    tags: ThinkTags | None = None


# -- the worker -------------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerSettings:
    """A worker's knobs (from config.SessionsSpec: one source for every default)."""

    checkpoint_tokens: int
    checkpoint_interval_s: float
    lease_s: float
    sweep_interval_s: float
    cancel_poll_s: float
    max_active: int
    #: Engine legs: attempts in a row without progress, and the backoff between them.
    retry: RetryPolicy
    #: Sessions of one tenant run at once (None: no bound but max_active).
    max_active_per_tenant: int | None = None
    #: Most time between two chunks of a leg once it sent its first (resilience.streams.stall_timeout_s,
    #: the chat path's setting: a stuck engine is as stuck for a session); past it the leg has failed.
    #: None: no limit (tests that build settings by hand).
    stall_timeout_s: float | None = None

    @classmethod
    def from_spec(cls, spec: Any, streams: Any) -> WorkerSettings:
        """The knobs of config.SessionsSpec `spec`, with the stall timeout of `streams`
        (config.StreamResilienceSpec)."""
        return cls(
            checkpoint_tokens=spec.checkpoint_tokens,
            checkpoint_interval_s=spec.checkpoint_interval_s,
            lease_s=spec.lease_s,
            sweep_interval_s=spec.sweep_interval_s,
            cancel_poll_s=spec.cancel_poll_s,
            max_active=spec.max_active_per_worker,
            retry=spec.retry_policy(),
            max_active_per_tenant=spec.max_active_per_tenant,
            stall_timeout_s=streams.stall_timeout_s,
        )


class _LegFailed(Exception):
    """An engine leg ended without finishing: an error chunk, an abort, or a stall (`stalled`: no chunk
    for `stall_timeout_s`, after `chunks` chunks of that leg)."""

    def __init__(self, error: EngineError, stalled: bool = False, chunks: int = 0) -> None:
        super().__init__(error.message)
        self.error = error
        self.stalled = stalled
        self.chunks = chunks


@dataclass(slots=True)
class _Active:
    task: asyncio.Task
    tenant: str = ""
    cancel_requested: bool = False
    lost: bool = False


class SessionWorker:
    """Claims, runs, checkpoints and finishes sessions (pure asyncio; the Serve wrapper is
    serving.sessions.server.SessionServer).

    Args:
        store: the durable log (calls run in threads).
        models: model name → what generating for it takes.
        settings: checkpoint, lease and retry knobs.
        owner: this worker's unique id (its lease holder name).
        on_finished: called with the finished record's id, tenant and final object (webhooks).
    """

    def __init__(
        self,
        store: SessionStore,
        models: dict[str, SessionModel],
        settings: WorkerSettings,
        owner: str | None = None,
        on_finished: Callable[[SessionRecord, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.settings = settings
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"
        self._on_finished = on_finished
        self._active: dict[str, _Active] = {}
        #: Sessions being claimed (the slot is taken before the claim's await) → their tenant.
        self._claiming: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self.resumed = 0
        self.completed: dict[str, int] = {}

    # -- lifecycle --

    def start(self) -> None:
        """Start the sweep, lease and cancel loops (on the running event loop)."""
        s = self.settings
        self._loops = [
            asyncio.create_task(self._every(s.sweep_interval_s, self.sweep), name="sessions-sweep"),
            asyncio.create_task(self._every(s.lease_s / 3, self._renew), name="sessions-lease"),
            asyncio.create_task(self._every(s.cancel_poll_s, self._poll_cancels), name="sessions-cancel"),
            asyncio.create_task(self._every(PURGE_PERIOD_S, self._purge), name="sessions-purge"),
        ]

    async def close(self) -> None:
        """Stop everything; the sessions still running are handed back to the store (their leases
        expire at once) for another worker to resume."""
        # The loops stop after their current round: a lease renewal still running in its thread
        # must not land after the hand-back below.
        self._stop.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        held = list(self._active)
        for a in self._active.values():
            a.lost = True
            a.task.cancel()
        await asyncio.gather(*self._loops, *(a.task for a in self._active.values()), return_exceptions=True)
        self._loops.clear()
        if held:
            # Expire our leases now: another worker resumes these sessions at its next sweep.
            await asyncio.to_thread(self.store.renew, self.owner, held, -1.0)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    async def _every(self, period: float, fn: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("session worker loop %s failed", getattr(fn, "__name__", fn))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)

    # -- claiming --

    def _busy(self, session_id: str) -> bool:
        return (
            session_id in self._active
            or session_id in self._claiming
            or len(self._active) + len(self._claiming) >= self.settings.max_active
        )

    def _running(self, tenant: str) -> int:
        """Sessions of `tenant` this worker runs or is claiming."""
        return sum(a.tenant == tenant for a in self._active.values()) + sum(
            t == tenant for t in self._claiming.values()
        )

    async def submit(self, session_id: str) -> bool:
        """Claim `session_id` and run it here; False if it is full (or full for its tenant), taken or
        finished."""
        if self._busy(session_id):
            return False
        cap = self.settings.max_active_per_tenant
        tenant = ""
        if cap is not None:
            # Read the tenant before claiming: a claim given back would count as a takeover.
            self._claiming[session_id] = ""  # the slot, held across the await
            try:
                head = await asyncio.to_thread(head_of, self.store, session_id)
            finally:
                del self._claiming[session_id]
            if head is None or head.status.finished or self._busy(session_id):
                return False
            tenant = head.tenant
            if self._running(tenant) >= cap:
                return False
        # Reserve the slot before the claim's await: a notify and a sweep may submit at once.
        self._claiming[session_id] = tenant
        try:
            rec = await asyncio.to_thread(self.store.claim, session_id, self.owner, self.settings.lease_s)
        finally:
            del self._claiming[session_id]
        if rec is None:
            return False
        if rec.claims > 1:
            self.resumed += 1
            logger.info("session %s taken over by %s (claim %d)", session_id, self.owner, rec.claims)
        task = asyncio.create_task(self._run(rec), name=f"session-{session_id}")
        self._active[session_id] = _Active(task, rec.tenant)
        task.add_done_callback(lambda _: self._active.pop(session_id, None))
        return True

    async def sweep(self) -> int:
        """Claim orphaned sessions (unowned, or their owner's lease lapsed) while there is room, in the
        store's round-robin order across tenants, skipping tenants at max_active_per_tenant."""
        s = self.settings
        room = s.max_active - len(self._active) - len(self._claiming)
        if room <= 0:
            return 0
        # With a per-tenant bound some candidates may be skipped: read a worker's worth more.
        want = room if s.max_active_per_tenant is None else room + s.max_active
        ids = await asyncio.to_thread(self.store.orphans, None, want)
        taken = 0
        for sid in ids:
            if len(self._active) + len(self._claiming) >= s.max_active:
                break
            taken += await self.submit(sid)
        return taken

    async def _renew(self) -> None:
        ids = list(self._active)
        if not ids:
            return
        held = await asyncio.to_thread(self.store.renew, self.owner, ids, self.settings.lease_s)
        for sid in set(ids) - held:
            a = self._active.get(sid)
            if a is not None:
                logger.warning("session %s: lease lost by %s; stopping here", sid, self.owner)
                a.lost = True
                a.task.cancel()

    async def _purge(self) -> None:
        n = await asyncio.to_thread(self.store.purge_expired)
        if n:
            logger.info("purged %d expired sessions", n)

    async def _poll_cancels(self) -> None:
        if not self._active:
            return
        for sid in await asyncio.to_thread(self.store.cancels, self.owner):
            a = self._active.get(sid)
            if a is not None and not a.cancel_requested:
                a.cancel_requested = True
                a.task.cancel()

    async def cancel(self, session_id: str) -> bool:
        """Cancel a session this worker runs (the store's flag is the durable way; this is quicker)."""
        a = self._active.get(session_id)
        if a is None:
            return False
        a.cancel_requested = True
        a.task.cancel()
        return True

    # -- running one session --

    async def _run(self, rec: SessionRecord) -> None:
        sid = rec.id
        try:
            await _SessionRun(self, rec).run()
        except asyncio.CancelledError:
            a = self._active.get(sid)
            if a is not None and a.cancel_requested and not a.lost:
                return  # finished as cancelled inside
            raise
        except LeaseLost:
            logger.warning("session %s: lease lost by %s", sid, self.owner)
        except Exception as e:
            if store_unavailable(e):
                # A blip, not a fault of the session: stop here and let the lease lapse; a sweep
                # (this worker's or another's) resumes it from its last checkpoint.
                logger.warning(
                    "session %s: the store did not answer (%s: %s); %s stops, the session resumes "
                    "after its lease lapses", sid, type(e).__name__, e, self.owner,
                )  # fmt: skip
                return
            # A fault here would fail again on every takeover: end the session as failed instead.
            logger.exception("session %s failed in worker %s", sid, self.owner)
            with contextlib.suppress(Exception):
                await _SessionRun(self, rec).fail("internal_error", f"{type(e).__name__}: {e}")

    async def report(self, session_id: str) -> bool:
        """Run `on_finished` for a session that ended without a worker (cancelled at the ingress
        while queued: `cancel_session_here`); False if it is not such a session. The cancel recorded
        its webhook in the store's outbox, so `on_finished` (the CompletionNotifier) delivers it from
        there at once, and without a report a notifier's poll does; its webhook id is that of its
        (id, status), so a repeated report is one event to the receiver."""
        rec = await asyncio.to_thread(self.store.get_any, session_id)
        if rec is None or rec.status is not Status.CANCELLED or rec.result is None:
            return False
        self._finished(rec, rec.result)
        return True

    def _finished(self, rec: SessionRecord, obj: dict[str, Any]) -> None:
        self.completed[obj["status"]] = self.completed.get(obj["status"], 0) + 1
        if self._on_finished is not None:
            try:
                self._on_finished(rec, obj)
            except Exception:
                logger.exception("on_finished hook failed for %s", rec.id)


class _SessionRun:
    """One claim of one session: resume from the log, generate, checkpoint, finish."""

    def __init__(self, worker: SessionWorker, rec: SessionRecord) -> None:
        self.w = worker
        self.rec = rec
        self.req = SessionRequest.from_dict(rec.request)
        self.model = worker.models.get(rec.model)
        self.generated: list[int] = []
        self.stored = 0  # ids already in the store
        self.last_ckpt = time.monotonic()
        self.writer: EventWriter | None = None
        self.cached = 0
        self.done = False
        self._pending: asyncio.Future | None = None

    async def run(self) -> None:
        w, rec = self.w, self.rec
        store = w.store
        tags = self.model.tags if self.model is not None else None
        self.generated, events = await asyncio.gather(
            asyncio.to_thread(store.tokens, rec.id), asyncio.to_thread(store.events, rec.id)
        )
        self.stored = len(self.generated)
        self.writer = EventWriter.from_events(rec.id, tags is not None, self.req.summary, events)
        if self.writer.finished:
            return
        start = self.writer.start(response_object(rec, Status.IN_PROGRESS))
        if start:
            await self._write(lambda: store.checkpoint(rec.id, w.owner, self.stored, [], start))
        if self.model is None:
            await self._finish(Status.FAILED, error=("model_not_served", f"{rec.model} is not served"))
            return
        if rec.claims > MAX_CLAIMS:
            # Every worker that took it died with it (e.g. out of memory): stop trying.
            await self._finish(
                Status.FAILED, error=("too_many_takeovers", f"the session was resumed {rec.claims - 1} times")
            )
            return
        failures = 0
        try:
            while True:
                progress_at = len(self.generated)
                run = ThinkingRun(
                    self.model.stream,
                    self._request(),
                    self.req.max_output_tokens,
                    self.req.reasoning_budget,
                    tags,
                    self.generated,
                )
                try:
                    await self._consume(run)
                except _LegFailed as e:
                    await self._checkpoint(force=True)
                    # Failures count legs in a row without progress (a leg that made some resets them).
                    # NOTE(stalls): a leg that stalled after its first chunk made none: an engine that
                    # answers each leg once and then hangs would otherwise resume the session chunk by
                    # chunk, stall_timeout_s each, holding its lease for as long as max_output_tokens lasts.
                    progressed = len(self.generated) > progress_at and not (e.stalled and e.chunks <= 1)
                    failures = 0 if progressed else failures + 1
                    err = e.error
                    # The error type tells an engine fault (500 engine_error: the same input fails the
                    # same way) from a server error: the former is not retried (router.resilience).
                    step = w.settings.retry.next_step(
                        classify(err.status, e.stalled, err.type), failures, retry_after_s=err.retry_after_s
                    )
                    if not isinstance(step, Retry):  # a session has no other target to go to
                        await self._finish(Status.FAILED, error=(err.type, err.message))
                        return
                    delay = step.delay_s
                    logger.warning(
                        "session %s: engine call failed (%s); resuming from %d tokens in %.2fs",
                        rec.id, err.message, len(self.generated), delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                break
        except asyncio.CancelledError:
            a = w._active.get(rec.id)
            if a is not None and a.cancel_requested and not a.lost:
                # Cancelled by the client: the engine call is already closed (aborted) by the
                # ThinkingRun's finally; record what was generated and end the session.
                await asyncio.shield(self._cancelled())
            raise
        reason = run.finish_reason
        if reason == "length":
            await self._finish(Status.INCOMPLETE, incomplete="max_output_tokens")
        else:
            await self._finish(Status.COMPLETED)

    async def fail(self, code: str, message: str) -> None:
        """End the session as failed with what the store holds (after an unexpected fault)."""
        store = self.w.store
        self.generated, events = await asyncio.gather(
            asyncio.to_thread(store.tokens, self.rec.id), asyncio.to_thread(store.events, self.rec.id)
        )
        self.stored = len(self.generated)
        has_tags = self.model is not None and self.model.tags is not None
        self.writer = EventWriter.from_events(self.rec.id, has_tags, self.req.summary, events)
        if not self.writer.finished:
            await self._finish(Status.FAILED, error=(code, message))

    async def _cancelled(self) -> None:
        if self.done:
            return
        # A lost lease: another worker holds the session now and sees the cancel flag itself.
        with contextlib.suppress(LeaseLost):
            await self._checkpoint(force=True)
            await self._finish(Status.CANCELLED)

    async def _write(self, fn: Callable[[], Any]) -> Any:
        """Run a store write in a thread, one at a time. The write is shielded: a cancel (client
        cancel, lost lease) does not leave it half-seen — the next write waits for it first, and
        what it records about progress is updated by the write itself."""
        prev = self._pending

        async def write() -> Any:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            return await asyncio.to_thread(fn)

        # Queued before any await, so a cancel cannot fall between the previous write and this one.
        self._pending = asyncio.ensure_future(write())
        return await asyncio.shield(self._pending)

    def _request(self) -> GenerateRequest:
        s = dict(self.req.sampling)
        s["max_tokens"] = self.req.max_output_tokens
        return GenerateRequest(
            request_id=f"{self.rec.id}-{self.rec.claims}",
            prompt_token_ids=self.req.prompt_ids,
            sampling=SamplingOptions(**s),
            cache_salt=self.req.cache_salt,
            block_keys=self.req.block_keys,
            tenant=self.rec.tenant,
            session_id=self.rec.id,
        )

    async def _consume(self, run: ThinkingRun) -> None:
        """Read `run` to its end, checkpointing as it goes; `_LegFailed` if it does not finish (an error
        chunk, an abort, or no chunk for `stall_timeout_s` once the first one came: the engine stream is
        closed, which aborts the request there, and the caller resumes from `self.generated`)."""
        it = run.chunks()
        stall_s = self.w.settings.stall_timeout_s
        chunks = 0
        try:
            while True:
                # The first chunk waits for its prefill and the engine's queue (a background session may
                # wait long there); after it, the stall timeout (a run's later legs included).
                deadline = asyncio.timeout(stall_s if chunks else None)
                try:
                    async with deadline:
                        chunk = await anext(it)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    error = EngineError(f"the engine sent nothing for {stall_s:g}s", 504, "engine_stalled")
                    raise _LegFailed(error, stalled=True, chunks=chunks) from None
                chunks += 1
                if chunk.error is not None:
                    raise _LegFailed(chunk.error)
                if chunk.cached_tokens and not self.cached:
                    self.cached = chunk.cached_tokens
                self.generated = run.generated
                if chunk.finish_reason == "abort":
                    raise _LegFailed(EngineError("the engine aborted the request", 503, "aborted"))
                if chunk.finish_reason is None:
                    await self._checkpoint()
        finally:
            await it.aclose()
        self.generated = run.generated

    def _texts(self, final: bool = False) -> tuple[str, str, bool]:
        """(reasoning text, answer text, reasoning over) of the ids generated so far."""
        assert self.model is not None
        gen = self.generated
        tags = self.model.tags
        r, a = split_generated(self.req.prompt_ids, gen, tags)
        reasoning_ids = gen[r:a]
        if tags is not None and reasoning_ids and reasoning_ids[-1] == tags.end:
            reasoning_ids = reasoning_ids[:-1]
        state = ReasoningState(self.req.prompt_ids, tags)
        for t in gen:
            state.feed(t)
        closed = state.state == "answer"
        dec = self.model.decoder
        w = self.writer
        # Hidden reasoning is never decoded: only `full` streams it and a summary needs it once.
        shown = w is not None and (w.full or w.summary in SUMMARY_MODES and (final or not w.reasoning_done))
        reasoning = dec.decode(reasoning_ids) if reasoning_ids and shown else ""
        answer = dec.decode(gen[a:]) if a < len(gen) else ""
        return reasoning, answer, closed

    async def _checkpoint(self, force: bool = False) -> None:
        s = self.w.settings
        new = len(self.generated) - self.stored
        due = new >= s.checkpoint_tokens or time.monotonic() - self.last_ckpt >= s.checkpoint_interval_s
        if new <= 0 or not (due or force):
            return
        ids = self.generated[self.stored :]
        start = self.stored
        assert self.writer is not None

        def write() -> None:
            reasoning, answer, closed = self._texts()
            events = self.writer.progress(reasoning, answer, closed, final=False)
            self.w.store.checkpoint(self.rec.id, self.w.owner, start, ids, events)
            self.stored = start + len(ids)
            self.last_ckpt = time.monotonic()

        await self._write(write)

    def _usage(self) -> dict[str, Any]:
        tags = self.model.tags if self.model else None
        r, a = split_generated(self.req.prompt_ids, self.generated, tags)
        reasoning = a - r - (1 if tags is not None and a > r and self.generated[a - 1] == tags.end else 0)
        out = len(self.generated)
        return {
            "input_tokens": len(self.req.prompt_ids),
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": max(0, reasoning)},
            "total_tokens": len(self.req.prompt_ids) + out,
        }

    async def _finish(
        self, status: Status, error: tuple[str, str] | None = None, incomplete: str | None = None
    ) -> None:
        """Write the end of the session (shielded: a cancel arriving now cannot cut it in half)."""
        if self.done:
            return
        self.done = True
        try:
            final = await self._write(lambda: self._finish_sync(status, error, incomplete))
        except asyncio.CancelledError:
            # Cancelled while the end was being written: see the write through, report it, stop.
            assert self._pending is not None
            final = await asyncio.shield(self._pending)
            self.w._finished(self.rec, final)
            raise
        self.w._finished(self.rec, final)

    def _finish_sync(
        self, status: Status, error: tuple[str, str] | None, incomplete: str | None
    ) -> dict[str, Any]:
        rec, w = self.rec, self.w
        writer = self.writer or EventWriter(rec.id, False, None)
        reasoning, answer, closed = "", "", False
        if self.model is not None and self.generated:
            try:
                reasoning, answer, closed = self._texts(final=True)
            except Exception:  # failing because decoding fails: end with what was sent
                if status is not Status.FAILED:
                    raise
                reasoning, answer, closed = writer.reasoning_sent, writer.answer_sent, writer.message_open
        events = writer.close(reasoning, answer, closed, cancelled=status is Status.CANCELLED)
        obj = dict(response_object(rec, status), status=status.value)
        obj.update(
            output=writer.output(reasoning),
            usage=self._usage() if self.model is not None else None,
            completed_at=int(time.time()),
            error={"code": error[0], "message": error[1]} if error else None,
            incomplete_details={"reason": incomplete} if incomplete else None,
        )
        events.append(writer.terminal(obj))
        w.store.checkpoint(rec.id, w.owner, self.stored, self.generated[self.stored :], [])
        self.stored = len(self.generated)
        w.store.finish(rec.id, w.owner, status, obj, events)
        return obj


def cancel_session(store: SessionStore, session_id: str, tenant: str) -> SessionRecord | None:
    """Ask for a session to be cancelled (blocking; run it in a thread); the record after it (None:
    the tenant has no session by that id). See `cancel_session_here`."""
    return cancel_session_here(store, session_id, tenant)[0]


def cancel_session_here(
    store: SessionStore, session_id: str, tenant: str
) -> tuple[SessionRecord | None, bool]:
    """Ask for a session to be cancelled (blocking; run it in a thread). A session no worker holds
    is cancelled on the spot, and its stream gets its terminal event here. Returns the record after
    it and whether it was ended here (no worker runs its `on_finished` then: the caller reports it,
    see `SessionWorker.report`; its webhook is in the store's outbox already, written with the
    cancelled status).

    A delete that lands meanwhile wins: the store writes nothing for a session that is gone (no
    orphan event is left) and this answers None, as for a session that never existed. A second
    cancel writing the same end at once is harmless too (the first one's end stands)."""
    rec = store.request_cancel(session_id, tenant)
    if rec is None or rec.status is not Status.CANCELLED or rec.owner is not None:
        return rec, False
    events = store.events(session_id)
    here = not any(ev.type in TERMINAL_EVENTS for ev in events)
    if here:
        obj = dict(response_object(rec, Status.CANCELLED), status="cancelled")
        seq = events[-1].seq + 1 if events else 0
        data = {"type": "response.cancelled", "sequence_number": seq, "response": obj}
        try:
            store.append_events(session_id, [Event(seq, "response.cancelled", data)])
            store.set_status(session_id, Status.CANCELLED, obj)
        except StoreError as e:  # deleted meanwhile ("no session"), or another cancel's end stored
            logger.info("cancel of %s raced another write (%s)", session_id, e)
            here = False
    return store.get(session_id, tenant), here
