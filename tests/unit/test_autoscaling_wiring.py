"""The autoscaler's meters (replica and ingress), the Ray Serve adapter over fake contexts, and the
Serve options and config it is deployed with (no Ray cluster: Serve's own types where they are plain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from autoscaler.meters import IngressMeter, ReplicaMeter
from autoscaler.signals import NO_VALUE, REPLICA_FIELDS
from serving.app import autoscaling_config, deployment_options, ingress_autoscaling_config
from serving.autoscaling import POLICY_PATH, TandemAutoscalingPolicy, serve_config
from serving.config import Role, parse_spec


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_replica_meter_ttft_tpot_rates_and_queued_prompts():
    c = Clock()
    m = ReplicaMeter(c, window_s=10)
    c.t += 20  # uptime
    m.started("a", 300)
    m.started("b", 200)
    snap = m.snapshot(running=0, waiting=2, kv_usage=0.1, prompt_tokens_computed=0)
    assert snap["prefill_tokens_queued"] == 500 and snap["ttft_s"] == NO_VALUE and snap["uptime_s"] == 20
    c.t += 0.5
    m.first_token("a")
    c.t += 1.0
    m.finished("a", 11)  # 10 tokens after the first in 1 s
    m.finished("b", 0)  # ended before its first token (cancelled): no TTFT, no TPOT
    c.t += 1.0
    snap = m.snapshot(running=1, waiting=0, kv_usage=0.4, prompt_tokens_computed=1000)
    assert set(snap) == set(REPLICA_FIELDS)
    assert snap["ttft_s"] == 0.5 and abs(snap["tpot_s"] - 0.1) < 1e-9
    assert snap["prefill_tokens_queued"] == 0
    assert snap["output_tokens_per_s"] == 11 / 10
    assert abs(snap["input_tokens_per_s"] - 1000 / 2.5) < 1e-9  # counter delta over the span seen
    c.t += 30  # the window passes: nothing recent
    snap = m.snapshot(running=0, waiting=0, kv_usage=0.0, prompt_tokens_computed=1000)
    assert snap["ttft_s"] == NO_VALUE and snap["output_tokens_per_s"] == 0 and snap["input_tokens_per_s"] == 0


def test_ingress_meter_counts_capacity_rejections_only():
    c = Clock()
    m = IngressMeter(c, window_s=10)
    for _ in range(20):
        m.arrived("a", 100, 50)
    m.rejected("a", "tenant_rate_limited")  # the tenant's own limit: not a capacity signal
    m.rejected("a", "queue_full")
    m.rejected("a", "predicted_wait")
    m.waited("a", 0.2)
    m.waited("a", 2.0)
    snap = m.snapshot({"a": 3, "b": 0})
    assert (
        snap["a:arrivals_per_s"] == 2.0
        and snap["a:input_tokens_per_s"] == 200
        and snap["a:output_tokens_per_s"] == 100
    )
    assert snap["a:rejected_per_s"] == 0.2 and snap["a:queued"] == 3 and snap["a:queue_wait_s"] == 2.0
    assert snap["b:arrivals_per_s"] == 0 and snap["b:queue_wait_s"] == 0


SPEC = {
    "models": [
        {
            "name": "small",
            "source": "local:tiny-intent",
            "pools": [
                {
                    "role": "colocated",
                    "replicas": {"min": 0, "initial": 1, "max": 4},
                    "max_ongoing_requests": 8,
                }
            ],
            "autoscaling": {"warmup_s": 0, "downscale_stabilization_s": 0, "downscale_cooldown_s": 0},
        },
        {
            "name": "big",
            "source": "local:tiny-reasoning",
            "pools": [
                {"role": "prefill", "replicas": {"min": 1, "max": 1}},
                {"role": "decode", "replicas": {"min": 1, "max": 3}, "max_ongoing_requests": 8},
            ],
        },
        {"name": "fixed", "source": "local:tiny-intent", "pools": [{"role": "colocated"}]},
    ],
}


@dataclass
class Ctx:
    """The fields of Ray Serve's AutoscalingContext the adapter reads."""

    target_num_replicas: int
    current_num_replicas: int
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    raw_metrics: dict[str, dict[Any, list]] = field(default_factory=dict)
    total_queued_requests: float = 0.0


