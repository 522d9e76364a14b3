"""The deployment spec: every knob of a Tandem deployment, and every default, lives here.

A spec is YAML (or the equivalent dict from a KubeRay ``serveConfigV2`` ``args``) validated by
pydantic models with ``extra="forbid"``. Errors name the field and say how to fix it.

Shape::

    server:   where the OpenAI API listens, and the local Ray settings
    models:   one entry per served model; each has one or more pools (colocated | prefill | decode)
    tiers:    task tiers (intent, reasoning, ...) that map to a model, with degradation chains
    routing:  how a request picks its tier (model name, `auto` + x-tandem-task, shape rules)
    auth:     API keys (hashed) -> tenants
    admission: per-tenant token buckets, fan-out width, priorities, pool limits, wait queue
    resilience: retry budget, backoff, health state machine of each target
    sessions: background reasoning sessions (/v1/responses): workers, durable store, webhooks
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.admission import AdmissionController, Limits
from router.contracts import DisaggMode, Role
from router.resilience import RetryPolicy
from router.tiers import Routing, Rule, RuleMatch, Task, Tier, TierRouter
from serving.upstreams import PROFILES, UpstreamServer

#: Where `tandem model build` writes the tiny local models (overridden by $TANDEM_MODEL_DIR).
DEFAULT_MODEL_DIR = "~/.cache/tandem/models"
#: Scheme prefix of a model source that names a locally built tiny model.
LOCAL_SOURCE_PREFIX = "local:"

#: Where durable local state (the session store) lives (overridden by $TANDEM_STATE_DIR).
DEFAULT_STATE_DIR = "~/.local/state/tandem"

_NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"


def default_model_dir() -> str:
    """$TANDEM_MODEL_DIR, else DEFAULT_MODEL_DIR (not expanded)."""
    return os.environ.get("TANDEM_MODEL_DIR", DEFAULT_MODEL_DIR)


def default_state_path(name: str) -> str:
    """`name` under $TANDEM_STATE_DIR, else DEFAULT_STATE_DIR (not expanded)."""
    return str(Path(os.environ.get("TANDEM_STATE_DIR", DEFAULT_STATE_DIR)) / name)


#: Stand-in for "no limit" (admission disabled).
UNLIMITED = 1 << 30


class SpecError(ValueError):
    """A deployment spec that cannot be used; the message lists every problem and its field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class EngineKind(StrEnum):
    """Which inference engine a pool runs."""

    VLLM = "vllm"
    SGLANG = "sglang"
    FAKE = "fake"
    #: An existing OpenAI-compatible server (vllm serve, SGLang, TGI, trtllm-serve, llama.cpp) behind
    #: the ingress: the pool's `upstream` (serving.replicas.external).
    OPENAI = "openai"


class Parallelism(_Spec):
    """How one replica of a pool is split across accelerators."""

    tp: int = Field(1, ge=1, description="Tensor-parallel size (GPUs inside one node).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel size (stages, may span nodes).")
    dp: int = Field(
        1,
        ge=1,
        description="Data-parallel ranks of one vLLM data-parallel group; each rank is one Ray Serve "
        "replica with tp x pp GPUs, and the ranks spread across nodes (MoE serving). SGLang runs the "
        "ranks inside one engine (DP attention over tp x dp GPUs).",
    )
    ep: bool = Field(False, description="Expert parallelism across the dp x tp ranks (MoE only).")

    @model_validator(mode="after")
    def _ep_needs_ranks(self) -> Parallelism:
        if self.ep and self.dp * self.tp == 1:
            raise ValueError("ep: expert parallelism needs dp * tp > 1; raise dp or tp, or set ep: false")
        return self

    @property
    def accelerators_per_replica(self) -> int:
        """Accelerators (GPUs) that one replica (one DP rank) occupies."""
        return self.tp * self.pp


class Replicas(_Spec):
    """Replica bounds of a pool (min == max means a fixed size, no autoscaling)."""

    min: int = Field(1, ge=0, description="Fewest replicas the autoscaler may keep.")
    initial: int | None = Field(None, ge=0, description="Replicas at start; defaults to min.")
    max: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max}); set min <= max")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(
                f"initial ({self.initial}) must lie between min ({self.min}) and max ({self.max})"
            )
        return self

    @property
    def start(self) -> int:
        """Replicas to start with."""
        return self.initial if self.initial is not None else max(self.min, 1)


