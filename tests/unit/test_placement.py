"""Placement: parallelism → Serve replica resources, placement-group bundles, GPU totals."""

from __future__ import annotations

import pytest

from serving.app import deployment_options, engine_args_for, kv_transfer_config
from serving.cli import main
from serving.config import ModelSpec, SpecError, parse_spec
from serving.replicas.placement import format_plan, place_pool, placement_options, plan

H100 = {"GPU": 1, "accelerator_type:H100": 0.001}


def _model(pools: list[dict], **extra) -> ModelSpec:
    return ModelSpec(name="m", source="x", pools=pools, **extra)


def test_8b_int4_tp1_is_one_gpu_without_placement_group() -> None:
    m = _model([{"accelerator": "L4", "replicas": {"min": 2, "max": 8}, "cpus_per_replica": 4,
                 "engine_args": {"quantization": "awq_marlin"}}])  # fmt: skip
    p = place_pool(m, m.pools[0])
    assert p.gpus_per_replica == 1 and p.total_gpus == 8 and p.strategy is None
    opts = deployment_options(m.pools[0], m)
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "L4"}
    assert "placement_group_bundles" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 8
    assert "tensor_parallel_size" not in engine_args_for(m.pools[0], m)


def test_70b_prefill_tp4_x2_and_decode_tp8() -> None:
    m = _model(
        [
            {"name": "prefill", "role": "prefill", "accelerator": "H100", "parallelism": {"tp": 4},
             "replicas": {"min": 2, "max": 2}, "cpus_per_replica": 8},
            {"name": "decode", "role": "decode", "accelerator": "H100", "parallelism": {"tp": 8},
             "replicas": {"min": 1, "max": 1}, "cpus_per_replica": 8},
        ]
    )  # fmt: skip
    pre, dec = (place_pool(m, p) for p in m.pools)
    assert pre.bundles == [{"CPU": 8, **H100}] + [H100] * 3
    assert dec.bundles == [{"CPU": 8, **H100}] + [H100] * 7
    assert pre.strategy == dec.strategy == "STRICT_PACK"  # TP never leaves a node
    assert (pre.total_gpus, dec.total_gpus) == (8, 8)
    opts = deployment_options(m.pools[0], m)
    assert opts["num_replicas"] == 2
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundles"] == pre.bundles
    assert "num_gpus" not in opts["ray_actor_options"]  # the GPUs are in the bundles
    pargs, dargs = engine_args_for(m.pools[0], m), engine_args_for(m.pools[1], m)
    assert (pargs["tensor_parallel_size"], dargs["tensor_parallel_size"]) == (4, 8)
    assert pargs["distributed_executor_backend"] == "ray"
    kv = pargs["kv_transfer_config"]
    assert kv["kv_connector"] == "NixlConnector" and kv["kv_buffer_device"] == "cuda"
    assert kv["kv_load_failure_policy"] == "recompute"


def test_moe_dp8_with_expert_parallel_is_a_spread_gang_of_ranks() -> None:
    m = _model([{"accelerator": "H100", "parallelism": {"dp": 8, "ep": True}, "cpus_per_replica": 8}])
    p = place_pool(m, m.pools[0])
    assert p.max_replicas == 8 and p.gpus_per_replica == 1 and p.total_gpus == 8
    opts = deployment_options(m.pools[0], m)
    assert opts["num_replicas"] == 8
    assert opts["gang_scheduling_config"] == {"gang_size": 8, "gang_placement_strategy": "SPREAD"}
    assert opts["placement_group_bundles"] == [{"CPU": 8, **H100}]
    assert "placement_group_strategy" not in opts  # Serve forbids it inside a gang
    args = engine_args_for(m.pools[0], m)
    assert args["data_parallel_size"] == 8 and args["data_parallel_size_local"] == 1
    assert args["data_parallel_external_lb"] is True and args["enable_expert_parallel"] is True


def test_pp2_may_span_nodes() -> None:
    m = _model([{"accelerator": "H100", "parallelism": {"tp": 4, "pp": 2}}])
    p = place_pool(m, m.pools[0])
    assert p.strategy == "PACK" and len(p.bundles) == 8 and p.gpus_per_replica == 8
    args = engine_args_for(m.pools[0], m)
    assert args["pipeline_parallel_size"] == 2 and args["tensor_parallel_size"] == 4


def test_cpu_pool_has_no_gpu() -> None:
    m = _model([{"cpus_per_replica": 0.5}])
    p = place_pool(m, m.pools[0])
    assert p.total_gpus == 0 and placement_options(p) == {"ray_actor_options": {"num_cpus": 0.5}}


def test_dp_pool_needs_fixed_groups() -> None:
    with pytest.raises(SpecError, match="replicas: a data-parallel pool"):
        pool = {"accelerator": "H100", "parallelism": {"dp": 2}, "replicas": {"min": 1, "max": 2}}
        parse_spec({"models": [{"name": "m", "source": "x", "pools": [pool]}]})


def test_user_kv_transfer_keys_override_the_defaults() -> None:
    m = _model(
        [{"role": "prefill", "engine_args": {"kv_transfer_config": {"kv_buffer_device": "cuda",
          "kv_connector_extra_config": {"backends": ["UCX", "GDS"]}}}}, {"role": "decode"}],
        disaggregation={"kv_lease_s": 7},
    )  # fmt: skip
    kv = kv_transfer_config(m, m.pools[0])
    assert kv["kv_buffer_device"] == "cuda"
    assert kv["kv_connector_extra_config"] == {"kv_lease_duration": 7, "backends": ["UCX", "GDS"]}


def test_sglang_pools_get_sglang_names() -> None:
    m = _model([{"role": "prefill", "engine": "sglang", "accelerator": "H100",
                 "parallelism": {"tp": 2, "dp": 4, "ep": True}, "replicas": {"min": 1, "max": 1}},
                {"role": "decode", "engine": "sglang"}],
               disaggregation={"transfer_backend": "mooncake"})  # fmt: skip
    args = engine_args_for(m.pools[0], m)
    assert args == {"tp_size": 8, "dp_size": 4, "enable_dp_attention": True, "ep_size": 8,
                    "disaggregation_transfer_backend": "mooncake"}  # fmt: skip
    # SGLang's DP ranks live in one engine: one replica with all 8 GPUs, strict-packed, no gang.
    p = place_pool(m, m.pools[0])
    assert (p.gpus_per_replica, p.max_replicas, p.dp, p.strategy) == (8, 1, 1, "STRICT_PACK")
    assert "gang_scheduling_config" not in deployment_options(m.pools[0], m)


def test_plan_command_prints_bundles_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "configs/cluster-8b-70b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.3-70b-instruct/prefill" in out and "STRICT_PACK" in out
    assert "GPUs per replica: 4   replicas (max): 4   GPUs (max): 16" in out
    assert "total GPUs (max): 56" in out
    spec = parse_spec({"models": [{"name": "m", "source": "x", "pools": [
        {"accelerator": "H100", "parallelism": {"dp": 8, "ep": True}}]}]})  # fmt: skip
    assert "Serve gang of 8 DP ranks, SPREAD" in format_plan(plan(spec))
