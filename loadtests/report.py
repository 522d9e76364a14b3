"""A load-test summary (`loadtests.summary`) as one HTML page with PNG plots.

`write_report(doc, out_dir)` writes into `out_dir`:

| file | what it shows |
|---|---|
| `latency_vs_load.png` | TTFT, TPOT and ITL p50 / p90 / p99 against offered load |
| `goodput_vs_load.png` | goodput and throughput against load, the capacity; SLO attainment and its CI |
| `latency_throughput.png` | TTFT p50 / p99 against output tokens per second (the latency–throughput curve) |
| `rejections.png` | rejections by reason, one stacked bar per run |
| `timeseries.png` | one run over time (the highest-rate run that met the search's target, else the last) |
| `index.html` | meta, the capacity and the search, every plot, a table per run and per request type |
| `summary.json` | the document itself, unless it is already there |

The page is self-contained apart from the PNGs next to it (no JavaScript, no external CSS), so a
directory can be archived or attached to an issue as is. Only stdlib and matplotlib: the report runs
wherever the summary was copied, without Locust, Ray or the serving stack.

CLI (dispatched by `python -m loadtests report`): `report SUMMARY_JSON_OR_DIR [--out DIR]`.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests.summary import LATENCIES, PERCENTILES, TOKEN_KINDS, check_summary

Run = Mapping[str, Any]
DASH = "–"  # what a missing value (None) renders as
REQUESTS = "req/s"  # the offered rate's unit unless the summary says otherwise
LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}
LATENCY_TITLES = {
    "ttft": "TTFT (time to first token)",
    "tpot": "TPOT (time per output token)",
    "itl": "ITL (inter-token latency)",
}


# -- formatting ------------------------------------------------------------------------------------


def _g(x: float | None) -> str:
    """A rate or a count in 3 significant digits; from 1000 up, whole, with thousands separators."""
    if x is None:
        return DASH
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _ms(x: float | None) -> str:
    return DASH if x is None else f"{1000 * x:.1f}"


def _pct(x: float | None) -> str:
    """Two decimals: the targets are 99 % and above, where one decimal would round a fail to a pass."""
    return DASH if x is None else f"{100 * x:.2f} %"


def _target(target: float) -> str:
    return f"{round(100 * target, 4):g} %"


def _by_reason(n: int, reasons: Mapping[str, int]) -> str:
    """`n`, and how many for each reason, most frequent first."""
    if not reasons:
        return str(n)
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{n} ({parts})"


def _slos(slos: Mapping[str, Mapping[str, float | None]]) -> str:
    """`{"chat": {"ttft_s": 0.5}}` as `chat: TTFT ≤ 500 ms`."""

    def one(k: str, v: float) -> str:
        return f"{k[:-2].upper()} ≤ {1000 * v:g} ms" if k.endswith("_s") else f"{k} = {v}"

    rows = [
        f"{name}: " + ", ".join(one(k, v) for k, v in objectives.items() if v is not None)
        for name, objectives in slos.items()
    ]
    return "; ".join(rows) or DASH


def _unit(part: Mapping[str, Any]) -> str:
    """The unit of a run's, a search's or a document's offered rate: requests, or jobs (agent sessions,
    fan-out tasks: several requests each)."""
    meta = part.get("meta")
    return (meta if isinstance(meta, Mapping) else part).get("rate_unit") or REQUESTS


def capacity_label(search: Mapping[str, Any]) -> str:
    """What the goodput plot calls the capacity, e.g. `capacity 12.5 req/s (target 99 %)`."""
    return f"capacity {_g(search['capacity_rps'])} {_unit(search)} (target {_target(search['target'])})"


def capacity_sentence(search: Mapping[str, Any] | None) -> str:
    """The search's outcome in one sentence (plain text)."""
    if not search:
        return "No capacity search ran: the runs below are at the rates they were given."
    cap, failing, target = search["capacity_rps"], search["first_failing_rps"], _target(search["target"])
    unit = _unit(search)
    if cap <= 0:
        return f"No rate tried met the target ({target} of requests within their SLOs)."
    head = (
        f"Capacity {_g(cap)} {unit} (target {target}): the highest offered rate at which at least "
        f"{target} of requests met their SLOs"
    )
    if failing is None:
        return f"{head}; the search stopped while still passing, so the capacity is at least that."
    return f"{head}; {_g(failing)} {unit} failed, so the capacity lies in [{_g(cap)}, {_g(failing)}) {unit}."