class UpstreamSpec(_Spec):
    """The external server of an `engine: openai` pool: one replica per endpoint.

    The ingress plans, admits, routes (cache-aware, over the endpoints) and streams as for an
    in-process engine; requests go to the server's `/v1/completions` as token ids (or text, for servers
    that take no ids: see serving/upstreams.py). Credentials come from the environment or a mounted
    Secret, never from the client's request.
    """

    endpoints: list[str] = Field(
        min_length=1,
        description="Base URLs of the server's replicas (http://host:port, without /v1); each is one "
        "replica to the cache-aware router.",
    )
    server: UpstreamServer = Field(
        UpstreamServer.VLLM,
        description="What the server is (vllm, sglang, tgi, trtllm, llamacpp, openai): which request "
        "fields, prompt form, load metrics and cache salt it understands (serving/upstreams.py).",
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="The model name the server serves (its --served-model-name); None: the first model "
        "its /v1/models lists.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the server's API key (from a Secret)."
    )
    api_key_file: str | None = Field(
        None, description="File holding the server's API key (a mounted Secret)."
    )
    max_model_len: int = Field(
        ge=1,
        description="The server's context length (its --max-model-len): the ingress plans requests "
        "against it. Required, so that Tandem starts while the server is down; an endpoint that reports "
        "another length in /v1/models is logged.",
    )
    block_size: int = Field(
        16,
        ge=1,
        description="The server's KV-cache block size in tokens (vLLM: 16 on GPUs, 128 on its CPU "
        "build): prompts are hashed in blocks of this size for cache-aware routing.",
    )
    kv_events: list[str] = Field(
        default_factory=list,
        description="Per endpoint, in the same order, its vLLM KV-event publisher (--kv-events-config "
        "with the zmq publisher, e.g. tcp://10.0.0.5:5557): the block index then follows the server's "
        "cache exactly. Empty: the index is fed by the ingress's own routing decisions.",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Time to open a connection to an endpoint.")
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Most time between two chunks of a stream (the first token's own limit is "
        "resilience.first_token_timeout_s); past it the stream ends with a 504.",
    )
    health_period_s: float = Field(
        2.0,
        gt=0,
        description="How often each endpoint's health path is checked: a failed one leaves routing at "
        "once (also on a refused connection) and returns when it answers again.",
    )

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        out = []
        for i, url in enumerate(v):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints[{i}]: {url!r} is not an http:// or https:// URL")
            url = url.rstrip("/")
            if url.endswith("/v1"):
                raise ValueError(f"endpoints[{i}]: give the base URL without /v1 ({url[:-3]!r})")
            out.append(url)
        if len(set(out)) != len(out):
            raise ValueError("endpoints: duplicate URLs")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamSpec:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give at most one of api_key_env or api_key_file")
        if self.kv_events and len(self.kv_events) != len(self.endpoints):
            raise ValueError(
                f"kv_events: {len(self.kv_events)} publishers for {len(self.endpoints)} endpoints; give one "
                "per endpoint, in the same order, or none"
            )
        if self.kv_events and self.server is not UpstreamServer.VLLM:
            raise ValueError(f"kv_events: only vLLM publishes KV events, not server {self.server.value}")
        return self

    def api_key(self) -> str | None:
        """The server's API key, read from the environment or the mounted file (None: no key)."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise SpecError(
                    f"upstream.api_key_env: ${self.api_key_env} is not set (mount it from a Secret)"
                )
            return key
        if self.api_key_file:
            try:
                return Path(self.api_key_file).read_text().strip()
            except OSError as e:
                why = f"cannot read {self.api_key_file}: {e.strerror}"
                raise SpecError(f"upstream.api_key_file: {why}") from None
        return None


class PoolSpec(_Spec):
    """A group of identical engine replicas serving one model in one role."""

    name: str | None = Field(None, pattern=_NAME_RE, description="Pool name; defaults to its role.")
    role: Role = Field(Role.COLOCATED, description="colocated (prefill+decode), prefill or decode.")
    engine: EngineKind = Field(
        EngineKind.VLLM,
        description="Inference engine: vllm, sglang, fake, or openai (an external server, see `upstream`).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed through to the engine (vLLM AsyncEngineArgs / SGLang ServerArgs).",
    )
    parallelism: Parallelism = Field(default_factory=Parallelism, description="tp / pp / dp / ep.")
    replicas: Replicas = Field(default_factory=Replicas, description="Replica bounds.")
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests Ray Serve sends to one replica at once (its default of 5 throttles "
        "an LLM engine that batches hundreds).",
    )
    accelerator: str = Field(
        "cpu",
        description="'cpu', or a Ray accelerator type such as H100, A100-80G, L4 (a GPU pool).",
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved for each replica's actor.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the replica's process."
    )
    stream_flush_ms: float = Field(
        20.0,
        ge=0,
        description="A replica sends a stream's tokens at most once per this many ms (the first "
        "token, the last and errors at once): fewer messages to the ingress at the same TTFT, "
        "E2E and mean TPOT; tokens in between arrive up to this much later (ITL). 0 sends each "
        "token as it comes (serving/replicas/streaming.py).",
    )

    @property
    def pool_name(self) -> str:
        """The pool's name (its role when not set)."""
        return self.name or self.role.value

    @property
    def uses_gpu(self) -> bool:
        """Whether replicas of this pool need GPUs."""
        return self.accelerator.lower() != "cpu"

    upstream: UpstreamSpec | None = Field(
        None, description="engine: openai only: the external OpenAI-compatible server and its endpoints."
    )

    @model_validator(mode="after")
    def _external(self) -> PoolSpec:
        external = self.engine is EngineKind.OPENAI
        if external and self.upstream is None:
            raise ValueError("upstream: required with engine: openai (the server's endpoints)")
        if not external and self.upstream is not None:
            raise ValueError(f"upstream: only for engine: openai; remove it (engine is {self.engine.value})")
        if external:
            if self.role is not Role.COLOCATED:
                raise ValueError(
                    "role: an external server is one colocated pool (its own prefill/decode split is its "
                    "business); set role: colocated"
                )
            if self.engine_args:
                raise ValueError("engine_args: an external server takes its own arguments; remove them")
            if self.replicas != Replicas() or self.parallelism != Parallelism():
                raise ValueError(
                    "replicas: an external pool's replicas are its upstream.endpoints; remove replicas "
                    "and parallelism"
                )
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas (Serve replicas, or an external pool's endpoints) the pool may run."""
        if self.upstream is not None:
            return len(self.upstream.endpoints)
        return self.replicas.max * self.parallelism.dp

    @model_validator(mode="after")
    def _dp_groups_fixed(self) -> PoolSpec:
        if self.parallelism.dp > 1 and self.replicas.min != self.replicas.max:
            raise ValueError(
                "replicas: a data-parallel pool (parallelism.dp > 1) has a fixed number of DP groups; "
                "set replicas.min == replicas.max"
            )
        return self

    @field_validator("engine_args")
    @classmethod
    def _no_model_in_engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("model", "served_model_name"):
            if key in v:
                raise ValueError(f"engine_args.{key}: set the model's `source` / `name` instead")
        return v


class TransferBackend(StrEnum):
    """KV transfer backend between prefill and decode engines."""

    NIXL = "nixl"
    MOONCAKE = "mooncake"


class Disaggregation(_Spec):
    """How a model with prefill and decode pools serves a request.

    The decode replica chosen for a request orchestrates it: it asks a prefill replica to run the
    prompt, pulls the KV engine to engine, and streams the answer. When the prompt's non-cached
    suffix on that decode replica is short, prefilling it there is cheaper than a transfer.
    """

    mode: DisaggMode = Field(
        DisaggMode.AUTO,
        description="Default for requests without an x-tandem-disagg header: auto (decide by the "
        "non-cached suffix), on (always a remote prefill), off (always colocated on decode).",
    )
    min_prefill_tokens: int = Field(
        256,
        ge=0,
        description="auto: a non-cached prompt suffix shorter than this many tokens is prefilled on "
        "the decode replica itself.",
    )
    prefill_timeout_s: float = Field(
        30.0, gt=0, description="Time allowed for one remote prefill attempt, queueing included."
    )
    prefill_attempts: int = Field(
        2, ge=1, description="Remote prefill attempts before falling back to colocated prefill."
    )
    kv_transfer_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time from the hand-off until the decode engine's first token (the KV pull); "
        "past it the request is prefilled on the decode replica instead.",
    )
    kv_lease_s: int = Field(
        30,
        ge=1,
        description="How long a prefill engine keeps KV that no decode engine claims (vLLM NIXL "
        "kv_lease_duration); then its blocks are freed.",
    )
    transfer_backend: TransferBackend = Field(
        TransferBackend.NIXL,
        description="KV transfer backend: nixl (vLLM NixlConnector, SGLang nixl) or mooncake (SGLang).",
    )
    nixl_progress_poll_ms: int = Field(
        5,
        ge=0,
        description="vLLM + NIXL: the UCX progress thread waits this long in poll() between "
        "wake-ups it was not signalled for (a transfer wakes it at once). 0 is NIXL's own setting, "
        "a busy loop that keeps one host core per engine busy even when idle "
        "(serving/replicas/engines/vllm_plugin.py).",
    )

    def prefill_retry_policy(self) -> RetryPolicy:
        """Remote prefill attempts, back to back (Serve's router avoids a replica it saw die); out of
        attempts the decode replica prefills itself."""
        return RetryPolicy(self.prefill_attempts, 0.0, 0.0)


class RouterPolicy(StrEnum):
    """Replica choice for a model's serving pool (and its prefill pool)."""

    CACHE_AWARE = "cache_aware"
    ROUND_ROBIN = "round_robin"
    POWER_OF_TWO = "power_of_two"
    CONSISTENT_HASH = "consistent_hash"


class ScorerWeights(_Spec):
    """Weights of the cache-aware scorers (each scorer returns [0, 1]; 0 turns one off)."""

    prefix: float = Field(2.0, ge=0, description="Leading prompt blocks the replica holds / prompt blocks.")
    load: float = Field(1.0, ge=0, description="1 - (running + waiting) / the busiest candidate's.")
    kv: float = Field(0.5, ge=0, description="1 - KV cache usage.")
    session: float = Field(1.0, ge=0, description="1 on the replica the x-session-id last used.")


class ImbalanceGate(_Spec):
    """Per candidate: load > ratio x mean load + slack takes away its prefix and session scores."""

    ratio: float = Field(1.25, ge=1.0, description="Multiple of the candidates' mean load.")
    slack: float = Field(3.0, ge=0, description="Requests of headroom above ratio x mean.")


class RouterSpec(_Spec):
    """How requests pick replicas (a profile: filters -> weighted scorers -> picker)."""

    policy: RouterPolicy = Field(RouterPolicy.CACHE_AWARE, description="cache_aware, or a baseline.")
    weights: ScorerWeights = Field(default_factory=ScorerWeights, description="Scorer weights.")
    gate: ImbalanceGate = Field(default_factory=ImbalanceGate, description="The imbalance gate.")
    block_budget: int = Field(
        200_000, ge=1, description="Blocks the router remembers per replica (LRU; bounds its memory)."
    )
    stale_after_s: float = Field(
        5.0, gt=0, description="Replica stats older than this are replaced by the router's own counts."
    )
    stats_period_s: float = Field(1.0, gt=0, description="How often replicas report load to the router.")
    sessions: int = Field(100_000, ge=1, description="Sessions remembered for affinity (LRU).")
    kv_events: bool = Field(
        True,
        description="cache_aware with vLLM: engines publish KV events (BlockStored/BlockRemoved) "
        "that keep the router's block index exact, besides its own routing decisions.",
    )
    tenant_salt: bool = Field(
        True,
        description="Salt block hashes (router and engine cache) per tenant so tenants never share "
        "cache entries (prefix-cache timing leaks across tenants otherwise). The salt is keyed by the "
        "TANDEM_SALT_SECRET environment variable of the ingress (router.hashing.tenant_salt; set it, "
        "the same on every Ray pod, or salts are a public function of tenant names). engine: sglang "
        "needs an SGLang whose Engine.async_generate takes cache_salt (or extra_key): on one that "
        "does not, replicas refuse to start (checked at start, not here, since the spec is checked "
        "where SGLang may not be installed).",
    )


class ReasoningSpec(_Spec):
    """How a reasoning model marks its thinking (Qwen3 / DeepSeek-R1 style tags).

    Both tags must be single tokens of the model's vocabulary: budgets are counted in tokens and
    the closing tag is forced as a token when the budget runs out.
    """

    start_tag: str = Field("<think>", min_length=1, description="Token that opens the reasoning block.")
    end_tag: str = Field("</think>", min_length=1, description="Token that closes the reasoning block.")
    default_max_tokens: int | None = Field(
        None, ge=1, description="Reasoning budget of a request that sets none (None: no budget)."
    )


class PoolCapacitySpec(_Spec):
    """What one replica of a pool processes while meeting the SLO (from `python -m loadtests search`,
    or the simulator's profile: `python -m loadtests plan` prints it)."""

    input_tokens_per_s: float | None = Field(
        None, gt=0, description="Prompt tokens computed per second (cache hits excluded)."
    )
    output_tokens_per_s: float | None = Field(None, gt=0, description="Output tokens per second.")


class AutoscalingSpec(_Spec):
    """The SLO autoscaler of one model (autoscaler/policy.py): applies to its pools with min < max.

    Every default here comes with its reason; `policy_config()` hands them to the pure policy.
    """

    ttft_slo_s: float | None = Field(
        None,
        gt=0,
        description="TTFT objective (p90) the prefill (or colocated) pool is sized for. None: the "
        "tightest `ttft_slo_s` of the tiers this model serves (the objective admission enforces).",
    )
    tpot_slo_s: float = Field(
        0.05,
        gt=0,
        description="TPOT objective (p90) the decode (or colocated) pool is sized for. 50 ms = 20 "
        "tokens/s, faster than people read, the interactive target DistServe and Dynamo use.",
    )
    target_utilization: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Fraction of a replica's capacity demand sizing fills: the headroom absorbs the "
        "arrivals of the cold start (a Poisson burst at 75 % load keeps p90 queueing under one service "
        "time).",
    )
    kv_target: float = Field(
        0.8,
        gt=0,
        le=1,
        description="KV-cache use per replica to size decode for (room for the "
        "outputs of running requests to grow before vLLM preempts).",
    )
    kv_high: float = Field(
        0.95,
        gt=0,
        le=1,
        description="A replica's KV use past this scales up at once (vLLM preempts near 100 %).",
    )
    queue_wait_fraction: float = Field(
        0.25,
        ge=0,
        description="Requests queued at the ingress longer than this fraction of the TTFT "
        "objective scale the serving pool up (queue wait is TTFT the engine never sees).",
    )
    scale_down_latency_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Scale down only while p90 TTFT and TPOT are under this fraction "
        "of their objectives (the gap between the up and down thresholds is the hysteresis).",
    )
    scale_down_margin: float = Field(
        0.7,
        gt=0,
        le=1,
        description="The N/(N-1) check: the replicas left after a scale-down must run within this "
        "fraction of target_utilization and kv_target (0.7: 52 % busy at the 75 % target), checked at "
        "every decision of the stabilization window. The band up to the scale-up point absorbs the noise "
        "of a 30 s window of long prompts and the cache misses a removed replica's prefixes cost the "
        "others (0.8 still reversed scale-downs in the simulated diurnal day: benchmarks/autoscale.py).",
    )
    slo_memory_s: float = Field(
        1800.0,
        ge=0,
        description="After a latency objective is missed and a replica added for it, no scale-down for "
        "this long may bring the load per replica back to where it was missed (the capacity the "
        "profile or `capacity` gives is not what a replica carries at the SLO under this traffic); "
        "forgotten after it, as the traffic mix changes over tens of minutes.",
    )
    max_step_up: float = Field(
        1.0,
        gt=0,
        description="Most replicas added at once, as a fraction of the pool (1: double; at "
        "least one): a burst is met in log2 steps, a noisy signal cannot start the whole fleet.",
    )
    downscale_stabilization_s: float = Field(
        60.0,
        ge=0,
        description="Every recommendation for this long must be below the pool's size "
        "before a replica is removed (Kubernetes HPA's scale-down window; sessions come back in bursts).",
    )
    downscale_cooldown_s: float = Field(
        120.0,
        ge=0,
        description="No scale-down within this long of the pool's last change in either "
        "direction: a replica just added is not removed before it had a chance to help, nor two at once.",
    )
    cold_start_s: float = Field(
        120.0,
        ge=0,
        description="How long a new replica takes to serve (an 8B engine loads in ~1 min, a "
        "70B TP8 in 2-5): replicas starting count as capacity for this long, and the forecast looks "
        "this far ahead.",
    )
    warmup_s: float = Field(
        10.0,
        ge=0,
        description="A replica's samples count only after it has served this long (its "
        "first seconds have an empty cache and no latency history).",
    )
    stale_after_s: float = Field(
        30.0,
        gt=0,
        description="Samples older than this are ignored (a replica that stopped reporting "
        "is not a load figure): three of Ray Serve's 10 s metrics intervals.",
    )
    idle_to_zero_s: float = Field(
        300.0,
        ge=0,
        description="A pool with min 0 goes to zero after this long with no arrivals and "
        "nothing in flight (longer than a cold start, so that idle gaps shorter than it cost no start-up).",
    )
    min_prefill_decode_ratio: float = Field(
        0.125,
        gt=0,
        description="Lowest prefill:decode replica ratio kept while both pools move (1:8; "
        "a decode pool with no prefill to feed it idles).",
    )
    max_prefill_decode_ratio: float = Field(
        8.0, gt=0, description="Highest prefill:decode replica ratio kept (8:1)."
    )
    forecast: bool = Field(
        False,
        description="Scale up for the arrival rate predicted cold_start_s ahead (Holt's linear "
        "trend); off by default: a trend fitted to noise adds replicas that a steady load does not need.",
    )
    forecast_alpha: float = Field(0.5, gt=0, le=1, description="Holt's level smoothing.")
    forecast_beta: float = Field(0.3, gt=0, le=1, description="Holt's trend smoothing.")
    window_s: float = Field(
        30.0,
        gt=0,
        description="How far back a replica's rates and latency percentiles look (long "
        "enough for a p90 of a few requests per second, short enough to follow a burst).",
    )
    drain_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A replica being removed stops taking requests and finishes those in "
        "flight for up to this long (Serve's graceful shutdown): the longest stream, e.g. 8k tokens at "
        "50 ms, "
        "ends before it goes.",
    )
    metrics_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often each replica publishes its autoscaling stats (Ray Serve's "
        "default 10 s leaves a burst unseen for that long).",
    )
    capacity: dict[str, PoolCapacitySpec] = Field(
        default_factory=dict,
        description="Per pool name: what one replica processes at the SLO. A pool not listed is sized by "
        "requests in flight against its max_ongoing_requests.",
    )

    @model_validator(mode="after")
    def _ratio_ordered(self) -> AutoscalingSpec:
        if self.min_prefill_decode_ratio > self.max_prefill_decode_ratio:
            raise ValueError("min_prefill_decode_ratio is greater than max_prefill_decode_ratio; swap them")
        if self.kv_target > self.kv_high:
            raise ValueError(f"kv_target ({self.kv_target}) is above kv_high ({self.kv_high}); lower it")
        return self

    def policy_config(self, ttft_slo_s: float) -> Any:
        """The pure policy's settings (autoscaler.policy.PolicyConfig), `ttft_slo_s` resolved."""
        from autoscaler.policy import PolicyConfig, PoolCapacity

        serve_only = {"ttft_slo_s", "capacity", "metrics_interval_s", "window_s", "drain_timeout_s"}
        fields = self.model_dump(exclude=serve_only)
        caps = {
            k: PoolCapacity(v.input_tokens_per_s, v.output_tokens_per_s) for k, v in self.capacity.items()
        }
        return PolicyConfig(ttft_slo_s=self.ttft_slo_s or ttft_slo_s, capacity=caps, **fields)


