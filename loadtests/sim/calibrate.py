"""Calibration: fit the simulator's serving-overhead terms to one measured load-test run.

The engine profiles are measured on a bare engine (`python -m loadtests fit-profile`). What a real
run adds around the engine is fitted here, from one Locust run's `summary.json` and its workload:

- `Template`: the chat template's tokens, from the run's mean prompt tokens per request type
  (`usage.prompt_tokens` = base + per_message x messages + content; least squares over the types);
- `Overheads.slowdown`: measured TPOT p50 / simulated TPOT p50 (the serving stack's CPU beside the
  engines stretches every step on a shared host);
- the per-request overheads' distributions (`Overheads.ttft_table`, `tpot_table`), from the run's
  records: at each probability of `GRID` the measured TTFT quantile minus the simulated one (ingress,
  Ray Serve hops, the stream, and the host's noise: a GC pause, a busy core), and the measured TPOT
  quantile over the simulated one. A real run's tail is mostly that noise, so a simulator that
  leaves it out can match a median and never a p99.

Then the calibration is frozen: other runs (another rate, another mix, a trace) are predictions.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.sim.calls import Jobs, Template
from loadtests.sim.cluster import Overheads, quantile
from loadtests.summary import percentile
from loadtests.workload import AgentWorkload, FanoutWorkload

SCHEMA = "tandem.sim-calibration/1"


def call_shapes(jobs: Jobs, rate: float | None, duration_s: float | None) -> dict[str, tuple[float, float]]:
    """Per request type of a run's plan: mean (messages, content tokens) of its calls."""
    sums: dict[str, list[float]] = {}
    for a in jobs.plan(rate, duration_s):
        w = jobs.wf.workloads[a.workload]
        if isinstance(w, AgentWorkload):
            calls = list(jobs.agent(w, a.workload, "s"))
        elif isinstance(w, FanoutWorkload):
            calls = jobs.fanout(w, "t")
        else:
            calls = [jobs.single(w, a.item)]
        for c in calls:
            s = sums.setdefault(c.name, [0.0, 0.0, 0.0])
            s[0] += 1
            s[1] += c.messages
            s[2] += c.content_tokens
    return {k: (m / n, c / n) for k, (n, m, c) in sums.items()}


def fit_template(measured: Mapping[str, Any], shapes: Mapping[str, tuple[float, float]]) -> Template:
    """The template's tokens from measured mean prompt tokens per type (see the module docstring)."""
    rows, ys = [], []
    for name, (messages, content) in shapes.items():
        t = measured.get("by_type", {}).get(name)
        if not t or not t.get("ok") or messages == 0:
            continue
        rows.append([1.0, messages])
        ys.append(t["tokens"]["input"] / t["ok"] - content)
    if not rows:
        return Template()
    a, y = np.array(rows), np.array(ys)
    if len({r[1] for r in rows}) < 2:  # one message count: only the total per request is known
        return Template(max(0, round(float(y.mean()))), 0)
    (base, per), *_ = np.linalg.lstsq(a, y, rcond=None)
    if per < 0:
        return Template(max(0, round(float(y.mean()))), 0)
    return Template(max(0, round(float(base))), max(0, round(float(per))))


#: Outputs at least this long (tokens) calibrate TPOT.
LONG_OUTPUT = 32

#: Probabilities at which the overhead distributions are tabulated.
GRID = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def _quantiles(values: list[float]) -> list[float]:
    return [percentile(values, p * 100) or 0.0 for p in GRID]


def _monotone(xs: list[float], floor: float) -> list[float]:
    out, top = [], floor
    for x in xs:
        top = max(top, x)
        out.append(top)
    return out


def recent_rps(records: list[Mapping[str, Any]], window_s: float) -> list[float]:
    """Per record, the calls sent in the `window_s` before it (itself included) per second."""
    sends = sorted(r["sent"] for r in records)
    return [
        (bisect.bisect_right(sends, r["sent"]) - bisect.bisect_left(sends, r["sent"] - window_s)) / window_s
        for r in records
    ]


def _key(r: Mapping[str, Any]) -> tuple:
    return r["name"], round(r["due"], 4), (r.get("tags") or {}).get("turn")


