"""What each kind of external OpenAI-compatible server understands (pure data, no I/O).

An `engine: openai` pool puts an existing server behind Tandem's ingress (serving.replicas.external).
The servers share the OpenAI `/v1/completions` shape but differ in what they accept beyond it: a
prompt given as token ids, vLLM's sampling extensions, a per-request prefix-cache salt, output token
ids, and which Prometheus metrics report their load. `PROFILES` is the one table of those
differences; the deployment spec (serving.config.UpstreamSpec.server) names a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class UpstreamServer(StrEnum):
    """The kind of server an `engine: openai` pool points at."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    TRTLLM = "trtllm"
    LLAMACPP = "llamacpp"
    OPENAI = "openai"


@dataclass(frozen=True, slots=True)
class UpstreamProfile:
    """One server kind's dialect of the OpenAI completions API.

    Attributes:
        token_prompt: `/v1/completions` takes `prompt` as a list of token ids (else the ingress sends
            the prompt's text, decoded from the ids with special tokens kept).
        sampling_extensions: it takes `top_k`, `min_tokens`, `stop_token_ids`, `ignore_eos`,
            `repetition_penalty`-style fields beside OpenAI's (vLLM's extra sampling params).
        cache_salt: it takes `cache_salt`, salting its prefix cache per tenant (vLLM).
        return_token_ids: it streams the generated token ids (`return_token_ids`, vLLM); otherwise
            the ingress re-tokenizes the streamed text.
        usage_per_chunk: it reports usage on every chunk (`stream_options.continuous_usage_stats`).
        running_metric / waiting_metric / kv_metric: Prometheus series (on `metrics_path`) of requests
            running, waiting and the KV-cache use (0..1); None: not exported (the router counts its
            own requests in flight instead).
        health_path: GET path that answers 200 when the server can serve.
        metrics_path: GET path of the Prometheus text.
        extension_fields: of the extension fields, those it takes when `sampling_extensions` is False
            (llama.cpp: `top_k`, `ignore_eos`).
        fixed_fields: fields sent with every request, before the request's own: they turn off
            server-side sampling defaults that OpenAI does not have (llama.cpp samples with top_k=40
            and min_p=0.05 unless told otherwise).
        reset_cache_path: POST path that drops the prefix cache (None: none).
    """

    token_prompt: bool
    sampling_extensions: bool
    cache_salt: bool
    return_token_ids: bool
    usage_per_chunk: bool
    running_metric: str | None
    waiting_metric: str | None
    kv_metric: str | None
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    extension_fields: tuple[str, ...] = ()
    fixed_fields: tuple[tuple[str, Any], ...] = ()
    reset_cache_path: str | None = None


# NOTE: each row was checked against the server's own source or docs (the comment above it names them).
# Servers that do not know a field differ: vLLM, SGLang, TGI and llama.cpp ignore unknown request fields,
# but trtllm-serve rejects them (its pydantic models are `extra="forbid"`), so a row never claims a field
# its server lacks.
PROFILES: dict[UpstreamServer, UpstreamProfile] = {
    # vLLM 0.32 (checked against a live `vllm serve`): vllm/entrypoints/openai/completion/protocol.py
    # (prompt ids, return_token_ids, cache_salt, stream_options), docs.vllm.ai/en/v0.32.0/usage/metrics;
    # /reset_prefix_cache exists only with VLLM_SERVER_DEV_MODE=1.
    UpstreamServer.VLLM: UpstreamProfile(
        token_prompt=True,
        sampling_extensions=True,
        cache_salt=True,
        return_token_ids=True,
        usage_per_chunk=True,
        running_metric="vllm:num_requests_running",
        waiting_metric="vllm:num_requests_waiting",
        kv_metric="vllm:kv_cache_usage_perc",
        reset_cache_path="/reset_prefix_cache",
    ),
    # SGLang main (2026): python/sglang/srt/entrypoints/openai/{protocol,serving_completions}.py: prompt
    # ids become input_ids; return_token_ids streams token_ids deltas; cache_salt reaches the radix cache
    # since sgl-project/sglang#23300 (older releases accept the field and ignore it); ModelCard has
    # max_model_len; metrics need --enable-metrics (docs.sglang.io/references/production_metrics);
    # POST /flush_cache.
    UpstreamServer.SGLANG: UpstreamProfile(
        token_prompt=True,
        sampling_extensions=True,
        cache_salt=True,
        return_token_ids=True,
        usage_per_chunk=True,
        running_metric="sglang:num_running_reqs",
        waiting_metric="sglang:num_queue_reqs",
        kv_metric="sglang:token_usage",
        reset_cache_path="/flush_cache",
    ),
    # TGI: router/src/lib.rs `CompletionRequest` (prompt: string(s) only; no top_k/min_tokens, no
    # stream_options: usage rides on the final chunk); huggingface.co/docs/text-generation-inference/
    # reference/metrics (tgi_batch_current_size, tgi_queue_size; no KV-use gauge).
    UpstreamServer.TGI: UpstreamProfile(
        token_prompt=False,
        sampling_extensions=False,
        cache_salt=False,
        return_token_ids=False,
        usage_per_chunk=False,
        running_metric="tgi_batch_current_size",
        waiting_metric="tgi_queue_size",
        kv_metric=None,
    ),
    # trtllm-serve: tensorrt_llm/serve/openai_protocol.py `CompletionRequest` (prompt ids, top_k,
    # min_tokens, stop_token_ids, ignore_eos; extra fields forbidden, so no cache_salt/return_token_ids),
    # serve/postprocess_handlers.py (continuous_usage_stats honoured); /metrics is JSON iteration stats,
    # the Prometheus text is /prometheus/metrics (tensorrt_llm/metrics/collector.py names).
    UpstreamServer.TRTLLM: UpstreamProfile(
        token_prompt=True,
        sampling_extensions=True,
        cache_salt=False,
        return_token_ids=False,
        usage_per_chunk=True,
        running_metric="trtllm_num_requests_running",
        waiting_metric="trtllm_num_requests_waiting",
        kv_metric="trtllm_kv_cache_utilization",
        metrics_path="/prometheus/metrics",
    ),
    # llama.cpp server: tools/server/README.md (/v1/completions takes /completion's options: prompt as
    # token ids, top_k, ignore_eos, min_p; GET /health 200/503; --metrics: llamacpp:requests_processing,
    # llamacpp:requests_deferred; the kv_cache_usage_ratio gauge is gone from current builds).
    UpstreamServer.LLAMACPP: UpstreamProfile(
        token_prompt=True,
        sampling_extensions=False,
        cache_salt=False,
        return_token_ids=False,
        usage_per_chunk=False,
        running_metric="llamacpp:requests_processing",
        waiting_metric="llamacpp:requests_deferred",
        kv_metric=None,
        extension_fields=("top_k", "ignore_eos"),
        fixed_fields=(("top_k", 0), ("min_p", 0.0)),
    ),
    # Any other OpenAI-compatible API: only OpenAI's own fields (platform.openai.com/docs/api-reference/
    # completions); no /health, so the model list is the health check.
    UpstreamServer.OPENAI: UpstreamProfile(
        token_prompt=False,
        sampling_extensions=False,
        cache_salt=False,
        return_token_ids=False,
        usage_per_chunk=False,
        running_metric=None,
        waiting_metric=None,
        kv_metric=None,
        health_path="/v1/models",
    ),
}
