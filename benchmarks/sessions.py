"""What durable background sessions cost next to a plain streamed chat completion.

    python -m benchmarks.sessions [--config configs/local.yaml] [--model tiny-reasoning]
        [--requests 8] [--concurrency 4] [--max-output-tokens 256] [--reasoning-budget 64]
        [--checkpoint-tokens 16] [--checkpoint-interval S] [--stream-poll S] [--get-poll 0.05]
        [--prompt TEXT] [--warmup 2] [--no-gc-freeze] [--json FILE]

Method
------
One real vLLM engine for the model (a reasoning model: the spec gives it `reasoning` tags) is built
in this process from its first pool's engine args and env (for tiny-reasoning: float32,
`enforce_eager`, the `uni` executor, a 1 GiB KV cache; no KV-transfer connector, the engine runs
colocated), plus `VLLM_ENABLE_V1_MULTIPROCESSING=0` (the model worker stays inside the engine core).
It is wrapped in the Tandem API (`serving.http.api.build_api`, an open gateway: no auth, no admission)
with `/v1/responses` served by a `SessionsFrontend` over a `SQLiteStore` in a temporary directory
and one `SessionWorker` in the same event loop, both with the spec's `sessions` settings except
`--checkpoint-tokens` (and `--checkpoint-interval` / `--stream-poll` when given). A client in the
same process talks to it over `benchmarks.asgi.StreamingASGITransport` (no Ray, no sockets).

Every request is the same: one fixed user message, greedy decoding (temperature 0), at most
`--max-output-tokens` tokens in all, of which at most `--reasoning-budget` reasoning tokens
(tiny-reasoning's template opens `<think>` and the model never closes it itself, so the budget
forces `</think>` and the answer fills the rest). Three modes:

- **chat**: `POST /v1/chat/completions` with `stream: true`, `max_tokens`, `max_reasoning_tokens`;
  first = time to the first SSE frame (the first token), total = time to `[DONE]`.
- **stream**: `POST /v1/responses` with `stream: true` (not background), `max_output_tokens`,
  `reasoning.max_tokens`; first = time to the first event (`response.created`, written when the
  worker starts the session), first text = time to the first `response.output_text.delta` (after
  the whole reasoning block, which is hidden), total = time to the terminal event.
- **background**: the same with `background: true`, then `GET /v1/responses/{id}` every
  `--get-poll` s until it is finished; total = from sending the POST to the GET that sees it done.

After a warm-up (`--warmup` requests of each mode, then the start-up heap is frozen out of the
garbage collector unless `--no-gc-freeze`, as in benchmarks.admission), two phases:

1. **sequential**: `--requests` rounds of one request of each mode, one at a time;
2. **concurrent**: `--requests` requests per mode in batches of `--concurrency` simultaneous
   requests of one mode, the modes taking turns batch by batch.

In both phases the order of the modes rotates every round (chat, stream, background; then stream,
background, chat; …), so that drift of the machine and the engine's occasional slow batches (on the
2-core development machine, vLLM's CPU engine now and then runs a batch 2-10x slower, with no
Tandem code involved) hit every mode alike. Identical requests started together finish together,
so a batch is what a closed loop of `--concurrency` workers amounts to here.

tok/s = output tokens / total per request (p50), and for the phase: a mode's output tokens / the
summed wall time of its batches. Overhead = a mode's p50 (p90) total over chat's, in %.
Store figures, per session of a mode: token chunks in the `tokens` table (the checkpoints that
wrote tokens), events, the `bytes` column (request + events + tokens + result), and the mean / p90
time of `SQLiteStore.checkpoint` calls (wrapped on the instance, timed in the worker's thread,
lock wait included) and of `finish`. The database file's growth per session is measured at the end
after a WAL checkpoint (pages, indexes and free space included).

Checks (BenchmarkError): every chat completion reports the same `completion_tokens` and
`reasoning_tokens == --reasoning-budget`; every session ends completed or incomplete with
`output_tokens` equal to chat's `completion_tokens` and the same reasoning tokens; a streamed
session's events are numbered 0, 1, 2, … with exactly one terminal event, last, and its
`output_text.delta`s add up to the final message text.

Caveats
-------
* Client, API, session worker, store and vLLM's front end share one Python process, one event loop
  and (store calls) asyncio's default thread pool; on a 2-core machine their CPU use is in every
  figure. Chat has none of the store work, so the overhead includes the CPU the log costs, not
  only the waits.
* The stream and background modes read the store by polling (`--stream-poll`, `--get-poll`): up to
  one poll period is added to each first/last event by design of the frontend.
* Same prompt every time: after the first request the prompt is in vLLM's prefix cache for every
  mode alike (one tenant, one cache salt).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.asgi import StreamingASGITransport
from benchmarks.common import BenchmarkError, load_average, machine_info, percentile, run_main
from benchmarks.stack import child_pids, pool_env, wait_for_exit
from serving.config import ModelSpec, ServingSpec, default_config_path, load_spec

logger = logging.getLogger(__name__)

MODES = ("chat", "stream", "background")
#: `status` values a finished session may have here (max_output_tokens reached: incomplete).
OK_STATUSES = ("completed", "incomplete")
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "response.cancelled"})
DEFAULT_PROMPT = (
    "A train leaves at 9:40 and arrives at 13:05 after two stops of 7 minutes each. "
    "How long does it actually drive? Think it through step by step."
)
_HTTP_TIMEOUT_S = 300.0
_SETTLE_TIMEOUT_S = 30.0
_FINISH_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """What to run."""

    config: str
    model: str
    requests: int
    concurrency: int
    max_output_tokens: int
    reasoning_budget: int
    checkpoint_tokens: int
    #: None: the spec's `sessions.checkpoint_interval_s` / `sessions.stream_poll_s`.
    checkpoint_interval_s: float | None
    stream_poll_s: float | None
    get_poll_s: float
    prompt: str
    warmup: int
    gc_freeze: bool


def parse_args(argv: list[str] | None) -> tuple[Params, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sessions",
        description="Background sessions (/v1/responses) vs a streamed chat completion: latency, "
        "throughput and store cost.",
    )
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    p.add_argument("--model", default="tiny-reasoning", help="reasoning model (from the spec)")
    p.add_argument("--requests", type=int, default=8, help="requests per mode and phase")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop workers of the concurrent phase")
    p.add_argument("--max-output-tokens", type=int, default=256, help="tokens generated in all")
    p.add_argument("--reasoning-budget", type=int, default=64, help="reasoning tokens (forced </think>)")
    p.add_argument("--checkpoint-tokens", type=int, default=16, help="session checkpoint every N tokens")
    p.add_argument(
        "--checkpoint-interval", type=float, default=None, help="...or every S seconds (default: the spec's)"
    )
    p.add_argument(
        "--stream-poll", type=float, default=None, help="store poll period of a stream (default: the spec's)"
    )
    p.add_argument("--get-poll", type=float, default=0.05, help="client's GET period in background mode")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message of every request")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per mode")
    p.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="do not freeze the start-up heap out of the garbage collector after the warm-up",
    )
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.warmup < 0:
        p.error("--requests and --concurrency must be >= 1, --warmup >= 0")
    if a.max_output_tokens < 2 or not 1 <= a.reasoning_budget < a.max_output_tokens:
        p.error("need 1 <= --reasoning-budget < --max-output-tokens (room for </think> and an answer)")
    if a.checkpoint_tokens < 1:
        p.error("--checkpoint-tokens must be >= 1")
    for name in ("checkpoint_interval", "stream_poll", "get_poll"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not a.prompt.strip():
        p.error("--prompt must not be empty")
    return Params(
        config=a.config,
        model=a.model,
        requests=a.requests,
        concurrency=a.concurrency,
        max_output_tokens=a.max_output_tokens,
        reasoning_budget=a.reasoning_budget,
        checkpoint_tokens=a.checkpoint_tokens,
        checkpoint_interval_s=a.checkpoint_interval,
        stream_poll_s=a.stream_poll,
        get_poll_s=a.get_poll,
        prompt=a.prompt,
        warmup=a.warmup,
        gc_freeze=a.gc_freeze,
    ), a.json_path


# --------------------------------------------------------------------------- pure helpers


def chat_body(params: Params) -> dict[str, Any]:
    """The streamed chat completion (mode chat)."""
    return {
        "model": params.model,
        "messages": [{"role": "user", "content": params.prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_output_tokens,
        "max_reasoning_tokens": params.reasoning_budget,
        "temperature": 0,
    }


def responses_body(params: Params, background: bool) -> dict[str, Any]:
    """The same request for /v1/responses: streamed (mode stream) or background (mode background)."""
    body: dict[str, Any] = {
        "model": params.model,
        "input": params.prompt,
        "max_output_tokens": params.max_output_tokens,
        "reasoning": {"max_tokens": params.reasoning_budget},
        "temperature": 0,
    }
    if background:
        body["background"] = True
    else:
        body["stream"] = True
    return body


@dataclass
class Sample:
    """One request's figures (seconds from sending it)."""

    mode: str
    total_s: float
    output_tokens: int
    reasoning_tokens: int | None
    #: chat: first SSE frame (first token); stream: first event; background: the POST's answer.
    first_s: float | None = None
    #: stream: first response.output_text.delta.
    first_text_s: float | None = None
    session_id: str | None = None
    status: str | None = None
    #: background: GETs until it was finished.
    polls: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s if self.total_s > 0 else math.nan


