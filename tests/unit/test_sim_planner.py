"""The capacity planner (loadtests/sim/planner.py) on a tiny synthetic spec and profiles, in process.

One model, one colocated pool; two synthetic GPU types: `fast` does a unit of work in a quarter of
`slow`'s time at twice its hourly price, so it is the cheaper per unit of work and must win.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loadtests.sim import planner
from loadtests.sim.planner import PlanError, Shape, main, plan
from loadtests.sim.profile import dump_profile, parse_profile
from loadtests.workload import parse_workload
from router.admission import AdmissionRequest, Rejected
from serving.config import parse_spec


def _profile(name: str, accelerator: str, slowness: float, usd: float, **kw):
    d = {
        "name": name, "model": "org/tiny", "accelerator": accelerator, "tp": 1, "pp": 1, "dtype": "bf16",
        "step": {"base_s": 0.004 * slowness, "per_prefill_token_s": 4e-5 * slowness,
                 "per_decode_seq_s": 2e-4 * slowness, "per_context_token_s": 0.0},
        "max_num_seqs": 2, "max_num_batched_tokens": 2048, "block_tokens": 16, "kv_blocks": 4096,
        "kv_bytes_per_token": 1024, "link_gbps": 100.0, "link_latency_s": 0.001, "startup_s": 1.0,
        "gpu_hour_usd": usd, "sources": ["synthetic, for the planner's unit tests"],
    }  # fmt: skip
    d.update(kw)
    return parse_profile(d, name)


FAST = _profile("fast", "X", 1.0, 2.0)
SLOW = _profile("slow", "Y", 4.0, 1.0)
#: So slow that one request alone misses a 0.5 s TTFT.
_STILL = {"base_s": 0.6, "per_prefill_token_s": 0.0, "per_decode_seq_s": 0.0, "per_context_token_s": 0.0}
GLACIAL = _profile("glacial", "Z", 1.0, 1.0, step=_STILL)


def _spec_dict(admission: dict | None = None) -> dict:
    return {
        "server": {"host": "127.0.0.1"},
        "auth": {"enabled": False},
        "admission": admission or {"enabled": False},
        "models": [{"name": "tiny", "source": "org/tiny", "pools": [
            {"role": "colocated", "accelerator": "X", "parallelism": {"tp": 1},
             "replicas": {"min": 1, "max": 1}, "max_ongoing_requests": 64}]}],
    }  # fmt: skip


def _workload_dict(prompt_tokens: int = 256) -> dict:
    return {
        "duration_s": 20, "shape": {"kind": "poisson", "rate": 30}, "seed": 0,
        "workloads": [{"type": "intent", "model": "tiny", "prompt_tokens": prompt_tokens, "max_tokens": 16,
                       "slo": {"ttft_s": 0.5, "tpot_s": 0.05}}],
    }  # fmt: skip


def _plan(profiles, rate=30.0, duration_s=20.0, spec=None, **kw):
    spec = spec or parse_spec(_spec_dict())
    wf = parse_workload(_workload_dict(kw.pop("prompt_tokens", 256)))
    kw.setdefault("layouts", ["colocated"])
    kw.setdefault("policies", ["round_robin"])
    kw.setdefault("max_replicas", 12)
    return plan(spec, wf, rate=rate, duration_s=duration_s, profiles={"tiny": profiles}, use_ray=False, **kw)


def _row(report, profile):
    (row,) = [r for r in report["models"]["tiny"]["ranked"] if r["profiles"] == [profile]]
    return row


def test_finds_the_cheaper_gpu_type():
    report = _plan([SLOW, FAST])
    model = report["models"]["tiny"]
    win = model["winner"]
    assert win is not None and win["profiles"] == ["fast"]
    slow = _row(report, "slow")
    assert slow["met"] and slow["usd_per_hour"] > win["usd_per_hour"]
    assert slow["why"].startswith(f"costs ${slow['usd_per_hour'] - win['usd_per_hour']:.2f}/h more")
    # The slow type needs more replicas for the same work; both are the fewest that meet the target.
    assert slow["replicas"]["colocated"] > win["replicas"]["colocated"]
    for row in (win, slow):
        assert row["slo_fraction"] >= 0.99
        k = row["k"]
        if k > 1:
            below = [s for s in report["simulations"] if s["id"] == row["id"] and s["k"] == k - 1]
            assert below and not below[0]["met"], "one replica fewer must miss (the search's edge)"
    assert report["fleet"] == {"complete": True, "pools": [
        {"model": "tiny", "role": "colocated", "profile": "fast", "replicas": win["replicas"]["colocated"],
         "gpus": win["gpus"], "usd_per_hour": win["usd_per_hour"]}],
        "gpus": win["gpus"], "usd_per_hour": win["usd_per_hour"]}  # fmt: skip
    text = planner.render(report)
    assert "cheapest: colocated X tp1, round_robin" in text and "costs $" in text


def test_pruning_keeps_the_winner_with_fewer_runs():
    exact = _plan([SLOW, FAST])
    pruned = _plan([SLOW, FAST], prune="model")
    win, want = pruned["models"]["tiny"]["winner"], exact["models"]["tiny"]["winner"]
    assert {k: v for k, v in win.items() if k != "wall_s"} == {k: v for k, v in want.items() if k != "wall_s"}
    assert pruned["simulations_run"] < exact["simulations_run"]
    slow = _row(pruned, "slow")
    assert slow["pruned"] and slow["why"].startswith("costs at least $"), slow["why"]
    with pytest.raises(PlanError, match="not a group"):
        _plan([FAST], prune="everything")


def test_more_load_needs_more_replicas():
    counts = []
    for rate in (10.0, 30.0, 60.0):
        win = _plan([FAST], rate=rate)["models"]["tiny"]["winner"]
        counts.append(win["replicas"]["colocated"])
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


def test_a_shape_that_cannot_meet_the_slo_says_why():
    report = _plan([FAST, GLACIAL], rate=5.0, duration_s=10.0, max_replicas=4)
    assert report["models"]["tiny"]["winner"]["profiles"] == ["fast"]
    row = _row(report, "glacial")
    assert not row["met"] and row["replicas"] == {"colocated": 4}
    assert "misses 0.99 even at 4 replicas (--max-replicas 4): TTFT p99" in row["why"]
    assert "> SLO 500 ms" in row["why"], row["why"]
    assert row["rank"] == 2


def test_no_shape_meets_the_target():
    report = _plan([GLACIAL], rate=5.0, duration_s=10.0, max_replicas=2)
    assert report["models"]["tiny"]["winner"] is None and not report["fleet"]["complete"]
    assert "NO shape meets" in planner.render(report)


def test_tenant_limits_are_not_a_capacity_problem():
    spec = parse_spec(_spec_dict({"default_tenant": {"tokens_per_s": 300, "burst_tokens": 2000}}))
    row = _row(_plan([FAST], spec=spec), "fast")
    assert not row["met"] and row["unfixable"] and row["runs"] == 1, "no replica count fixes it: stop at once"
    assert "cannot meet 0.99 at any size" in row["why"] and "rejected (tenant_rate_limited)" in row["why"]
    lifted = _plan([FAST], spec=spec, lift_tenant_limits=True)["models"]["tiny"]["winner"]
    assert lifted is not None and lifted["rejected"] == 0


async def test_lifted_tenant_limits_lift_the_in_flight_cap_too():
    # The default cap (TenantLimits.max_in_flight 512): a simulated tenant keeping more requests in
    # flight than that measures the cap (429 tenant_concurrency), not the pool, unless it is lifted.
    spec = parse_spec(_spec_dict({"default_tenant": {}, "tenants": [{"name": "acme"}]}))
    assert spec.admission.default_tenant.max_in_flight == 512
    for lift, want in ((False, 512), (True, 600)):
        sim = parse_spec(planner.simulated_spec(spec, lift_tenant_limits=lift))
        assert {t.max_in_flight for t in [sim.admission.default_tenant, *sim.admission.tenants]} == (
            {512} if not lift else {None}
        )
        ctl = sim.admission_controller()
        for tenant in ("default", "acme"):
            admitted, reasons = 0, set()
            for _ in range(600):
                try:
                    await ctl.admit(AdmissionRequest(tenant, 8, 8))
                    admitted += 1
                except Rejected as e:
                    reasons.add(e.reason)
            assert admitted == want and reasons == (set() if lift else {"tenant_concurrency"}), (lift, tenant)


def test_the_planner_with_lifted_tenant_limits_measures_the_pool_not_the_in_flight_cap():
    spec = parse_spec(_spec_dict({"default_tenant": {"max_in_flight": 2}}))
    capped = _plan([FAST], spec=spec, duration_s=10.0, max_replicas=4)
    assert capped["models"]["tiny"]["winner"] is None
    assert "rejected (tenant_concurrency)" in _row(capped, "fast")["why"]
    lifted = _plan([FAST], spec=spec, duration_s=10.0, max_replicas=4, lift_tenant_limits=True)
    win = lifted["models"]["tiny"]["winner"]
    assert win is not None and win["rejected"] == 0


def test_pd_shapes_and_policies():
    report = _plan([FAST], layouts=["colocated", "pd"], ratios=[(1, 1), (1, 2)],
                   policies=["cache_aware", "round_robin"], prompt_tokens=1024)  # fmt: skip
    ranked = report["models"]["tiny"]["ranked"]
    assert len(ranked) == 6 and report["models"]["tiny"]["shapes"] == 6
    pd = [r for r in ranked if r["layout"] == "pd" and r.get("requests")]
    assert pd and all(r["disagg"] > 0 and r["kv_moved_gb"] > 0 for r in pd)
    assert all(set(r["utilisation"]) == {"prefill", "decode"} for r in pd)
    assert {r["replicas"]["decode"] // r["replicas"]["prefill"] for r in pd} == {1, 2}


def test_runs_are_deterministic():
    a = _plan([FAST], rate=20.0, duration_s=10.0)["simulations"]
    b = _plan([FAST], rate=20.0, duration_s=10.0)["simulations"]
    strip = [{k: v for k, v in s.items() if k != "wall_s"} for s in a]
    assert strip == [{k: v for k, v in s.items() if k != "wall_s"} for s in b]


def test_evaluate_runs_fixed_shapes():
    spec, wf = parse_spec(_spec_dict()), parse_workload(_workload_dict())
    shapes = [(Shape("tiny", "colocated", ("fast",), (1,), p), 2) for p in ("cache_aware", "round_robin")]
    out = planner.evaluate(
        spec, wf, shapes, rate=20.0, duration_s=10.0, profiles={"tiny": [FAST]}, use_ray=False
    )
    assert [f["policy"] for f in out] == ["cache_aware", "round_robin"]
    assert all(f["replicas"] == {"colocated": 2} and f["requests"] > 100 for f in out)


def test_bad_input_is_a_clear_error():
    with pytest.raises(PlanError, match=r"unknown router policy \['nope'\]; choose from"):
        _plan([FAST], policies=["nope"])
    with pytest.raises(PlanError, match="unknown layout"):
        _plan([FAST], layouts=["sideways"])
    spec = parse_spec(_spec_dict())
    wf = parse_workload(_workload_dict())
    with pytest.raises(PlanError, match=r"--profile: unknown model\(s\) \['other'\]"):
        plan(spec, wf, rate=1.0, profiles={"other": [FAST]}, use_ray=False)
    with pytest.raises(PlanError, match="no engine profile for model tiny"):
        plan(spec, wf, rate=1.0, use_ray=False)  # no shipped profile is org/tiny's


@pytest.fixture()
def files(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec_dict()))
    wl = tmp_path / "wl.yaml"
    wl.write_text(yaml.safe_dump(_workload_dict()))
    for p in (FAST, SLOW):
        dump_profile(p, tmp_path / f"{p.name}.yaml")
    return tmp_path


def test_main_writes_the_json(files, capsys):
    out = files / "plan.json"
    profiles = f"tiny={files / 'fast.yaml'},{files / 'slow.yaml'}"
    rc = main(["--workload", str(files / "wl.yaml"), "--config", str(files / "spec.yaml"), "--rate", "30",
               "--duration", "20", "--profile", profiles, "--layouts", "colocated", "--policies",
               "round_robin", "--no-ray", "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan: [1/" in text, "a plain progress line per finished run when stdout is not a terminal"
    assert "cheapest: colocated X tp1" in text
    doc = json.loads(out.read_text())
    assert doc["models"]["tiny"]["winner"]["profiles"] == ["fast"]
    assert len(doc["simulations"]) == doc["simulations_run"] >= 2
    assert {"shape", "k", "replicas", "gpus", "usd_per_hour", "slo_fraction", "ttft_p99", "tpot_p99",
            "prefix_hit", "utilisation", "worst"} <= set(doc["simulations"][0])  # fmt: skip
    assert [r["rank"] for r in doc["models"]["tiny"]["ranked"]] == [1, 2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratios", "2"], "bad ratio '2': want PREFILL:DECODE"),
        (["--target", "1.5"], "want a fraction in (0, 1]"),
        (["--rate", "-1"], "must be > 0"),
        (["--no-ray", "--workers", "2"], "not allowed with argument"),
    ],
)
def test_bad_flags(files, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["--workload", str(files / "wl.yaml"), "--config", str(files / "spec.yaml"), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_exit_2(files, capsys):
    base = [
        "--workload",
        str(files / "wl.yaml"),
        "--config",
        str(files / "spec.yaml"),
        "--no-ray",
        "--rate",
        "1",
    ]
    assert main([*base, "--profile", "tiny=no-such-profile"]) == 2
    assert "no profile 'no-such-profile'" in capsys.readouterr().err
    assert main([*base, "--profile", f"tiny={files / 'fast.yaml'}", "--models", "huge"]) == 2
    assert "--models: unknown model(s) ['huge']" in capsys.readouterr().err


_RAY_PLAN = """
import json, sys
import ray
from tests.unit.test_sim_planner import FAST, _spec_dict, _workload_dict
from loadtests.sim.planner import plan
from loadtests.workload import parse_workload
from router.admission import AdmissionRequest, Rejected
from serving.config import parse_spec

assert not ray.is_initialized()
got = plan(parse_spec(_spec_dict()), parse_workload(_workload_dict()), profiles={"tiny": [FAST]},
           layouts=["colocated"], policies=["round_robin"], use_ray=True, workers=1,
           rate=20.0, duration_s=10.0, max_replicas=4)
assert not ray.is_initialized(), "the planner shuts down the cluster it started"
json.dump(got, sys.stdout)
"""


@pytest.mark.integration
def test_real_ray_matches_in_process():
    """The same plan as Ray tasks on a fresh local cluster (1 CPU): the same simulations. In its own
    process: the test session may hold the shared local stack's Ray, which must not be touched."""
    t0 = time.monotonic()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", _RAY_PLAN], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = _plan([FAST], rate=20.0, duration_s=10.0, max_replicas=4)
    strip = [{k: v for k, v in s.items() if k != "wall_s"} for s in got["simulations"]]
    assert strip == [{k: v for k, v in s.items() if k != "wall_s"} for s in want["simulations"]]
    assert got["timing"]["executor"] == "ray" and got["timing"]["workers"] == 1
    assert time.monotonic() - t0 < 90
