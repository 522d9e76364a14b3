"""Tandem vs `vllm serve` on the same model, engine args and core binding, in one run.

    python -m benchmarks.overhead [--config configs/local.yaml] [--model tiny-intent]
        [--concurrency 1,16,64] [--num-prompts 200] [--own-requests 64]
        [--prompt-tokens 128] [--max-tokens 64] [--json FILE]

Method
------
Two servers, one after the other, on the same machine:

1. **vllm serve**: vLLM's own OpenAI server (`python -m benchmarks.vllm_cli serve`, the `vllm`
   CLI under the CPU build) on the model's weights with the engine args of the model's serving
   pool (`serving.app.engine_args_for`, without the P/D and KV-event settings: a colocated engine)
   and the pool's `env` (so the same `VLLM_CPU_OMP_THREADS_BIND` core).
2. **tandem**: `tandem up` (as `make run` does: its own Ray cluster, the spec's data plane) on the
   spec trimmed to the model and its tiers. A P/D model keeps its prefill and decode pools and, with
   `--disagg on` (the default for a P/D model), every request is disaggregated.

Each server gets, at every concurrency level, `vllm bench serve` (vLLM's load generator, a
separate process: `--dataset-name random --random-input-len P --random-output-len T --ignore-eos`,
`--max-concurrency c`, `--num-prompts N`, 8 warm-up requests; chat for a colocated model,
`/v1/completions` for a reasoning model, whose chat stream hides the reasoning), then this script's
own streaming client (closed loop, `--own-requests` distinct chat/text prompts, greedy,
`ignore_eos`). While `vllm bench serve` runs, the CPU seconds of every process of the server are
read (psutil, user + system) and divided by the output tokens of the level: **µs of CPU per
output token**, per kind of process. "Outside the engine" is every process but vLLM's engine core
and its worker (for `vllm serve`: its API server process, which also runs vLLM's AsyncLLM front end;
for Tandem: HAProxy or the Serve proxy, the ingress, the engine replica with its AsyncLLM, and Ray's
own processes). That figure sizes ingress replicas on a GPU node: tokens/s one core can carry.

Goals (issue 13): at c=1, TTFT p50 within 5 ms and p99 within 15 ms of `vllm serve`; at c=16 and
c=64, output tok/s >= 0.8 x and TTFT p50 <= 1.5 x `vllm serve`.

Caveats
-------
* Two cores: the client, the server's front end and the engine share them, so any CPU the serving
  layers use is taken from the engine. Idle vLLM CPU engines no longer spin (see benchmarks/idle.py)
  but a P/D stack runs two engines on two cores.
* TPOT is vLLM's: (E2E - TTFT) / (output tokens - 1), a mean per request; ITL is the gap between
  stream messages. Tandem's replicas send a stream at most once per `stream_flush_ms` (default
  20 ms) after its first token, so its ITL is lumpier than its TPOT; `vllm serve` sends every token.
* The servers run one after the other, so other load on the machine may differ between them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BenchmarkError, int_list, load_average, machine_info, percentile, run_main
from benchmarks.stack import Server, cpu_seconds, free_port, start_server, start_tandem
from serving.config import ModelSpec, ServingSpec, default_config_path, load_spec

logger = logging.getLogger(__name__)

#: Goals: c=1 added TTFT (ms) at p50 / p99; at the loaded levels, tok/s and TTFT p50 ratios.
GOAL_C1_ADDED_TTFT_MS = {"p50": 5.0, "p99": 15.0}
GOAL_TOKS_RATIO = 0.8
GOAL_TTFT_RATIO = 1.5
_BENCH_TIMEOUT_S = 900.0
#: Processes that are the engine itself (not counted "outside the engine").
ENGINE_ROLES = frozenset({"vllm engine core", "vllm worker"})
#: Words of filler text the prompts are built from (repeated to reach --prompt-tokens).
_FILLER = (
    "a customer writes to support about an order that arrived late and asks whether the "
    "shipping fee can be refunded or whether a discount on the next purchase is possible"
).split()
#: Request indices of warm-up prompts start here, so they never share a prefix with measured ones.
_HTTP_TIMEOUT_S = 300.0


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
    from serving.http.protocol import ChatMessage

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


def _check_tokens(timing: RequestTiming, max_tokens: int) -> RequestTiming:
    if timing.tokens != max_tokens:
        raise BenchmarkError(f"a request generated {timing.tokens} tokens, expected {max_tokens}")
    return timing


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """What to run."""

    config: str
    model: str
    concurrency: tuple[int, ...]
    num_prompts: int
    own_requests: int
    prompt_tokens: int
    max_tokens: int
    disagg: str

    def as_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def parse_args(argv: list[str] | None) -> tuple[Params, str | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    p.add_argument("--model", default="tiny-intent", help="model (from the spec) to benchmark")
    p.add_argument("--concurrency", type=int_list, default=(1, 16, 64), help="levels, e.g. 1,16,64")
    p.add_argument("--num-prompts", type=int, default=200, help="vllm bench serve prompts per level")
    p.add_argument("--own-requests", type=int, default=64, help="own-client requests per level (0: none)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (random dataset)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--disagg", choices=("on", "auto"), default="on", help="P/D model: force disaggregation")
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    a = p.parse_args(argv)
    if a.prompt_tokens < 1 or a.max_tokens < 2 or a.num_prompts < 1 or a.own_requests < 0:
        p.error("--prompt-tokens >= 1, --max-tokens >= 2 (TPOT needs two tokens), --num-prompts >= 1")
    return Params(
        config=a.config,
        model=a.model,
        concurrency=tuple(dict.fromkeys(a.concurrency)),
        num_prompts=a.num_prompts,
        own_requests=a.own_requests,
        prompt_tokens=a.prompt_tokens,
        max_tokens=a.max_tokens,
        disagg=a.disagg,
    ), a.json_path


# --------------------------------------------------------------------------- servers


def reference_args(spec: ServingSpec, model: ModelSpec) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` arguments and environment for the same engine as `model`'s serving pool, colocated."""
    from serving.app import engine_args_for

    pool = model.serving_pool
    args = engine_args_for(pool)  # no model: no P/D transfer config, no KV events
    argv = [spec.resolve_source(model), "--served-model-name", model.name]
    for key, value in sorted(args.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv, dict(pool.env)


def start_vllm(spec: ServingSpec, model: ModelSpec, workdir: Path) -> Server:
    argv, env = reference_args(spec, model)
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.vllm_cli", "serve", *argv, "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    return start_server("vllm serve", cmd, {"HF_HUB_OFFLINE": "1", **env}, f"http://127.0.0.1:{port}",
                  workdir / "vllm-serve.log")  # fmt: skip


# --------------------------------------------------------------------------- one level


def _cpu_used(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    used: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        used[role] = used.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return used


def vllm_bench(server: Server, model: ModelSpec, tokenizer_path: str, params: Params, c: int,
               out: Path) -> dict[str, Any]:  # fmt: skip
    """One `vllm bench serve` run at concurrency `c`; its result JSON."""
    chat = model.reasoning is None
    cmd = [
        sys.executable, "-m", "benchmarks.vllm_cli", "bench", "serve",
        "--backend", "openai-chat" if chat else "openai",
        "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
        "--base-url", server.url, "--model", model.name, "--tokenizer", tokenizer_path,
        "--dataset-name", "random", "--random-input-len", str(params.prompt_tokens),
        "--random-output-len", str(params.max_tokens), "--ignore-eos",
        "--num-prompts", str(params.num_prompts), "--max-concurrency", str(c), "--num-warmups", "8",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--disable-tqdm", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BENCH_TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        raise BenchmarkError(
            f"vllm bench serve failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    result = json.loads(out.read_text())
    if result.get("failed", 0) or result.get("completed", 0) != params.num_prompts:
        raise BenchmarkError(f"vllm bench serve: {result.get('failed')} failed of {params.num_prompts}")
    return result


def bench_level(server: Server, model: ModelSpec, tokenizer_path: str, params: Params, c: int,
                workdir: Path) -> dict[str, Any]:  # fmt: skip
    before = cpu_seconds(server.processes())
    t0 = time.monotonic()
    r = vllm_bench(
        server, model, tokenizer_path, params, c, workdir / f"{server.name.replace(' ', '-')}-c{c}.json"
    )
    wall = time.monotonic() - t0
    used = _cpu_used(before, cpu_seconds(server.processes()))
    tokens = r["total_output_tokens"]
    per_token = {role: cpu / tokens * 1e6 for role, cpu in sorted(used.items(), key=lambda kv: -kv[1])
                 if cpu / wall >= 0.005}  # fmt: skip
    outside = sum(v for role, v in used.items() if role not in ENGINE_ROLES) / tokens * 1e6
    return {
        "concurrency": c,
        "completed": r["completed"],
        "output_tokens_per_s": r["output_throughput"],
        "ttft_p50_ms": r["p50_ttft_ms"],
        "ttft_p99_ms": r["p99_ttft_ms"],
        "tpot_p50_ms": r["p50_tpot_ms"],
        "itl_p50_ms": r["p50_itl_ms"],
        "itl_p99_ms": r["p99_itl_ms"],
        "e2e_p50_ms": r["p50_e2el_ms"],
        "cpu_us_per_output_token": {k: round(v, 1) for k, v in per_token.items()},
        "cpu_us_per_output_token_outside_engine": round(outside, 1),
        "cores": {role: round(cpu / wall, 3) for role, cpu in used.items() if cpu / wall >= 0.005},
        "load_average": load_average(),
    }


# --------------------------------------------------------------------------- own client


def _body(model: str, prompt: Prompt, max_tokens: int, chat: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


async def stream_request(
    client: Any, model: str, prompt: Prompt, max_tokens: int, chat: bool = True
) -> RequestTiming:
    """One streamed chat (or text) completion; TTFT and the gaps between output events."""
    clock = StreamClock()
    tokens = 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", path, json=_body(model, prompt, max_tokens, chat)) as r:
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
            if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                clock.event()
            if frame.get("usage"):
                tokens = frame["usage"]["completion_tokens"]
    return _check_tokens(clock.timing(tokens), max_tokens)


async def _own_levels(
    server: Server, model: ModelSpec, prompts: list[Prompt], params: Params
) -> dict[int, dict]:
    import httpx

    chat = model.reasoning is None
    limits = httpx.Limits(max_connections=max(params.concurrency) + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=_HTTP_TIMEOUT_S, limits=limits) as client:

        async def send(_: int, prompt: Prompt) -> RequestTiming:
            return await stream_request(client, model.name, prompt, params.max_tokens, chat)

        await closed_loop(send, prompts[:8], 4)  # warm-up (the last prompts are never measured)
        out = {}
        for c in params.concurrency:
            run = await closed_loop(send, prompts[8 : 8 + params.own_requests], c)
            s = run.summary()
            out[c] = {k: s[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "tokens_per_s")}
        return out


# --------------------------------------------------------------------------- the run


def _serve_and_measure(server: Server, model: ModelSpec, tokenizer_path: str, prompts: list[Prompt],
                       params: Params, workdir: Path) -> dict[str, Any]:  # fmt: skip
    levels = []
    for c in params.concurrency:
        level = bench_level(server, model, tokenizer_path, params, c, workdir)
        logger.info("%s c=%d: %.0f tok/s, TTFT p50 %.1f ms", server.name, c, level["output_tokens_per_s"],
                    level["ttft_p50_ms"])  # fmt: skip
        levels.append(level)
    own = asyncio.run(_own_levels(server, model, prompts, params)) if params.own_requests else {}
    for level in levels:
        level["own_client"] = own.get(level["concurrency"])
    return {"levels": levels}


def compare(ref: dict[str, Any], tandem: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: Tandem against `vllm serve`, and whether each goal holds."""
    rows = []
    for r, t in zip(ref["levels"], tandem["levels"], strict=True):
        c = r["concurrency"]
        row: dict[str, Any] = {
            "concurrency": c,
            "ttft_added_p50_ms": t["ttft_p50_ms"] - r["ttft_p50_ms"],
            "ttft_added_p99_ms": t["ttft_p99_ms"] - r["ttft_p99_ms"],
            "ttft_p50_ratio": t["ttft_p50_ms"] / r["ttft_p50_ms"],
            "toks_ratio": t["output_tokens_per_s"] / r["output_tokens_per_s"],
            "tpot_p50_ratio": t["tpot_p50_ms"] / r["tpot_p50_ms"],
        }
        if c == 1:
            row["goal_met"] = (
                row["ttft_added_p50_ms"] <= GOAL_C1_ADDED_TTFT_MS["p50"]
                and row["ttft_added_p99_ms"] <= GOAL_C1_ADDED_TTFT_MS["p99"]
            )
        else:
            row["goal_met"] = (
                row["toks_ratio"] >= GOAL_TOKS_RATIO and row["ttft_p50_ratio"] <= GOAL_TTFT_RATIO
            )
        rows.append(row)
    return rows


def run(params: Params) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = load_spec(params.config)
    model = spec.model(params.model)
    tokenizer_path = spec.resolve_source(model)
    from serving.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer(tokenizer_path)
    words = calibrate_words(tokenizer, params.prompt_tokens)
    prompts = build_prompts(tokenizer, params.own_requests + 8, words)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-overhead-") as tmp:
        workdir = Path(tmp)
        for name, start in (
            ("vllm_serve", lambda: start_vllm(spec, model, workdir)),
            ("tandem", lambda: start_tandem(spec, model, params.disagg, workdir)),
        ):
            server = start()
            try:
                results[name] = _serve_and_measure(server, model, tokenizer_path, prompts, params, workdir)
            finally:
                server.stop()
            results[name]["log_tail"] = server.log.read_text()[-2000:] if name == "tandem" else ""
    return {
        "params": params.as_json(),
        "model": model.name,
        "disaggregated": model.disaggregated,
        "data_plane": spec.server.data_plane.value,
        "stream_flush_ms": model.serving_pool.stream_flush_ms,
        "vllm_serve": results["vllm_serve"],
        "tandem": results["tandem"],
        "comparison": compare(results["vllm_serve"], results["tandem"]),
        "machine": machine_info(),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def _fmt(v: float, nd: int = 1) -> str:
    return f"{v:,.{nd}f}"


def _own(o: Mapping[str, float]) -> str:
    return f"{_fmt(o['ttft_p50_ms'])} / {_fmt(o['ttft_p99_ms'])}, {_fmt(o['tokens_per_s'], 0)}"


def format_report(r: dict[str, Any]) -> str:
    ref, tan, cmp_ = r["vllm_serve"]["levels"], r["tandem"]["levels"], r["comparison"]
    mode = "P/D (disaggregated)" if r["disaggregated"] else "colocated"
    lines = [
        f"{r['model']}: Tandem ({mode}, data plane {r['data_plane']}, stream_flush_ms "
        f"{r['stream_flush_ms']:g}) vs vllm serve, measured by vllm bench serve",
        "",
        "| c | TTFT p50 / p99 vllm serve | TTFT p50 / p99 Tandem | TPOT p50 vllm / Tandem | ITL p50 / p99 "
        "Tandem | tok/s vllm / Tandem | Tandem / vllm | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b, c in zip(ref, tan, cmp_, strict=True):
        lines.append(
            f"| {a['concurrency']} | {_fmt(a['ttft_p50_ms'])} / {_fmt(a['ttft_p99_ms'])} ms | "
            f"{_fmt(b['ttft_p50_ms'])} / {_fmt(b['ttft_p99_ms'])} ms | {_fmt(a['tpot_p50_ms'], 2)} / "
            f"{_fmt(b['tpot_p50_ms'], 2)} ms | {_fmt(b['itl_p50_ms'], 2)} / {_fmt(b['itl_p99_ms'])} ms | "
            f"{_fmt(a['output_tokens_per_s'], 0)} / {_fmt(b['output_tokens_per_s'], 0)} | "
            f"{c['toks_ratio']:.2f} | {'met' if c['goal_met'] else 'MISSED'} |"
        )
    lines += ["", "CPU per output token (µs), while vllm bench serve ran:", ""]
    for name, levels in (("vllm serve", ref), ("Tandem", tan)):
        for lv in levels:
            parts = ", ".join(f"{k} {v:,.0f}" for k, v in lv["cpu_us_per_output_token"].items())
            lines.append(
                f"- {name} c={lv['concurrency']}: outside the engine "
                f"**{lv['cpu_us_per_output_token_outside_engine']:,.0f}** ({parts})"
            )
    own = [
        (lv["concurrency"], a.get("own_client"), lv.get("own_client")) for lv, a in zip(tan, ref, strict=True)
    ]
    if any(o for _, o, _ in own):
        lines += ["", "Own client (TTFT p50 / p99 ms, tok/s): vllm serve | Tandem", ""]
        for c, a, b in own:
            if a and b:
                lines.append(f"- c={c}: {_own(a)} | {_own(b)}")
    lines.append(f"\n({r['elapsed_s']:.0f} s in all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    sys.exit(main())