def _p(values: Sequence[float | None], q: float) -> float:
    return percentile([v for v in values if v is not None], q)


def summarize_mode(samples: Sequence[Sample], wall_s: float | None = None) -> dict[str, Any]:
    """p50/p90 of the totals and first figures, tok/s per request (p50) and for the phase (output
    tokens / `wall_s`; None: the sum of the totals, as if run back to back)."""
    totals = [s.total_s for s in samples]
    wall = sum(totals) if wall_s is None else wall_s
    tokens = sum(s.output_tokens for s in samples)
    return {
        "requests": len(samples),
        "total_p50_s": _p(totals, 50),
        "total_p90_s": _p(totals, 90),
        "total_mean_s": sum(totals) / len(totals) if totals else math.nan,
        "first_p50_s": _p([s.first_s for s in samples], 50),
        "first_p90_s": _p([s.first_s for s in samples], 90),
        "first_text_p50_s": _p([s.first_text_s for s in samples], 50),
        "first_text_p90_s": _p([s.first_text_s for s in samples], 90),
        "tokens_per_s_p50": _p([s.tokens_per_s for s in samples], 50),
        "output_tokens": tokens,
        "wall_s": wall,
        "phase_tokens_per_s": tokens / wall if wall > 0 else math.nan,
    }


def overhead_pct(value: float, base: float) -> float:
    """How much longer `value` is than `base`, in % of `base` (NaN without a base)."""
    if not base or math.isnan(base) or math.isnan(value):
        return math.nan
    return (value - base) / base * 100.0


