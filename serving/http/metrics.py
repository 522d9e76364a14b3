"""Prometheus metrics of the ingress (one registry per ingress instance; no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
)


class IngressMetrics:
    """Request, latency and token metrics, labelled by model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_requests", "Finished HTTP requests.", ["model", "endpoint", "status"], registry=r
        )
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests in progress.", ["model"], registry=r)
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "Time to first token at the ingress.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Time between streamed chunks.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds",
            "Whole request latency.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        self.cached_tokens = Counter(
            "tandem_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache.",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "tandem_completion_tokens", "Generated tokens.", ["model"], registry=r
        )
        self.stream_migrations = Counter(
            "tandem_stream_migrations",
            "Streams that broke after their first token, by model, how they broke (error, stalled, cut) "
            "and what followed (migrated, or why not: limit, budget, client_error, ...).",
            ["model", "failure", "result"],
            registry=r,
        )
        self.stream_stalls = Counter(
            "tandem_stream_stalls",
            "Streams whose engine sent nothing within resilience.streams.stall_timeout_s.",
            ["model"],
            registry=r,
        )
        self.reasoning_tokens = Counter(
            "tandem_reasoning_tokens",
            "Generated tokens inside the reasoning block (part of tandem_completion_tokens).",
            ["model"],
            registry=r,
        )
        self.sessions = Counter(
            "tandem_sessions",
            "Background sessions (/v1/responses) created, by model.",
            ["model"],
            registry=r,
        )
        self.disconnects = Counter(
            "tandem_client_disconnects",
            "Streams the client abandoned (engine request aborted).",
            ["model"],
            registry=r,
        )

        self.tier_requests = Counter(
            "tandem_tier_requests",
            "Requests by tier and the model that served them (degraded: served down the chain).",
            ["tier", "model", "how", "degraded"],
            registry=r,
        )
        self.rejections = Counter(
            "tandem_admission_rejections",
            "Requests refused before reaching an engine, by reason (tenant_concurrency, "
            "tenant_rate_limited, request_too_large, fanout_timeout, queue_full, queue_timeout, "
            "predicted_wait, pool_down).",
            ["reason", "model"],
            registry=r,
        )
        self.auth_failures = Counter(
            "tandem_auth_failures", "Requests refused with 401, by reason.", ["reason"], registry=r
        )
        self.retries = Counter(
            "tandem_retries",
            "Attempts retried on the same target, by error class.",
            ["model", "error_class"],
            registry=r,
        )
        self.attempt_failures = Counter(
            "tandem_attempt_failures",
            "Failed attempts (before the first token), by error class (server, timeout, engine_fault, "
            "rate_limited, client).",
            ["model", "error_class"],
            registry=r,
        )
        self.target_health = Gauge(
            "tandem_target_health",
            "Health of each target as this ingress sees it: 0 healthy, 1 sticky_retry, 2 terminal.",
            ["model"],
            registry=r,
        )
        self.health_transitions = Counter(
            "tandem_health_transitions", "Health state changes, by new state.", ["model", "state"], registry=r
        )
        self.probes = Counter(
            "tandem_health_probes", "Recovery probes of terminal targets.", ["model", "result"], registry=r
        )
        self.templates = Counter(
            "tandem_template_requests",
            "Requests by the prompt template chosen for them (name@version) and whether it was put in "
            "(applied) or left out (the request had its own system message).",
            ["model", "template", "applied"],
            registry=r,
        )
        self.template_reloads = Counter(
            "tandem_template_reloads",
            "Reloads of the template library file, by result (ok, invalid: the old library stays).",
            ["result"],
            registry=r,
        )
        self.template_library = Gauge(
            "tandem_template_library_templates", "Templates in the library in use.", registry=r
        )
        self.truncations = Counter(
            "tandem_truncations",
            "Requests whose conversation was truncated to fit the context (items dropped), or whose "
            "max_tokens was clamped, by kind.",
            ["model", "kind"],
            registry=r,
        )
        self.truncated_tokens = Counter(
            "tandem_truncated_tokens", "Prompt tokens dropped by truncation.", ["model"], registry=r
        )
        self.upstream_up = Gauge(
            "tandem_upstream_up",
            "External servers (engine: openai pools): 1 while an endpoint's health answers, else 0.",
            ["model", "endpoint"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tandem_upstream_errors",
            "Failed calls to external servers, by kind (connect, status, stalled, protocol).",
            ["model", "endpoint", "kind"],
            registry=r,
        )

    def watch_admission(self, controller: Any) -> None:
        """Export the admission controller's levels (read at scrape time)."""
        self.registry.register(_AdmissionCollector(controller))

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)


class _AdmissionCollector(Collector):
    """Bucket levels, fan-out slots and pool queues of an AdmissionController, read when scraped."""

    def __init__(self, controller: Any) -> None:
        self._ctl = controller

    def describe(self) -> list:
        return []

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        snap = self._ctl.snapshot()
        bucket = GaugeMetricFamily(
            "tandem_admission_bucket_tokens", "Tokens left in each tenant's bucket.", labels=["tenant"]
        )
        for tenant, level in snap["buckets"].items():
            bucket.add_metric([tenant], level)
        inflight = GaugeMetricFamily(
            "tandem_admission_tenant_in_flight", "Admitted requests in flight per tenant.", labels=["tenant"]
        )
        for tenant, n in snap["tenant_in_flight"].items():
            inflight.add_metric([tenant], n)
        fanout = GaugeMetricFamily(
            "tandem_admission_fanout_in_use",
            "Fan-out slots in use (calls of agent tasks in flight) per tenant.",
            labels=["tenant"],
        )
        for tenant, n in snap["fanout_in_use"].items():
            fanout.add_metric([tenant], n)
        pool_in_use = GaugeMetricFamily(
            "tandem_admission_pool_in_flight", "Requests holding a pool slot, per model.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "tandem_admission_queue_depth", "Requests waiting for a pool slot, per model.", labels=["model"]
        )
        for model, p in snap["pools"].items():
            pool_in_use.add_metric([model], p["in_use"])
            queued.add_metric([model], p["queued"])
        yield from (bucket, inflight, fanout, pool_in_use, queued)
