"""Ray Serve glue of the SLO autoscaler: one application-level policy decides for all of a model's pools.

Ray Serve (2.60) calls an application's `autoscaling_policy` with the `AutoscalingContext` of every
autoscaled deployment at once. `TandemAutoscalingPolicy` turns those contexts into
`autoscaler.signals.ModelSignals` (the engine replicas' and the ingress's `record_autoscaling_stats`,
with their timestamps: a sample's age is how long ago its replica pushed it), calls the pure
`autoscaler.policy.decide` per model, and returns the targets. The ingress deployment is in the
contexts only to carry its metrics (its min == max: it keeps its size).

Serve applies the policy only to applications deployed from a config (`serve deploy`, a KubeRay
RayService's `serveConfigV2`, or `serve_config()` below, which `tandem up` uses when a spec has
autoscaled pools). The decisions and their reasons are Ray metrics (`ray_tandem_autoscaler_*`, on the
Grafana dashboard) and, when a target changes, lines in the Serve controller's log (Ray dashboard ->
Serve -> controller logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from autoscaler.policy import Decision, ModelState, decide
from autoscaler.signals import INGRESS_FIELDS, IngressSample, ModelSignals, PoolSignals, ReplicaSample
from serving.config import ServingSpec, load_spec, parse_spec

logger = logging.getLogger("ray.serve")

#: Import path of the policy for a Serve config's `autoscaling_policy.policy_function`.
POLICY_PATH = "serving.autoscaling:TandemAutoscalingPolicy"
INGRESS_DEPLOYMENT = "ingress"


def _latest(series: Any) -> tuple[float, float] | None:
    """(timestamp, value) of the newest point of a Serve TimeSeries (None if empty)."""
    if not series:
        return None
    p = max(series, key=lambda v: v.timestamp)
    return float(p.timestamp), float(p.value)


def replica_metrics(raw: Mapping[str, Mapping[Any, Any]] | None) -> dict[Any, tuple[float, dict[str, float]]]:
    """Per replica id: (timestamp of its newest push, {metric: newest value})."""
    out: dict[Any, tuple[float, dict[str, float]]] = {}
    for name, per_replica in (raw or {}).items():
        for rid, series in per_replica.items():
            p = _latest(series)
            if p is None:
                continue
            ts, metrics = out.get(rid, (0.0, {}))
            metrics[name] = p[1]
            out[rid] = (max(ts, p[0]), metrics)
    return out


class TandemAutoscalingPolicy:
    """The application-level policy (`autoscaling_policy.policy_function`: POLICY_PATH).

    Args (its `policy_kwargs`, the same as the app builder's `args`):
        spec: the deployment spec inline, or
        config: a path to it.
    """

    def __init__(self, spec: dict[str, Any] | None = None, config: str | None = None) -> None:
        self._spec: ServingSpec = (
            parse_spec(spec, origin="policy_kwargs.spec") if spec is not None else load_spec(config)
        )
        self._pools: dict[str, tuple[str, Any]] = {}  # deployment -> (model, pool spec)
        self._configs = {}
        for m in self._spec.models:
            if self._spec.autoscaled(m):
                self._configs[m.name] = self._spec.autoscaling_policy_config(m.name)
                for p in m.pools:
                    self._pools[m.deployment_name(p)] = (m.name, p)
        self._states: dict[str, ModelState] = {}
        self._last: dict[str, tuple[int, str]] = {}  # model/pool -> (target, reason codes)
        self._gauges: Any = None
        self._clock = time.time

    # -- Ray Serve's call ------------------------------------------------------------------------

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        now = self._clock()
        ids = {dep_id.name: dep_id for dep_id in contexts}
        decisions: dict[Any, int] = {}
        state: dict[Any, dict] = {}
        ingress = self._ingress(contexts.get(ids.get(INGRESS_DEPLOYMENT)), now)
        if INGRESS_DEPLOYMENT in ids:
            ctx = contexts[ids[INGRESS_DEPLOYMENT]]
            decisions[ids[INGRESS_DEPLOYMENT]] = ctx.target_num_replicas
        for model in self._configs:
            signals = self.signals(model, contexts, ids, ingress.get(model), now)
            d = decide(signals, self._states.get(model, ModelState()), self._configs[model])
            self._states[model] = d.state
            self._publish(model, d, signals)
            for pool, target in d.targets.items():
                dep = self._spec.model(model).deployment_name(self._pool_spec(model, pool))
                if dep in ids:
                    decisions[ids[dep]] = target
                    state[ids[dep]] = {"reasons": [str(r) for r in d.reasons_for(pool)]}
        return decisions, state

    # -- signals ---------------------------------------------------------------------------------

    def _pool_spec(self, model: str, pool: str) -> Any:
        return next(p for p in self._spec.model(model).pools if p.pool_name == pool)

    def _ingress(self, ctx: Any, now: float) -> dict[str, IngressSample]:
        """Per model, the ingress replicas' newest metrics summed."""
        if ctx is None:
            return {}
        per_model: dict[str, list[tuple[float, dict[str, float]]]] = {}
        for _rid, (ts, metrics) in replica_metrics(ctx.raw_metrics).items():
            by_model: dict[str, dict[str, float]] = {}
            for key, value in metrics.items():
                model, _, field = key.rpartition(":")
                if model and field in INGRESS_FIELDS:
                    by_model.setdefault(model, {})[field] = value
            for model, m in by_model.items():
                per_model.setdefault(model, []).append((max(0.0, now - ts), m))
        return {
            model: s for model, parts in per_model.items() if (s := IngressSample.merge(parts)) is not None
        }

    def signals(
        self,
        model: str,
        contexts: dict[Any, Any],
        ids: dict[str, Any],
        ingress: IngressSample | None,
        now: float,
    ) -> ModelSignals:
        """`model`'s pools from their contexts (a pool with a fixed size, not autoscaled, is held)."""
        m = self._spec.model(model)
        pools: dict[str, PoolSignals] = {}
        missing: dict[str, str] = {}
        serving = m.serving_pool.pool_name
        for p in m.pools:
            dep = m.deployment_name(p)
            ctx = contexts.get(ids.get(dep))
            if ctx is None:
                n = p.replicas.min
                pools[p.pool_name] = PoolSignals(
                    p.pool_name, p.role.value, n, n, n, n, p.max_ongoing_requests
                )
                if p.replicas.min < p.replicas.max:
                    missing[p.pool_name] = f"Serve gave no autoscaling context for {dep}"
                continue
            samples = tuple(
                ReplicaSample.from_metrics(str(rid), max(0.0, now - ts), metrics)
                for rid, (ts, metrics) in replica_metrics(ctx.raw_metrics).items()
            )
            pools[p.pool_name] = PoolSignals(
                p.pool_name,
                p.role.value,
                int(ctx.target_num_replicas),
                int(ctx.current_num_replicas),
                int(ctx.capacity_adjusted_min_replicas),
                int(ctx.capacity_adjusted_max_replicas),
                p.max_ongoing_requests,
                samples,
            )
            if p.pool_name == serving:
                held = float(ctx.total_queued_requests or 0.0)  # at handles: no replica to send to
                if held > 0:
                    base = ingress or IngressSample(0.0)
                    ingress = IngressSample(
                        base.age_s,
                        base.queued + held,
                        base.queue_wait_s,
                        base.rejected_per_s,
                        base.arrivals_per_s,
                        base.input_tokens_per_s,
                        base.output_tokens_per_s,
                    )
        return ModelSignals(model, now, pools, ingress, missing)

    # -- what it decided, for people -------------------------------------------------------------

    def _publish(self, model: str, d: Decision, signals: ModelSignals) -> None:
        g = self._metrics()
        for pool, target in d.targets.items():
            tags = {"model": model, "pool": pool}
            if g is not None:
                g["target"].set(target, tags=tags)
                g["running"].set(signals.pools[pool].running, tags=tags)
            reasons = d.reasons_for(pool)
            key = (target, ";".join(r.code for r in reasons))
            current = signals.pools[pool].current
            if target != current and g is not None:
                for r in reasons:
                    if r.action != "hold":
                        g["decisions"].inc(tags={**tags, "direction": r.action, "reason": r.code})
            # One log line per change of target or of the reasons' codes (not one per control loop).
            if target != current or self._last.get(f"{model}/{pool}") != key:
                why = "; ".join(str(r) for r in reasons) or "no change"
                logger.info("tandem autoscaler %s/%s: %d -> %d (%s)", model, pool, current, target, why)
            self._last[f"{model}/{pool}"] = key

    def _metrics(self) -> dict[str, Any] | None:
        """Ray metrics of the decisions (None outside a Ray worker, e.g. in unit tests)."""
        if self._gauges is None:
            try:
                from ray.util.metrics import Counter, Gauge

                self._gauges = {
                    "target": Gauge(
                        "tandem_autoscaler_target_replicas",
                        description="Replicas the SLO autoscaler wants for the pool.",
                        tag_keys=("model", "pool"),
                    ),
                    "running": Gauge(
                        "tandem_autoscaler_running_replicas",
                        description="Replicas of the pool running, as the SLO autoscaler saw them.",
                        tag_keys=("model", "pool"),
                    ),
                    "decisions": Counter(
                        "tandem_autoscaler_decisions",
                        description="Scale decisions of the SLO autoscaler by direction and reason.",
                        tag_keys=("model", "pool", "direction", "reason"),
                    ),
                }
            except Exception as e:  # noqa: BLE001 - no Ray metrics here (unit tests): decisions still apply
                logger.debug("autoscaler metrics unavailable: %s", e)
                self._gauges = {}
        return self._gauges or None


def serve_config(spec: ServingSpec, name: str, route_prefix: str = "/") -> dict[str, Any]:
    """The Serve config (`ServeDeploySchema` dict) of `spec` as application `name`, with the SLO
    autoscaler as its application-level policy when any pool is autoscaled."""
    dumped = spec.model_dump(mode="json")
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "serving.app:build_app",
        "args": {"spec": dumped},
    }
    if any(spec.autoscaled(m) for m in spec.models):
        app["autoscaling_policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"spec": dumped}}
    return {"applications": [app]}
