"""How much latency Tandem adds over calling the same vLLM engine directly, measured in one run.

    python -m benchmarks.overhead [--config configs/local.yaml] [--model tiny-intent]
        [--concurrency 1,16] [--requests N | N1,N2] [--prompt-tokens 128] [--max-tokens 64]
        [--json FILE] [--port P]

Method
------
The same prompt set (distinct prompts, one per request; warm-up prompts differ from all of them)
is sent twice, one phase after the other, at each concurrency level as a closed loop of `c`
workers (each worker sends its next request when the previous one has finished):

1. **direct**: in this process, with the pool's `env` from the spec applied to `os.environ`, a
   `VLLMEngine` is built exactly as an engine replica builds it (same weights, same
   `engine_args_for(pool)`) and driven through `engine.generate(GenerateRequest(...))` with
   token ids prepared beforehand by the model's own tokenizer and chat template
   (`serving.tokenizer.PromptTokenizer`, which is what the ingress uses). The engine is then shut
   down and its process is waited for before phase 2.
2. **tandem**: a local Ray cluster (`start_local_ray`) serves the Tandem app built from the spec,
   trimmed to the chosen model; the same prompts go as streaming `POST /v1/chat/completions`
   through one shared `httpx.AsyncClient`.

Both phases use greedy sampling and `ignore_eos`, so every request generates exactly
`--max-tokens` tokens and both phases do the same engine work. An *output event* is an engine
chunk with non-empty text (direct) or an SSE frame with non-empty `delta.content` (tandem). TTFT
is the time from sending a request to its first output event; ITL is each gap between successive
output events of one request (all gaps of a level are pooled for its percentiles). "added" is
tandem minus direct, at p50 and at p99. The goal is added TTFT <= 3 ms at p50 and <= 10 ms at p99.

A breakdown of the mean TTFT is printed as well: the ingress's own TTFT histogram (sum/count from
its `/metrics`, read before and after each level) measures from the Ray handle call to the first
engine chunk, which splits the added time into "ingress -> engine replica" (Ray handle hop and
the replica's generator) and "client <-> ingress" (HTTP client, Serve proxy, FastAPI, prompt
tokenization, SSE encoding). And for each level, the cores each kind of process kept busy (CPU
seconds from psutil over the level's wall time: engine core, Serve proxy, ingress, ...) show
where the CPU went, which on a small machine is usually where the added latency comes from.

Caveats
-------
* The tandem path includes everything a client sees: HTTP and SSE encoding/parsing (the client
  runs in this process), the Serve HTTP proxy actor, the ingress replica (validation,
  tokenization in a thread, SSE frames) and two Ray actor hops (proxy -> ingress,
  ingress -> engine replica). The direct path has none of these, nor tokenization (its prompts
  are tokenized before the clock starts; the local tokenization time is reported separately).
* On a small machine (2 cores) the proxy, the ingress, Ray's own processes (GCS, raylet,
  dashboard) and the benchmark client compete with the engine for CPU, which slows the engine's
  steps too: on such a machine "added" is an upper bound of what the serving layers cost on a
  machine with spare cores. Load averages are recorded before each phase.
* The phases run one after the other, so other load on the machine may differ between them.
* With few requests per level, p99 TTFT is close to the maximum and noisy; ITL pools many gaps.
* Tandem ITL is measured after HTTP chunking: frames that arrive in one read show as a near-zero
  gap followed by a longer one, so tandem ITL percentiles can be lower than direct ones at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from benchmarks.common import BenchmarkError, int_list, load_average, machine_info, percentile
from serving.config import ModelSpec, ServingSpec, default_config_path, load_spec

logger = logging.getLogger(__name__)

#: The goal: Tandem adds at most this much TTFT (ms) at p50 and at p99.
GOAL_ADDED_TTFT_MS = MappingProxyType({"p50": 3.0, "p99": 10.0})
#: Words of filler text the prompts are built from (repeated to reach --prompt-tokens).
_FILLER = (
    "a customer writes to support about an order that arrived late and asks whether the "
    "shipping fee can be refunded or whether a discount on the next purchase is possible"
).split()
#: Request indices of warm-up prompts start here, so they never share a prefix with measured ones.
_WARMUP_OFFSET = 1_000_000
_HTTP_TIMEOUT_S = 300.0
_ENGINE_EXIT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """What to run."""

    config: str
    model: str
    concurrency: tuple[int, ...]
    requests: Mapping[int, int]
    prompt_tokens: int
    max_tokens: int
    port: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model": self.model,
            "concurrency": list(self.concurrency),
            "requests": {str(c): n for c, n in self.requests.items()},
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "port": self.port,
        }


def requests_per_level(requests: tuple[int, ...] | None, levels: tuple[int, ...]) -> dict[int, int]:
    """Requests to send at each level: one number for all, one per level, or max(64, 8c)."""
    if requests is None:
        return {c: max(64, 8 * c) for c in levels}
    if len(requests) == 1:
        return {c: requests[0] for c in levels}
    if len(requests) != len(levels):
        raise SystemExit(f"--requests: give one number or {len(levels)} (one per --concurrency level)")
    return dict(zip(levels, requests, strict=True))


def parse_args(argv: list[str] | None) -> tuple[Params, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description="Latency Tandem adds over calling the same vLLM engine directly.",
    )
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    p.add_argument("--model", default="tiny-intent", help="model (from the spec) to benchmark")
    p.add_argument("--concurrency", type=int_list, default=(1, 16), help="levels, e.g. 1,16")
    p.add_argument(
        "--requests",
        type=int_list,
        default=None,
        help="requests per level: one number, or one per level (default max(64, 8c))",
    )
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    p.add_argument("--port", type=int, help="HTTP port of the Tandem phase (default: a free one)")
    a = p.parse_args(argv)
    if a.prompt_tokens < 1 or a.max_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --max-tokens >= 2 (ITL needs two tokens)")
    levels = tuple(dict.fromkeys(a.concurrency))
    return Params(
        config=a.config,
        model=a.model,
        concurrency=levels,
        requests=requests_per_level(a.requests, levels),
        prompt_tokens=a.prompt_tokens,
        max_tokens=a.max_tokens,
        port=a.port,
    ), a.json_path


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: the text sent over HTTP and the token ids the ingress makes of it."""

    text: str
    token_ids: list[int]