# -- what to plot ----------------------------------------------------------------------------------


def timeseries_run(doc: Mapping[str, Any]) -> int:
    """The index of the run the time series shows: under a search, the highest-rate run whose own SLO
    fraction met the target (the most load the stack sustained, over time); else the last run."""
    runs = doc["runs"]
    search = doc.get("search")
    if search:
        met = [i for i, r in enumerate(runs) if r["requests"] and r["slo_fraction"] >= search["target"]]
        if met:
            return max(met, key=lambda i: runs[i]["offered_rate"])
    return len(runs) - 1


def _nan(x: float | None, scale: float = 1.0) -> float:
    """None as NaN, which matplotlib leaves as a gap."""
    return math.nan if x is None else scale * x


def _latency_ms(runs: Sequence[Run], metric: str, p: int) -> list[float]:
    return [_nan(r["latency"][metric][f"p{p}"], 1000) for r in runs]


def _offered(runs: Sequence[Run]) -> list[float]:
    return [r["offered_rate"] for r in runs]


# -- plots: each draws on a fresh Figure -----------------------------------------------------------


def _plot_latency_vs_load(fig: Any, doc: Mapping[str, Any], runs: Sequence[Run]) -> None:
    x = _offered(runs)
    for ax, metric in zip(fig.subplots(1, 3), LATENCY_TITLES, strict=True):
        for p, style in zip(PERCENTILES, ("o-", "s--", "^:"), strict=True):
            ax.plot(x, _latency_ms(runs, metric, p), style, label=f"p{p}")
        ax.set(title=LATENCY_TITLES[metric], xlabel=f"offered load ({_unit(doc)})", ylabel="latency (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Latency against offered load (ok requests)")


def _plot_goodput_vs_load(fig: Any, doc: Mapping[str, Any], runs: Sequence[Run]) -> None:
    ax, frac_ax = fig.subplots(1, 2)
    x = _offered(runs)
    goodput = [r["goodput_rps"] for r in runs]
    ax.plot(x, goodput, "o-", label="goodput (met SLO)")
    ax.plot(x, [r["throughput_rps"] for r in runs], "s-", label="throughput (ok)")
    top = max([*x, *goodput, 0.0]) * 1.05 or 1.0
    if _unit(doc) == REQUESTS:  # with several requests per job (agent sessions) the diagonal means nothing
        ax.plot([0, top], [0, top], "k--", lw=1, label="offered (y = x)")
    search = doc.get("search")
    if search and search["capacity_rps"] > 0:
        cap = search["capacity_rps"]
        at_cap = [r["goodput_rps"] for r in runs if math.isclose(r["offered_rate"], cap, rel_tol=1e-9)]
        ax.axvline(cap, color="tab:green", ls=":")
        y = sum(at_cap) / len(at_cap) if at_cap else cap
        ax.plot([cap], [y], "*", ms=14, color="tab:green", ls="none", label=capacity_label(search))
    ax.set(title="Goodput against offered load", xlabel=f"offered load ({_unit(doc)})", ylabel="requests/s")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()

    if search and search["points"]:
        points = sorted(search["points"], key=lambda p: p["rate"])
        for passed, colour, name in ((True, "tab:green", "pass"), (False, "tab:red", "fail")):
            sel = [p for p in points if p["passed"] == passed]
            if not sel:
                continue
            f = [100 * p["fraction"] for p in sel]
            # The Wilson interval contains the fraction; max() only absorbs rounding.
            below = [max(0.0, fi - 100 * p["ci95"][0]) for fi, p in zip(f, sel, strict=True)]
            above = [max(0.0, 100 * p["ci95"][1] - fi) for fi, p in zip(f, sel, strict=True)]
            frac_ax.errorbar(
                [p["rate"] for p in sel],
                f,
                yerr=[below, above],
                fmt="o",
                capsize=3,
                color=colour,
                label=f"{name} (95 % CI)",
            )
        frac_ax.axhline(
            100 * search["target"], color="k", ls="--", lw=1, label=f"target {_target(search['target'])}"
        )
        frac_ax.set_title("SLO attainment per search rate")
    else:
        frac_ax.plot(x, [100 * r["slo_fraction"] for r in runs], "o-", label="per run (no search)")
        frac_ax.set_title("SLO attainment per run")
    frac_ax.set(xlabel=f"offered load ({_unit(doc)})", ylabel="requests meeting their SLOs (%)")
    frac_ax.grid(alpha=0.3)
    frac_ax.legend()


