"""loadtests' pure parts: arrival schedules and pacing, the metric definitions, the trace readers."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from loadtests import schedule
from loadtests.metrics import StreamTiming, Usage
from loadtests.traces import MOONCAKE_BLOCK_TOKENS, TraceError, TraceRequest, read_trace, scale

SHARED_TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


# -- schedules -------------------------------------------------------------------------------------


def test_poisson_1000_arrivals_at_50_per_s_keep_the_rate_and_do_not_drift() -> None:
    offs = schedule.poisson(50.0, 1000, random.Random(7))
    gaps = [b - a for a, b in zip(offs, offs[1:], strict=False)]
    assert all(g >= 0 for g in gaps) and offs[-1] <= 1000 / 50.0
    assert abs(999 / (offs[-1] - offs[0]) - 50.0) / 50.0 < 0.02  # mean rate within 2 %
    # Exponential gaps: coefficient of variation ~1.
    assert 0.9 < statistics.pstdev(gaps) / statistics.fmean(gaps) < 1.1
    # No drift: each quarter of the schedule runs at the rate too (the schedule is absolute).
    for q in range(4):
        part = offs[q * 250 : (q + 1) * 250]
        assert abs(249 / (part[-1] - part[0]) - 50.0) / 50.0 < 0.15


def test_constant_gamma_and_ramp() -> None:
    assert schedule.constant(4.0, 3) == [0.0, 0.25, 0.5]
    bursty = schedule.gamma(20.0, 4000, 3.0, random.Random(1))
    gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert bursty[-1] == pytest.approx(4000 / 20.0)  # exactly the rate over the span
    assert 2.5 < statistics.pstdev(gaps) / statistics.fmean(gaps) < 3.5
    r = schedule.ramp(1.0, 9.0, 10.0)  # (1 + 9) / 2 x 10 = 50 arrivals
    assert len(r) == 50 and r == sorted(r) and r[-1] <= 10.0
    first, last = [x for x in r if x < 2.0], [x for x in r if x >= 8.0]
    assert len(last) > 3 * len(first)  # the rate grows
    assert schedule.ramp(5.0, 5.0, 2.0) == schedule.constant(5.0, 10)
    assert schedule.from_timestamps([10.0, 12.0, 11.0], 2.0) == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="rate"):
        schedule.constant(0.0, 3)
    with pytest.raises(ValueError, match="cv"):
        schedule.gamma(1.0, 3, 0.0, random.Random(0))


def test_pacing_reports_lateness_and_the_rate_achieved() -> None:
    offs = schedule.constant(10.0, 11)  # 0.0 .. 1.0
    on_time = schedule.pacing(offs, offs)
    assert on_time.late_max_s == 0 and on_time.late_requests == 0
    assert on_time.scheduled_rate == pytest.approx(10.0) and on_time.achieved_rate == pytest.approx(10.0)
    # The last 5 sends were 200 ms late: counted, and the achieved rate is lower.
    sent = offs[:6] + [o + 0.2 for o in offs[6:]]
    p = schedule.pacing(offs, sent)
    assert p.late_requests == 5 and p.late_max_s == pytest.approx(0.2)
    assert p.achieved_rate == pytest.approx(10 / 1.2)
    with pytest.raises(ValueError):
        schedule.pacing(offs, sent[:-1])


# -- metrics ---------------------------------------------------------------------------------------


def test_metric_definitions() -> None:
    t = StreamTiming()
    for at in (0.10, 0.12, 0.15, 0.30):
        t.event(at)
    t.finish(0.31, Usage(input=100, cached=64, output=11, reasoning=0))
    assert t.ttft == 0.10 and t.e2e == 0.31
    assert t.tpot == pytest.approx((0.31 - 0.10) / 10)  # output tokens from usage, not events
    assert t.itl == pytest.approx([0.02, 0.03, 0.15])
    assert t.meets(0.2, 0.05) and not t.meets(0.05, None) and not t.meets(None, 0.01)
    one = StreamTiming()
    one.event(0.1)
    one.finish(0.1, Usage(output=1))
    assert one.tpot is None and one.meets(1.0, 0.001)  # TPOT is undefined for one token
    unfinished = StreamTiming()
    unfinished.event(0.1)
    assert not unfinished.meets(None, None)
    with pytest.raises(ValueError):
        t.event(0.2)


def test_usage_from_both_apis() -> None:
    chat = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    responses = {"input_tokens": 10, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 8},
                 "output_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    assert Usage.from_openai(chat) == Usage.from_openai(responses) == Usage(10, 8, 5, 3)
    assert Usage.from_openai(None) == Usage()
    assert Usage.from_openai({"prompt_tokens": 4, "completion_tokens": 1}) == Usage(4, 0, 1, 0)


# -- traces ----------------------------------------------------------------------------------------


def test_read_the_shared_traces() -> None:
    moon = read_trace(SHARED_TRACES / "mooncake_conversation.jsonl")
    assert len(moon) == 12_031 and moon[0].t_s == 0.0
    assert moon[0].hash_ids[0] == moon[1].hash_ids[0] == 0  # a shared first block
    assert all(len(r.hash_ids) == -(-r.input_tokens // MOONCAKE_BLOCK_TOKENS) for r in moon[:200])
    azure = read_trace(SHARED_TRACES / "azure_llm_2023_conv.csv")
    assert len(azure) == 19_366 and azure[0].t_s == 0.0 and azure[0].input_tokens == 374
    assert azure[1].t_s == pytest.approx(4.3145789, abs=1e-6)
    assert [r.t_s for r in azure] == sorted(r.t_s for r in azure)


def test_bad_trace_files_name_the_line_and_the_fields(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    good = json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1})
    bad.write_text(good + "\n" + json.dumps({"timestamp": 1}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: .*input_length"):
        read_trace(bad)
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(tmp_path / "t.txt")


def test_scaling_keeps_the_block_structure() -> None:
    r = TraceRequest(0.0, 6758, 500, tuple(range(14)))
    (s,) = scale([r], 0.125, max_input=4096, max_output=256)  # 512-token blocks become 64
    assert s.input_tokens == 845 and s.output_tokens == 62 and s.hash_ids == r.hash_ids
    (capped,) = scale([r], 0.5, max_input=1000, max_output=64)  # 256-token blocks, 1000 tokens: 4 blocks
    assert capped.input_tokens == 1000 and capped.output_tokens == 64 and capped.hash_ids == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="token_scale"):
        scale([r], 2.0, 4096, 256)