def theil_sen(xs: list[float], ys: list[float]) -> float:
    """The median of the pairwise slopes (robust to the tail a few slow requests make)."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]  # fmt: skip
    return float(np.median(slopes)) if slopes else 0.0


def fit_noise(
    measured: list[Mapping[str, Any]],
    slowdown: float,
    records: Callable[[Overheads], list[Mapping[str, Any]]],
) -> Overheads:
    """The overheads with their load and their noise.

    Measured and simulated requests are paired by their due time (the same plan: the first call of
    every job pairs). Each pair's TTFT residual (measured - simulated without overhead) is
    regressed on the measured run's recent sending rate (`recent_rps`): the slope is
    `ttft_per_rps` (Theil-Sen). What remains is the TTFT table; its floor (1st percentile) is the
    stream latency every message pays. The TPOT table then comes from a simulation with both."""
    from loadtests.sim.cluster import RATE_WINDOW_S

    bare = records(Overheads(0.0, slowdown))
    sim = {_key(r): r for r in bare if r["outcome"] == "ok"}
    ok = [r for r in measured if r["outcome"] == "ok"]
    rates = dict(zip((id(r) for r in ok), recent_rps(ok, RATE_WINDOW_S), strict=True))
    xs, ys = [], []
    for r in ok:
        s = sim.get(_key(r))
        if s is not None and r.get("ttft") is not None and s.get("ttft") is not None:
            xs.append(rates[id(r)])
            ys.append(r["ttft"] - s["ttft"])
    slope = max(0.0, theil_sen(xs, ys)) if len(xs) >= 20 else 0.0
    rest = [y - slope * x for x, y in zip(xs, ys, strict=True)]
    ttft_table = tuple(zip(GRID, _monotone(_quantiles(rest), -math.inf), strict=True))
    stream_s = max(0.0, quantile(ttft_table, 0.01) + slope * min(xs, default=0.0))
    with_ttft = records(Overheads(0.0, slowdown, ttft_table, (), stream_s, slope))
    _, tpot_table = noise_tables(measured, with_ttft)
    return Overheads(0.0, slowdown, ttft_table, tpot_table, stream_s, slope)


def noise_tables(
    measured: list[Mapping[str, Any]], simulated: list[Mapping[str, Any]]
) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]:
    """(ttft_table, tpot_table) from a measured run's ok records and the simulated run's (see the
    module docstring); the simulated run has the slowdown and no TTFT overhead."""

    def ok(rs: list[Mapping[str, Any]], k: str) -> list[float]:
        return [r[k] for r in rs if r["outcome"] == "ok" and r.get(k) is not None]

    mt, st = _quantiles(ok(measured, "ttft")), _quantiles(ok(simulated, "ttft"))
    ttft = _monotone([m - s for m, s in zip(mt, st, strict=True)], 0.0)

    # TPOT from long answers only: a short one's tokens may all arrive with its first (TPOT ~0),
    # and a ratio of two near-zero quantiles says nothing about the engine's pace.
    def long(rs: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in rs if (r.get("output") or 0) >= LONG_OUTPUT]

    mp, sp = _quantiles(ok(long(measured), "tpot")), _quantiles(ok(long(simulated), "tpot"))
    tpot = _monotone([m / s if s > 1e-4 else 1.0 for m, s in zip(mp, sp, strict=True)], 0.0)
    return tuple(zip(GRID, ttft, strict=True)), tuple(zip(GRID, tpot, strict=True))


def tpot_anchor(doc: Mapping[str, Any]) -> str | None:
    """The request type with the longest outputs: its TPOT is the engine's, while a short answer's
    tokens may all reach the client with its first (a coalesced stream, TPOT ~0)."""
    rows = [
        (t["tokens"]["output"] / t["ok"], name) for name, t in doc.get("by_type", {}).items() if t.get("ok")
    ]
    return max(rows)[1] if rows else None


def fit_overheads(
    measured: Mapping[str, Any], simulate: Callable[[Overheads], Mapping[str, Any]], rounds: int = 3
) -> tuple[Overheads, dict[str, Any]]:
    """Slowdown and TTFT offset that make `simulate(overheads)` match `measured` at p50: the TPOT
    of the `tpot_anchor` type, and the TTFT of all requests."""
    anchor = tpot_anchor(measured)

    def tpot(doc: Mapping[str, Any]) -> float | None:
        row = doc["by_type"].get(anchor) if anchor else None
        return (row or doc)["latency"]["tpot"]["p50"]

    m_ttft, m_tpot = measured["latency"]["ttft"]["p50"], tpot(measured)
    oh = Overheads()
    doc: Mapping[str, Any] = {}
    for _ in range(rounds):
        s_tpot = tpot(simulate(oh))
        slowdown = oh.slowdown * (m_tpot / s_tpot) if m_tpot and s_tpot else oh.slowdown
        doc = simulate(Overheads(oh.ttft_s, slowdown))
        s_ttft = doc["latency"]["ttft"]["p50"]
        shift = m_ttft - s_ttft if m_ttft is not None and s_ttft is not None else 0.0
        oh = Overheads(max(0.0, oh.ttft_s + shift), slowdown)
    doc = simulate(oh)
    return oh, dict(doc)


def save(path: str | Path, template: Template, overheads: Overheads, source: Mapping[str, Any]) -> None:
    Path(path).write_text(
        json.dumps(
            {
                "schema": SCHEMA,
                "template": {"base": template.base, "per_message": template.per_message},
                "overheads": {
                    "ttft_s": overheads.ttft_s,
                    "slowdown": overheads.slowdown,
                    "ttft_table": [list(x) for x in overheads.ttft_table],
                    "tpot_table": [list(x) for x in overheads.tpot_table],
                    "stream_s": overheads.stream_s,
                    "ttft_per_rps": overheads.ttft_per_rps,
                },
                "source": dict(source),
            },
            indent=2,
        )
    )


def load(path: str | Path) -> tuple[Template, Overheads]:
    """A calibration file's template and overheads (ValueError naming the file otherwise)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration {path}: cannot read it ({e})") from None
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"calibration {path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    t, o = doc["template"], doc["overheads"]
    tables = {k: tuple((float(p), float(v)) for p, v in o.get(k) or ()) for k in ("ttft_table", "tpot_table")}
    overheads = Overheads(
        float(o["ttft_s"]), float(o["slowdown"]), tables["ttft_table"], tables["tpot_table"]
    )
    return Template(int(t["base"]), int(t["per_message"])), overheads