class ModelSpec(_Spec):
    """A served model: its name in the API, where its weights are, and its pools."""

    name: str = Field(pattern=_NAME_RE, description="Model name clients put in `model`.")
    source: str = Field(
        description="Weights: 'local:<tiny model>' (built by `tandem model build`), a path, or a "
        "hub id available to the cluster.",
        min_length=1,
    )
    pools: list[PoolSpec] = Field(
        min_length=1,
        max_length=2,
        description="Engine pools serving this model: one colocated pool, or one prefill and one "
        "decode pool.",
    )
    disaggregation: Disaggregation = Field(
        default_factory=Disaggregation, description="Prefill/decode settings (P/D pools only)."
    )
    router: RouterSpec = Field(default_factory=RouterSpec, description="Replica choice (cache-aware).")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="SLO autoscaler of the pools with replicas.min < replicas.max.",
    )
    reasoning: ReasoningSpec | None = Field(
        None,
        description="The model thinks in a tagged block (`<think>…</think>`): reasoning budgets, "
        "hidden reasoning and split token accounting apply. None: a plain model.",
    )

    @model_validator(mode="after")
    def _pools_consistent(self) -> ModelSpec:
        names = [p.pool_name for p in self.pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pools: duplicate pool names {sorted(dup)}; give each pool a unique name")
        roles = sorted(p.role.value for p in self.pools)
        if roles not in (["colocated"], ["decode", "prefill"]):
            raise ValueError(
                f"pools: roles {roles} are not a valid layout; use one pool with role: colocated, or "
                "one pool with role: prefill and one with role: decode"
            )
        unknown = sorted(set(self.autoscaling.capacity) - set(names))
        if unknown:
            raise ValueError(f"autoscaling.capacity: unknown pools {unknown}; choose from {names}")
        engines = {p.engine for p in self.pools}
        if len(engines) > 1:
            raise ValueError(f"pools: prefill and decode must run the same engine, got {sorted(engines)}")
        for p in self.pools:
            up = p.upstream
            if up is not None and self.router.tenant_salt and not PROFILES[up.server].cache_salt:
                raise ValueError(
                    f"router.tenant_salt: server {up.server.value} cannot salt its prefix cache per tenant, "
                    "so tenants would share cache entries (a timing side channel); set router.tenant_salt: "
                    "false for this model to accept that, or serve it with vLLM"
                )
        return self

    @property
    def external(self) -> UpstreamSpec | None:
        """The external server of an `engine: openai` model (None: Tandem runs its engines)."""
        return self.serving_pool.upstream

    @property
    def disaggregated(self) -> bool:
        """Whether this model has separate prefill and decode pools."""
        return any(p.role is Role.PREFILL for p in self.pools)

    def pool(self, role: Role) -> PoolSpec:
        """The pool with `role` (KeyError if absent)."""
        for p in self.pools:
            if p.role is role:
                return p
        raise KeyError(role.value)

    @property
    def serving_pool(self) -> PoolSpec:
        """The pool the ingress sends requests to: decode (which orchestrates prefill) or colocated."""
        return self.pool(Role.DECODE) if self.disaggregated else self.pool(Role.COLOCATED)

    def deployment_name(self, pool: PoolSpec) -> str:
        """Name of the Ray Serve deployment of `pool`."""
        return f"{self.name}-{pool.pool_name}"

    def local_model_name(self) -> str | None:
        """Name of the local tiny model if `source` is 'local:<name>'."""
        if self.source.startswith(LOCAL_SOURCE_PREFIX):
            return self.source[len(LOCAL_SOURCE_PREFIX) :]
        return None


class TierRuleMatch(_Spec):
    """Conditions on a request's shape; every condition given must hold (an empty match always holds)."""

    reasoning_effort: list[str] | None = Field(
        None, description="The request's reasoning_effort is one of these (low, medium, high, ...)."
    )
    tools: bool | None = Field(None, description="The request declares tools (true) or not (false).")
    min_prompt_tokens: int | None = Field(None, ge=0, description="Prompt has at least this many tokens.")
    max_prompt_tokens: int | None = Field(None, ge=0, description="Prompt has at most this many tokens.")
    min_max_tokens: int | None = Field(
        None, ge=0, description="The request asks for at least this many output tokens (max_tokens)."
    )

    def policy(self) -> RuleMatch:
        """The router's form (router.tiers)."""
        effort = tuple(self.reasoning_effort) if self.reasoning_effort is not None else None
        return RuleMatch(
            effort, self.tools, self.min_prompt_tokens, self.max_prompt_tokens, self.min_max_tokens
        )


class TierRule(_Spec):
    """Send requests whose shape matches `when` to `tier` (rules are tried in order; first match wins)."""

    tier: str = Field(description="Tier for matching requests.")
    when: TierRuleMatch = Field(default_factory=TierRuleMatch, description="Conditions.")
    task: str | None = Field(
        None, description="Task type (routing.tasks) of matching requests: picks their prompt template."
    )

    def policy(self) -> Rule:
        """The router's form (router.tiers)."""
        return Rule(self.tier, self.when.policy(), self.task)


class TaskSpec(_Spec):
    """A task type: a named kind of call (math, code, classify, ...) that `x-tandem-task` may name
    instead of a tier. It is served by `tier` and picks its own prompt template (`templates`)."""

    name: str = Field(pattern=_NAME_RE, description="Task type name, e.g. math.")
    tier: str = Field(description="Tier that serves it.")
    description: str = Field("", description="What calls are of this type.")

    def policy(self) -> Task:
        """The router's form (router.tiers)."""
        return Task(self.name, self.tier)


class TierSpec(_Spec):
    """A task tier: a kind of call (intent classification, reasoning) served by one model."""

    name: str = Field(pattern=_NAME_RE, description="Tier name, e.g. intent or reasoning.")
    model: str = Field(description="Name of the model (under `models`) that serves this tier.")
    description: str = Field("", description="What calls belong to this tier.")
    fallback: list[str] = Field(
        default_factory=list,
        description="Degradation chain: tiers tried in order when this tier's model is unhealthy "
        "(skipped when the prompt and max_tokens do not fit their context window).",
    )
    ttft_slo_s: float = Field(
        2.0,
        gt=0,
        description="Time-to-first-token objective: a request whose predicted queue wait already "
        "exceeds it is rejected at once (429) instead of queueing.",
    )
    first_token_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Overrides resilience.first_token_timeout_s for this tier's model.",
    )

    def policy(self) -> Tier:
        """The router's form (router.tiers)."""
        return Tier(self.name, self.model, tuple(self.fallback), self.ttft_slo_s, self.first_token_timeout_s)


