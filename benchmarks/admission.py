"""What admission control buys under overload: a 10x fan-out burst at 2x capacity, with and without it.

    python -m benchmarks.admission [--config configs/local.yaml] [--model tiny-intent]
        [--unloaded-requests 64] [--concurrency 1,2,4,8,16] [--duration 20] [--load 2.0]
        [--fanout 10] [--fanout-width 4] [--arrivals uniform|poisson] [--seed 0]
        [--drain-timeout 60] [--prompt-tokens 128] [--max-tokens 32] [--engine-multiprocessing]
        [--no-gc-freeze] [--json FILE]

Method
------
One real vLLM engine for the model is built in this process as a serving replica
builds it (same weights, `engine_args_for(pool)`, the pool's `env` applied to `os.environ`), plus
`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless `--engine-multiprocessing`: the vLLM CPU platform then
keeps the model worker inside the engine-core process instead of starting a separate worker
process (one engine process, not two, on a 2-core machine). The engine is wrapped in the Tandem
FastAPI app (`serving.http.api.build_api`) with a `Gateway.from_spec` built from the spec, exactly as an
ingress replica builds it (tokenizer, block hasher, tenant salt), and driven in this process by an
`httpx.AsyncClient` over an in-process ASGI transport. No Ray, no sockets. The transport streams:
httpx's own `ASGITransport` (0.28) returns a response only once the app has sent all of it, which
would make every TTFT read as the whole request's latency (`benchmarks.asgi.StreamingASGITransport`).

Every request is a streaming chat completion with a distinct prompt of about `--prompt-tokens`
tokens (template included; prompts differ in their leading ticket number), temperature 0,
`ignore_eos` and `--max-tokens`, so every request does the same engine work. TTFT is the time
from sending the request (in phase 3: from its *scheduled* arrival) to the first SSE frame with
non-empty `delta.content`. Requests name the model; an explicit model name resolves to the first
tier serving it, whose `ttft_slo_s` applies (for `tiny-intent`, the `intent` tier).

1. **Unloaded**: `--unloaded-requests` requests one after the other (admission off), after a
   warm-up. Their TTFT p50/p99 define the objective: **SLO = 1.5 x unloaded p99 TTFT**.
   After the warm-up the start-up heap is frozen out of the garbage collector (`gc.freeze()`,
   as vLLM's engine core does with its own; `--no-gc-freeze` to skip): without it, gen2
   collections walking torch/transformers/vLLM objects paused this process for 100-300 ms on
   the 2-core development machine, which showed up as TTFT outliers. GC pauses are recorded
   per phase either way.
2. **Capacity**: a closed loop (each of `c` workers sends its next request when its previous one
   has finished) at each `--concurrency` level, admission off, `max(32, 8c)` requests per level.
   Capacity is the highest throughput (requests/s) among the levels whose p99 TTFT <= SLO, and C*
   the concurrency of that level. (If no level qualifies, the lowest level is used and the report
   says so.)
3. **Burst**, twice on the same engine, each with a fresh gateway (fresh admission state):
   admission off (`admission.enabled: false`), then on, with
   - `admission.pool_limits`: C* for the model (one ingress here, so no share scaling),
   - the tier's `ttft_slo_s` = SLO - unloaded p50 TTFT. The admission check compares a request's
     *predicted queue wait* with `ttft_slo_s` (router/admission.py `PoolLimiter.acquire`), and
     an admitted request still needs about the unloaded TTFT after its wait, so the wait budget
     that keeps TTFT within the SLO is the SLO minus the typical service TTFT. Setting it to the
     full SLO would admit requests that are predicted to wait their whole budget and then miss it.
   - the default tenant's fan-out width `--fanout-width`, its token bucket 10x the offered token
     rate (prompt + max_tokens per request; burst: one second of that), so the bucket never
     rejects; max_queue and queue_timeout_s as in the spec.
   Before each run, 4 x C* requests at concurrency C* go through the new gateway: a fresh
   `PoolLimiter` has no hold-time estimate and predicts zero wait until its first release, so
   without this the first burst of a run would be queued unchecked.
   Open-loop arrivals (uniform spacing, or Poisson with `--arrivals poisson`) of agent tasks for
   `--duration` seconds at `load x capacity / fanout` tasks/s; each task sends `--fanout` calls
   at once, all with the same `x-tandem-task-id`, so the offered load is `--load` (2) x capacity
   in requests/s. A 429 is counted as rejected (its reason and Retry-After recorded) and not
   retried. After the last arrival, requests still running get `--drain-timeout` seconds; what is
   still running then is cancelled and counted as unfinished.

Per run: offered, admitted (got a 200 stream), rejected by reason, failed, unfinished,
completed, admitted TTFT p50/p99, and **goodput** = requests that completed with TTFT <= SLO,
divided by the arrival window (`--duration`), reported against capacity. Instrumentation (wrappers
on the run's own controller and limiter instances, benchmark-side only; a context variable carries
each request's trace into the app task that serves it) splits each admitted request's TTFT into
send lateness, `admit()` (token bucket + fan-out slot), the pool queue, and the rest (tokenization,
engine, SSE, event-loop delays); rejected requests report how long their 429 took.

Goals (judged on the admission-on run; the off run is printed for comparison):
admitted p99 TTFT <= 1.5 x unloaded p99, and goodput >= 90 % of capacity.

Caveats
-------
* Client, API, gateway, tokenizer and vLLM's AsyncLLM front end share one Python process and one
  event loop; only the engine core runs in its own process. On a small machine the client's own
  CPU use is part of every figure, and arrivals can start late when the loop is busy: TTFT counts
  from the scheduled arrival, and the lateness is reported.
* Capacity comes from a short closed loop, so it is noisy; the burst's goodput ratio inherits
  that noise. p99 of a few dozen requests is close to the maximum, and the SLO, C* and the
  tier's wait budget all follow from such p99s.
* Capacity is defined by the TTFT objective, not by what the engine can push through: levels
  beyond C* may well carry more requests/s at a worse TTFT, so "2 x capacity" need not overload
  the engine itself.
* The runs follow each other, so other load on the machine may differ between them (load averages
  are recorded before each phase).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import logging
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from benchmarks.asgi import StreamingASGITransport
from benchmarks.common import BenchmarkError, int_list, load_average, machine_info, percentile, run_main
from benchmarks.overhead import _prompt_text, calibrate_words
from benchmarks.stack import child_pids, pool_env, wait_for_exit
from serving.config import ModelSpec, ServingSpec, default_config_path, load_spec, parse_spec

logger = logging.getLogger(__name__)

#: The objective: TTFT <= this x unloaded p99 TTFT.
SLO_FACTOR = 1.5
#: The goodput goal, as a fraction of capacity.
GOODPUT_GOAL = 0.9
#: The token bucket is set to this many times the offered token rate (so it never rejects).
BUCKET_HEADROOM = 10.0
TASK_ID_HEADER = "x-tandem-task-id"
#: `Outcome.reason` of a request still running at the drain deadline (then cancelled).
UNFINISHED = "unfinished"
_HTTP_TIMEOUT_S = 300.0
_SETTLE_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """What to run."""

    config: str
    model: str
    unloaded_requests: int
    concurrency: tuple[int, ...]
    duration_s: float
    load: float
    fanout: int
    fanout_width: int
    arrivals: str
    seed: int
    drain_timeout_s: float
    prompt_tokens: int
    max_tokens: int
    engine_multiprocessing: bool
    gc_freeze: bool


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(sorted(set(int_list(text))))


def parse_args(argv: list[str] | None) -> tuple[Params, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.admission",
        description="Goodput and TTFT under a 10x fan-out burst at 2x capacity, admission off vs on.",
    )
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    p.add_argument("--model", default="tiny-intent", help="model (from the spec) to benchmark")
    p.add_argument("--unloaded-requests", type=int, default=64, help="sequential requests of phase 1")
    p.add_argument("--concurrency", type=_int_list, default=(1, 2, 4, 8, 16), help="capacity levels")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of burst arrivals per run")
    p.add_argument("--load", type=float, default=2.0, help="offered load, as a multiple of capacity")
    p.add_argument("--fanout", type=int, default=10, help="concurrent calls per agent task")
    p.add_argument("--fanout-width", type=int, default=4, help="tenant fan-out width (admission on)")
    p.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform", help="task arrivals")
    p.add_argument("--seed", type=int, default=0, help="seed of Poisson arrivals")
    p.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds given to running requests after the burst"
    )
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument(
        "--engine-multiprocessing",
        action="store_true",
        help="leave VLLM_ENABLE_V1_MULTIPROCESSING alone (default: 0, the worker runs in the engine core)",
    )
    p.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="do not freeze the start-up heap out of the garbage collector (see Caveats)",
    )
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    a = p.parse_args(argv)
    if a.unloaded_requests < 2 or a.duration <= 0 or a.load <= 0 or a.fanout < 1 or a.fanout_width < 1:
        p.error("--unloaded-requests >= 2, --duration > 0, --load > 0, --fanout >= 1, --fanout-width >= 1")
    if a.prompt_tokens < 1 or a.max_tokens < 1 or a.drain_timeout <= 0:
        p.error("--prompt-tokens and --max-tokens must be >= 1, --drain-timeout > 0")
    return Params(
        config=a.config,
        model=a.model,
        unloaded_requests=a.unloaded_requests,
        concurrency=a.concurrency,
        duration_s=a.duration,
        load=a.load,
        fanout=a.fanout,
        fanout_width=a.fanout_width,
        arrivals=a.arrivals,
        seed=a.seed,
        drain_timeout_s=a.drain_timeout,
        prompt_tokens=a.prompt_tokens,
        max_tokens=a.max_tokens,
        engine_multiprocessing=a.engine_multiprocessing,
        gc_freeze=a.gc_freeze,
    ), a.json_path


# --------------------------------------------------------------------------- pure helpers


def slo_s(unloaded_p99_s: float, factor: float = SLO_FACTOR) -> float:
    """The TTFT objective: `factor` x the unloaded p99 TTFT."""
    return factor * unloaded_p99_s


def wait_budget_s(slo: float, unloaded_p50_s: float) -> float:
    """The tier's `ttft_slo_s` (a bound on predicted queue wait): the SLO minus the typical service
    TTFT, floored at 1 ms (the field must be positive)."""
    return max(slo - unloaded_p50_s, 1e-3)


def pick_capacity(levels: Sequence[dict[str, Any]], ttft_limit_s: float) -> tuple[dict[str, Any], bool]:
    """The level with the highest requests/s among those whose p99 TTFT <= `ttft_limit_s`, and True;
    the lowest-concurrency level and False when none qualifies."""
    if not levels:
        raise ValueError("no levels")
    ok = [lv for lv in levels if lv["ttft_p99_s"] <= ttft_limit_s]
    if not ok:
        return min(levels, key=lambda lv: lv["concurrency"]), False
    return max(ok, key=lambda lv: (lv["requests_per_s"], -lv["concurrency"])), True


def arrival_times(rate_per_s: float, duration_s: float, kind: str = "uniform", seed: int = 0) -> list[float]:
    """Offsets (s) of arrivals at `rate_per_s` within [0, duration_s): evenly spaced from 0, or Poisson."""
    if rate_per_s <= 0 or duration_s <= 0:
        return []
    if kind == "uniform":
        n = math.ceil(rate_per_s * duration_s)
        return [t for t in (i / rate_per_s for i in range(n)) if t < duration_s]
    if kind == "poisson":
        rng = random.Random(seed)
        out, t = [], rng.expovariate(rate_per_s)
        while t < duration_s:
            out.append(t)
            t += rng.expovariate(rate_per_s)
        return out
    raise ValueError(f"unknown arrival kind {kind!r}")


@dataclass(frozen=True)
class Outcome:
    """What happened to one request."""

    #: HTTP status; None when no answer came before the drain deadline.
    status: int | None
    #: Seconds from send (scheduled arrival in phase 3) to the first content frame; None: none came.
    ttft_s: float | None = None
    #: The stream ran to [DONE] with the expected number of tokens.
    completed: bool = False
    #: Error code of a non-200 answer (admission reason), or of an error frame in the stream.
    reason: str | None = None
    #: Retry-After header of a 429/503.
    retry_after: str | None = None
    #: How late the request was actually sent after its scheduled arrival (s).
    lateness_s: float = 0.0
    #: Prompt tokens the ingress counted (usage), if the stream completed.
    prompt_tokens: int | None = None
    #: Seconds from send to the response status (for a 429: how long the rejection took).
    response_s: float | None = None
    #: Time spent in the gateway's admit() (token bucket + fan-out slot) and waiting for a pool slot.
    admission_wait_s: float = 0.0
    pool_wait_s: float = 0.0


def _p(outcomes: Sequence[Outcome], value: Callable[[Outcome], float | None], q: float) -> float:
    """q-th percentile of `value` over `outcomes` (those where it is known); NaN if none."""
    return percentile([v for v in map(value, outcomes) if v is not None], q)


def _rest(o: Outcome) -> float | None:
    """TTFT not spent late, in admission or in the pool queue."""
    if o.ttft_s is None:
        return None
    return o.ttft_s - o.lateness_s - o.admission_wait_s - o.pool_wait_s


def summarize_burst(
    outcomes: Sequence[Outcome], duration_s: float, slo: float, capacity_rps: float
) -> dict[str, Any]:
    """Counts, admitted TTFT percentiles, goodput and the goal verdicts of one burst run."""
    admitted = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status is not None and o.status != 200]
    unfinished = [o for o in outcomes if o.reason == UNFINISHED]
    completed = [o for o in admitted if o.completed]
    failed = [o for o in admitted if not o.completed and o.reason != UNFINISHED]
    ttft = [o.ttft_s for o in admitted if o.ttft_s is not None]
    good = [o for o in completed if o.ttft_s is not None and o.ttft_s <= slo]
    goodput = len(good) / duration_s
    p99 = percentile(ttft, 99) if ttft else math.nan
    return {
        "offered": len(outcomes),
        "offered_rps": len(outcomes) / duration_s,
        "admitted": len(admitted),
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(f"{o.status} {o.reason}" for o in rejected)),
        "retry_after_s": dict(Counter(o.retry_after or "none" for o in rejected)),
        "failed_in_stream": len(failed),
        "unfinished": len(unfinished),
        "completed": len(completed),
        "completed_rps": len(completed) / duration_s,
        "admitted_ttft_p50_s": percentile(ttft, 50) if ttft else math.nan,
        "admitted_ttft_p99_s": p99,
        "admitted_ttft_max_s": max(ttft) if ttft else math.nan,
        "good": len(good),
        "goodput_rps": goodput,
        "goodput_over_capacity": goodput / capacity_rps if capacity_rps > 0 else math.nan,
        "lateness_p99_s": _p(outcomes, lambda o: o.lateness_s, 99),
        "rejection_latency_p50_s": _p(rejected, lambda o: o.response_s, 50),
        "rejection_latency_p99_s": _p(rejected, lambda o: o.response_s, 99),
        # Where an admitted request's TTFT went: the send's lateness, admit() (bucket + fan-out
        # slot), the pool queue, and the rest (tokenization, engine prefill, SSE, event-loop lag).
        "admitted_breakdown": {
            f"{name}_p{q}_s": _p(admitted, fn, q)
            for name, fn in (
                ("lateness", lambda o: o.lateness_s),
                ("admission_wait", lambda o: o.admission_wait_s),
                ("pool_wait", lambda o: o.pool_wait_s),
                ("rest", _rest),
            )
            for q in (50, 99)
        },
        "goal_met": {
            "admitted_p99_ttft": bool(ttft) and p99 <= slo,
            "goodput": capacity_rps > 0 and goodput >= GOODPUT_GOAL * capacity_rps,
        },
    }


def ttft_summary(ttft: Sequence[float], wall_s: float) -> dict[str, float]:
    """p50/p99/mean TTFT and throughput of a batch of requests that took `wall_s` in all."""
    return {
        "requests": len(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else math.nan,
        "requests_per_s": len(ttft) / wall_s if wall_s > 0 else math.nan,
        "wall_s": wall_s,
    }


# --------------------------------------------------------------------------- the stack


class GcPauses:
    """Garbage-collector pauses of this process (gc.callbacks), summarized per phase."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t))

    def mark(self) -> int:
        return len(self.pauses)

    def since(self, mark: int) -> dict[str, Any]:
        """Collections since `mark`: how many (gen2 among them), the longest pause and the total."""
        sub = self.pauses[mark:]
        return {
            "collections": len(sub),
            "gen2": sum(1 for g, _ in sub if g == 2),
            "max_pause_s": max((d for _, d in sub), default=0.0),
            "total_s": sum(d for _, d in sub),
        }

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def bench_spec(
    spec: ServingSpec, model: ModelSpec, admission: dict[str, Any], tier_slo_s: float | None
) -> ServingSpec:
    """`spec` serving only `model` and its tiers, one ingress, with `admission` (and the model's first
    tier's ttft_slo_s set to `tier_slo_s` when given); validated like any spec."""
    data = spec.model_dump(mode="json")
    data["models"] = [m for m in data["models"] if m["name"] == model.name]
    tiers = [t for t in data["tiers"] if t["model"] == model.name]
    names = {t["name"] for t in tiers}
    for t in tiers:
        t["fallback"] = [f for f in t["fallback"] if f in names]
    if tier_slo_s is not None and tiers:
        tiers[0]["ttft_slo_s"] = tier_slo_s
    data["tiers"] = tiers
    routing = data["routing"]
    routing["tasks"] = [t for t in routing.get("tasks", []) if t["tier"] in names]
    tasks = {t["name"] for t in routing["tasks"]}
    routing["rules"] = [r for r in routing["rules"] if r["tier"] in names and r.get("task") in (None, *tasks)]
    if routing.get("default_tier") not in names:
        routing["default_tier"] = None
    library = data["templates"]["library"]
    library["bindings"] = [
        b for b in library["bindings"] if b.get("tier") in (None, *names) and b.get("task") in (None, *tasks)
    ]
    data["server"]["ingress_replicas"] = 1
    data["admission"] = admission
    return parse_spec(data, origin="benchmark spec")


