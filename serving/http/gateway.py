"""The ingress's front door: API keys, tier choice, admission, retries and target health.

One `Gateway` per ingress replica, built from the deployment spec (`Gateway.from_spec`). It owns
no I/O of its own except recovery probes, which it runs as tasks on the ingress's event loop.
The request path that uses it is `serving.http.api.OpenAIApi.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from autoscaler.meters import IngressMeter
from router.admission import AdmissionController
from router.resilience import HealthState, RetryBudget, TargetHealth
from router.tiers import TierRouter
from serving.config import AuthSpec, Priority, ResilienceSpec, ServingSpec, TemplatesSpec, TruncationSpec
from serving.http.auth import Authenticator
from serving.http.metrics import IngressMetrics
from serving.http.templates import TemplateLibrary

logger = logging.getLogger(__name__)

#: Tenant of requests when auth is disabled and no x-tandem-tenant header is sent.
DEFAULT_TENANT = "default"


class Gateway:
    """Auth, tiers, admission and health of one ingress replica.

    Args:
        auth: authenticator (API key -> tenant).
        tiers: tier resolution and degradation chains.
        admission: token buckets, fan-out and pool limits.
        resilience: retry and health settings.
        metrics: the ingress's metrics (health transitions and probes are counted there).
        default_reserved_tokens: output tokens reserved for requests without max_tokens.
        templates: the prompt template library (reloaded from its file; default: none).
        truncation: context-overflow settings.
    """

    def __init__(
        self,
        auth: Authenticator,
        tiers: TierRouter,
        admission: AdmissionController,
        resilience: ResilienceSpec,
        metrics: IngressMetrics,
        default_reserved_tokens: int,
        templates: TemplateLibrary | None = None,
        truncation: TruncationSpec | None = None,
    ) -> None:
        self.auth = auth
        self.templates = templates or TemplateLibrary(TemplatesSpec(), tiers.tiers, tiers.tasks, metrics)
        self.truncation = truncation or TruncationSpec()
        #: Per (model, template): the token ids of the template's messages alone (its prefix).
        self.template_prefix: dict[tuple[str, Any], list[int]] = {}
        self.tiers = tiers
        self.admission = admission
        self.resilience = resilience
        self.metrics = metrics
        self.default_reserved_tokens = default_reserved_tokens
        self.budget = RetryBudget(resilience.retry_budget_ratio, resilience.retry_budget_min)
        self._health: dict[str, TargetHealth] = {}
        self._probes: dict[str, Callable[[], Awaitable[None]]] = {}
        self._probe_tasks: dict[str, asyncio.Task] = {}
        self._terminal: dict[str, asyncio.Event] = {}
        #: Models whose pool may scale to zero: no running replica is normal there (Serve starts one
        #: for the next request), so it does not make the target terminal.
        self.scale_to_zero: set[str] = set()
        #: Per model: seconds added to the first-token timeout while its pool may be starting from
        #: zero (the model's `autoscaling.cold_start_s`): the first request waits for the cold start.
        self.cold_start_s: dict[str, float] = {}
        #: What the SLO autoscaler sees of this ingress (arrivals, capacity rejections, queue waits).
        self.autoscaling = IngressMeter(time.monotonic)
        metrics.watch_admission(admission)

    @classmethod
    def from_spec(cls, spec: ServingSpec, metrics: IngressMetrics) -> Gateway:
        """The gateway for `spec`; every limit is scaled to this replica's share of the ingress."""
        controller = spec.admission_controller()
        tiers = spec.tier_router()
        gateway = cls(
            Authenticator(spec.auth, DEFAULT_TENANT),
            tiers,
            controller,
            spec.resilience,
            metrics,
            spec.admission.default_reserved_tokens,
            TemplateLibrary(spec.templates, tiers.tiers, tiers.tasks, metrics),
            spec.truncation,
        )
        with contextlib.suppress(RuntimeError):  # no running loop (pure unit use): no reloads
            gateway.templates.start()
        gateway.scale_to_zero = {m.name for m in spec.models if m.serving_pool.replicas.min == 0}
        gateway.cold_start_s = {m: spec.model(m).autoscaling.cold_start_s for m in gateway.scale_to_zero}
        gateway.autoscaling = IngressMeter(time.monotonic, max(m.autoscaling.window_s for m in spec.models))
        return gateway

    def autoscaling_stats(self) -> dict[str, float]:
        """The ingress's `record_autoscaling_stats` dict: `<model>:<field>`
        (autoscaler.signals.INGRESS_FIELDS)."""
        pools = self.admission.snapshot()["pools"]
        return self.autoscaling.snapshot({m: p["queued"] for m, p in pools.items()})

    @classmethod
    def open(cls, models: list[str], metrics: IngressMetrics) -> Gateway:
        """No auth, no tiers, no limits: for embedding the API in tests and benchmarks."""
        from serving.config import ModelSpec, PoolSpec, ServerSpec

        spec = ServingSpec(
            server=ServerSpec(),
            models=[ModelSpec(name=n, source="none", pools=[PoolSpec()]) for n in models],
            auth=AuthSpec(enabled=False),
            admission={"enabled": False},
        )
        return cls.from_spec(spec, metrics)

    # -- priority ------------------------------------------------------------------------------

    @staticmethod
    def priority_rank(value: str | None) -> int | None:
        """Rank of an x-tandem-priority value (ValueError if unknown); None when absent."""
        if value is None or not value.strip():
            return None
        return Priority(value.strip().lower()).rank

    # -- health --------------------------------------------------------------------------------

    def register_probe(self, model: str, probe: Callable[[], Awaitable[None]]) -> None:
        """How to check that `model`'s pool answers again (raises if not)."""
        self._probes[model] = probe

    def health(self, model: str) -> TargetHealth:
        """The health state machine of `model` (created healthy)."""
        h = self._health.get(model)
        if h is None:
            r = self.resilience
            h = self._health[model] = TargetHealth(
                model, r.terminal_after, r.probe_interval_s, self._on_transition
            )
            self.metrics.target_health.labels(model).set(h.state.level)
        return h

    def terminal_event(self, model: str) -> asyncio.Event:
        """Set while `model` is terminal: attempts waiting on it give up at once when it is set."""
        ev = self._terminal.get(model)
        if ev is None:
            ev = self._terminal[model] = asyncio.Event()
            if not self.health(model).usable:
                ev.set()
        return ev

    def _on_transition(self, model: str, old: HealthState, new: HealthState, reason: str) -> None:
        logger.warning("target %s: %s -> %s (%s)", model, old, new, reason)
        self.metrics.target_health.labels(model).set(new.level)
        self.metrics.health_transitions.labels(model, new.value).inc()
        if new is HealthState.TERMINAL:
            self._terminal.setdefault(model, asyncio.Event()).set()
            self._start_probing(model)
        elif old is HealthState.TERMINAL:
            self._terminal.pop(model, None)

    def pool_status(self, model: str, running_replicas: int) -> None:
        """What the cluster says about `model`'s pool: no running replica makes it terminal at once."""
        if running_replicas == 0 and model not in self.scale_to_zero:
            self.health(model).on_down("no running replica", time.monotonic())

    def _start_probing(self, model: str) -> None:
        task = self._probe_tasks.get(model)
        if task is not None and not task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (pure unit use): probes are the caller's business
        self._probe_tasks[model] = loop.create_task(self._probe_loop(model), name=f"probe-{model}")

    async def _probe_loop(self, model: str) -> None:
        """Probe a terminal target every probe_interval_s until it answers."""
        h = self.health(model)
        r = self.resilience
        while h.state is HealthState.TERMINAL:
            await asyncio.sleep(h.probe_in(time.monotonic()))
            if not h.probe_due(time.monotonic()):
                continue
            # Looked up each time: a target may go terminal before its probe is registered (an
            # external server down while the ingress starts).
            probe = self._probes.get(model)
            ok = False
            if probe is not None:
                try:
                    await asyncio.wait_for(probe(), r.probe_timeout_s)
                    ok = True
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # any failure keeps it terminal
                    logger.info("probe of %s failed: %s", model, type(e).__name__)
            self.metrics.probes.labels(model, "ok" if ok else "failed").inc()
            h.on_probe(ok, time.monotonic())

    async def close(self) -> None:
        """Stop the probe tasks and the template reloads."""
        await self.templates.close()
        for task in self._probe_tasks.values():
            task.cancel()
        await asyncio.gather(*self._probe_tasks.values(), return_exceptions=True)
        self._probe_tasks.clear()