class RoutingSpec(_Spec):
    """How a request picks its tier: model name, `auto` + x-tandem-task header, or rules."""

    auto_model: str = Field("auto", pattern=_NAME_RE, description="Model alias that means 'pick a tier'.")
    default_tier: str | None = Field(
        None, description="Tier of an `auto` request that no header or rule places (the first tier if unset)."
    )
    rules: list[TierRule] = Field(
        default_factory=list, description="Shape rules for `auto` requests without an x-tandem-task header."
    )
    tasks: list[TaskSpec] = Field(
        default_factory=list,
        description="Task types x-tandem-task may name besides tiers (each served by a tier, each with "
        "its own prompt template).",
    )

    def policy(self) -> Routing:
        """The router's form (router.tiers)."""
        return Routing(
            self.auto_model,
            self.default_tier,
            tuple(r.policy() for r in self.rules),
            tuple(t.policy() for t in self.tasks),
        )


class InjectMode(StrEnum):
    """When a prompt template's messages are put before the request's (router.templates.Inject)."""

    IF_MISSING = "if_missing"
    ALWAYS = "always"
    NEVER = "never"


class TemplateTurn(_Spec):
    """One few-shot message of a template."""

    role: Literal["user", "assistant"] = Field(description="user or assistant.")
    content: str = Field(min_length=1, description="The message's text.")


