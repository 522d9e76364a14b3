"""Spec → Ray Serve deployment options and engine args (no Ray cluster needed)."""

from __future__ import annotations

import pytest

from serving.app import deployment_options, engine_args_for
from serving.config import PoolSpec, SpecError


def test_cpu_pool_options() -> None:
    pool = PoolSpec(max_ongoing_requests=64, cpus_per_replica=0.5, env={"A": "1"})
    opts = deployment_options(pool)
    assert opts["max_ongoing_requests"] == 64
    assert opts["num_replicas"] == 1
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "runtime_env": {"env_vars": {"A": "1"}}}
    assert "placement_group_bundles" not in opts


def test_autoscaling_when_bounds_differ() -> None:
    opts = deployment_options(PoolSpec(replicas={"min": 1, "initial": 2, "max": 4}, max_ongoing_requests=32))
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
    }


def test_single_gpu_pool() -> None:
    opts = deployment_options(PoolSpec(accelerator="L4"))
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["accelerator_type"] == "L4"


def test_tensor_parallel_pool_gets_strict_pack_bundles() -> None:
    pool = PoolSpec(accelerator="H100", parallelism={"tp": 4}, cpus_per_replica=8)
    opts = deployment_options(pool)
    assert opts["placement_group_bundles"] == [{"CPU": 8}] + [{"GPU": 1}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    args = engine_args_for(pool)
    assert args["tensor_parallel_size"] == 4
    assert args["distributed_executor_backend"] == "ray"


def test_pipeline_parallel_may_span_nodes() -> None:
    pool = PoolSpec(accelerator="H100", parallelism={"tp": 2, "pp": 2})
    assert deployment_options(pool)["placement_group_strategy"] == "PACK"
    assert engine_args_for(pool)["pipeline_parallel_size"] == 2


def test_parallelism_has_one_source() -> None:
    with pytest.raises(SpecError, match="parallelism.tp"):
        engine_args_for(PoolSpec(engine_args={"tensor_parallel_size": 2}))