def add_overheads(modes: dict[str, dict[str, Any]]) -> None:
    """Each mode's p50/p90 total and phase throughput against chat's (in place)."""
    base = modes["chat"]
    for m in modes.values():
        m["overhead_p50_pct"] = overhead_pct(m["total_p50_s"], base["total_p50_s"])
        m["overhead_p90_pct"] = overhead_pct(m["total_p90_s"], base["total_p90_s"])
        m["throughput_vs_chat_pct"] = overhead_pct(m["phase_tokens_per_s"], base["phase_tokens_per_s"])


def check_chat(usage: dict[str, Any] | None, budget: int, reference: int | None) -> int:
    """A chat completion's completion_tokens, after checking its usage (BenchmarkError)."""
    if not usage:
        raise BenchmarkError("a chat completion ended without a usage frame")
    done = usage["completion_tokens"]
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if reasoning != budget:
        raise BenchmarkError(f"a chat completion had {reasoning} reasoning tokens, expected {budget}")
    if reference is not None and done != reference:
        raise BenchmarkError(f"a chat completion generated {done} tokens, another {reference} (greedy)")
    return done


def check_session(obj: dict[str, Any], budget: int, reference: int | None) -> tuple[int, int]:
    """A finished response object's (output_tokens, reasoning_tokens), after checking it against the
    chat completions' `reference` completion_tokens and the budget (BenchmarkError)."""
    rid = obj.get("id")
    if obj.get("status") not in OK_STATUSES:
        raise BenchmarkError(f"session {rid} ended {obj.get('status')}: {obj.get('error')}")
    usage = obj.get("usage") or {}
    out = usage.get("output_tokens")
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning != budget:
        raise BenchmarkError(f"session {rid} had {reasoning} reasoning tokens, expected {budget}")
    if reference is not None and out != reference:
        raise BenchmarkError(
            f"session {rid} generated {out} tokens; the same greedy chat completion {reference}"
        )
    return out, reasoning