def _raw(per_replica: dict[str, dict[str, float]], ts: float) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for rid, metrics in per_replica.items():
        for k, v in metrics.items():
            out.setdefault(k, {})[rid] = [TimeStampedValue(ts - 5, 0.0), TimeStampedValue(ts, v)]
    return out


def test_policy_adapter_decides_for_every_pool_and_keeps_the_ingress():
    policy = TandemAutoscalingPolicy(spec=SPEC)
    policy._clock = lambda: 5000.0
    busy = {"uptime_s": 100, "running": 8, "waiting": 4, "kv_usage": 0.3, "ttft_s": 0.1, "tpot_s": 0.01}
    ids = {n: DeploymentID(name=n, app_name="tandem") for n in ("small-colocated", "big-decode", "ingress")}
    contexts = {
        ids["small-colocated"]: Ctx(1, 1, 0, 4, _raw({"r1": busy}, 4999.0)),
        ids["big-decode"]: Ctx(1, 1, 1, 3, _raw({"d1": {**busy, "running": 2, "waiting": 0}}, 4999.0)),
        ids["ingress"]: Ctx(
            2,
            2,
            2,
            2,
            _raw({"i1": {"small:arrivals_per_s": 3.0}, "i2": {"small:arrivals_per_s": 1.0}}, 4999.0),
        ),
    }
    decisions, state = policy(contexts)
    # 12 in flight over 8 per replica at 75 % -> 2; decode's 2 of 8 -> 1; the ingress keeps its 2.
    assert decisions == {ids["small-colocated"]: 2, ids["big-decode"]: 1, ids["ingress"]: 2}
    assert any("[demand]" in r for r in state[ids["small-colocated"]]["reasons"])
    sig = policy.signals(
        "small",
        contexts,
        {i.name: i for i in contexts},
        policy._ingress(contexts[ids["ingress"]], 5000.0)["small"],
        5000.0,
    )
    assert sig.ingress.arrivals_per_s == 4.0 and sig.pools["colocated"].samples[0].age_s == 1.0


def test_policy_adapter_scales_a_pool_at_zero_for_requests_held_at_handles():
    policy = TandemAutoscalingPolicy(spec=SPEC)
    policy._clock = lambda: 100.0
    dep = DeploymentID(name="small-colocated", app_name="tandem")
    decisions, _ = policy({dep: Ctx(0, 0, 0, 4, {}, total_queued_requests=1)})
    assert decisions[dep] == 1


def test_stale_metrics_are_not_load():
    policy = TandemAutoscalingPolicy(spec=SPEC)
    policy._clock = lambda: 5000.0
    busy = {"uptime_s": 100, "running": 8, "waiting": 40}
    dep = DeploymentID(name="small-colocated", app_name="tandem")
    decisions, _ = policy({dep: Ctx(1, 1, 0, 4, _raw({"r1": busy}, 4000.0))})
    assert decisions[dep] == 1


def test_serve_options_and_config_carry_the_policy():
    spec = parse_spec(SPEC)
    small = spec.model("small")
    cfg = autoscaling_config(small.pools[0], small)
    AutoscalingConfig(**cfg)  # Serve accepts it
    assert cfg["upscale_delay_s"] == cfg["downscale_delay_s"] == 0 and cfg["min_replicas"] == 0
    opts = deployment_options(small.pools[0], small)
    assert opts["graceful_shutdown_timeout_s"] == small.autoscaling.drain_timeout_s
    big = spec.model("big")
    assert "num_replicas" in deployment_options(big.pool(Role.PREFILL), big)
    ing = ingress_autoscaling_config(spec)
    assert ing["min_replicas"] == ing["max_replicas"] == spec.server.ingress_replicas
    doc = serve_config(spec, "tandem")
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.autoscaling_policy["policy_function"] == POLICY_PATH
    assert app.autoscaling_policy["policy_kwargs"]["spec"]["models"][0]["name"] == "small"
    fixed = parse_spec({"models": [SPEC["models"][2]]})
    assert "autoscaling_policy" not in serve_config(fixed, "tandem")["applications"][0]
    assert ingress_autoscaling_config(fixed) is None
