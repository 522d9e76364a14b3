"""loadtests.report: the HTML page and its PNG plots, from summaries of synthetic runs and a real search."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib import image

from loadtests import report
from loadtests.search import Trial, search
from loadtests.summary import search_section, summarize_run, summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = (
    "latency_vs_load.png",
    "goodput_vs_load.png",
    "latency_throughput.png",
    "rejections.png",
    "timeseries.png",
)
CAPACITY = 6.0  # req/s the synthetic server keeps up with
DURATION_S = 10.0
SLOS = {"chat": {"ttft_s": 0.5, "tpot_s": 0.05}, "agent": {"ttft_s": 1.0, "tpot_s": None}}


def records(rate: float, seed: int, capacity: float = CAPACITY) -> list[dict[str, Any]]:
    """A run at `rate` against a server that rejects whatever exceeds `capacity` and slows down near it."""
    rng = random.Random(seed)
    load = rate / capacity
    out = []
    for i in range(int(rate * DURATION_S)):
        due = i / rate
        name = "agent" if i % 4 == 0 else "chat"
        base = {
            "name": name,
            "type": name,
            "due": due,
            "sent": due + rng.uniform(0, 0.003),
            "input": 200,
            "cached": 120,
            "reasoning": 5 if name == "agent" else 0,
            "overhead": 0.0005,
        }
        if load > 1 and rng.random() < (load - 1) / load:
            reason = "overloaded" if rng.random() < 0.7 else "queue_full"
            out.append(
                {
                    **base,
                    "outcome": "rejected",
                    "status": 429,
                    "reason": reason,
                    "ttft": None,
                    "tpot": None,
                    "e2e": 0.002,
                    "itl": [],
                    "output": 0,
                    "slo_met": False,
                }
            )
            continue
        ttft = 0.05 * (1 + 4 * max(0.0, load - 0.5)) * rng.uniform(0.8, 1.2)
        tpot = 0.02 * rng.uniform(0.9, 1.1)
        out.append(
            {
                **base,
                "outcome": "ok",
                "status": 200,
                "reason": None,
                "ttft": ttft,
                "tpot": tpot,
                "e2e": ttft + 20 * tpot,
                "itl": [tpot] * 20,
                "output": 21,
                "slo_met": ttft <= SLOS[name]["ttft_s"],
            }
        )
    return out


def searched_doc() -> dict[str, Any]:
    """A summary whose runs are the trials of a real capacity search, read back from its JSON."""
    runs: list[dict[str, Any]] = []

    def trial(rate: float) -> Trial:
        run = summarize_run(
            records(rate, seed=len(runs)),
            duration_s=DURATION_S,
            offered_rate=rate,
            slos=SLOS,
            window_s=2.0,
            label=f"trial {len(runs) + 1}",
        )
        runs.append(run)
        return Trial(rate, run["requests"], run["slo_met"])

    result = search(trial, start_rate=1.0, rel_tolerance=0.1, repeats=1)
    assert result.capacity == CAPACITY and result.first_failing is not None
    doc = summary(
        runs,
        search=search_section(result),
        host="http://127.0.0.1:8000",
        workload="<b>mix</b>",
        started="2025-01-02T03:04:05Z",
    )
    return json.loads(json.dumps(doc))


def assert_pngs(out: Path) -> None:
    for name in PLOTS:
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        height, width = image.imread(path).shape[:2]
        assert height > 100 and width > 100, name


def test_a_searched_summary_renders_every_plot_the_capacity_and_the_rejections(tmp_path: Path) -> None:
    doc = searched_doc()
    page = report.write_report(doc, tmp_path / "out")
    assert page == tmp_path / "out" / "index.html"
    assert_pngs(page.parent)
    text = page.read_text(encoding="utf-8")
    assert "Capacity 6 req/s (target 99 %)" in text
    assert report.capacity_label(doc["search"]) == "capacity 6 req/s (target 99 %)"
    first_failing = report._g(doc["search"]["first_failing_rps"])
    assert f"[6, {first_failing}) req/s" in text
    assert "overloaded: " in text and "queue_full: " in text
    assert text.count("<img ") == len(PLOTS) and all(f'src="{name}"' in text for name in PLOTS)
    # Meta is escaped, in the title and the meta table.
    assert "<b>mix</b>" not in text
    assert "Tandem load test: &lt;b&gt;mix&lt;/b&gt; on http://127.0.0.1:8000" in text
    assert "2025-01-02T03:04:05Z" in text
    # The search table: one row per rate tried, with its verdict; a table per run and per type.
    assert text.count('<tr class="pass">') + text.count('<tr class="fail">') == len(doc["search"]["points"])
    assert text.count("<h3 ") == text.count("<h4>By request type</h4>") == len(doc["runs"])
    assert "chat: TTFT ≤ 500 ms, TPOT ≤ 50 ms; agent: TTFT ≤ 1000 ms" in text
    # The time series is the highest-rate run that met the target on its own: the capacity's.
    shown = doc["runs"][report.timeseries_run(doc)]
    assert shown["offered_rate"] == CAPACITY and "(the time series above)" in text
    # The document travels with its report.
    assert json.loads((page.parent / "summary.json").read_text()) == doc


def test_a_single_run_without_a_search_or_rejections_still_renders(tmp_path: Path) -> None:
    doc = summary([summarize_run(records(2.0, seed=1), duration_s=DURATION_S, offered_rate=2.0)])
    page = report.write_report(doc, tmp_path)
    assert_pngs(tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "No capacity search ran" in text and text.count("<img ") == len(PLOTS)
    assert "<title>Tandem load test</title>" in text
    assert report.timeseries_run(doc) == 0


def test_runs_without_latencies_render_dashes(tmp_path: Path) -> None:
    """Every request rejected (no TTFT at all) and a run with no requests: gaps and dashes, no errors."""
    rejected = [
        {
            "name": "chat",
            "type": "chat",
            "due": t,
            "sent": t,
            "outcome": "rejected",
            "status": 429,
            "reason": "overloaded",
            "ttft": None,
            "tpot": None,
            "e2e": 0.001,
            "itl": [],
            "input": 0,
            "cached": 0,
            "output": 0,
            "reasoning": 0,
            "slo_met": False,
            "overhead": None,
        }
        for t in (0.0, 0.5, 1.0)
    ]
    runs = [summarize_run(rejected, duration_s=2.0, offered_rate=1.5), summarize_run([], duration_s=2.0)]
    section = {
        "target": 0.99,
        "capacity_rps": 0.0,
        "first_failing_rps": 1.5,
        "points": [
            {
                "rate": 1.5,
                "trials": 1,
                "requests": 3,
                "met_slo": 0,
                "fraction": 0.0,
                "ci95": [0.0, 0.56],
                "passed": False,
            }
        ],
    }
    page = report.write_report(summary(runs, search=section), tmp_path)
    assert_pngs(tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "No rate tried met the target (99 % of requests within their SLOs)." in text
    assert "<td>–</td>" in text and "None" not in text


def test_an_existing_summary_json_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("the original\n")
    report.write_report(summary([summarize_run(records(1.0, seed=2), duration_s=DURATION_S)]), tmp_path)
    assert (tmp_path / "summary.json").read_text() == "the original\n"


def test_cli_reads_a_file_or_a_directory_and_prints_the_page(tmp_path: Path, capsys) -> None:
    doc = summary([summarize_run(records(3.0, seed=3), duration_s=DURATION_S, offered_rate=3.0)])
    (tmp_path / "summary.json").write_text(json.dumps(doc))
    assert report.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "index.html")
    assert_pngs(tmp_path)
    assert report.main([str(tmp_path / "summary.json"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "elsewhere" / "index.html")
    assert (tmp_path / "elsewhere" / "summary.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ('{"schema": "tandem.loadtest/0", "runs": [{}]}', "schema 'tandem.loadtest/0', expected"),
        ('{"schema": "tandem.loadtest/1", "runs": []}', "the summary has no runs"),
        ("[1, 2]", "not a Tandem load-test summary"),
        ("{not json", "is not JSON"),
    ],
)
def test_cli_errors_are_one_line_and_status_2(tmp_path: Path, capsys, content: str | None, message: str):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    assert report.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1
    assert captured.err.startswith("report: ") and not (tmp_path / "index.html").exists()


def test_the_report_needs_neither_locust_ray_nor_the_stack_and_leaves_pyplot_alone(tmp_path: Path) -> None:
    """Importing it loads no matplotlib (the CLI's other commands stay cheap); drawing uses Figure
    objects, so pyplot (and the process's backend) is never touched."""
    code = (
        "import sys\n"
        "from loadtests import report\n"
        "assert 'matplotlib' not in sys.modules\n"
        "from loadtests.summary import summarize_run, summary\n"
        "rec = {'name': 'c', 'type': 'c', 'due': 0.0, 'sent': 0.0, 'outcome': 'ok', 'ttft': 0.1}\n"
        f"report.write_report(summary([summarize_run([rec], duration_s=1.0)]), {str(tmp_path)!r})\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('locust', 'ray', 'serving', 'router')]\n"
        "assert not heavy, heavy\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
    assert_pngs(tmp_path)
