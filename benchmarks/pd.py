"""P/D disaggregation vs colocated prefill on the local CPU pair: TTFT, TPOT, KV moved per request.

    python -m benchmarks.pd [--config configs/local.yaml] [--model tiny-reasoning]
        [--prompt-tokens 128,3000] [--requests 8] [--max-tokens 32] [--json FILE]

Method
------
Starts a local Ray cluster and the Tandem app from the spec (the model must have prefill and
decode pools), then for each prompt length sends `--requests` sequential streaming completions in
each mode, forced with the `x-tandem-disagg` header:

- **colocated** (`off`): the decode replica prefills the prompt itself;
- **disagg** (`on`): a prefill replica runs the prompt, the decode engine pulls the KV over NIXL.

Every request has a fresh random token-id prompt (no prefix-cache hits), greedy sampling,
`ignore_eos`, so each generates exactly `--max-tokens` tokens. TTFT is client-side (send → first
SSE token); TPOT is (last token − first token) / (tokens − 1). KV bytes and transfer time come
from the decode engine's NIXL connector stats (vLLM `NixlKVConnectorStats`), read through the
replica before and after each disagg run and divided by the request count. One warm-up request
per mode runs first (the first NIXL transfer pays the connection set-up).

On a 2-core machine the prefill and decode engines are pinned to one core each, but the Ray
processes, the ingress and this client share those cores, so absolute figures are pessimistic;
the comparison between modes is what this measures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import percentile


def one_request(url: str, model: str, prompt: list[int], mode: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"x-tandem-disagg": mode}, timeout=300
    ) as r:
        r.raise_for_status()
        route = r.headers.get("x-tandem-route", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += 1
    assert first is not None and last is not None, "no tokens streamed"
    return {
        "ttft_s": first - t0,
        "tpot_s": (last - first) / max(1, tokens - 1),
        "frames": tokens,
        "route": route,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from serving.app import build_app_from_spec, deployment_name
    from serving.cli import APP_NAME, _build_models, start_local_ray
    from serving.config import Role, load_spec
    from tests.conftest import free_port

    base = load_spec(args.config)
    model = base.model(args.model)
    if not model.disaggregated:
        raise SystemExit(f"{args.model}: needs prefill and decode pools in {args.config}")
    server = base.server.model_copy(update={"port": free_port(), "dashboard_port": free_port()})
    spec = base.model_copy(update={"server": server, "models": [model], "tiers": []})
    _build_models(Path(spec.model_dir).expanduser(), [model.local_model_name()], force=False)
    start_local_ray(spec)
    url = f"http://127.0.0.1:{server.port}"
    rng = random.Random(0)
    results: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "levels": []}
    try:
        serve.run(build_app_from_spec(spec), name=APP_NAME, route_prefix="/")
        decode = serve.get_deployment_handle(deployment_name(model, model.pool(Role.DECODE)), APP_NAME)
        info = decode.model_info.remote().result()
        vocab_hi = 4000

        def prompt(n: int) -> list[int]:
            return [rng.randrange(10, vocab_hi) for _ in range(n)]

        for mode in ("off", "on"):  # warm-up: the first NIXL transfer sets up the connection
            one_request(url, args.model, prompt(256), mode, 4)
        for n in args.prompt_tokens:
            if n + args.max_tokens > info.max_model_len:
                raise SystemExit(f"--prompt-tokens {n} + --max-tokens exceeds max_model_len")
            level: dict[str, Any] = {"prompt_tokens": n}
            for mode, label in (("off", "colocated"), ("on", "disagg")):
                before = decode.stats.remote().result()
                runs = [
                    one_request(url, args.model, prompt(n), mode, args.max_tokens)
                    for _ in range(args.requests)
                ]
                time.sleep(1.5)  # let the last stats interval reach the stat logger
                after = decode.stats.remote().result()
                ttft = [r["ttft_s"] for r in runs]
                tpot = [r["tpot_s"] for r in runs]
                entry = {
                    "requests": len(runs),
                    "ttft_ms_p50": 1e3 * percentile(ttft, 50),
                    "ttft_ms_p90": 1e3 * percentile(ttft, 90),
                    "ttft_ms_mean": 1e3 * statistics.fmean(ttft),
                    "tpot_ms_p50": 1e3 * percentile(tpot, 50),
                    "tpot_ms_mean": 1e3 * statistics.fmean(tpot),
                    "routes": sorted({r["route"].split(";")[0] for r in runs}),
                    "decode_prompt_tokens_computed": after.prompt_tokens_computed
                    - before.prompt_tokens_computed,
                    "decode_prompt_tokens_external": after.prompt_tokens_external
                    - before.prompt_tokens_external,
                }
                if mode == "on":
                    xfers = after.kv_transfers - before.kv_transfers
                    entry["kv_transfers"] = xfers
                    entry["kv_bytes_per_request"] = (
                        after.kv_transfer_bytes - before.kv_transfer_bytes
                    ) / len(runs)
                    entry["kv_transfer_ms_per_request"] = (
                        1e3 * (after.kv_transfer_s - before.kv_transfer_s) / len(runs)
                    )
                level[label] = entry
            results["levels"].append(level)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"P/D vs colocated — {results['model']}, {results['max_tokens']} output tokens, sequential requests"
    ]
    lines.append(
        f"{'prompt':>7} {'mode':>10} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} "
        f"{'KV/req':>10} {'xfer/req':>9} {'decode computed':>16}"
    )
    for lv in results["levels"]:
        for label in ("colocated", "disagg"):
            e = lv[label]
            kv = f"{e['kv_bytes_per_request'] / 2**20:.2f} MiB" if "kv_bytes_per_request" in e else "-"
            xfer = f"{e['kv_transfer_ms_per_request']:.1f} ms" if "kv_transfer_ms_per_request" in e else "-"
            lines.append(
                f"{lv['prompt_tokens']:>7} {label:>10} {e['ttft_ms_p50']:>7.1f}ms {e['ttft_ms_p90']:>7.1f}ms "
                f"{e['tpot_ms_p50']:>7.2f}ms {kv:>10} {xfer:>9} {e['decode_prompt_tokens_computed']:>16}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--model", default="tiny-reasoning")
    p.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 3000])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    print(report(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