def _prompt_text(index: int, words: int) -> str:
    filler = " ".join(itertools.islice(itertools.cycle(_FILLER), words))
    return f"Ticket {index}: {filler}."


def _encode(tokenizer: Any, text: str) -> list[int]:
    from serving.openai_protocol import ChatMessage

    return tokenizer.encode_chat([ChatMessage(role="user", content=text)])


def calibrate_words(tokenizer: Any, target_tokens: int) -> int:
    """Filler words that make a chat prompt about `target_tokens` tokens long (template included)."""
    words = max(1, target_tokens // 2)
    for _ in range(6):
        n = len(_encode(tokenizer, _prompt_text(0, words)))
        if n == target_tokens:
            break
        words = max(1, round(words * target_tokens / n))
    return words


def build_prompts(tokenizer: Any, count: int, words: int, offset: int = 0) -> list[Prompt]:
    """`count` distinct prompts (they differ in their leading ticket number)."""
    texts = [_prompt_text(offset + i, words) for i in range(count)]
    return [Prompt(t, _encode(tokenizer, t)) for t in texts]


def tokenize_ms(tokenizer: Any, prompts: list[Prompt]) -> float:
    """Median time (ms) to tokenize one of `prompts` here, as the ingress does for each request."""
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        _encode(tokenizer, p.text)
        times.append(time.perf_counter() - t0)
    return percentile(times, 50) * 1e3


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class RequestTiming:
    """Timing of one streamed request, in seconds."""

    ttft: float
    itls: tuple[float, ...]
    tokens: int


class StreamClock:
    """Collects the output-event times of one request."""

    __slots__ = ("_start", "_events")

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._events: list[float] = []

    def event(self) -> None:
        self._events.append(time.perf_counter())

    def timing(self, tokens: int) -> RequestTiming:
        if not self._events:
            raise BenchmarkError("a request produced no output text")
        ev = self._events
        return RequestTiming(ev[0] - self._start, tuple(b - a for a, b in itertools.pairwise(ev)), tokens)


@dataclass(frozen=True)
class LevelRun:
    """All requests of one concurrency level."""

    concurrency: int
    timings: tuple[RequestTiming, ...]
    wall_s: float
    cpu_cores: Mapping[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        ttft = [t.ttft for t in self.timings]
        itl = [g for t in self.timings for g in t.itls]
        tokens = sum(t.tokens for t in self.timings)
        return {
            "requests": len(self.timings),
            "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "ttft_mean_ms": sum(ttft) / len(ttft) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3,
            "itl_p99_ms": percentile(itl, 99) * 1e3,
            "requests_per_s": len(self.timings) / self.wall_s,
            "tokens_per_s": tokens / self.wall_s,
            "completion_tokens": tokens,
            "wall_s": self.wall_s,
            "cpu_cores": dict(self.cpu_cores),
        }


RequestFn = Callable[[int, Prompt], Awaitable[RequestTiming]]


async def closed_loop(send: RequestFn, prompts: list[Prompt], concurrency: int) -> LevelRun:
    """Send every prompt with `concurrency` workers, each waiting for its previous request."""
    todo = iter(enumerate(prompts))
    timings: list[RequestTiming] = []

    async def worker() -> None:
        for i, prompt in todo:
            timings.append(await send(i, prompt))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return LevelRun(concurrency, tuple(timings), time.perf_counter() - t0)


#: Process roles, by a substring of the process's command line (Ray and vLLM set process titles).
_ROLES = (
    ("ProxyActor", "serve proxy"),
    ("ServeReplica:tandem:ingress", "ingress"),
    ("ServeReplica", "engine replica (AsyncLLM)"),
    ("EngineCore", "vllm engine core"),
    ("Worker", "vllm worker"),
    ("ServeController", "serve controller"),
    ("gcs_server", "ray gcs"),
    ("raylet", "raylet"),
    ("dashboard", "ray dashboard"),
)


def _role(proc: Any) -> str:
    if proc.pid == os.getpid():
        return "benchmark (client / direct AsyncLLM)"
    cmd = " ".join(proc.info["cmdline"] or [])
    return next((role for key, role in _ROLES if key in cmd), "other")


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every visible process, with its role."""
    import psutil

    snap = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            snap[proc.pid] = (_role(proc), times.user + times.system)
    return snap


def cpu_cores(before: Mapping[int, tuple[str, float]], wall_s: float) -> dict[str, float]:
    """Cores each role kept busy since `before` (CPU seconds / wall seconds), busiest first."""
    used: dict[str, float] = {}
    for pid, (role, cpu) in cpu_snapshot().items():
        used[role] = used.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return {
        r: round(c / wall_s, 3) for r, c in sorted(used.items(), key=lambda kv: -kv[1]) if c / wall_s >= 0.005
    }


async def measured_level(send: RequestFn, prompts: list[Prompt], concurrency: int) -> LevelRun:
    """`closed_loop`, with the CPU each process role used meanwhile."""
    before = cpu_snapshot()
    run = await closed_loop(send, prompts, concurrency)
    return replace(run, cpu_cores=cpu_cores(before, run.wall_s))


def _check_tokens(timing: RequestTiming, max_tokens: int) -> RequestTiming:
    if timing.tokens != max_tokens:
        raise BenchmarkError(f"a request generated {timing.tokens} tokens, expected {max_tokens}")
    return timing


# --------------------------------------------------------------------------- phase 1: direct


@contextmanager
def pool_env(env: Mapping[str, str]) -> Iterator[None]:
    """`env` applied to os.environ, restored afterwards (the replica gets it via runtime_env)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_for_exit(pids: set[int]) -> None:
    """Wait for the engine's processes (children started by this process) to be gone."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "resource_tracker" not in " ".join(proc.cmdline()):
                procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=_ENGINE_EXIT_TIMEOUT_S)
    for proc in alive:
        logger.warning("engine process %d still alive after shutdown; terminating it", proc.pid)
        proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for proc in alive:
        proc.kill()
    if alive:
        psutil.wait_procs(alive, timeout=10)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


async def _direct_request(engine: Any, prompt: Prompt, max_tokens: int) -> RequestTiming:
    from serving.engines.base import GenerateRequest, SamplingOptions

    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = GenerateRequest(f"bench-{uuid.uuid4().hex}", prompt.token_ids, sampling)
    clock = StreamClock()
    tokens = 0
    async for chunk in engine.generate(request):
        if chunk.error is not None:
            raise BenchmarkError(f"engine error: {chunk.error.message}")
        if chunk.text:
            clock.event()
        tokens = chunk.completion_tokens
    return _check_tokens(clock.timing(tokens), max_tokens)


async def _direct_levels(
    spec: ServingSpec, model: ModelSpec, params: Params, prompts: list[Prompt], warmup: list[Prompt]
) -> dict[int, LevelRun]:
    from serving.app import engine_args_for
    from serving.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model.name, spec.resolve_source(model), engine_args_for(model.pools[0]))
    await engine.start()
    try:

        async def send(_: int, prompt: Prompt) -> RequestTiming:
            return await _direct_request(engine, prompt, params.max_tokens)

        await closed_loop(send, warmup, max(params.concurrency))
        runs = {}
        for c in params.concurrency:
            runs[c] = await measured_level(send, prompts[: params.requests[c]], c)
            logger.info("direct c=%d: %s", c, _brief(runs[c].summary()))
        return runs
    finally:
        await engine.shutdown()


def run_direct(
    spec: ServingSpec, model: ModelSpec, params: Params, prompts: list[Prompt], warmup: list[Prompt]
) -> dict[int, LevelRun]:
    """Phase 1: the engine in this process; its processes are gone when this returns."""
    before = _child_pids()
    try:
        with pool_env(model.pools[0].env):
            return asyncio.run(_direct_levels(spec, model, params, prompts, warmup))
    finally:
        _wait_for_exit(_child_pids() - before)


# --------------------------------------------------------------------------- phase 2: tandem


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_model_spec(spec: ServingSpec, model: ModelSpec, port: int | None) -> ServingSpec:
    """`spec` serving only `model` (and its tiers), on free (or given) ports."""
    server = spec.server.model_copy(update={"port": port or free_port(), "dashboard_port": free_port()})
    tiers = [t for t in spec.tiers if t.model == model.name]
    return spec.model_copy(update={"server": server, "models": [model], "tiers": tiers})


def _body(model: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt.text}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def _tandem_request(client: Any, model: str, prompt: Prompt, max_tokens: int) -> RequestTiming:
    clock = StreamClock()
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=_body(model, prompt, max_tokens)) as r:
        if r.status_code != 200:
            raise BenchmarkError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            frame = json.loads(data)
            if "error" in frame:
                raise BenchmarkError(f"stream error: {frame['error']}")
            choices = frame.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                clock.event()
            if frame.get("usage"):
                tokens = frame["usage"]["completion_tokens"]
                if frame["usage"]["prompt_tokens"] != len(prompt.token_ids):
                    raise BenchmarkError("the ingress tokenized a prompt differently from this script")
    return _check_tokens(clock.timing(tokens), max_tokens)


_METRIC_RE = r'^{name}{{model="{model}"}} ([0-9.eE+-]+)$'


async def _ingress_ttft(client: Any, model: str) -> tuple[float, float]:
    """(sum, count) of the ingress's TTFT histogram for `model`."""
    text = (await client.get("/metrics")).text
    out = []
    for suffix in ("sum", "count"):
        pattern = _METRIC_RE.format(name=f"tandem_time_to_first_token_seconds_{suffix}", model=model)
        m = re.search(pattern, text, re.MULTILINE)
        out.append(float(m.group(1)) if m else float("nan"))
    return out[0], out[1]


@dataclass(frozen=True)
class TandemRun:
    """A tandem level: client-side timings, and the ingress's mean TTFT over the same requests."""

    run: LevelRun
    ingress_ttft_mean_ms: float


async def _tandem_levels(
    url: str, model: str, params: Params, prompts: list[Prompt], warmup: list[Prompt]
) -> dict[int, TandemRun]:
    import httpx

    width = max(params.concurrency)
    limits = httpx.Limits(max_connections=width + 4, max_keepalive_connections=width + 4)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=_HTTP_TIMEOUT_S, trust_env=False
    ) as client:

        async def send(_: int, prompt: Prompt) -> RequestTiming:
            return await _tandem_request(client, model, prompt, params.max_tokens)

        await closed_loop(send, warmup, width)
        runs = {}
        for c in params.concurrency:
            s0, n0 = await _ingress_ttft(client, model)
            run = await measured_level(send, prompts[: params.requests[c]], c)
            s1, n1 = await _ingress_ttft(client, model)
            ingress_ms = (s1 - s0) / (n1 - n0) * 1e3 if n1 > n0 else float("nan")
            runs[c] = TandemRun(run, ingress_ms)
            logger.info("tandem c=%d: %s", c, _brief(run.summary()))
        return runs


def run_tandem(
    spec: ServingSpec, model: ModelSpec, params: Params, prompts: list[Prompt], warmup: list[Prompt]
) -> dict[int, TandemRun]:
    """Phase 2: a local Ray cluster serving the Tandem app for `model`; stopped when this returns."""
    import ray
    from ray import serve

    from serving.app import build_app_from_spec
    from serving.cli import APP_NAME, start_local_ray

    spec = single_model_spec(spec, model, params.port)
    url = f"http://{spec.server.host}:{spec.server.port}"
    start_local_ray(spec)
    try:
        serve.run(build_app_from_spec(spec), name=APP_NAME, route_prefix="/")
        return asyncio.run(_tandem_levels(url, model.name, params, prompts, warmup))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# --------------------------------------------------------------------------- report


def _brief(s: Mapping[str, float]) -> str:
    return (
        f"TTFT p50 {s['ttft_p50_ms']:.2f} ms p99 {s['ttft_p99_ms']:.2f} ms, "
        f"ITL p50 {s['itl_p50_ms']:.2f} ms p99 {s['itl_p99_ms']:.2f} ms, "
        f"{s['requests_per_s']:.2f} req/s, {s['tokens_per_s']:.1f} tok/s"
    )


def compare_level(direct: LevelRun, tandem: TandemRun) -> dict[str, Any]:
    """Both phases' figures at one level, the added latency, and the goal verdict."""
    d, t = direct.summary(), tandem.run.summary()
    added = {
        f"{metric}_{q}_ms": t[f"{metric}_{q}_ms"] - d[f"{metric}_{q}_ms"]
        for metric in ("ttft", "itl")
        for q in ("p50", "p99")
    }
    goal = {q: added[f"ttft_{q}_ms"] <= limit for q, limit in GOAL_ADDED_TTFT_MS.items()}
    breakdown = {
        "direct_ttft_mean_ms": d["ttft_mean_ms"],
        "ingress_ttft_mean_ms": tandem.ingress_ttft_mean_ms,
        "client_ttft_mean_ms": t["ttft_mean_ms"],
        "ingress_to_engine_ms": tandem.ingress_ttft_mean_ms - d["ttft_mean_ms"],
        "client_to_ingress_ms": t["ttft_mean_ms"] - tandem.ingress_ttft_mean_ms,
    }
    return {
        "concurrency": direct.concurrency,
        "direct": d,
        "tandem": t,
        "added": added,
        "ttft_mean_breakdown": breakdown,
        "goal_met": goal,
    }


def format_report(levels: list[dict[str, Any]], tokenize_p50_ms: float) -> str:
    """A readable table per level, the TTFT breakdown, and the goal check."""
    lines = []
    head = f"{'':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'req/s':>7} {'tok/s':>8}"
    for lv in levels:
        lines += [f"\nconcurrency {lv['concurrency']} ({lv['direct']['requests']} requests; ms)", head]
        for name in ("direct", "tandem"):
            s = lv[name]
            lines.append(
                f"{name:>8} {s['ttft_p50_ms']:9.2f} {s['ttft_p99_ms']:9.2f} "
                f"{s['itl_p50_ms']:8.2f} {s['itl_p99_ms']:8.2f} "
                f"{s['requests_per_s']:7.2f} {s['tokens_per_s']:8.1f}"
            )
        a = lv["added"]
        lines.append(
            f"{'added':>8} {a['ttft_p50_ms']:+9.2f} {a['ttft_p99_ms']:+9.2f} "
            f"{a['itl_p50_ms']:+8.2f} {a['itl_p99_ms']:+8.2f}"
        )
        b = lv["ttft_mean_breakdown"]
        lines.append(
            f"  mean TTFT: direct {b['direct_ttft_mean_ms']:.2f}, at ingress "
            f"{b['ingress_ttft_mean_ms']:.2f}, at client {b['client_ttft_mean_ms']:.2f} -> "
            f"ingress->engine {b['ingress_to_engine_ms']:+.2f}, "
            f"client<->ingress {b['client_to_ingress_ms']:+.2f} "
            f"(of which tokenization ~{tokenize_p50_ms:.2f})"
        )
        for name in ("direct", "tandem"):
            busy = ", ".join(f"{r} {c:.2f}" for r, c in lv[name]["cpu_cores"].items())
            lines.append(f"  cores busy, {name}: {busy}")
    lines.append(
        "\ngoal: added TTFT <= {p50:g} ms at p50 and <= {p99:g} ms at p99".format(**GOAL_ADDED_TTFT_MS)
    )
    for lv in levels:
        a, g = lv["added"], lv["goal_met"]
        verdict = "MET" if all(g.values()) else "NOT MET"
        lines.append(
            f"  c={lv['concurrency']:<4} p50 {a['ttft_p50_ms']:+.2f} ms "
            f"({'ok' if g['p50'] else 'over'}), p99 {a['ttft_p99_ms']:+.2f} ms "
            f"({'ok' if g['p99'] else 'over'}): {verdict}"
        )
    overall = all(all(lv["goal_met"].values()) for lv in levels)
    lines.append(f"overall: {'MET' if overall else 'NOT MET'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(params: Params) -> dict[str, Any]:
    """Both phases; the full result (what --json writes)."""
    from serving.tokenizer import PromptTokenizer

    spec = load_spec(params.config)
    try:
        model = spec.model(params.model)
    except KeyError:
        raise SystemExit(
            f"--model: {params.model!r} is not in {params.config} (models: {[m.name for m in spec.models]})"
        ) from None
    if len(model.pools) != 1:
        raise SystemExit(f"model {model.name!r}: the benchmark needs exactly one (colocated) pool")
    tokenizer = PromptTokenizer(spec.resolve_source(model))
    words = calibrate_words(tokenizer, params.prompt_tokens)
    prompts = build_prompts(tokenizer, max(params.requests.values()), words)
    warmup = build_prompts(tokenizer, max(params.concurrency), words, offset=_WARMUP_OFFSET)
    prompt_lens = [len(p.token_ids) for p in prompts]
    logger.info("%d prompts of %d-%d tokens", len(prompts), min(prompt_lens), max(prompt_lens))

    load = {"before_direct": load_average()}
    t0 = time.perf_counter()
    direct = run_direct(spec, model, params, prompts, warmup)
    load["before_tandem"] = load_average()
    tandem = run_tandem(spec, model, params, prompts, warmup)
    load["after_tandem"] = load_average()
    levels = [compare_level(direct[c], tandem[c]) for c in params.concurrency]
    return {
        "params": params.as_json(),
        "prompt_tokens": {"min": min(prompt_lens), "max": max(prompt_lens)},
        "tokenize_p50_ms": tokenize_ms(tokenizer, prompts),
        "goal_added_ttft_ms": dict(GOAL_ADDED_TTFT_MS),
        "levels": levels,
        "goal_met": all(all(lv["goal_met"].values()) for lv in levels),
        "machine": machine_info(ray=importlib.metadata.version("ray")),
        "load_average": load,
        "elapsed_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    params, json_path = parse_args(argv)
    try:
        result = run(params)
    except BenchmarkError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    print(format_report(result["levels"], result["tokenize_p50_ms"]), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