class TemplateSampling(_Spec):
    """Sampling defaults of a template: used for the fields a request does not set itself."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1, description="Output limit of a request that sets none.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)


class PromptTemplateSpec(_Spec):
    """A versioned prompt template: the system prompt (and few-shot turns) a small specialised model
    needs to answer in the role it was trained for, with its stop sequences and sampling defaults."""

    name: str = Field(pattern=_NAME_RE, description="Template name, e.g. math.")
    version: int = Field(
        1, ge=1, description="Version; a binding names `name` (the highest) or `name@version`."
    )
    description: str = Field("", description="What the template is for.")
    language: str = Field("en", min_length=2, description="Language of the prompt (BCP 47), for operators.")
    system: str = Field("", description="System prompt put first (a shared, cached prefix).")
    few_shot: list[TemplateTurn] = Field(
        default_factory=list, description="Example turns after the system prompt: user/assistant pairs."
    )
    stop: list[str] = Field(
        default_factory=list, max_length=8, description="Stop sequences added to the request's."
    )
    sampling: TemplateSampling = Field(default_factory=TemplateSampling, description="Sampling defaults.")
    inject: InjectMode = Field(
        InjectMode.IF_MISSING,
        description="if_missing: only when the request has no system/developer message of its own; "
        "always: the template's system prompt goes first and the request's own follows it in the same "
        "system message; never: the template is not used (e.g. a tenant override that turns it off).",
    )

    @model_validator(mode="after")
    def _shape(self) -> PromptTemplateSpec:
        if not self.system and not self.few_shot and self.inject is not InjectMode.NEVER:
            raise ValueError("a template needs a system prompt or few-shot turns (or inject: never)")
        roles = [t.role for t in self.few_shot]
        if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
            raise ValueError("few_shot: user/assistant pairs, starting with user")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop sequences must be non-empty")
        return self

    @property
    def ref(self) -> str:
        """`name@version`."""
        return f"{self.name}@{self.version}"


class TemplateBinding(_Spec):
    """Which template serves which requests. A binding matches a request when every field it gives
    matches; the most specific match wins (tenant > task > tier; ties: the first listed)."""

    template: str = Field(
        description="`name` (its highest version), `name@version` (pinned), or `none` (no template).",
        pattern=r"^(none|[a-z0-9][a-z0-9._-]{0,62}(@[1-9][0-9]*)?)$",
    )
    tier: str | None = Field(None, description="Requests served by this tier.")
    task: str | None = Field(None, description="Requests of this task type (routing.tasks, x-tandem-task).")
    tenant: str | None = Field(None, description="Requests of this tenant (a per-tenant override).")

    @model_validator(mode="after")
    def _scoped(self) -> TemplateBinding:
        if self.tier is None and self.task is None and self.tenant is None:
            raise ValueError("a binding needs at least one of tier, task or tenant")
        return self


class TemplateLibrarySpec(_Spec):
    """A prompt template library: templates and their bindings (inline, or a mounted ConfigMap's file)."""

    templates: list[PromptTemplateSpec] = Field(default_factory=list, description="The templates.")
    bindings: list[TemplateBinding] = Field(default_factory=list, description="Which requests use which.")

    @model_validator(mode="after")
    def _references(self) -> TemplateLibrarySpec:
        refs = [t.ref for t in self.templates]
        dup = sorted({r for r in refs if refs.count(r) > 1})
        if dup:
            raise ValueError(f"templates: {dup} defined twice; give each version once")
        names = {t.name for t in self.templates}
        for i, b in enumerate(self.bindings):
            if b.template == "none":
                continue
            name = b.template.split("@", 1)[0]
            if b.template not in refs and ("@" in b.template or name not in names):
                raise ValueError(
                    f"bindings[{i}].template: {b.template!r} is not in the library; choose from "
                    f"{sorted(refs)}"
                )
        return self

    def check_scopes(self, tiers: list[str], tasks: list[str]) -> None:
        """ValueError naming the binding when one names a tier or task type the spec does not have."""
        for i, b in enumerate(self.bindings):
            if b.tier is not None and b.tier not in tiers:
                raise ValueError(f"bindings[{i}].tier: unknown tier {b.tier!r}; choose from {tiers}")
            if b.task is not None and b.task not in tasks:
                raise ValueError(f"bindings[{i}].task: unknown task type {b.task!r}; choose from {tasks}")


class TemplatesSpec(_Spec):
    """Prompt templates per task type, tier and tenant (router.templates; serving.http.templates)."""

    library: TemplateLibrarySpec = Field(
        default_factory=TemplateLibrarySpec, description="The library given inline."
    )
    library_file: str | None = Field(
        None,
        description="YAML file holding a library ({templates, bindings}), e.g. a mounted ConfigMap. It "
        "replaces `library` and is re-read every reload_interval_s: a valid change applies without a "
        "restart; an invalid one keeps the library in use and is logged and counted with the reason.",
    )
    reload_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often library_file is checked for a change (kubelet updates a "
        "mounted ConfigMap within about a minute).",
    )


class TruncationSpec(_Spec):
    """Context overflow: `truncation: "auto"` on /v1/responses, x-tandem-truncation: auto on chat."""

    min_output_tokens: int = Field(
        256,
        ge=1,
        description="Truncation drops turns until at least this many output tokens fit, when the request "
        "sets no max_tokens or lets it be clamped (x-tandem-max-tokens: clamp); else it makes room for "
        "the max_tokens asked.",
    )


#: What an API key may do: `inference` (the /v1/* API), `metrics` (GET /metrics, which names every
#: tenant with its bucket level; give it to the scraper, not to tenants) and `debug` (an operator's
#: key: the detailed x-tandem-route, which names deployments, replica ids and router scores, and the
#: x-tandem-disagg override, which forces a remote prefill).
KeyScope = Literal["inference", "metrics", "debug"]


class ApiKey(_Spec):
    """An API key, stored as the SHA-256 of the key (`tandem key new` prints both)."""

    tenant: str = Field(pattern=_NAME_RE, description="Tenant the key authenticates as.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key.")
    scopes: list[KeyScope] = Field(
        default_factory=lambda: ["inference"],
        min_length=1,
        description="What the key may call: inference (/v1/*), metrics (GET /metrics, which lists every "
        "tenant; a Prometheus scraper's key) and debug (with inference: the x-tandem-route header's "
        "replicas and scores, and the x-tandem-disagg header; an operator's key). A metrics-only key "
        "cannot call /v1/*.",
    )
    models: list[str] | None = Field(
        None,
        min_length=1,
        description="The models and tiers this key may call (names from `models` and `tiers`); a request "
        "whose model or tier is not listed is a 403, and /v1/models lists only these. Absent: every one. "
        "A tier's degradation chain is the operator's: a listed tier may still be served by its fallbacks.",
    )


class AuthSpec(_Spec):
    """API key authentication (`Authorization: Bearer <key>`)."""

    enabled: bool = Field(True, description="Require an API key. Disabling it must be explicit.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys given inline (hashed).")
    keys_file: str | None = Field(
        None,
        description="YAML/JSON file with more keys, a list of {tenant, sha256, scopes} (a mounted "
        "Kubernetes Secret); re-read when it changes, so a key removed from it stops working without a "
        "restart. A change that does not parse keeps the previous keys (and is logged).",
    )
    keys_reload_s: float = Field(
        1.0,
        gt=0,
        description="How often the keys file is checked for a change (a stat; it is re-read only when "
        "changed), at most: the check runs on a request. A revoked key stops working within this time.",
    )
    allow_remote_unauthenticated: bool = Field(
        False,
        description="With auth disabled, allow binding the API to a non-loopback address. Anyone who "
        "can reach the port can then use any tenant.",
    )


class HttpSpec(_Spec):
    """Limits of the HTTP edge (serving.http.api), applied before a request is authenticated or parsed
    (the prompt's size: before it is tokenized)."""

    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest request body (bytes); past it the answer is 413 `body_too_large`, checked on "
        "Content-Length before anything is read and by counting a chunked body. 8 MiB holds a 1M-token "
        "prompt as text or a 500k-token prompt as token ids; without a bound a client can make the "
        "ingress hold, parse and tokenize hundreds of MB.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Most time a client may take to send its whole request body; past it the answer is "
        "408 `body_timeout`. A client that trickles its body would otherwise hold a connection and an "
        "ingress slot forever; 30 s sends 8 MiB at ~2 Mbit/s.",
    )
    max_prompt_chars_per_token: int = Field(
        8,
        ge=1,
        description="A prompt longer than the model's context times this many characters (all its "
        "messages' contents, a response's instructions and input, a text completion's string) is a 400 "
        "`context_length_exceeded` before it is tokenized, as is a token-id prompt longer than the "
        "context. Here with max_body_bytes, not under admission: both bound what one request costs the "
        "ingress before it is charged anything (a huge prompt tokenizes for seconds in the thread pool "
        "every request shares, only to be rejected). Text averages 3-5 characters a token; raise this "
        "for prompts of long runs of one character (deeply indented code).",
    )
    max_truncated_contexts: int = Field(
        4,
        ge=1,
        description="A conversation that asks for truncation (its oldest turns dropped to fit) may be "
        "this many contexts long, in characters at max_prompt_chars_per_token, before it is tokenized: "
        "truncation must tokenize the turns it drops, so this bounds that work as the cap above bounds "
        "a prompt's.",
    )
    docs: bool = Field(
        False,
        description="Serve /docs, /redoc and /openapi.json (with auth on they need a valid key). Off by "
        "default: the schema tells anyone who can reach the port every route and field.",
    )


class Priority(StrEnum):
    """Priority classes: a higher class is served first from a pool's wait queue."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """0 is served first."""
        return list(Priority).index(self)


class TenantLimits(_Spec):
    """Admission limits of one tenant (cluster-wide figures; each ingress replica enforces its share)."""

    tokens_per_s: float = Field(
        20_000.0, gt=0, description="Token bucket refill rate (prompt + max_tokens per second)."
    )
    burst_tokens: int = Field(
        100_000, ge=1, description="Token bucket size: the most a tenant can spend at once."
    )
    fanout_width: int = Field(
        8, ge=1, description="Calls of one agent task (x-tandem-task-id) in flight at once."
    )
    priority: Priority = Field(
        Priority.STANDARD,
        description="Default priority class; a request may lower its own (x-tandem-priority) but "
        "not raise it.",
    )
    max_in_flight: int | None = Field(
        512,
        ge=1,
        description="Requests of the tenant admitted at once (holding a pool slot, waiting for one, or "
        "streaming); beyond it: 429 `tenant_concurrency`. The token bucket bounds tokens, not requests: "
        "without this, cheap requests (max_tokens 1) of one tenant hold every slot. 512 is half of what "
        "one ingress replica accepts (server.ingress_max_ongoing_requests 1024), so other tenants always "
        "find room, and still more than a default pool's slots (64 per replica) plus its wait queue "
        "(admission.max_queue 256), so a lone tenant is not slowed. null: no cap.",
    )

    def limits(self, share: float) -> Limits:
        """These limits as one ingress replica enforces them (its `share` of the cluster figures)."""
        return Limits(
            self.tokens_per_s * share,
            max(1.0, self.burst_tokens * share),
            self.fanout_width,
            self.priority.rank,
            None if self.max_in_flight is None else max(1, math.ceil(self.max_in_flight * share)),
        )


class TenantSpec(TenantLimits):
    """A named tenant and its limits."""

    name: str = Field(pattern=_NAME_RE, description="Tenant name (from its API key).")


class PoolLimit(_Spec):
    """Concurrency limit of one model's serving pool at the ingress."""

    model: str = Field(description="Model name.")
    max_concurrency: int = Field(ge=1, description="Requests in flight to the model at once.")