def _plot_latency_throughput(fig: Any, doc: Mapping[str, Any], runs: Sequence[Run]) -> None:
    ax = fig.subplots()
    x = [r["output_tokens_per_s"] for r in runs]
    p99 = _latency_ms(runs, "ttft", 99)
    ax.plot(x, _latency_ms(runs, "ttft", 50), "o-", label="TTFT p50")
    ax.plot(x, p99, "s-", label="TTFT p99")
    for r, xi, yi in zip(runs, x, p99, strict=True):
        if not math.isnan(yi):
            ax.annotate(
                f"{_g(r['offered_rate'])}/s", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax.set(
        title="Latency–throughput curve (points labelled with the offered load)",
        xlabel="output tokens/s (ok requests)",
        ylabel="TTFT (ms)",
    )
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_rejections(fig: Any, doc: Mapping[str, Any], runs: Sequence[Run]) -> None:
    ax = fig.subplots()
    ax.set_title("Rejections (429) by reason")
    reasons = sorted({k for r in runs for k in r["rejected_by_reason"]})
    if not reasons:
        ax.text(0.5, 0.5, "no rejections", ha="center", va="center", fontsize=18, transform=ax.transAxes)
        ax.set_axis_off()
        return
    at = list(range(len(runs)))
    bottom = [0] * len(runs)
    for reason in reasons:
        heights = [r["rejected_by_reason"].get(reason, 0) for r in runs]
        ax.bar(at, heights, bottom=bottom, label=reason)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(at, [_g(r["offered_rate"]) for r in runs], rotation=45 if len(runs) > 8 else 0)
    ax.set(xlabel=f"offered load ({_unit(doc)}), one bar per run", ylabel="rejected requests")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="reason")


