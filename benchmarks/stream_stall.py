"""Does a streamed response reach the client as it is produced? Through the front door and around it.

    python -m benchmarks.stream_stall [--config configs/local.yaml] [--model tiny-reasoning]
        [--requests 12] [--max-tokens 64] [--json FILE]

Starts `tandem up` on the spec trimmed to `--model` (`benchmarks.stack.start_tandem`) and sends the
same sequence of streamed requests (alternating `/v1/completions` and `/v1/chat/completions`, and for
a P/D model `x-tandem-disagg: on` and `off`; fresh random prompts, `ignore_eos`), one at a time,
twice: to the API's port (Ray Serve's HAProxy with `server.data_plane: haproxy`, its Python proxy
with `proxy`), and straight to the ingress replica's own HTTP port (Serve's direct ingress,
found as the ingress process's listening port that answers `/health`). Per request it records when
the response headers, the first SSE event and the end arrived.

A request **stalls** when its headers arrive after 80 % of its end-to-end time although the stream
has many events: the ingress produced them as the engine did (one per `stream_flush_ms`), but the
client got them in one burst at the end, and its TTFT is its E2E. The first request of each path is
a warm-up and is not counted.

Found with it (issue 13): some streams stall, more often through HAProxy than straight to the
ingress replica (which also stalls now and then); this is what made `vllm bench serve` read a TPOT of
~0 ms and a TTFT near the E2E for the P/D model in benchmarks/overhead.py. Not explained yet.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import BenchmarkError, machine_info, percentile, run_main
from benchmarks.stack import role_of, start_tandem
from serving.config import default_config_path, load_spec

#: Headers later than this fraction of the request's E2E: a stalled stream.
STALL_FRACTION = 0.8


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    p.add_argument("--model", default="tiny-reasoning", help="model (from the spec) to stream from")
    p.add_argument("--requests", type=int, default=12, help="requests per path (after one warm-up)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--json", dest="json_path", help="write the results to this file")
    a = p.parse_args(argv)
    return a, a.json_path


def ingress_direct_url() -> str:
    """The ingress replica's own HTTP server (Serve's direct ingress): the port of it that answers /health."""
    for proc in psutil.process_iter(["cmdline"]):
        if role_of(proc.info["cmdline"] or []) == "ingress":
            for conn in proc.net_connections("tcp"):
                if conn.status != psutil.CONN_LISTEN:
                    continue
                url = f"http://127.0.0.1:{conn.laddr.port}"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    continue
    raise BenchmarkError("no ingress replica answers /health on a port of its own (direct ingress off?)")


def stalled(events: int, headers_s: float, e2e_s: float) -> bool:
    """A stream of many events whose headers came after `STALL_FRACTION` of its E2E: one burst at the end."""
    return events > 4 and headers_s > STALL_FRACTION * e2e_s


def stream_once(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: float | None = None
    events = 0
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=120) as r:
        hdr = time.perf_counter() - t0
        if r.status_code != 200:
            raise BenchmarkError(f"{path}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events += 1
                if first is None:
                    first = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    return {
        "path": path,
        "disagg": headers.get("x-tandem-disagg", ""),
        "headers_ms": hdr * 1e3,
        "first_event_ms": (first if first is not None else e2e) * 1e3,
        "e2e_ms": e2e * 1e3,
        "events": events,
        "stalled": stalled(events, hdr, e2e),
    }


def requests_for(model: str, n: int, max_tokens: int, pd: bool, seed: int) -> list[tuple[str, dict, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n + 1):
        words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(90))
        common = {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        if i % 2 == 0:
            body, path = {**common, "prompt": words}, "/v1/completions"
        else:
            body, path = {**common, "messages": [{"role": "user", "content": words}]}, "/v1/chat/completions"
        hdr = {"x-tandem-disagg": "on" if (i // 2) % 2 == 0 else "off"} if pd else {}
        out.append((path, body, hdr))
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests": len(rows),
        "stalled": sum(r["stalled"] for r in rows),
        "headers_p50_ms": percentile([r["headers_ms"] for r in rows], 50),
        "first_event_p50_ms": percentile([r["first_event_ms"] for r in rows], 50),
        "first_event_max_ms": max(r["first_event_ms"] for r in rows),
        "e2e_p50_ms": percentile([r["e2e_ms"] for r in rows], 50),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(a.config)
    model = spec.model(a.model)
    work = Path(tempfile.mkdtemp(prefix="tandem-stall-"))
    started = time.monotonic()
    server = start_tandem(spec, model, "auto", work)
    paths: dict[str, Any] = {}
    try:
        front = server.url
        direct = ingress_direct_url()
        for name, url in (("front door", front), ("ingress direct", direct)):
            reqs = requests_for(model.name, a.requests, a.max_tokens, model.disaggregated, seed=1)
            rows = [stream_once(url, *req) for req in reqs]
            paths[name] = {"url": url, "rows": rows[1:], "summary": summary(rows[1:])}
    finally:
        server.stop()
    return {
        "model": model.name,
        "data_plane": spec.server.data_plane.value,
        "stream_flush_ms": model.serving_pool.stream_flush_ms,
        "paths": paths,
        "machine": machine_info(),
        "elapsed_s": time.monotonic() - started,
    }


def _label(row: dict[str, Any]) -> str:
    kind = "chat" if "chat" in row["path"] else "completion"
    return f"{kind}/{row['disagg']}" if row["disagg"] else kind


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']}: streamed requests one at a time, data plane {r['data_plane']}",
        "",
        "| path | requests | stalled | headers p50 | first event p50 / max | E2E p50 |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in r["paths"].items():
        s = p["summary"]
        lines.append(
            f"| {name} | {s['requests']} | {s['stalled']} | {s['headers_p50_ms']:.0f} ms | "
            f"{s['first_event_p50_ms']:.0f} / {s['first_event_max_ms']:.0f} ms | {s['e2e_p50_ms']:.0f} ms |"
        )
    lines += ["", "Per request (headers / first event / E2E ms, events):"]
    for name, p in r["paths"].items():
        lines.append(f"- {name}: " + "; ".join(
            f"{_label(row)} "
            f"{row['headers_ms']:.0f}/{row['first_event_ms']:.0f}/{row['e2e_ms']:.0f}"
            f"{' STALL' if row['stalled'] else ''}"
            for row in p["rows"]
        ))  # fmt: skip
    lines.append(f"\n({r['elapsed_s']:.0f} s in all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