class AdmissionSpec(_Spec):
    """Admission control in front of the pools: 429 + Retry-After, never a hang."""

    enabled: bool = Field(True, description="Apply the limits below (auth is separate).")
    default_tenant: TenantLimits = Field(
        default_factory=TenantLimits, description="Limits of tenants not listed under `tenants`."
    )
    tenants: list[TenantSpec] = Field(default_factory=list, description="Per-tenant limits.")
    pool_limits: list[PoolLimit] = Field(
        default_factory=list,
        description="Per-model concurrency limits; a model not listed gets replicas.max x "
        "max_ongoing_requests of its serving pool.",
    )
    max_queue: int = Field(
        256, ge=0, description="Requests that may wait for a pool slot (per model); beyond it: 429."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="Most time a request waits for a fan-out or pool slot before a 429."
    )
    default_reserved_tokens: int = Field(
        1024,
        ge=1,
        description="Output tokens reserved in the bucket for a request without max_tokens "
        "(reconciled with the real count when it finishes).",
    )


class StreamResilienceSpec(_Spec):
    """What the ingress does when a stream breaks after its first token (serving.http.migration)."""

    stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Most time between two chunks of a stream once it started. An engine that is alive "
        "but stuck (a wedged scheduler, a hung collective) sends nothing; past this the stream is "
        "migrated or ends with a 504 `engine_stalled`, and its pool slot and ticket are freed. Well above "
        "a loaded engine's worst inter-token gap (seconds on CPU), well below a client's patience.",
    )
    migration_limit: int = Field(
        3,
        ge=0,
        description="Times one chat or text completion may be continued on another replica (or the "
        "next target of its chain with the same vocabulary) after its stream broke: prompt + the tokens "
        "already sent, so greedy output is unchanged. Each migration also spends one retry of the "
        "retry budget. 0: never (the client gets an error chunk).",
    )


class ResilienceSpec(_Spec):
    """Retries, backoff and per-target health at the ingress."""

    retry_budget_ratio: float = Field(
        0.1, ge=0, le=1, description="Retries allowed per request sent (0.1: at most 10 %)."
    )
    retry_budget_min: float = Field(
        3.0, ge=0, description="Retries the budget starts with (so a quiet ingress can still retry)."
    )
    backoff_base_s: float = Field(0.1, gt=0, description="First retry's backoff ceiling (full jitter).")
    backoff_max_s: float = Field(5.0, gt=0, description="Largest backoff ceiling.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts on one target before moving down the chain (an engine fault, a plain 500 "
        "`engine_error`, is never retried on the same target: the same input fails the same way).",
    )
    first_token_timeout_s: float = Field(
        90.0,
        gt=0,
        description="An attempt with no first token after this long (engine queueing included) counts "
        "as a timeout: retried with backoff or sent down the degradation chain. A timeout while the "
        "target's admission pool is saturated (every slot taken or a request waiting) is overload, "
        "not a strike against its health.",
    )
    terminal_after: int = Field(
        2,
        ge=1,
        description="Distinct failed requests in a row, with no success in between, that take a "
        "target from sticky_retry to terminal for every tenant. It counts requests, not attempts: "
        "the retries of one request are one strike whatever max_attempts is, and engine faults count "
        "once per tenant, so one tenant's poison request cannot take a model down unless this is 1 "
        "(then any one failed request does: for single-tenant setups and tests only).",
    )
    probe_interval_s: float = Field(
        5.0, gt=0, description="How often a terminal target is probed for recovery."
    )
    probe_timeout_s: float = Field(5.0, gt=0, description="Time a recovery probe may take.")
    pool_status_period_s: float = Field(
        2.0,
        gt=0,
        description="How often the ingress reads the pools' replica counts from Ray Serve; a pool "
        "with no running replica is terminal at once (waiting attempts move down the chain).",
    )
    streams: StreamResilienceSpec = Field(
        default_factory=StreamResilienceSpec,
        description="Stall timeout and mid-stream migration of streams that broke after their first token.",
    )

    def retry_policy(self) -> RetryPolicy:
        """The ingress's retry policy (router.resilience)."""
        return RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_max_s)


class RetrySpec(_Spec):
    """Attempts and full-jitter exponential backoff of one retry loop (router.resilience.RetryPolicy)."""

    max_attempts: int = Field(5, ge=1, description="Attempts, the first included.")
    backoff_base_s: float = Field(0.5, ge=0, description="First retry's backoff ceiling (full jitter).")
    backoff_max_s: float = Field(
        30.0, ge=0, description="Largest backoff ceiling; a Retry-After is honoured up to this."
    )

    def policy(self) -> RetryPolicy:
        """The router.resilience form."""
        return RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_max_s)


class SessionStoreSpec(_Spec):
    """Where background sessions are kept.

    - `sqlite` (default): one file. Every ingress and session worker must see the same file, so it
      suits one node (local use, or a cluster whose ingress and workers share a node and a volume).
    - `redis`: a Redis server (one primary, AOF persistence for durability) that every node
      reaches: the store for a cluster. `url`, or `url_env` naming the variable that holds it
      (a URL with a password belongs in a Secret).
    - `custom`: `class_path` (`module:Class`, implementing serving.sessions.store.SessionStore),
      called with `options` plus ttl_s / max_sessions_per_tenant / max_bytes_per_tenant.
    """

    kind: Literal["sqlite", "redis", "custom"] = Field("sqlite", description="sqlite, redis or custom.")
    path: str = Field(
        default_factory=lambda: default_state_path("sessions.db"),
        description=f"SQLite file ($TANDEM_STATE_DIR, else {DEFAULT_STATE_DIR}).",
    )
    url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis URL (kind redis), e.g. redis://host:6379/0.",
    )
    url_env: str | None = Field(None, description="Environment variable holding the Redis URL (kind redis).")
    prefix: str = Field("tandem:", min_length=1, description="Prefix of every Redis key (kind redis).")
    class_path: str | None = Field(None, description="`module:Class` of a custom store.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a custom store (or of the Redis client)."
    )
    io_threads: int = Field(
        8,
        ge=1,
        description="Threads of an ingress replica that run its store calls. They are the store's own: "
        "a slow or unreachable store makes its calls queue here, and never takes the default thread "
        "pool that tokenizes chat requests.",
    )
    retry_after_s: int = Field(
        2,
        ge=1,
        description="Retry-After of a 503 `store_unavailable` (the store did not answer: Redis down or "
        "timed out, SQLite locked past its busy timeout). Outages are usually brief; a later call works.",
    )
    socket_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Redis: most time one command waits for its reply. redis-py 5 waits forever "
        "without one, so a black-holed server would hold a store thread for good.",
    )
    socket_connect_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Redis: most time to open a connection (a server that drops packets would "
        "otherwise hold the call for the OS's TCP timeout).",
    )
    retries: int = Field(
        1,
        ge=0,
        description="Redis: retries of a command after a connection error or timeout, with a short "
        "jittered backoff. Each one may take the timeouts above again, so a few keep a dead server "
        "from holding every call for long.",
    )
    require_aof: bool = Field(
        False,
        description="Redis: refuse to start unless the server runs with `appendonly yes`. Without AOF a "
        "Redis restart loses acknowledged sessions (a client's `resp_` id answers 404, a finished one "
        "runs again). False only logs a warning. A server that refuses CONFIG GET (managed Redis) "
        "cannot be checked and is warned about, never refused.",
    )

    @model_validator(mode="after")
    def _kind_has_its_fields(self) -> SessionStoreSpec:
        if self.kind == "custom" and not self.class_path:
            raise ValueError("class_path: required when kind is custom (`module:Class`)")
        if self.kind == "redis" and (self.url is None) == (self.url_env is None):
            raise ValueError("url: give exactly one of url or url_env when kind is redis")
        return self


class WebhookSpec(_Spec):
    """A tenant's completion webhook (Standard Webhooks: HMAC-SHA256 signed, retried)."""

    tenant: str = Field(pattern=_NAME_RE, description="Tenant whose sessions are reported.")
    url: str = Field(pattern=r"^https?://", description="Endpoint that receives the POST.")
    secret_env: str | None = Field(None, description="Environment variable holding the signing secret.")
    secret_file: str | None = Field(None, description="File holding the signing secret (a mounted Secret).")

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSpec:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env or secret_file")
        return self


