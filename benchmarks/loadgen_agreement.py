"""Is the Locust client a faithful load generator? Its TTFT against `vllm bench serve`'s, same server.

    python -m benchmarks.loadgen_agreement [--rate 4] [--num-prompts 120] [--rounds 2] [--json FILE]

One `vllm serve` of tiny-intent (vLLM's own server: no Tandem in the path, so only the clients
differ). Against it, in alternating rounds, the same offered load from both generators:

- **vllm bench serve**: `--dataset-name random --random-input-len L --random-output-len O
  --ignore-eos --request-rate R` (Poisson arrivals), text completions;
- **Locust** (`python -m loadtests run`, its own processes): a trace workload of N requests of exactly
  L input and O output tokens (`ignore_eos`), Poisson arrivals at R/s on its absolute schedule.

It prints TTFT p50 / p99 and TPOT p50 from each, the ratio of the TTFT p50s (the goal: within 10 %),
and Locust's own pacing error and CPU per request. Rounds alternate so that a drift of the machine
(2 cores, the idle engine's own spin) lands on both generators alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import BenchmarkError, machine_info, percentile, run_main
from benchmarks.overhead import start_vllm
from serving.config import default_config_path, load_spec

_TIMEOUT_S = 900
ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen_agreement", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", default=str(default_config_path()))
    p.add_argument("--model", default="tiny-intent")
    p.add_argument("--rate", type=float, default=4.0, help="offered requests per second (Poisson)")
    p.add_argument("--num-prompts", type=int, default=120)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", help="keep the runs' files (records, logs) here instead of a temp dir")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    return args, args.json


def _vllm_bench(url: str, model: str, tokenizer: str, a: argparse.Namespace, out: Path, seed: int) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.vllm_cli", "bench", "serve", "--backend", "openai",
        "--endpoint", "/v1/completions", "--base-url", url, "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(a.input_len),
        "--random-output-len", str(a.output_len), "--ignore-eos", "--num-prompts", str(a.num_prompts),
        "--request-rate", str(a.rate), "--burstiness", "1.0", "--seed", str(seed), "--num-warmups", "4",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--disable-tqdm", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        raise BenchmarkError(f"vllm bench serve failed ({proc.returncode}): {proc.stderr[-1500:]}")
    r = json.loads(out.read_text())
    if r.get("completed") != a.num_prompts:
        raise BenchmarkError(f"vllm bench serve completed {r.get('completed')} of {a.num_prompts}")
    return {
        "ttft_p50_ms": r["median_ttft_ms"],
        "ttft_p99_ms": r["p99_ttft_ms"],
        "tpot_p50_ms": r["median_tpot_ms"],
        "itl_p50_ms": r["median_itl_ms"],
        "requests": r["completed"],
        "duration_s": r["duration"],
    }


def _trace(path: Path, n: int, input_len: int, output_len: int) -> None:
    """An Azure-format trace of `n` requests of exactly these lengths (its timestamps are not used)."""
    t0 = datetime(2026, 1, 1)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"{(t0 + timedelta(seconds=i)).strftime('%Y-%m-%d %H:%M:%S.%f')}0,{input_len},{output_len}"
             for i in range(n)]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")


def _locust(url: str, model: str, a: argparse.Namespace, work: Path, seed: int) -> dict:
    trace = work / "fixed.csv"
    _trace(trace, a.num_prompts, a.input_len, a.output_len)
    workload = {
        "duration_s": a.num_prompts / a.rate,
        "shape": {"kind": "poisson", "rate": a.rate},
        "seed": seed,
        "workloads": [{"type": "trace", "path": str(trace), "model": model, "token_scale": 1.0,
                       "max_input_tokens": a.input_len, "max_output_tokens": a.output_len}],
    }  # fmt: skip
    wpath = work / "workload.yaml"
    wpath.write_text(yaml.safe_dump(workload))
    out = work / "locust"
    cmd = [sys.executable, "-m", "loadtests", "run", "--workload", str(wpath), "--host", url, "--no-stack",
           "--no-report", "--out", str(out), "--drain-s", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchmarkError(f"loadtests run failed ({proc.returncode}): {proc.stderr[-1500:]}")
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["outcome"] == "ok"]
    if len(ok) != a.num_prompts:
        raise BenchmarkError(f"Locust completed {len(ok)} of {a.num_prompts}: see {out}")
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    return {
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "tpot_p50_ms": ms(tpot, 50),
        "itl_p50_ms": ms(itl, 50),
        "requests": len(ok),
        "output_tokens_mean": sum(r["output"] for r in ok) / len(ok),
        "pacing_late_p99_ms": 1000 * run["pacing"]["late_p99_s"],
        "client_overhead_p50_ms": 1000 * (run["client_overhead_s"]["p50"] or 0.0),
        "generator_cpu_per_request_ms": run["generator"]["cpu_per_request_ms"],
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(a.config)
    model = spec.model(a.model)
    tokenizer = str(Path(spec.model_dir).expanduser() / a.model)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        server = start_vllm(spec, model, work)
        try:
            for i in range(a.rounds):
                print(f"round {i + 1}/{a.rounds}: vllm bench serve, then Locust", flush=True)
                bench = _vllm_bench(server.url, model.name, tokenizer, a, work / f"bench-{i}.json", seed=i)
                (work / f"l{i}").mkdir(exist_ok=True)
                loc = _locust(server.url, model.name, a, work / f"l{i}", seed=i)
                rounds.append({"vllm_bench": bench, "locust": loc})
        finally:
            server.stop()
    med = lambda key, who: percentile([r[who][key] for r in rounds], 50)  # noqa: E731
    b, lo = med("ttft_p50_ms", "vllm_bench"), med("ttft_p50_ms", "locust")
    return {
        "params": vars(a),
        "machine": machine_info(),
        "rounds": rounds,
        "ttft_p50_ms": {"vllm_bench": b, "locust": lo},
        "ttft_p50_ratio": lo / b,
        "within_10_percent": abs(lo / b - 1) <= 0.10,
    }


def report(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [f"Locust vs vllm bench serve: {p['model']} on vllm serve, {p['rate']:g} req/s Poisson, "
             f"{p['num_prompts']} requests of {p['input_len']} in / {p['output_len']} out tokens", "",
             "round  client            TTFT p50   TTFT p99   TPOT p50   ITL p50 (ms)"]  # fmt: skip
    for i, rd in enumerate(r["rounds"]):
        for who in ("vllm_bench", "locust"):
            x = rd[who]
            lines.append(f"{i + 1:>5}  {who:<16} {x['ttft_p50_ms']:>9.1f} {x['ttft_p99_ms']:>10.1f} "
                         f"{x['tpot_p50_ms']:>10.2f} {x['itl_p50_ms']:>9.2f}")  # fmt: skip
    t = r["ttft_p50_ms"]
    verdict = "within" if r["within_10_percent"] else "NOT within"
    lines += ["", f"TTFT p50 (median of rounds): vllm bench {t['vllm_bench']:.1f} ms, "
              f"Locust {t['locust']:.1f} ms -> ratio {r['ttft_p50_ratio']:.3f}, {verdict} 10 %"]  # fmt: skip
    last = r["rounds"][-1]["locust"]
    lines.append(f"Locust's own figures: pacing late p99 {last['pacing_late_p99_ms']:.1f} ms, "
                 f"client overhead p50 {last['client_overhead_p50_ms']:.2f} ms/request, generator CPU "
                 f"{last['generator_cpu_per_request_ms']:.1f} ms/request")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, _parse, run, report)


if __name__ == "__main__":
    sys.exit(main())