def answer_text(obj: dict[str, Any]) -> str:
    """The message text of a response object."""
    for item in obj.get("output", []):
        if item.get("type") == "message":
            return "".join(p.get("text", "") for p in item.get("content", []))
    return ""


def check_events(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The terminal event's response object, after checking a streamed session's events: numbered
    0, 1, 2, … with one terminal event, last, and deltas that add up to the final text."""
    if not events:
        raise BenchmarkError("a streamed session sent no events")
    seqs = [e.get("sequence_number") for e in events]
    if seqs != list(range(len(events))):
        raise BenchmarkError(f"a streamed session's events are numbered {seqs[:8]}…, not 0, 1, 2, …")
    terminal = [i for i, e in enumerate(events) if e.get("type") in TERMINAL]
    if terminal != [len(events) - 1]:
        raise BenchmarkError(f"a streamed session's terminal events are at {terminal} of {len(events)}")
    obj = events[-1]["response"]
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    if streamed != answer_text(obj):
        raise BenchmarkError(f"session {obj.get('id')}: the streamed deltas differ from the final text")
    return obj


def store_summary(
    sessions: Sequence[dict[str, Any]], calls: Sequence[dict[str, Any]], ids: set[str]
) -> dict[str, Any]:
    """Per-session store figures of the sessions `ids`: `sessions` rows (id, bytes, token_chunks,
    events, token_bytes, event_bytes, request_bytes, result_bytes) and timed store `calls` (session_id,
    method, s, tokens)."""
    rows = [r for r in sessions if r["id"] in ids]
    n = len(rows)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / n if n else math.nan

    mine = [c for c in calls if c["session_id"] in ids]
    ckpt = [c["s"] for c in mine if c["method"] == "checkpoint"]
    with_tokens = [c["s"] for c in mine if c["method"] == "checkpoint" and c["tokens"]]
    fin = [c["s"] for c in mine if c["method"] == "finish"]
    return {
        "sessions": n,
        "token_chunks_per_session": mean("token_chunks"),
        "events_per_session": mean("events"),
        "bytes_per_session": mean("bytes"),
        "token_bytes_per_session": mean("token_bytes"),
        "event_bytes_per_session": mean("event_bytes"),
        "request_bytes_per_session": mean("request_bytes"),
        "result_bytes_per_session": mean("result_bytes"),
        "checkpoint_calls_per_session": len(ckpt) / n if n else math.nan,
        "checkpoint_mean_s": sum(ckpt) / len(ckpt) if ckpt else math.nan,
        "checkpoint_p90_s": percentile(ckpt, 90),
        "checkpoint_max_s": max(ckpt, default=math.nan),
        "token_checkpoint_mean_s": sum(with_tokens) / len(with_tokens) if with_tokens else math.nan,
        "finish_mean_s": sum(fin) / len(fin) if fin else math.nan,
        "store_write_s_per_session": (sum(ckpt) + sum(fin)) / n if n else math.nan,
    }


# --------------------------------------------------------------------------- the stack


class TimedStore:
    """Times `checkpoint` and `finish` of one store instance (wrappers on the instance; they run in
    the worker's threads, so the lock wait is part of each time)."""

    METHODS = ("checkpoint", "finish")

    def __init__(self, store: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        for name in self.METHODS:
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(session_id: str, owner: str, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(session_id, owner, *args)
            finally:
                tokens = len(args[1]) if name == "checkpoint" else 0
                self.calls.append(
                    {
                        "session_id": session_id,
                        "method": name,
                        "s": time.perf_counter() - t0,
                        "tokens": tokens,
                    }
                )

        return timed


_SESSION_ROWS = """
SELECT s.id, s.bytes, LENGTH(s.request), COALESCE(LENGTH(s.result), 0),
    (SELECT COUNT(*) FROM tokens t WHERE t.session_id = s.id),
    (SELECT COALESCE(SUM(LENGTH(t.ids)), 0) FROM tokens t WHERE t.session_id = s.id),
    (SELECT COUNT(*) FROM events e WHERE e.session_id = s.id),
    (SELECT COALESCE(SUM(LENGTH(e.data)), 0) FROM events e WHERE e.session_id = s.id)
FROM sessions s
"""


def read_sessions(path: Path) -> list[dict[str, Any]]:
    """Per-session sizes straight from the database file (a second connection)."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(_SESSION_ROWS).fetchall()
    finally:
        db.close()
    keys = (
        "id",
        "bytes",
        "request_bytes",
        "result_bytes",
        "token_chunks",
        "token_bytes",
        "events",
        "event_bytes",
    )
    return [dict(zip(keys, r, strict=True)) for r in rows]


def file_bytes(path: Path) -> int:
    """The database's size on disk (file and WAL; not the fixed-size `-shm` index) after folding the WAL
    back into the file."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


@dataclass
class Stack:
    engine: Any
    worker: Any
    store: Any
    timer: TimedStore
    db_path: Path
    app: Any
    settings: dict[str, Any] = field(default_factory=dict)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=StreamingASGITransport(self.app),
            base_url="http://tandem.bench",
            timeout=_HTTP_TIMEOUT_S,
        )

    async def settle(self) -> None:
        """Wait until the engine has no unfinished request and the worker no active session."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while (self.engine.stats().running or self.worker.active) and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)


async def start_stack(spec: ServingSpec, model: ModelSpec, params: Params, state_dir: Path) -> Stack:
    from dataclasses import replace

    from serving.app import engine_args_for
    from serving.backends import EngineBackend
    from serving.config import Role
    from serving.http.api import build_api
    from serving.http.pipeline import ServedModel
    from serving.http.responses import SessionsFrontend
    from serving.replicas.engines import make_engine
    from serving.sessions.store import SQLiteStore
    from serving.sessions.worker import SessionModel, SessionWorker, WorkerSettings
    from serving.thinking import reasoning_tags
    from serving.tokenizer import PromptTokenizer

    pool = model.pools[0]
    path = spec.resolve_source(model)
    # The pool alone (no model): no KV-transfer connector, the engine serves the model colocated.
    engine = make_engine(pool.engine, model.name, path, engine_args_for(pool), Role.COLOCATED)
    tokenizer = await asyncio.to_thread(PromptTokenizer, path)
    tags = reasoning_tags(spec, model.name, tokenizer)
    if tags is None:
        raise SystemExit(f"--model: {model.name!r} is not a reasoning model (no `reasoning` in the spec)")
    await engine.start()
    info = engine.model_info()
    backend = EngineBackend(engine)
    served = ServedModel.from_spec(spec, model.name, tokenizer, backend, info)
    s = spec.sessions
    db_path = state_dir / "sessions.db"
    store = SQLiteStore(db_path, s.ttl_s, s.max_sessions_per_tenant, s.max_bytes_per_tenant)
    timer = TimedStore(store)
    settings = replace(
        WorkerSettings.from_spec(s, spec.resilience.streams),
        checkpoint_tokens=params.checkpoint_tokens,
        checkpoint_interval_s=params.checkpoint_interval_s or s.checkpoint_interval_s,
    )
    worker = SessionWorker(
        store, {model.name: SessionModel(model.name, backend.stream, tokenizer, tags)}, settings
    )
    worker.start()
    poll = params.stream_poll_s or s.stream_poll_s
    app = build_api({model.name: served}, sessions=SessionsFrontend(store, worker.submit, poll))
    return Stack(engine, worker, store, timer, db_path, app, {**asdict(settings), "stream_poll_s": poll})


# --------------------------------------------------------------------------- requests


class Reference:
    """The chat completions' completion_tokens: the same for every greedy request."""

    def __init__(self) -> None:
        self.tokens: int | None = None


async def chat_request(client: httpx.AsyncClient, params: Params, ref: Reference) -> Sample:
    t0 = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(params)) as r:
        if r.status_code != 200:
            raise BenchmarkError(f"chat completion: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            frame = json.loads(data)
            if "error" in frame:
                raise BenchmarkError(f"chat completion failed in its stream: {frame['error']}")
            if first is None and frame.get("choices"):
                first = time.perf_counter() - t0
            if frame.get("usage"):
                usage = frame["usage"]
    total = time.perf_counter() - t0
    done = check_chat(usage, params.reasoning_budget, ref.tokens)
    if ref.tokens is None:
        ref.tokens = done
    assert usage is not None
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    return Sample("chat", total, done, reasoning, first_s=first)


async def stream_request(client: httpx.AsyncClient, params: Params, ref: Reference) -> Sample:
    t0 = time.perf_counter()
    first = first_text = None
    events: list[dict[str, Any]] = []
    async with client.stream("POST", "/v1/responses", json=responses_body(params, False)) as r:
        if r.status_code != 200:
            raise BenchmarkError(f"POST /v1/responses: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            now = time.perf_counter() - t0
            if first is None:
                first = now
            if first_text is None and ev.get("type") == "response.output_text.delta":
                first_text = now
            events.append(ev)
            if ev.get("type") in TERMINAL or ev.get("type") == "error":
                break
    total = time.perf_counter() - t0
    obj = check_events(events)
    out, reasoning = check_session(obj, params.reasoning_budget, ref.tokens)
    return Sample("stream", total, out, reasoning, first, first_text, obj["id"], obj["status"])


async def background_request(client: httpx.AsyncClient, params: Params, ref: Reference) -> Sample:
    t0 = time.perf_counter()
    r = await client.post("/v1/responses", json=responses_body(params, True))
    if r.status_code != 200:
        raise BenchmarkError(f"POST /v1/responses (background): HTTP {r.status_code}: {r.text[:300]}")
    posted = time.perf_counter() - t0
    rid = r.json()["id"]
    polls = 0
    while True:
        await asyncio.sleep(params.get_poll_s)
        polls += 1
        g = await client.get(f"/v1/responses/{rid}")
        if g.status_code != 200:
            raise BenchmarkError(f"GET /v1/responses/{rid}: HTTP {g.status_code}: {g.text[:300]}")
        obj = g.json()
        if obj["status"] not in ("queued", "in_progress"):
            break
        if time.perf_counter() - t0 > _FINISH_TIMEOUT_S:
            raise BenchmarkError(f"session {rid} still {obj['status']} after {_FINISH_TIMEOUT_S:g} s")
    total = time.perf_counter() - t0
    out, reasoning = check_session(obj, params.reasoning_budget, ref.tokens)
    return Sample(
        "background", total, out, reasoning, first_s=posted, session_id=rid, status=obj["status"], polls=polls
    )


RequestFn = Callable[[httpx.AsyncClient, Params, Reference], Awaitable[Sample]]
SENDERS: dict[str, RequestFn] = {
    "chat": chat_request,
    "stream": stream_request,
    "background": background_request,
}


def batches(requests: int, size: int) -> list[tuple[str, int]]:
    """A phase's order: rounds of one batch of `size` simultaneous requests per mode (the last round
    smaller when `size` does not divide `requests`), the order of the modes rotated every round."""
    out: list[tuple[str, int]] = []
    for i in range(math.ceil(requests / size)):
        n = min(size, requests - i * size)
        k = i % len(MODES)
        out += [(m, n) for m in MODES[k:] + MODES[:k]]
    return out


async def run_phase(
    client: httpx.AsyncClient, params: Params, ref: Reference, size: int, requests: int
) -> tuple[list[Sample], dict[str, float]]:
    """`requests` requests per mode in batches of `size` (see `batches`); the samples and, per mode,
    the summed wall time of its batches."""
    samples: list[Sample] = []
    walls = dict.fromkeys(MODES, 0.0)
    for mode, n in batches(requests, size):
        t0 = time.perf_counter()
        samples += await asyncio.gather(*(SENDERS[mode](client, params, ref) for _ in range(n)))
        walls[mode] += time.perf_counter() - t0
    return samples, walls


# --------------------------------------------------------------------------- phases


async def run_all(spec: ServingSpec, model: ModelSpec, params: Params) -> dict[str, Any]:
    result: dict[str, Any] = {"load_average": {"before_engine": load_average()}}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-sessions-") as tmp:
        stack = await start_stack(spec, model, params, Path(tmp))
        ref = Reference()
        try:
            empty_bytes = file_bytes(stack.db_path)
            async with stack.client() as client:
                # Warm-up (its first request is a chat completion: the reference token count).
                if params.warmup:
                    await run_phase(client, params, ref, 1, params.warmup)
                else:
                    await chat_request(client, params, ref)
                warm_ids = {r["id"] for r in read_sessions(stack.db_path)}
                if params.gc_freeze:
                    gc.collect()
                    gc.freeze()

                phases: dict[str, Any] = {}
                samples: dict[str, list[Sample]] = {}
                for phase, size in (("sequential", 1), ("concurrent", params.concurrency)):
                    await stack.settle()
                    result["load_average"][f"before_{phase}"] = load_average()
                    ss, walls = await run_phase(client, params, ref, size, params.requests)
                    samples[phase] = ss
                    phases[phase] = {
                        m: summarize_mode([s for s in ss if s.mode == m], walls[m]) for m in MODES
                    }
                await stack.settle()
            for modes in phases.values():
                add_overheads(modes)
            rows = read_sessions(stack.db_path)
            calls = stack.timer.calls
            store: dict[str, Any] = {}
            for phase, ss in samples.items():
                for mode in ("stream", "background"):
                    ids = {s.session_id for s in ss if s.mode == mode and s.session_id}
                    store[f"{phase}_{mode}"] = store_summary(rows, calls, ids)
            measured = {r["id"] for r in rows} - warm_ids
            store["all"] = store_summary(rows, calls, measured)
            store["file_bytes_per_session"] = (file_bytes(stack.db_path) - empty_bytes) / max(1, len(rows))
            store["sessions_in_file"] = len(rows)
            result.update(
                phases=phases,
                store=store,
                reference_completion_tokens=ref.tokens,
                worker_settings=stack.settings,
                samples={k: [asdict(s) for s in v] for k, v in samples.items()},
                worker_finished=dict(stack.worker.completed),
            )
            result["load_average"]["after"] = load_average()
        finally:
            await stack.worker.close()
            stack.store.close()
            await stack.engine.shutdown()
    return result


# --------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1e3:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.1f} %"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def format_report(res: dict[str, Any]) -> str:
    """The per-phase mode table and the store figures."""
    p, ws = res["params"], res["worker_settings"]
    lines = [
        f"model {p['model']}, {p['max_output_tokens']} output tokens "
        f"({res['reference_completion_tokens']} generated) of which {p['reasoning_budget']} reasoning, "
        f"greedy, {p['requests']} requests per mode and phase, {res['machine']['cpu_count']} cores",
        f"sessions: checkpoint every {ws['checkpoint_tokens']} tokens or {ws['checkpoint_interval_s']:g} s, "
        f"stream poll {ws['stream_poll_s'] * 1e3:g} ms, GET poll {p['get_poll_s'] * 1e3:g} ms (background)",
    ]
    head = (
        f"{'mode':<11} {'total p50':>9} {'p90':>6} {'first p50':>9} {'1st text':>8} "
        f"{'tok/s/req':>9} {'tok/s':>7} {'ovh p50':>9} {'ovh p90':>9}"
    )
    for phase, title in (
        ("sequential", "sequential (one at a time, modes in turn)"),
        ("concurrent", f"concurrent (batches of {p['concurrency']} simultaneous requests, modes in turn)"),
    ):
        lines += [f"\n{title}; times in ms", head]
        for mode, m in res["phases"][phase].items():
            chat = mode == "chat"
            lines.append(
                f"{mode:<11} {_ms(m['total_p50_s']):>9} {_ms(m['total_p90_s']):>6} "
                f"{_ms(m['first_p50_s']):>9} {_ms(m['first_text_p50_s']):>8} "
                f"{_num(m['tokens_per_s_p50']):>9} {_num(m['phase_tokens_per_s']):>7} "
                f"{'' if chat else _pct(m['overhead_p50_pct']):>9} "
                f"{'' if chat else _pct(m['overhead_p90_pct']):>9}"
            )
    lines.append(
        "first: chat = first token, stream = first event, background = the POST's answer; "
        "1st text = first output_text.delta; tok/s = output tokens / the mode's wall time"
    )
    st = res["store"]
    lines += [
        "\nstore (SQLite, per session)",
        f"{'sessions':<21} {'n':>3} {'chunks':>6} {'events':>6} {'bytes':>7} {'tokens B':>8} {'events B':>8} "
        f"{'ckpt calls':>10} {'ckpt mean':>10} {'ckpt p90':>9} {'finish':>7} {'write/sess':>10}",
    ]
    for key, s in st.items():
        if not isinstance(s, dict):
            continue
        lines.append(
            f"{key:<21} {s['sessions']:>3} {_num(s['token_chunks_per_session']):>6} "
            f"{_num(s['events_per_session']):>6} {_num(s['bytes_per_session'], '.0f'):>7} "
            f"{_num(s['token_bytes_per_session'], '.0f'):>8} {_num(s['event_bytes_per_session'], '.0f'):>8} "
            f"{_num(s['checkpoint_calls_per_session']):>10} "
            f"{_num(s['checkpoint_mean_s'] * 1e3, '.2f'):>8} ms "
            f"{_num(s['checkpoint_p90_s'] * 1e3, '.2f'):>6} ms "
            f"{_num(s['finish_mean_s'] * 1e3, '.2f'):>4} ms "
            f"{_num(s['store_write_s_per_session'] * 1e3, '.1f'):>7} ms"
        )
    lines.append(
        "chunks: token chunks stored (checkpoints that wrote tokens); bytes: the sessions.bytes column "
        "(request + events + tokens + result); ckpt calls: SQLiteStore.checkpoint calls (the start "
        "events, every checkpoint, the rest at the end); write/sess: time in checkpoint + finish"
    )
    lines.append(
        f"database file growth: {st['file_bytes_per_session']:.0f} bytes per session "
        f"({st['sessions_in_file']} sessions, warm-up included, after a WAL checkpoint)"
    )
    lines.append(f"load average before each phase: {res['load_average']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(params: Params) -> dict[str, Any]:
    """Warm-up, both phases, the store figures; the full result (what --json writes)."""
    spec = load_spec(params.config)
    try:
        model = spec.model(params.model)
    except KeyError:
        raise SystemExit(f"--model: {params.model!r} is not in {params.config}") from None
    env = dict(model.pools[0].env)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t0 = time.perf_counter()
    before = child_pids()
    try:
        with pool_env(env):
            result = asyncio.run(run_all(spec, model, params))
    finally:
        wait_for_exit(child_pids() - before)
    return {
        "params": asdict(params),
        "engine_env": env,
        **result,
        "machine": machine_info(httpx=httpx.__version__),
        "elapsed_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