class SessionsSpec(_Spec):
    """Background reasoning sessions (`/v1/responses`): workers, durability, bounds."""

    enabled: bool = Field(True, description="Serve /v1/responses with session workers.")
    workers: int = Field(1, ge=1, description="Session worker replicas (detached actors).")
    cpus_per_worker: float = Field(
        0.1, ge=0, description="CPUs reserved per worker (light: it streams tokens and writes checkpoints)."
    )
    max_active_per_worker: int = Field(32, ge=1, description="Sessions one worker generates at once.")
    max_active_per_tenant: int | None = Field(
        16,
        ge=1,
        description="Sessions of one tenant that one worker generates at once (None: no bound but "
        "max_active_per_worker). With the default half of a worker stays open to other tenants, so a "
        "tenant that queued hundreds of long sessions does not make another's wait for one of them to "
        "end; queued sessions are claimed round-robin across tenants (oldest of each tenant first).",
    )
    default_max_output_tokens: int = Field(
        8192,
        ge=1,
        description="Output tokens (reasoning included) a session that sets no max_output_tokens may "
        "generate, at most the rest of the context. A session is charged to its tenant's token bucket "
        "up front (prompt + this limit, never reconciled, since it runs on a worker after the request "
        "is answered), so the limit is what makes the charge cover what it generates. A tenant whose "
        "burst_tokens is smaller gets a 400 request_too_large and must set max_output_tokens.",
    )
    max_streams_per_tenant: int = Field(
        50,
        ge=1,
        description="Event streams (GET /v1/responses/{id}?stream=true, POST with stream) and "
        "waiting creates (neither background nor stream) one tenant holds open at once on one ingress "
        "replica; past it a 429 `too_many_streams`. A stream costs no tokens, so without a bound one "
        "key could hold every connection and store thread of the ingress.",
    )
    stream_retry_after_s: int = Field(
        5, ge=1, description="Retry-After of a 429 `too_many_streams` (a stream frees its slot when it ends)."
    )
    stream_poll_max_s: float = Field(
        1.0,
        gt=0,
        description="Longest pause between a stream reader's store reads: the pause starts at "
        "stream_poll_s and doubles while no event arrives (a queued or slow session costs a few "
        "reads a second, not twenty).",
    )
    stream_heartbeat_s: float = Field(
        15.0,
        gt=0,
        description="An SSE comment (`: keepalive`) after this long without an event, so that proxies "
        "with read timeouts keep an idle stream open.",
    )
    wait_max_s: float = Field(
        600.0,
        gt=0,
        description="Longest a create without background or stream waits for its session to end; "
        "then it answers the response as it stands (in_progress), which the client polls by id.",
    )
    store: SessionStoreSpec = Field(default_factory=SessionStoreSpec, description="The durable log.")
    checkpoint_tokens: int = Field(16, ge=1, description="Checkpoint after this many new tokens...")
    checkpoint_interval_s: float = Field(0.25, gt=0, description="...or after this long, if sooner.")
    lease_s: float = Field(
        10.0, gt=0, description="A worker's hold on a session; another worker takes over after it lapses."
    )
    sweep_interval_s: float = Field(1.0, gt=0, description="How often a worker looks for orphaned sessions.")
    cancel_poll_s: float = Field(0.2, gt=0, description="How often a worker checks for cancel requests.")
    stream_poll_s: float = Field(0.05, gt=0, description="How often a stream reader checks for new events.")
    max_attempts: int = Field(
        5, ge=1, description="Engine attempts in a row without progress before a session fails."
    )
    backoff_base_s: float = Field(
        0.5, ge=0, description="First engine retry's backoff ceiling (full jitter; it doubles per retry)."
    )
    backoff_max_s: float = Field(10.0, ge=0, description="Largest engine retry backoff ceiling.")
    ttl_s: float = Field(7 * 86400.0, gt=0, description="How long a session is kept after it was created.")
    max_sessions_per_tenant: int = Field(1000, ge=1, description="Stored sessions per tenant.")
    max_bytes_per_tenant: int = Field(256 * 2**20, ge=1, description="Stored bytes per tenant.")
    webhooks: list[WebhookSpec] = Field(default_factory=list, description="Completion webhooks by tenant.")
    webhook_retry: RetrySpec = Field(
        default_factory=RetrySpec,
        description="Delivery attempts of a completion webhook (429 and 5xx and transport errors are "
        "retried; a numeric Retry-After of a 429/503 is honoured up to backoff_max_s).",
    )
    webhook_poll_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often a session worker looks in the store's outbox for completion webhooks "
        "still to deliver (its own on start, and ones a worker that died, or an ingress cancel whose "
        "report was lost, left behind) and delivers them. Delivery is at least once: a receiver "
        "deduplicates by webhook-id.",
    )
    webhook_lease_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="A worker's hold on an outbox entry it delivers, renewed every third of it while "
        "the delivery runs; after it lapses (the worker died) another worker delivers the entry.",
    )
    webhook_grace_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Age of an unclaimed outbox entry before a worker's poll takes it: the worker that "
        "ended the session delivers at once, the poll is for the ones it could not.",
    )
    webhook_max_claims: int = Field(
        10,
        ge=1,
        le=1000,
        description="Claims of one outbox entry before it is given up on (removed, counted as failed, "
        "logged): each claim past the first means the worker delivering it died (or lost its lease) "
        "before an answer, so an entry that keeps killing its deliverers is not retried forever.",
    )

    @model_validator(mode="after")
    def _stream_poll_bounds(self) -> SessionsSpec:
        if self.stream_poll_max_s < self.stream_poll_s:
            raise ValueError(
                f"stream_poll_max_s ({self.stream_poll_max_s:g}) is below stream_poll_s "
                f"({self.stream_poll_s:g}); raise stream_poll_max_s or lower stream_poll_s"
            )
        return self

    def retry_policy(self) -> RetryPolicy:
        """A session worker's retry policy for engine legs (attempts count legs without progress)."""
        return RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_max_s)


class DataPlane(StrEnum):
    """Ray Serve's HTTP ingress and inter-replica transport (see ServerSpec.data_plane)."""

    HAPROXY = "haproxy"
    PROXY = "proxy"


#: Ray's environment variables for each data plane; they must be set before Ray starts.
#: The header Ray Serve's own session affinity reads, moved off `x-session-id`: that header is
#: Tandem's (the cache-aware router's session, checked by the app: a bad value is a 400 naming it),
#: and Serve's direct ingress decodes it as UTF-8 before the app runs, answering a 500 for a value
#: that is not (tests/faults/test_hostile.py). Tandem routes sessions itself; Serve never needs it.
SERVE_SESSION_HEADER_ENV = {"RAY_SERVE_SESSION_ID_HEADER_KEY": "x-ray-serve-session-id"}

DATA_PLANE_ENV: dict[DataPlane, dict[str, str]] = {
    DataPlane.HAPROXY: {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        **SERVE_SESSION_HEADER_ENV,
    },
    DataPlane.PROXY: {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        **SERVE_SESSION_HEADER_ENV,
    },
}


class ServerSpec(_Spec):
    """Where the API listens, and how `tandem up` runs Ray locally."""

    host: str = Field("127.0.0.1", description="HTTP bind address of the OpenAI API.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI API.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    ingress_max_ongoing_requests: int = Field(
        1024, ge=1, description="Concurrent requests one ingress replica accepts."
    )
    ray_address: str | None = Field(
        None, description="Existing Ray cluster to join; None starts a local one (`tandem up`)."
    )
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard port (local Ray).")
    data_plane: DataPlane = Field(
        DataPlane.HAPROXY,
        description="How HTTP reaches the ingress and chunks cross replicas: haproxy (Ray Serve's "
        "HAProxy ingress straight to the ingress replica, and gRPC between replicas: "
        "RAY_SERVE_ENABLE_HA_PROXY + RAY_SERVE_THROUGHPUT_OPTIMIZED; measured in benchmarks/overhead.py "
        "at about half the CPU per token of the default) or proxy (Ray Serve's Python HTTP proxy "
        "actor and Ray actor calls). Set on the Ray cluster's processes: `tandem up` and the Helm chart "
        "do; a cluster you start yourself needs the variables of `ray_env()`.",
    )

    worker_niceness: int = Field(
        0,
        ge=-20,
        le=19,
        description="Scheduling niceness of Ray's worker processes, where the replicas and their "
        "engines run (RAY_worker_niceness). Ray's own default, 15, suits batch tasks; a serving "
        "replica at 15 loses the CPU to anything else on the node (measured on 2 cores: the load "
        "generator starved the engine, 661 vs 1,078 output tok/s at c=16).",
    )

    def ray_env(self) -> dict[str, str]:
        """Environment of every Ray process (head and workers): the data plane and the niceness."""
        return {**DATA_PLANE_ENV[self.data_plane], "RAY_worker_niceness": str(self.worker_niceness)}


