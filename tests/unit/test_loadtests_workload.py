"""loadtests.workload: a workload file is validated completely before any traffic, every error named."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.workload import WorkloadError, load_workload, parse_workload

GOOD = """
duration_s: 30
shape: {kind: poisson, rate: 4}
tenant: team-a
workloads:
  - {type: intent, weight: 3, slo: {ttft_s: 0.5}}
  - {type: agent, weight: 1, turns: 3, slo: {ttft_s: 2.0, tpot_s: 0.1}}
  - {type: fanout, width: 4, name: tools}
"""


def test_a_good_file_parses_with_defaults_and_its_mix(tmp_path: Path) -> None:
    f = tmp_path / "w.yaml"
    f.write_text(GOOD)
    w = load_workload(f)
    assert w.shape.rate == 4 and w.shape.cv == 1.0 and w.seed == 0
    intent, agent, fan = w.workloads
    assert intent.task == "intent" and intent.max_tokens == 8 and intent.slo.ttft_s == 0.5
    assert agent.turns == 3 and agent.system_prompts == 3 and agent.slo.tpot_s == 0.1
    assert w.mix() == [("intent", 0.6), ("agent", 0.2), ("tools", 0.2)]


CLOSED = {"kind": "closed", "users": 2}
BAD = [
    ({"shape": {"kind": "poisson"}, "workloads": [{"type": "intent"}]}, "shape kind poisson needs rate"),
    (
        {"shape": CLOSED, "workloads": [{"type": "intent", "max_token": 3}]},
        "workloads.0.intent.max_token: unknown field 'max_token'; remove it or check its spelling",
    ),
    ({"shape": CLOSED, "workloads": [{"type": "chatty"}]}, "workloads.0: Input tag 'chatty'"),
    (
        {"shape": CLOSED, "workloads": [{"type": "reasoning", "reasoning_budget": 300}]},
        "reasoning_budget (300) must be below max_tokens (256)",
    ),
    ({"shape": {"kind": "trace"}, "workloads": [{"type": "intent"}]}, "give exactly one trace workload"),
    ({"shape": CLOSED, "workloads": []}, "workloads: List should have at least 1 item"),
    ({"workloads": [{"type": "intent"}]}, "shape: required field is missing"),
    ({"shape": CLOSED, "workloads": [{"type": "trace"}]}, "workloads.0.trace.path: required field"),
]


@pytest.mark.parametrize(("data", "expected"), BAD)
def test_bad_files_name_the_field_and_the_fix(data: dict, expected: str) -> None:
    with pytest.raises(WorkloadError) as e:
        parse_workload(data, "w.yaml")
    assert "invalid workload file w.yaml" in str(e.value) and expected in str(e.value), str(e.value)


def test_every_error_is_listed_at_once() -> None:
    with pytest.raises(WorkloadError) as e:
        parse_workload(
            {"shape": {"kind": "gamma", "rate": 0}, "workloads": [{"type": "intent", "weight": 0}]}
        )
    text = str(e.value)
    assert "shape.rate" in text and "workloads.0.intent.weight" in text


def test_not_a_mapping_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="must be a mapping"):
        parse_workload(["intent"])
    with pytest.raises(WorkloadError, match="cannot read workload file"):
        load_workload(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shape: {kind: [\n")
    with pytest.raises(WorkloadError, match="not valid YAML"):
        load_workload(bad)


def test_a_responses_budget_must_leave_room_for_an_answer() -> None:
    bad = {"shape": {"kind": "constant", "rate": 1},
           "workloads": [{"type": "responses", "max_output_tokens": 32, "reasoning_budget": 32}]}  # fmt: skip
    with pytest.raises(
        WorkloadError, match=r"reasoning_budget \(32\) must be below max_output_tokens \(32\)"
    ):
        parse_workload(bad)


def test_the_rate_unit_says_what_a_job_is() -> None:
    from loadtests.run import rate_unit

    def unit(*types: str) -> str:
        return rate_unit(parse_workload({"shape": {"kind": "constant", "rate": 1},
                                         "workloads": [{"type": t} for t in types]}))  # fmt: skip

    assert unit("intent", "reasoning") == "req/s"
    assert unit("agent") == "sessions/s"
    assert unit("intent", "fanout") == "jobs/s"


def test_every_shipped_workload_file_is_valid() -> None:
    files = sorted((Path(__file__).resolve().parents[2] / "loadtests" / "workloads").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        load_workload(f)
