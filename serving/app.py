"""Builds the Ray Serve application from a deployment spec.

`build_app` is the `import_path` target (`serving.app:build_app`) for `serve run`, `serve deploy`
and a KubeRay RayService `serveConfigV2`; its `args` are either `{"config": "<path to YAML>"}` or
`{"spec": {...}}` (the spec inline). The CLI (`tandem up`) calls `build_app_from_spec`.

One engine deployment per model pool, named `<model>-<pool>`, plus the `ingress` deployment and
the `sessions` deployment (background session workers, serving.sessions.server).
Placement (TP/PP/DP/EP → bundles) comes from `serving.replicas.placement`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from router.serve_adapter import ROUTER_CLASS
from serving.config import (
    EngineKind,
    ModelSpec,
    PoolSpec,
    Role,
    RouterPolicy,
    ServingSpec,
    SpecError,
    load_spec,
    parse_spec,
)
from serving.http.ingress import IngressDeployment
from serving.replicas.deployments import KV_EVENTS_ANY_PORT, DecodeServer, EngineServer, PrefillServer
from serving.replicas.engines.vllm_plugin import POLL_ENV as NIXL_POLL_ENV
from serving.replicas.placement import place_pool, placement_options
from serving.sessions.server import SessionServer

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
#: Session workers are checked often so that a dead one is replaced quickly (its sessions are resumed
#: when their leases lapse either way).
SESSION_SERVER_MAX_ONGOING = 256
SESSION_HEALTH_PERIOD_S = 2.0


def deployment_name(model: ModelSpec, pool: PoolSpec) -> str:
    """Name of the engine deployment of `pool`."""
    return model.deployment_name(pool)


def kv_transfer_config(model: ModelSpec, pool: PoolSpec) -> dict[str, Any]:
    """vLLM `kv_transfer_config` of a P/D pool: NixlConnector, pulled by the decode engine.

    `kv_both` on both roles (ray.serve.llm does the same): the request's `kv_transfer_params` say
    who sends and who receives. A transfer that fails is recomputed on the decode engine rather
    than failing the request; KV that no decode engine claims is freed after `kv_lease_s`. The
    pool's own `engine_args.kv_transfer_config` overrides any of these keys.
    """
    d = model.disaggregation
    cfg: dict[str, Any] = {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_buffer_device": "cuda" if pool.uses_gpu else "cpu",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kv_lease_duration": d.kv_lease_s},
    }
    user = dict(pool.engine_args.get("kv_transfer_config") or {})
    extra = {**cfg["kv_connector_extra_config"], **(user.pop("kv_connector_extra_config", None) or {})}
    cfg.update(user)
    cfg["kv_connector_extra_config"] = extra
    return cfg


def engine_args_for(pool: PoolSpec, model: ModelSpec | None = None) -> dict[str, Any]:
    """The engine args of `pool`: parallelism filled in from `parallelism`, and for P/D pools the KV
    transfer settings from the model's `disaggregation`."""
    args = dict(pool.engine_args)
    clash = sorted(k for k in _PARALLEL_ARGS if k in args)
    if clash:
        fields = ", ".join(f"parallelism.{_PARALLEL_ARGS[k]}" for k in clash)
        raise SpecError(f"engine_args: {clash} are set through {fields}; remove them from engine_args")
    par = pool.parallelism
    if pool.engine is EngineKind.FAKE:
        return args  # the fake engine takes its own test knobs only
    if pool.engine is EngineKind.SGLANG:
        # SGLang's ServerArgs names. Its data parallelism is DP attention inside one engine: the
        # engine spans tp x dp GPUs (tp_size) of which each DP rank has tp (see serving.replicas.placement).
        if par.tp * par.dp > 1:
            args["tp_size"] = par.tp * par.dp
        if par.pp > 1:
            args["pp_size"] = par.pp
        if par.dp > 1:
            args["dp_size"] = par.dp
            args.setdefault("enable_dp_attention", True)
        if par.ep:
            args["ep_size"] = par.dp * par.tp
        if model is not None and pool.role is not Role.COLOCATED:
            args.setdefault("disaggregation_transfer_backend", model.disaggregation.transfer_backend.value)
        return args
    if par.tp > 1:
        args["tensor_parallel_size"] = par.tp
    if par.pp > 1:
        args["pipeline_parallel_size"] = par.pp
    if par.dp > 1:
        # Each Serve replica is one DP rank (external load balancing); the rank and the group's
        # address are filled in by the replica at start (see serving.replicas.deployments).
        args["data_parallel_size"] = par.dp
        args["data_parallel_size_local"] = 1
        args["data_parallel_external_lb"] = True
    if par.ep:
        args["enable_expert_parallel"] = True
    if par.accelerators_per_replica > 1:
        args.setdefault("distributed_executor_backend", "ray")
    if model is not None and pool.role is not Role.COLOCATED and pool.engine is EngineKind.VLLM:
        args["kv_transfer_config"] = kv_transfer_config(model, pool)
    if (
        model is not None
        and model.router.kv_events
        and model.router.policy is RouterPolicy.CACHE_AWARE
        and "kv_events_config" not in args
    ):
        # Port 0: each replica picks a free port and advertises it in its routing stats.
        args["kv_events_config"] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": KV_EVENTS_ANY_PORT,
        }
    return args


