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


def test_parallelism_has_one_source() -> None:
    with pytest.raises(SpecError, match="parallelism.tp"):
        engine_args_for(PoolSpec(engine_args={"tensor_parallel_size": 2}))
