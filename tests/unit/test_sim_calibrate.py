"""Calibration of the simulator's serving overheads: template tokens, slowdown and TTFT offset at the
median, and the per-request noise distributions that make the tail."""

from __future__ import annotations

import json

import pytest

from loadtests.sim import calibrate as cal
from loadtests.sim.calls import Jobs, Template
from loadtests.sim.cluster import Overheads, SimOptions, Simulation, quantile
from loadtests.workload import parse_workload
from tests.unit.sim_helpers import fleet, profile, spec, workload


def test_quantile_tables_interpolate_and_clamp():
    table = ((0.0, 0.0), (0.5, 1.0), (1.0, 3.0))
    assert quantile(table, 0.25) == pytest.approx(0.5)
    assert quantile(table, 0.75) == pytest.approx(2.0)
    assert quantile(table, -1) == 0.0 and quantile(table, 2) == 3.0


def test_the_template_is_solved_from_two_request_types_with_different_message_counts():
    shapes = {"intent": (1.0, 32.0), "agent": (4.0, 700.0)}
    measured = {"by_type": {"intent": {"ok": 10, "tokens": {"input": 10 * (32 + 5 + 3)}},
                            "agent": {"ok": 10, "tokens": {"input": 10 * (700 + 5 + 12)}}}}  # fmt: skip
    assert cal.fit_template(measured, shapes) == Template(5, 3)
    one = {"by_type": {"intent": measured["by_type"]["intent"]}}
    assert cal.fit_template(one, shapes) == Template(8, 0)  # one message count: a total per request


def test_fitted_median_overheads_reproduce_the_measured_medians():
    sp, fl = spec(), fleet(profile())
    call = {"type": "intent", "model": "m", "prompt_tokens": 100, "max_tokens": 20}
    wf = workload(call, rate=2.0, duration_s=60)

    def simulate(oh: Overheads) -> dict:
        return Simulation(sp, fl, SimOptions(unit_tokens=16, overheads=oh)).run(Jobs(wf, 16, Template(), {}))

    truth = simulate(Overheads(0.05, 1.7))
    oh, doc = cal.fit_overheads(truth, simulate)
    assert oh.slowdown == pytest.approx(1.7, rel=0.03)
    assert oh.ttft_s == pytest.approx(0.05, rel=0.06)
    assert doc["latency"]["ttft"]["p50"] == pytest.approx(truth["latency"]["ttft"]["p50"], rel=0.01)


def test_noise_tables_turn_a_measured_tail_into_a_simulated_one():
    def recs(ttfts, tpots):
        return [
            {"outcome": "ok", "ttft": a, "tpot": b, "output": 64} for a, b in zip(ttfts, tpots, strict=True)
        ]

    sim = recs([0.01] * 100, [0.002] * 100)
    meas = recs([0.05] * 98 + [0.5, 0.9], [0.004] * 99 + [0.02])
    ttft, tpot = cal.noise_tables(meas, sim)
    assert quantile(ttft, 0.5) == pytest.approx(0.04)
    assert quantile(ttft, 0.999) > 0.4
    assert quantile(tpot, 0.5) == pytest.approx(2.0)
    assert [v for _, v in ttft] == sorted(v for _, v in ttft)  # a quantile function never falls


def test_a_run_with_the_tables_has_the_tail_and_a_calibration_file_round_trips(tmp_path):
    sp, fl = spec(), fleet(profile())
    call = {"type": "intent", "model": "m", "prompt_tokens": 100, "max_tokens": 20}
    wf = workload(call, rate=2.0, duration_s=300)
    table = ((0.0, 0.0), (0.9, 0.0), (0.99, 1.0), (1.0, 1.0))
    oh = Overheads(0.0, 1.0, table, ())
    doc = Simulation(sp, fl, SimOptions(unit_tokens=16, overheads=oh)).run(Jobs(wf, 16, Template(), {}))
    assert doc["latency"]["ttft"]["p50"] < 0.05
    assert doc["latency"]["ttft"]["p99"] > 0.5
    path = tmp_path / "cal.json"
    cal.save(path, Template(1, 2), oh, {"summary": "x"})
    assert cal.load(path) == (Template(1, 2), oh)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        cal.load(path)


def test_fit_noise_recovers_a_load_dependent_overhead_from_one_ramp_run():
    """A known truth (10 ms more TTFT per call/s, on top of noise) simulated under a ramp, then fitted
    back from that one run: the slope, and the stream floor, come out of its own range of rates."""
    sp, fl = spec(), fleet(profile())
    call = {"type": "intent", "model": "m", "prompt_tokens": 100, "max_tokens": 20}
    wf = parse_workload({"duration_s": 120, "shape": {"kind": "ramp", "start_rate": 1, "end_rate": 20},
                         "workloads": [call]})  # fmt: skip
    noise = ((0.0, 0.01), (0.5, 0.02), (0.99, 0.05), (1.0, 0.06))

    def records(oh: Overheads) -> list:
        sim = Simulation(sp, fl, SimOptions(unit_tokens=16, overheads=oh, keep_records=True))
        sim.run(Jobs(wf, 16, Template(), {}))
        return sim.recorder.records

    truth = records(Overheads(0.0, 1.0, noise, (), 0.0, 0.010))
    fitted = cal.fit_noise(truth, 1.0, records)
    assert fitted.ttft_per_rps == pytest.approx(0.010, rel=0.2)
    assert quantile(fitted.ttft_table, 0.5) == pytest.approx(0.02, abs=0.006)
