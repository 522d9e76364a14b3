"""Prometheus metrics of the ingress (one registry per ingress instance; no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.disconnects = Counter(
            "tandem_client_disconnects",
            "Streams the client abandoned (engine request aborted).",
            ["model"],
            registry=r,
        )

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