class ServingSpec(_Spec):
    """A whole Tandem deployment."""

    server: ServerSpec = Field(default_factory=ServerSpec, description="API server and local Ray.")
    model_dir: str = Field(
        default_factory=lambda: default_model_dir(),
        description=f"Directory of locally built models ($TANDEM_MODEL_DIR, else {DEFAULT_MODEL_DIR}).",
    )
    models: list[ModelSpec] = Field(min_length=1, description="Served models.")
    tiers: list[TierSpec] = Field(default_factory=list, description="Task tiers -> model.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="How requests pick a tier.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys -> tenants.")
    http: HttpSpec = Field(
        default_factory=HttpSpec, description="Request body size and time limits, the API docs pages."
    )
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec, description="Admission control.")
    resilience: ResilienceSpec = Field(default_factory=ResilienceSpec, description="Retries and health.")
    sessions: SessionsSpec = Field(default_factory=SessionsSpec, description="Background sessions.")
    templates: TemplatesSpec = Field(
        default_factory=TemplatesSpec, description="Prompt templates per task type, tier and tenant."
    )
    truncation: TruncationSpec = Field(default_factory=TruncationSpec, description="Context overflow.")

    @model_validator(mode="after")
    def _references(self) -> ServingSpec:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"models: duplicate model names {sorted(dup)}")
        for i, tier in enumerate(self.tiers):
            if tier.model not in names:
                raise ValueError(f"tiers[{i}].model: unknown model {tier.model!r}; choose one of {names}")
        tier_names = [t.name for t in self.tiers]
        if len(set(tier_names)) != len(tier_names):
            raise ValueError("tiers: duplicate tier names")
        for i, tier in enumerate(self.tiers):
            for j, fb in enumerate(tier.fallback):
                if fb not in tier_names or fb == tier.name:
                    raise ValueError(
                        f"tiers[{i}].fallback[{j}]: {fb!r} is not another tier; choose from {tier_names}"
                    )
        routing = self.routing
        if routing.default_tier is not None and routing.default_tier not in tier_names:
            raise ValueError(
                f"routing.default_tier: unknown tier {routing.default_tier!r}; choose from {tier_names}"
            )
        task_names = [t.name for t in routing.tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError("routing.tasks: duplicate task type names")
        for i, task in enumerate(routing.tasks):
            if task.tier not in tier_names:
                raise ValueError(
                    f"routing.tasks[{i}].tier: unknown tier {task.tier!r}; choose from {tier_names}"
                )
            if task.name in tier_names:
                raise ValueError(
                    f"routing.tasks[{i}].name: {task.name!r} is also a tier; x-tandem-task could mean "
                    "either, rename one"
                )
        for i, rule in enumerate(routing.rules):
            if rule.tier not in tier_names:
                raise ValueError(
                    f"routing.rules[{i}].tier: unknown tier {rule.tier!r}; choose from {tier_names}"
                )
            if rule.task is not None and rule.task not in task_names:
                raise ValueError(
                    f"routing.rules[{i}].task: unknown task type {rule.task!r}; choose from {task_names}"
                )
        try:
            self.templates.library.check_scopes(tier_names, task_names)
        except ValueError as e:
            raise ValueError(f"templates.library.{e}") from None
        if routing.auto_model in names:
            raise ValueError(f"routing.auto_model: {routing.auto_model!r} is also a model name; rename one")
        for i, tier in enumerate(self.tiers):
            model = self.model(tier.model)
            if not model.disaggregated:
                continue
            d = model.disaggregation
            worst = d.prefill_timeout_s * d.prefill_attempts + d.kv_transfer_timeout_s
            timeout = tier.first_token_timeout_s or self.resilience.first_token_timeout_s
            if timeout <= worst:
                raise ValueError(
                    f"tiers[{i}].first_token_timeout_s: {timeout:g}s would cut off {model.name}'s own "
                    f"prefill fallback (prefill_timeout_s x prefill_attempts + kv_transfer_timeout_s = "
                    f"{worst:g}s); raise it above {worst:g}s"
                )
        for i, limit in enumerate(self.admission.pool_limits):
            if limit.model not in names:
                raise ValueError(f"admission.pool_limits[{i}].model: unknown model {limit.model!r}")
        known = set(names) | set(tier_names)
        for i, key in enumerate(self.auth.keys):
            for j, name in enumerate(key.models or []):
                if name not in known:
                    raise ValueError(
                        f"auth.keys[{i}].models[{j}]: {name!r} is neither a model nor a tier; choose from "
                        f"{sorted(known)}"
                    )
        hooks = [w.tenant for w in self.sessions.webhooks]
        if len(set(hooks)) != len(hooks):
            raise ValueError("sessions.webhooks: one webhook per tenant")
        tenants = [t.name for t in self.admission.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError("admission.tenants: duplicate tenant names")
        if (
            not self.auth.enabled
            and not self.auth.allow_remote_unauthenticated
            and not _loopback(self.server.host)
        ):
            raise ValueError(
                f"auth.enabled: false with server.host {self.server.host!r} would serve anyone on the "
                "network; bind to 127.0.0.1, enable auth, or set auth.allow_remote_unauthenticated: true"
            )
        return self

    def tier_router(self) -> TierRouter:
        """The tier router of this spec (router.tiers, on its own dataclasses)."""
        tiers = [t.policy() for t in self.tiers]
        return TierRouter(tiers, self.routing.policy(), [m.name for m in self.models])

    def admission_controller(self, clock: Callable[[], float] = time.monotonic) -> AdmissionController:
        """The admission controller of one ingress replica: every limit scaled to its share
        (1 / `server.ingress_replicas`). The gateway and the simulator both build it here."""
        share = 1.0 / self.server.ingress_replicas
        adm = self.admission
        named = {t.name: t for t in adm.tenants}

        def limits_for(tenant: str) -> Limits:
            t: TenantLimits = named.get(tenant, adm.default_tenant)
            if not adm.enabled:
                return Limits(math.inf, math.inf, UNLIMITED, t.priority.rank)
            return t.limits(share)

        explicit = {p.model: p.max_concurrency for p in adm.pool_limits}
        pools = {}
        for m in self.models:
            pool = m.serving_pool
            limit = explicit.get(m.name, pool.max_replicas * pool.max_ongoing_requests)
            pools[m.name] = max(1, math.ceil(limit * share)) if adm.enabled else UNLIMITED
        return AdmissionController(
            limits_for, pools, adm.max_queue if adm.enabled else UNLIMITED, adm.queue_timeout_s, clock
        )

    def autoscaling_policy_config(self, model: str) -> Any:
        """`model`'s autoscaler settings (autoscaler.policy.PolicyConfig); a TTFT objective not set
        is the tightest of the tiers serving it (else the tiers' default)."""
        m = self.model(model)
        slos = [t.ttft_slo_s for t in self.tiers if t.model == model]
        return m.autoscaling.policy_config(min(slos) if slos else TierSpec.model_fields["ttft_slo_s"].default)

    def autoscaled(self, model: ModelSpec) -> list[PoolSpec]:
        """`model`'s pools the autoscaler sizes (replicas.min < replicas.max)."""
        return [p for p in model.pools if p.replicas.min < p.replicas.max]

    def tier(self, name: str) -> TierSpec:
        """The tier called `name` (KeyError if absent)."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def model(self, name: str) -> ModelSpec:
        """The model called `name` (KeyError if absent)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def resolve_source(self, model: ModelSpec) -> str:
        """Path or hub id the engine loads for `model`."""
        local = model.local_model_name()
        if local is None:
            return model.source
        return str(Path(self.model_dir).expanduser() / local)


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def validation_errors(err: ValidationError, root: str = "<spec>") -> str:
    """Every error of `err`, one indented line each: the field's dotted path and what to do."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or root
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field {e['loc'][-1]!r}; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, origin: str = "<spec>") -> ServingSpec:
    """Validate a spec given as a dict (from YAML or a serveConfigV2 `args`)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a spec must be a mapping with a `models` list")
    try:
        return ServingSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"invalid deployment spec {origin}:\n{validation_errors(err)}") from None


def load_spec(path: str | os.PathLike[str]) -> ServingSpec:
    """Load and validate a deployment spec from a YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"cannot read deployment spec {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    return parse_spec(data, origin=str(p))


def default_config_path() -> Path:
    """The embedded default spec (both tiny models on CPU)."""
    return Path(__file__).resolve().parent.parent / "configs" / "local.yaml"
