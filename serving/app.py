"""Builds the Ray Serve application from a deployment spec.

`build_app` is the `import_path` target (`serving.app:build_app`) for `serve run`, `serve deploy`
and a KubeRay RayService `serveConfigV2`; its `args` are either `{"config": "<path to YAML>"}` or
`{"spec": {...}}` (the spec inline). The CLI (`tandem up`) calls `build_app_from_spec`.

One engine deployment per model pool, named `<model>-<pool>`, plus the `ingress` deployment.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import ModelSpec, PoolSpec, Role, ServingSpec, SpecError, load_spec, parse_spec
from serving.deployments import EngineServer
from serving.ingress import IngressDeployment

#: Engine-arg names owned by `parallelism` (one source for each setting).
_PARALLEL_ARGS = {
    "tensor_parallel_size": "tp",
    "pipeline_parallel_size": "pp",
    "data_parallel_size": "dp",
    "enable_expert_parallel": "ep",
}
#: Engine replicas take minutes to load a large model; Ray's 30 s default health timeout is short.
HEALTH_CHECK_TIMEOUT_S = 60.0
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0


def deployment_name(model: ModelSpec, pool: PoolSpec) -> str:
    """Name of the engine deployment of `pool`."""
    return f"{model.name}-{pool.pool_name}"


def engine_args_for(pool: PoolSpec) -> dict[str, Any]:
    """The engine args of `pool`, with the parallelism settings filled in from `parallelism`."""
    args = dict(pool.engine_args)
    clash = sorted(k for k in _PARALLEL_ARGS if k in args)
    if clash:
        fields = ", ".join(f"parallelism.{_PARALLEL_ARGS[k]}" for k in clash)
        raise SpecError(f"engine_args: {clash} are set through {fields}; remove them from engine_args")
    par = pool.parallelism
    if par.tp > 1:
        args["tensor_parallel_size"] = par.tp
    if par.pp > 1:
        args["pipeline_parallel_size"] = par.pp
    if par.dp > 1:
        args["data_parallel_size"] = par.dp
    if par.ep:
        args["enable_expert_parallel"] = True
    if par.accelerators_per_replica > 1:
        args.setdefault("distributed_executor_backend", "ray")
    return args


def deployment_options(pool: PoolSpec) -> dict[str, Any]:
    """Ray Serve options of the engine deployment of `pool`."""
    reps = pool.replicas
    actor: dict[str, Any] = {"num_cpus": pool.cpus_per_replica}
    if pool.env:
        actor["runtime_env"] = {"env_vars": dict(pool.env)}
    opts: dict[str, Any] = {
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
    }
    if pool.uses_gpu:
        actor["accelerator_type"] = pool.accelerator
        n = pool.parallelism.accelerators_per_replica
        if n == 1:
            actor["num_gpus"] = 1
        else:
            # The replica actor holds the first bundle; vLLM's Ray executor places its workers
            # in the rest. TP stays inside a node; PP may span nodes.
            opts["placement_group_bundles"] = [{"CPU": pool.cpus_per_replica}] + [
                {"GPU": 1} for _ in range(n)
            ]
            opts["placement_group_strategy"] = "STRICT_PACK" if pool.parallelism.pp == 1 else "PACK"
    opts["ray_actor_options"] = actor
    if reps.min == reps.max:
        opts["num_replicas"] = reps.max
    else:
        opts["autoscaling_config"] = {
            "min_replicas": reps.min,
            "initial_replicas": reps.start,
            "max_replicas": reps.max,
            "target_ongoing_requests": max(1, pool.max_ongoing_requests // 2),
        }
    return opts


def _serving_pool(model: ModelSpec) -> PoolSpec:
    roles = {p.role for p in model.pools}
    if Role.PREFILL in roles or Role.DECODE in roles:
        raise SpecError(
            f"models[{model.name}].pools: prefill/decode disaggregation is not available in this "
            "build yet; use a single pool with role: colocated"
        )
    if len(model.pools) > 1:
        raise SpecError(
            f"models[{model.name}].pools: more than one colocated pool per model is not supported "
            "yet; merge them into one pool with more replicas"
        )
    return model.pools[0]


def build_app_from_spec(spec: ServingSpec) -> Application:
    """The Serve application for `spec`: engine deployments and the ingress bound together."""
    engines = {}
    for model in spec.models:
        pool = _serving_pool(model)
        dep = serve.deployment(EngineServer).options(
            name=deployment_name(model, pool), **deployment_options(pool)
        )
        engines[model.name] = dep.bind(
            model.name, spec.resolve_source(model), pool.engine, engine_args_for(pool), pool.pool_name
        )
    server = spec.server
    ingress = serve.deployment(IngressDeployment).options(
        name="ingress",
        num_replicas=server.ingress_replicas,
        max_ongoing_requests=server.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0.5},
    )
    return ingress.bind(spec.model_dump(mode="json"), engines)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (`import_path: serving.app:build_app`).

    Args:
        args: `{"config": path}` to a YAML spec, or `{"spec": {...}}` with the spec inline.
    """
    if "spec" in args:
        spec = parse_spec(args["spec"], origin="args.spec")
    elif "config" in args:
        spec = load_spec(args["config"])
    else:
        raise SpecError("build_app args: give `config` (path to a YAML spec) or `spec` (inline)")
    return build_app_from_spec(spec)