def request_router_config(model: ModelSpec, pool: PoolSpec) -> dict[str, Any]:
    """Serve `request_router_config` running the model's router policy for `pool`'s replicas."""
    r = model.router
    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {
            "policy": r.policy.value,
            "weights": r.weights.model_dump(),
            "gate": r.gate.model_dump(),
            "block_budget": r.block_budget,
            "stale_after_s": r.stale_after_s,
            "sessions": r.sessions,
            "role": pool.role.value,
            "deployment": deployment_name(model, pool),
        },
        "request_routing_stats_period_s": r.stats_period_s,
    }


def deployment_options(pool: PoolSpec, model: ModelSpec | None = None) -> dict[str, Any]:
    """Ray Serve options of the engine deployment of `pool` (placement from serving.replicas.placement)."""
    reps = pool.replicas
    placement = place_pool(model or _anonymous(pool), pool)
    opts: dict[str, Any] = {
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
    }
    if model is not None:
        opts["request_router_config"] = request_router_config(model, pool)
    opts.update(placement_options(placement))
    env = dict(pool.env)
    if model is not None and pool.role is not Role.COLOCATED and pool.engine is EngineKind.VLLM:
        poll_ms = model.disaggregation.nixl_progress_poll_ms
        if poll_ms:
            # Read by the vLLM plugin in the engine worker (serving/replicas/engines/vllm_plugin.py).
            env.setdefault(NIXL_POLL_ENV, str(poll_ms * 1000))
    if env:
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if reps.min == reps.max:
        opts["num_replicas"] = placement.max_replicas
    else:
        opts["autoscaling_config"] = autoscaling_config(pool, model)
        if model is not None:
            opts["graceful_shutdown_timeout_s"] = model.autoscaling.drain_timeout_s
    return opts