def _plot_timeseries(fig: Any, doc: Mapping[str, Any], runs: Sequence[Run]) -> None:
    run = doc["runs"][timeseries_run(doc)]
    ts = run["timeseries"]
    t = ts["t"]
    window = t[1] - t[0] if len(t) > 1 else None
    x = [ti + window / 2 for ti in t] if window else t  # plot each window at its middle
    counts_ax, tokens_ax, ttft_ax = fig.subplots(3, 1, sharex=True)
    for key, style in (("sent", "o-"), ("ok", "s-"), ("rejected", "^-"), ("failed", "x-")):
        counts_ax.plot(x, ts[key], style, ms=3, label=key)
    counts_ax.set(ylabel=f"requests per {window:g} s" if window else "requests per window")
    tokens_ax.plot(x, ts["output_tokens_per_s"], "o-", ms=3, label="output tokens/s")
    tokens_ax.set(ylabel="output tokens/s")
    for p, style in ((50, "o-"), (99, "s-")):
        ttft_ax.plot(x, [_nan(v, 1000) for v in ts[f"ttft_p{p}"]], style, ms=3, label=f"TTFT p{p}")
    ttft_ax.set(ylabel="TTFT (ms)", xlabel="time since the run started (s), by send time")
    for ax in (counts_ax, tokens_ax, ttft_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    label = f" ({run['label']})" if run.get("label") else ""
    fig.suptitle(f"Run at {_g(run['offered_rate'])} {_unit(run)} offered{label}, over time")


Plot = Callable[[Any, Mapping[str, Any], Sequence[Run]], None]
#: (file, alt text, size in inches, drawing function), in the order the page shows them.
PLOTS: tuple[tuple[str, str, tuple[float, float], Plot], ...] = (
    (
        "latency_vs_load.png",
        "TTFT, TPOT and ITL percentiles against offered load",
        (15, 4.5),
        _plot_latency_vs_load,
    ),
    (
        "goodput_vs_load.png",
        "Goodput and throughput against offered load, and SLO attainment",
        (14, 5),
        _plot_goodput_vs_load,
    ),
    ("latency_throughput.png", "TTFT against output tokens per second", (9, 6), _plot_latency_throughput),
    ("rejections.png", "Rejections by reason per run", (10, 5), _plot_rejections),
    ("timeseries.png", "One run over time", (11, 9), _plot_timeseries),
)


def _draw(doc: Mapping[str, Any], out: Path) -> None:
    """Every PNG of `PLOTS` into `out`.

    matplotlib's object API (a `Figure` of its own, no pyplot) renders with Agg whatever backend the
    process has, and leaves pyplot's global figures and backend alone, so a caller with an
    interactive session (a notebook) keeps it. Imported here: only the report needs matplotlib.
    """
    from matplotlib.figure import Figure

    runs = sorted(doc["runs"], key=lambda r: r["offered_rate"])
    for name, _alt, size, draw in PLOTS:
        fig = Figure(figsize=size, layout="constrained")
        draw(fig, doc, runs)
        fig.savefig(out / name, dpi=100, format="png")


# -- HTML ------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
tr.pass td:last-child { color: #176317; font-weight: bold; }
tr.fail td:last-child { color: #a31515; font-weight: bold; }
p.capacity { font-size: 1.15em; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _table(
    head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0, classes: Sequence[str] = ()
) -> str:
    """An HTML table of plain-text cells (escaped here); the first `left` columns align left."""

    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for n, row in enumerate(rows):
        cls = f' class="{classes[n]}"' if n < len(classes) else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _percentiles_ms(dist: Mapping[str, Any]) -> str:
    return " / ".join(_ms(dist[f"p{p}"]) for p in PERCENTILES)


def _tokens(tokens: Mapping[str, int]) -> str:
    return " / ".join(str(tokens[k]) for k in TOKEN_KINDS)


def _run_section(i: int, run: Run, shown_over_time: bool) -> str:
    """One run: its counts, rates, tokens, pacing and overhead; its latencies; the same per request type."""
    label = f" · {run['label']}" if run.get("label") else ""
    over_time = " (the time series above)" if shown_over_time else ""
    head = f"Run {i + 1}{label} · offered {_g(run['offered_rate'])} {_unit(run)}{over_time}"
    pacing, overhead = run["pacing"], run["client_overhead_s"]
    facts = [
        (f"offered rate ({_unit(run)})", _g(run["offered_rate"])),
        ("sent rate (req/s)", _g(run["sent_rate"])),
        ("duration (s)", _g(run["duration_s"])),
        ("requests", str(run["requests"])),
        ("ok", str(run["ok"])),
        ("rejected (by reason)", _by_reason(run["rejected"], run["rejected_by_reason"])),
        ("failed (by reason)", _by_reason(run["failed"], run["failed_by_reason"])),
        ("met SLO", f"{run['slo_met']} ({_pct(run['slo_fraction'])})"),
        ("goodput (req/s meeting SLO)", _g(run["goodput_rps"])),
        ("throughput (ok req/s)", _g(run["throughput_rps"])),
        ("output tokens/s", _g(run["output_tokens_per_s"])),
        ("tokens in / cached / out / reasoning", _tokens(run["tokens"])),
        (
            "pacing: late p99 / mean / max (ms)",
            f"{_ms(pacing['late_p99_s'])} / {_ms(pacing['late_mean_s'])} / {_ms(pacing['late_max_s'])}",
        ),
        ("pacing: sent over 10 ms late", str(pacing["late_over_10ms"])),
        ("client overhead p50 / p99 (ms)", f"{_ms(overhead['p50'])} / {_ms(overhead['p99'])}"),
        ("SLOs", _slos(run["slos"])),
    ]
    latency = [
        (
            LATENCY_NAMES[k],
            str(run["latency"][k]["count"]),
            _ms(run["latency"][k]["mean"]),
            *(_ms(run["latency"][k][f"p{p}"]) for p in PERCENTILES),
        )
        for k in LATENCIES
    ]
    pct_head = "/".join(f"p{p}" for p in PERCENTILES)
    by_type = [
        (
            name,
            t["type"],
            str(t["requests"]),
            str(t["ok"]),
            _by_reason(t["rejected"], t["rejected_by_reason"]),
            _by_reason(t["failed"], t["failed_by_reason"]),
            _pct(t["slo_fraction"]),
            _g(t["goodput_rps"]),
            *(_percentiles_ms(t["latency"][k]) for k in LATENCIES),
            _tokens(t["tokens"]),
        )
        for name, t in run["by_type"].items()
    ]
    return "\n".join(
        [
            f'<h3 id="run-{i + 1}">{html.escape(head)}</h3>',
            _table(("", "value"), facts, left=2),
            _table(("latency", "count", "mean (ms)", *(f"p{p} (ms)" for p in PERCENTILES)), latency, left=1),
            "<h4>By request type</h4>",
            _table(
                (
                    "name",
                    "type",
                    "requests",
                    "ok",
                    "rejected",
                    "failed",
                    "met SLO",
                    "goodput (req/s)",
                    *(f"{LATENCY_NAMES[k]} {pct_head} (ms)" for k in LATENCIES),
                    "tokens in / cached / out / reasoning",
                ),
                by_type,
                left=2,
            ),
        ]
    )


def _search_table(search: Mapping[str, Any]) -> str:
    rows = [
        (
            str(n + 1),
            _g(p["rate"]),
            str(p["trials"]),
            str(p["requests"]),
            str(p["met_slo"]),
            _pct(p["fraction"]),
            f"{_pct(p['ci95'][0])} – {_pct(p['ci95'][1])}",
            "pass" if p["passed"] else "fail",
        )
        for n, p in enumerate(search["points"])
    ]
    head = ("#", f"rate ({_unit(search)})", "trials", "requests", "met SLO", "fraction", "95 % CI", "result")
    return _table(head, rows, classes=[row[-1] for row in rows])


def _meta_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def render_html(doc: Mapping[str, Any]) -> str:
    """The page (its `<img>`s name the PNGs `_draw` writes next to it)."""
    meta = doc.get("meta") or {}
    runs = doc["runs"]
    search = doc.get("search")
    title = "Tandem load test"
    if meta.get("workload"):
        title += f": {meta['workload']}"
    if meta.get("host"):
        title += f" on {meta['host']}"
    started = f"<p>started {html.escape(str(meta['started']))}</p>" if meta.get("started") else ""
    shown = timeseries_run(doc)
    overview = [
        (
            f"{i + 1}",
            r.get("label") or "",
            _g(r["offered_rate"]),
            str(r["requests"]),
            str(r["ok"]),
            str(r["rejected"]),
            str(r["failed"]),
            _pct(r["slo_fraction"]),
            _g(r["goodput_rps"]),
            _ms(r["latency"]["ttft"]["p99"]),
            _ms(r["latency"]["tpot"]["p99"]),
            _ms(r["latency"]["e2e"]["p99"]),
        )
        for i, r in enumerate(runs)
    ]
    overview_head = (
        "run",
        "label",
        f"offered ({_unit(doc)})",
        "requests",
        "ok",
        "rejected",
        "failed",
        "met SLO",
        "goodput (req/s)",
        "TTFT p99 (ms)",
        "TPOT p99 (ms)",
        "E2E p99 (ms)",
    )
    figures = [
        f'<figure><img src="{name}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        for name, alt, _size, _draw_fn in PLOTS
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        started,
        _table(("meta", "value"), [(str(k), _meta_value(v)) for k, v in meta.items()], left=2)
        if meta
        else "",
        "<h2>Capacity</h2>",
        f'<p class="capacity">{html.escape(capacity_sentence(search))}</p>',
        _search_table(search) if search and search["points"] else "",
        "<h2>Plots</h2>",
        *figures,
        "<h2>Runs</h2>",
        _table(overview_head, overview, left=2),
        *(_run_section(i, r, i == shown) for i, r in enumerate(runs)),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# -- entry points ----------------------------------------------------------------------------------


def write_report(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Validate `doc`, write the PNGs, `index.html` (and `summary.json` if absent) into `out_dir`;
    return the HTML's path."""
    check_summary(doc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _draw(doc, out)
    page = out / "index.html"
    page.write_text(render_html(doc), encoding="utf-8")
    saved = out / "summary.json"
    if not saved.exists():  # a report of a summary elsewhere still travels with its data
        saved.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    """`report SUMMARY_JSON_OR_DIR [--out DIR]` (the arguments after `python -m loadtests report`)."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests report",
        description="Turn a load-test summary (summary.json) into index.html with PNG plots.",
    )
    parser.add_argument("summary", type=Path, help="summary.json, or a directory holding one")
    parser.add_argument(
        "--out", type=Path, help="where to write the report (default: the summary's directory)"
    )
    args = parser.parse_args(argv)
    path: Path = args.summary / "summary.json" if args.summary.is_dir() else args.summary
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _fail(f"no such file: {path}")
    except json.JSONDecodeError as e:
        return _fail(f"{path} is not JSON ({e})")
    except OSError as e:
        return _fail(f"cannot read {path}: {e}")
    try:
        page = write_report(doc, args.out or path.parent)
    except ValueError as e:  # check_summary: the wrong schema, no runs
        return _fail(f"{path}: {e}")
    except OSError as e:
        return _fail(f"cannot write the report: {e}")
    print(page)
    return 0


def _fail(message: str) -> int:
    """One line on stderr and the usage-error status, as argparse's own errors."""
    print(f"report: {message}", file=sys.stderr)
    return 2