#: Per-request trace the gateway wrappers write into (set by `send`; the app task inherits it).
_TRACE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("bench_trace", default=None)


def _traced(fn: Callable[..., Awaitable[Any]], key: str) -> Callable[..., Awaitable[Any]]:
    """`fn`, adding the time each call took to the current request's trace under `key`."""

    async def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kw)
        finally:
            trace = _TRACE.get()
            if trace is not None:
                trace[key] = trace.get(key, 0.0) + time.perf_counter() - t0

    return timed


def trace_waits(gateway: Any, model: str) -> None:
    """Time this gateway's admission (token bucket + fan-out slot) and pool-slot waits per request.

    Benchmark-side instrumentation: wrappers on this gateway's own controller and limiter
    instances; nothing else changes."""
    ctl = gateway.admission
    ctl.admit = _traced(ctl.admit, "admission_wait_s")
    limiter = ctl.pool(model)
    limiter.acquire = _traced(limiter.acquire, "pool_wait_s")


class Stack:
    """The engine, the served model, and a fresh app (gateway) per phase."""

    def __init__(self, spec: ServingSpec, model: ModelSpec, engine: Any, served: Any) -> None:
        self.spec, self.model, self.engine, self.served = spec, model, engine, served

    def client(self, admission: dict[str, Any], tier_slo_s: float | None = None) -> tuple[Any, Any]:
        """An httpx client on a new app whose gateway is built from the spec with `admission`."""
        from serving.http.api import build_api
        from serving.http.gateway import Gateway
        from serving.http.metrics import IngressMetrics

        spec = bench_spec(self.spec, self.model, admission, tier_slo_s)
        metrics = IngressMetrics()
        gateway = Gateway.from_spec(spec, metrics)
        trace_waits(gateway, self.model.name)
        app = build_api({self.model.name: self.served}, metrics, gateway)
        client = httpx.AsyncClient(
            transport=StreamingASGITransport(app), base_url="http://tandem.bench", timeout=_HTTP_TIMEOUT_S
        )
        return client, gateway

    async def settle(self) -> None:
        """Wait until the engine has no unfinished request (aborted ones included)."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while self.engine.stats().running and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)


async def start_stack(spec: ServingSpec, model: ModelSpec) -> Stack:
    from router.hashing import BlockHasher
    from serving.app import engine_args_for
    from serving.backends import EngineBackend
    from serving.http.pipeline import ServedModel
    from serving.replicas.engines import make_engine
    from serving.tokenizer import PromptTokenizer

    pool = model.pools[0]
    path = spec.resolve_source(model)
    # The pool alone (no model): a colocated pool's args then lack only the KV-events publisher,
    # which feeds a router this in-process stack does not have.
    engine = make_engine(pool.engine, model.name, path, engine_args_for(pool), pool.role)
    tokenizer = await asyncio.to_thread(PromptTokenizer, path)
    await engine.start()
    info = engine.model_info()
    served = ServedModel(
        name=model.name,
        max_model_len=info.max_model_len,
        tokenizer=tokenizer,
        backend=EngineBackend(engine),
        hasher=BlockHasher(info.block_size),
        salt_tenants=model.router.tenant_salt,
    )
    return Stack(spec, model, engine, served)


# --------------------------------------------------------------------------- requests


class Prompts:
    """Distinct prompt texts of about the same length, numbered across the whole run."""

    def __init__(self, words: int) -> None:
        self.words = words
        self._next = 0

    def next(self) -> str:
        self._next += 1
        return _prompt_text(self._next, self.words)


def _body(model: str, text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def send(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    headers: dict[str, str] | None,
    since: float,
    trace: dict[str, Any] | None = None,
) -> Outcome:
    """One streaming request, timed from `since` (perf_counter).

    `trace` collects what is known as soon as it is (status, TTFT, and the gateway's waits through
    `_TRACE`), so a request cancelled midway still tells how far it got (`outcome_of`)."""
    trace = {} if trace is None else trace
    _TRACE.set(trace)  # the app task that serves this request inherits this context
    trace["lateness_s"] = time.perf_counter() - since
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        trace["status"] = r.status_code
        trace["response_s"] = time.perf_counter() - since
        if r.status_code != 200:
            raw = await r.aread()
            try:
                reason = str(json.loads(raw)["error"]["code"])
            except (ValueError, KeyError, TypeError):
                reason = raw[:200].decode(errors="replace")
            return outcome_of(trace, reason=reason, retry_after=r.headers.get("retry-after"))
        usage = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            frame = json.loads(data)
            if "error" in frame:
                return outcome_of(trace, reason=str(frame["error"].get("code")))
            choices = frame.get("choices") or []
            if "ttft_s" not in trace and choices and choices[0].get("delta", {}).get("content"):
                trace["ttft_s"] = time.perf_counter() - since
            if frame.get("usage"):
                usage = frame["usage"]
    done = usage is not None and usage["completion_tokens"] == body["max_tokens"] and "ttft_s" in trace
    return outcome_of(
        trace,
        completed=done,
        reason=None if done else "short_stream",
        prompt_tokens=usage["prompt_tokens"] if usage else None,
    )


def outcome_of(
    trace: dict[str, Any],
    completed: bool = False,
    reason: str | None = None,
    retry_after: str | None = None,
    prompt_tokens: int | None = None,
) -> Outcome:
    """The outcome of a request from its trace."""
    return Outcome(
        status=trace.get("status"),
        ttft_s=trace.get("ttft_s"),
        completed=completed,
        reason=reason,
        retry_after=retry_after,
        lateness_s=trace.get("lateness_s", 0.0),
        prompt_tokens=prompt_tokens,
        response_s=trace.get("response_s"),
        admission_wait_s=trace.get("admission_wait_s", 0.0),
        pool_wait_s=trace.get("pool_wait_s", 0.0),
    )


def _must_complete(o: Outcome) -> Outcome:
    if not o.completed:
        raise BenchmarkError(f"a request did not complete: {o}")
    return o


# --------------------------------------------------------------------------- phases


async def closed_loop(
    client: httpx.AsyncClient, params: Params, prompts: Prompts, concurrency: int, count: int
) -> tuple[list[Outcome], float]:
    """`count` requests from `concurrency` workers, each waiting for its previous one."""
    left = iter(range(count))
    out: list[Outcome] = []

    async def worker() -> None:
        for _ in left:
            body = _body(params.model, prompts.next(), params.max_tokens)
            out.append(_must_complete(await send(client, body, None, time.perf_counter())))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return out, time.perf_counter() - t0


async def burst(
    client: httpx.AsyncClient, params: Params, prompts: Prompts, capacity_rps: float, run: str
) -> tuple[list[Outcome], dict[str, float]]:
    """Open-loop arrivals of fan-out tasks at `params.load` x capacity for `params.duration_s`."""
    task_rate = params.load * capacity_rps / params.fanout
    schedule = arrival_times(task_rate, params.duration_s, params.arrivals, params.seed)
    outcomes: list[Outcome] = []
    pending: list[tuple[asyncio.Task, dict[str, Any], float]] = []

    def task_calls(k: int, at: float) -> None:
        headers = {TASK_ID_HEADER: f"{run}-{k}-{uuid.uuid4().hex[:8]}"}
        for _ in range(params.fanout):
            trace: dict[str, Any] = {}
            body = _body(params.model, prompts.next(), params.max_tokens)
            t = asyncio.create_task(send(client, body, headers, at, trace))
            pending.append((t, trace, at))

    t0 = time.perf_counter()
    for k, offset in enumerate(schedule):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task_calls(k, t0 + offset)
    arrivals_end = time.perf_counter()
    tasks = [t for t, _, _ in pending]
    _, still = await asyncio.wait(tasks, timeout=params.drain_timeout_s) if tasks else (set(), set())
    drained_at = time.perf_counter()
    for t in still:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t, trace, at in pending:
        if t.cancelled():
            # Unfinished: what it had reached (streaming: the time until the drain deadline is a
            # lower bound of a TTFT that never came).
            if trace.get("status") == 200 and "ttft_s" not in trace:
                trace["ttft_s"] = drained_at - at
            outcomes.append(outcome_of(trace, reason=UNFINISHED))
        elif t.exception() is not None:
            raise BenchmarkError(f"a request raised: {t.exception()!r}")
        else:
            outcomes.append(t.result())
    timing = {
        "tasks": len(schedule),
        "task_rate_per_s": task_rate,
        "arrivals_s": arrivals_end - t0,
        "drain_s": drained_at - arrivals_end,
        "cancelled_at_drain_timeout": len(still),
    }
    return outcomes, timing


def admission_off() -> dict[str, Any]:
    return {"enabled": False}


def admission_on(spec: ServingSpec, model: str, params: Params, pool_limit: int, offered_rps: float) -> dict:
    """The spec's admission section with the benchmark's pool limit, fan-out width and a bucket
    `BUCKET_HEADROOM` x the offered token rate."""
    adm = spec.admission.model_dump(mode="json")
    rate = math.ceil(BUCKET_HEADROOM * offered_rps * (params.prompt_tokens + params.max_tokens))
    adm["enabled"] = True
    adm["default_tenant"] = dict(
        adm["default_tenant"], tokens_per_s=rate, burst_tokens=rate, fanout_width=params.fanout_width
    )
    adm["tenants"] = []
    adm["pool_limits"] = [{"model": model, "max_concurrency": pool_limit}]
    return adm


async def run_all(spec: ServingSpec, model: ModelSpec, params: Params, words: int) -> dict[str, Any]:
    result: dict[str, Any] = {"load_average": {"before_engine": load_average()}}
    stack = await start_stack(spec, model)
    prompts = Prompts(words)
    pauses = GcPauses()
    gc_stats: dict[str, Any] = {}
    result["gc"] = gc_stats
    try:
        # Phase 1: unloaded.
        client, _ = stack.client(admission_off())
        async with client:
            await closed_loop(client, params, prompts, max(params.concurrency), 2 * max(params.concurrency))
            if params.gc_freeze:
                # As vLLM's engine core does with its own heap: the start-up objects (torch,
                # transformers, vLLM, the tokenizer) leave the collector's generations, so a gen2
                # collection no longer walks them (100-300 ms pauses on this machine otherwise).
                gc.collect()
                gc.freeze()
                gc_stats["frozen_objects"] = gc.get_freeze_count()
            await stack.settle()
            result["load_average"]["before_unloaded"] = load_average()
            mark = pauses.mark()
            unloaded, wall = await closed_loop(client, params, prompts, 1, params.unloaded_requests)
            gc_stats["unloaded"] = pauses.since(mark)
            u = ttft_summary([o.ttft_s for o in unloaded], wall)
            prompt_lens = [o.prompt_tokens for o in unloaded if o.prompt_tokens]
            slo = slo_s(u["ttft_p99_s"])
            budget = wait_budget_s(slo, u["ttft_p50_s"])
            logger.info(
                "unloaded: TTFT p50 %.2f ms p99 %.2f ms -> SLO %.2f ms",
                u["ttft_p50_s"] * 1e3,
                u["ttft_p99_s"] * 1e3,
                slo * 1e3,
            )

            # Phase 2: capacity.
            result["load_average"]["before_capacity"] = load_average()
            mark = pauses.mark()
            levels = []
            for c in params.concurrency:
                outs, wall = await closed_loop(client, params, prompts, c, max(32, 8 * c))
                lv = {"concurrency": c, **ttft_summary([o.ttft_s for o in outs], wall)}
                lv["within_slo"] = lv["ttft_p99_s"] <= slo
                levels.append(lv)
                logger.info(
                    "c=%d: TTFT p50 %.2f ms p99 %.2f ms, %.2f req/s",
                    c,
                    lv["ttft_p50_s"] * 1e3,
                    lv["ttft_p99_s"] * 1e3,
                    lv["requests_per_s"],
                )
            gc_stats["capacity"] = pauses.since(mark)
            best, qualified = pick_capacity(levels, slo)
            capacity, c_star = best["requests_per_s"], best["concurrency"]
        result.update(
            unloaded=u,
            prompt_tokens={"min": min(prompt_lens), "max": max(prompt_lens)} if prompt_lens else None,
            slo_s=slo,
            tier_ttft_slo_s=budget,
            capacity_levels=levels,
            capacity={"requests_per_s": capacity, "concurrency": c_star, "qualified": qualified},
        )

        # Phase 3: the burst, admission off then on.
        offered_rps = params.load * capacity
        runs = {}
        for name in ("off", "on"):
            await stack.settle()
            if name == "off":
                adm = admission_off()
            else:
                adm = admission_on(spec, model.name, params, c_star, offered_rps)
            client, gateway = stack.client(adm, None if name == "off" else budget)
            async with client:
                # Seed the pool's hold-time estimate: a fresh controller predicts no wait at all
                # until its first release (see the module docstring).
                await closed_loop(client, params, prompts, c_star, 4 * c_star)
                hold = gateway.admission.pool(model.name).mean_hold_s
                await stack.settle()
                result["load_average"][f"before_burst_{name}"] = load_average()
                mark = pauses.mark()
                outs, timing = await burst(client, params, prompts, capacity, name)
                gc_stats[f"burst_{name}"] = pauses.since(mark)
            await gateway.close()
            summary = summarize_burst(outs, params.duration_s, slo, capacity)
            runs[name] = {
                "admission": adm,
                "tier_ttft_slo_s": None if name == "off" else budget,
                "mean_hold_s_after_warmup": hold if name == "on" else None,
                **timing,
                **summary,
            }
            logger.info("burst, admission %s: %s", name, _brief(runs[name]))
        result["burst"] = runs
        result["load_average"]["after"] = load_average()
    finally:
        pauses.close()
        await stack.engine.shutdown()
    return result


# --------------------------------------------------------------------------- report


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1e3:.1f}"


def _brief(r: dict[str, Any]) -> str:
    return (
        f"offered {r['offered']}, admitted {r['admitted']}, rejected {r['rejected']}, "
        f"completed {r['completed']}, TTFT p50 {_ms(r['admitted_ttft_p50_s'])} ms "
        f"p99 {_ms(r['admitted_ttft_p99_s'])} ms, goodput {r['goodput_rps']:.2f} req/s"
    )


def _pair(breakdown: dict[str, float], name: str) -> str:
    return f"{_ms(breakdown[f'{name}_p50_s'])} / {_ms(breakdown[f'{name}_p99_s'])} ms"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_report(res: dict[str, Any]) -> str:
    """The unloaded figures, the capacity table, both burst runs and the goal lines."""
    p, u, cap = res["params"], res["unloaded"], res["capacity"]
    slo = res["slo_s"]
    lines = [
        f"model {p['model']}, prompts ~{p['prompt_tokens']} tokens, {p['max_tokens']} output tokens, "
        f"{res['machine']['cpu_count']} cores",
        f"\nunloaded ({u['requests']} sequential): TTFT p50 {_ms(u['ttft_p50_s'])} ms, "
        f"p99 {_ms(u['ttft_p99_s'])} ms -> SLO = {SLO_FACTOR:g} x p99 = {_ms(slo)} ms",
        "\ncapacity (closed loop)",
        f"{'conc':>5} {'reqs':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'req/s':>7}  p99 <= SLO",
    ]
    for lv in res["capacity_levels"]:
        mark = " <- capacity" if lv["concurrency"] == cap["concurrency"] else ""
        lines.append(
            f"{lv['concurrency']:>5} {lv['requests']:>5} {_ms(lv['ttft_p50_s']):>9} "
            f"{_ms(lv['ttft_p99_s']):>9} {lv['requests_per_s']:>7.2f}  "
            f"{'yes' if lv['within_slo'] else 'no'}{mark}"
        )
    note = "" if cap["qualified"] else " (no level met the SLO: the lowest level is used)"
    lines.append(f"capacity {cap['requests_per_s']:.2f} req/s at C* = {cap['concurrency']}{note}")
    on = res["burst"]["on"]
    lines.append(
        f"\nburst: {p['fanout']} calls per task, {p['load']:g} x capacity offered "
        f"({p['load'] * cap['requests_per_s']:.2f} req/s), {p['duration_s']:g} s of {p['arrivals']} "
        "arrivals; "
        f"admission on: pool limit {cap['concurrency']}, tier ttft_slo_s {_ms(on['tier_ttft_slo_s'])} ms "
        f"(SLO - unloaded p50), fan-out width {p['fanout_width']}"
    )
    rows = [
        ("offered", lambda r: f"{r['offered']} ({r['offered_rps']:.2f}/s)"),
        ("admitted", lambda r: str(r["admitted"])),
        ("rejected", lambda r: str(r["rejected"])),
        ("  by reason", lambda r: ", ".join(f"{k}: {v}" for k, v in r["rejected_by_reason"].items()) or "-"),
        (
            "  Retry-After",
            lambda r: ", ".join(f"{k} s: {v}" for k, v in r["retry_after_s"].items()) or "-",
        ),
        ("failed in stream", lambda r: str(r["failed_in_stream"])),
        ("unfinished", lambda r: f"{r['unfinished']} (drain {r['drain_s']:.1f} s)"),
        ("completed", lambda r: f"{r['completed']} ({r['completed_rps']:.2f}/s)"),
        ("admitted TTFT p50", lambda r: f"{_ms(r['admitted_ttft_p50_s'])} ms"),
        ("admitted TTFT p99", lambda r: f"{_ms(r['admitted_ttft_p99_s'])} ms"),
        ("admitted TTFT max", lambda r: f"{_ms(r['admitted_ttft_max_s'])} ms"),
        ("  of which p50/p99:", lambda r: ""),
        ("    send lateness", lambda r: _pair(r["admitted_breakdown"], "lateness")),
        ("    admit (fan-out)", lambda r: _pair(r["admitted_breakdown"], "admission_wait")),
        ("    pool queue", lambda r: _pair(r["admitted_breakdown"], "pool_wait")),
        ("    rest (engine...)", lambda r: _pair(r["admitted_breakdown"], "rest")),
        (
            "429 latency p50/p99",
            lambda r: f"{_ms(r['rejection_latency_p50_s'])} / {_ms(r['rejection_latency_p99_s'])} ms",
        ),
        ("send lateness p99", lambda r: f"{_ms(r['lateness_p99_s'])} ms"),
        ("goodput (TTFT<=SLO)", lambda r: f"{r['goodput_rps']:.2f} req/s"),
        ("goodput / capacity", lambda r: f"{r['goodput_over_capacity'] * 100:.1f} %"),
    ]
    lines.append(f"{'':<22} {'admission off':>26} {'admission on':>26}")
    for label, fn in rows:
        lines.append(f"{label:<22} {fn(res['burst']['off']):>26} {fn(on):>26}")
    lines.append("\ngoals (admission on; admission off in brackets)")
    for key, text in (
        ("admitted_p99_ttft", f"admitted p99 TTFT <= {SLO_FACTOR:g} x unloaded p99 ({_ms(slo)} ms)"),
        ("goodput", f"goodput >= {GOODPUT_GOAL:.0%} of capacity"),
    ):
        lines.append(
            f"  {text}: {_verdict(on['goal_met'][key])} [{_verdict(res['burst']['off']['goal_met'][key])}]"
        )
    lines.append(f"load average before each phase: {res['load_average']}")
    gcs = res["gc"]
    lines.append(
        "GC in this process (gc.freeze: "
        + ("yes" if p["gc_freeze"] else "no")
        + "): "
        + ", ".join(
            f"{k} {v['gen2']} gen2 / max pause {_ms(v['max_pause_s'])} ms"
            for k, v in gcs.items()
            if isinstance(v, dict)
        )
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(params: Params) -> dict[str, Any]:
    """All three phases; the full result (what --json writes)."""
    from serving.tokenizer import PromptTokenizer

    spec = load_spec(params.config)
    try:
        model = spec.model(params.model)
    except KeyError:
        raise SystemExit(f"--model: {params.model!r} is not in {params.config}") from None
    if len(model.pools) != 1:
        raise SystemExit(f"model {model.name!r}: the benchmark needs exactly one (colocated) pool")
    tokenizer = PromptTokenizer(spec.resolve_source(model))
    words = calibrate_words(tokenizer, params.prompt_tokens)
    env = dict(model.pools[0].env)
    if not params.engine_multiprocessing:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t0 = time.perf_counter()
    before = child_pids()
    try:
        with pool_env(env):
            result = asyncio.run(run_all(spec, model, params, words))
    finally:
        wait_for_exit(child_pids() - before)
    goals = result["burst"]["on"]["goal_met"]
    return {
        "params": asdict(params),
        "engine_env": env,
        "slo_factor": SLO_FACTOR,
        "goodput_goal": GOODPUT_GOAL,
        **result,
        "goal_met": dict(goals),
        "machine": machine_info(httpx=httpx.__version__),
        "elapsed_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