def autoscaling_config(pool: PoolSpec, model: ModelSpec | None = None) -> dict[str, Any]:
    """Serve `autoscaling_config` of an autoscaled pool.

    Deployed from a config (`serve_config`, `serve deploy`, a RayService), the application-level SLO
    policy (serving.autoscaling) decides and owns every delay and step: Serve's own delays are 0 and
    its scaling factors unset. `target_ongoing_requests` (half of `max_ongoing_requests`) is the rule
    Serve's default policy falls back to for an application deployed with `serve.run`.
    """
    reps = pool.replicas
    cfg: dict[str, Any] = {
        "min_replicas": reps.min,
        "initial_replicas": reps.start,
        "max_replicas": reps.max,
        "target_ongoing_requests": max(1, pool.max_ongoing_requests // 2),
    }
    if model is not None:
        a = model.autoscaling
        cfg.update(
            metrics_interval_s=a.metrics_interval_s,
            look_back_period_s=max(a.window_s, 2 * a.metrics_interval_s),
            upscale_delay_s=0.0,
            downscale_delay_s=0.0,
            downscale_to_zero_delay_s=0.0,
        )
    return cfg


def ingress_autoscaling_config(spec: ServingSpec) -> dict[str, Any] | None:
    """The ingress's fixed-size `autoscaling_config` when the SLO autoscaler runs: it keeps
    `ingress_replicas` but publishes its per-model stats (queue, rejections, arrivals) to the policy."""
    intervals = [m.autoscaling.metrics_interval_s for m in spec.models if spec.autoscaled(m)]
    if not intervals:
        return None
    n = spec.server.ingress_replicas
    interval = min(intervals)
    return {
        "min_replicas": n,
        "initial_replicas": n,
        "max_replicas": n,
        "metrics_interval_s": interval,
        "look_back_period_s": max(2 * interval, 10.0),
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
    }


def _anonymous(pool: PoolSpec) -> ModelSpec:
    return ModelSpec(name="model", source="none", pools=[pool.model_copy(update={"role": Role.COLOCATED})])


def build_app_from_spec(spec: ServingSpec) -> Application:
    """The Serve application for `spec`: engine deployments and the ingress bound together.

    A colocated model gets one `EngineServer` deployment. A P/D model gets a `PrefillServer`
    deployment and a `DecodeServer` deployment holding a handle to it: the ingress calls decode,
    and the decode replica orchestrates the prefill (see serving.replicas.deployments).
    """
    engines = {}
    for model in spec.models:
        if model.external is not None:
            continue  # an external server: the ingress and session workers call it (serving.backends)
        source = spec.resolve_source(model)

        def deploy(cls: type, pool: PoolSpec, model: ModelSpec = model) -> Any:
            return serve.deployment(cls).options(
                name=deployment_name(model, pool), **deployment_options(pool, model)
            )

        if model.disaggregated:
            pre, dec = model.pool(Role.PREFILL), model.pool(Role.DECODE)
            prefill = deploy(PrefillServer, pre).bind(
                model.name,
                source,
                pre.engine,
                engine_args_for(pre, model),
                pre.pool_name,
                pre.role,
                meter_window_s=model.autoscaling.window_s,
                tenant_salt=model.router.tenant_salt,
            )
            engines[model.name] = deploy(DecodeServer, dec).bind(
                model.name,
                source,
                dec.engine,
                engine_args_for(dec, model),
                dec.pool_name,
                dec.role,
                dec.stream_flush_ms,
                model.autoscaling.window_s,
                prefill=prefill,
                disaggregation=model.disaggregation.model_dump(mode="json"),
                tenant_salt=model.router.tenant_salt,
            )
        else:
            pool = model.serving_pool
            engines[model.name] = deploy(EngineServer, pool).bind(
                model.name,
                source,
                pool.engine,
                engine_args_for(pool, model),
                pool.pool_name,
                pool.role,
                pool.stream_flush_ms,
                model.autoscaling.window_s,
                tenant_salt=model.router.tenant_salt,
            )
    server = spec.server
    sessions = None
    if spec.sessions.enabled:
        sessions = (
            serve.deployment(SessionServer)
            .options(
                name="sessions",
                num_replicas=spec.sessions.workers,
                max_ongoing_requests=SESSION_SERVER_MAX_ONGOING,
                health_check_period_s=SESSION_HEALTH_PERIOD_S,
                graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
                ray_actor_options={"num_cpus": spec.sessions.cpus_per_worker},
            )
            .bind(spec.model_dump(mode="json"), engines)
        )
    scaling = ingress_autoscaling_config(spec)
    sizing = {"num_replicas": server.ingress_replicas} if scaling is None else {"autoscaling_config": scaling}
    ingress = serve.deployment(IngressDeployment).options(
        name="ingress",
        max_ongoing_requests=server.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0.5},
        **sizing,
    )
    return ingress.bind(spec.model_dump(mode="json"), engines, sessions)


def run_app(spec: ServingSpec, name: str, route_prefix: str = "/", timeout_s: float = 1800.0) -> None:
    """Deploy `spec` as Serve application `name` on the connected Ray cluster and wait until it runs.

    With autoscaled pools it is deployed from its Serve config (serving.autoscaling.serve_config), as
    `serve deploy` and a RayService do: only then does Serve run the application-level SLO policy.
    Otherwise `serve.run` (the same application, built here).
    """
    import time

    if not any(spec.autoscaled(m) for m in spec.models):
        serve.run(build_app_from_spec(spec), name=name, route_prefix=route_prefix)
        return
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serving.autoscaling import serve_config

    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(serve_config(spec, name, route_prefix)))
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = getattr(app, "status", None)
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {name} is {status}: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name} not running after {timeout_s:g}s (status {status})")
        time.sleep(1.0)


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
