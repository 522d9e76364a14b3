"""The workload file: which request types, in what mix, at what load shape and SLOs (validated first).

A load test reads one YAML file. It is validated completely before any traffic is sent: a bad file
fails with every wrong field named and what to do about it (as the deployment spec does).

```yaml
duration_s: 120                 # each run (each trial of a capacity search) stops after this
shape: {kind: poisson, rate: 4} # closed (users) | constant | poisson | gamma (cv) | ramp | trace
tenant: default                 # x-tandem-tenant (auth disabled), or api_key_env with auth on
workloads:
  - {type: intent, weight: 3, slo: {ttft_s: 0.5}}
  - {type: agent, weight: 1, turns: 4, slo: {ttft_s: 2.0, tpot_s: 0.1}}
  - {type: trace, path: ../shared/traces/mooncake_conversation.jsonl, token_scale: 0.125}
```

Request types: `agent` (multi-turn sessions sharing system prompts and tool definitions, with
`x-session-id`), `intent` (short `model: auto` calls with `x-tandem-task: intent`), `reasoning`
(streamed chat with a reasoning budget), `responses` (`/v1/responses` background sessions, polled or
streamed), `fanout` (one agent task's `width` calls at once under one `x-tandem-task-id`) and
`trace` (replay of a Mooncake or Azure trace file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.config import validation_errors


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names every wrong field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slo(_Model):
    """Per-request objectives; a request meets its SLO when every objective given holds."""

    ttft_s: float | None = Field(None, gt=0, description="Time to first token.")
    tpot_s: float | None = Field(None, gt=0, description="Time per output token after the first.")


class _Workload(_Model):
    weight: float = Field(1.0, gt=0, description="Share of the requests (relative to the other workloads).")
    slo: Slo = Field(default_factory=Slo, description="The objectives this type's requests are held to.")
    model: str = Field("auto", min_length=1, description="The request's `model`.")
    name: str | None = Field(None, description="Name in the reports (default: the type).")


class AgentWorkload(_Workload):
    type: Literal["agent"]
    system_prompts: int = Field(3, ge=1, description="Distinct system prompts the sessions share.")
    system_tokens: int = Field(512, ge=1, description="Tokens of a system prompt with its tool definitions.")
    turns: int = Field(4, ge=1, description="Turns per session (each appends the answer and a tool result).")
    user_tokens: int = Field(48, ge=1, description="Tokens a turn adds (tool result + question).")
    max_tokens: int = Field(64, ge=1)
    task: str | None = Field(None, description="x-tandem-task (None: the model's own tier).")


class IntentWorkload(_Workload):
    type: Literal["intent"]
    task: str = Field("intent", description="x-tandem-task of the `model: auto` call.")
    prompt_tokens: int = Field(32, ge=1)
    max_tokens: int = Field(8, ge=1)


def _check_budget(budget: int | None, limit: int, limit_field: str) -> None:
    if budget is not None and budget >= limit:
        raise ValueError(
            f"reasoning_budget ({budget}) must be below {limit_field} ({limit}), "
            "or no answer follows the reasoning"
        )


class ReasoningWorkload(_Workload):
    type: Literal["reasoning"]
    task: str = Field("reasoning")
    prompt_tokens: int = Field(128, ge=1)
    max_tokens: int = Field(256, ge=1)
    reasoning_budget: int | None = Field(
        128, ge=1, description="max_reasoning_tokens (None: the model's default)."
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> ReasoningWorkload:
        _check_budget(self.reasoning_budget, self.max_tokens, "max_tokens")
        return self


class ResponsesWorkload(_Workload):
    type: Literal["responses"]
    task: str = Field("reasoning")
    prompt_tokens: int = Field(128, ge=1)
    max_output_tokens: int = Field(256, ge=1)
    reasoning_budget: int | None = Field(
        64, ge=1, description="reasoning.max_tokens (None: the model's default)."
    )
    follow: Literal["poll", "stream"] = Field(
        "poll", description="Wait by polling GET /v1/responses/{id}, or by streaming its events."
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> ResponsesWorkload:
        _check_budget(self.reasoning_budget, self.max_output_tokens, "max_output_tokens")
        return self


class FanoutWorkload(_Workload):
    type: Literal["fanout"]
    width: int = Field(8, ge=1, description="Calls one agent task issues at once (one x-tandem-task-id).")
    task: str = Field("intent")
    prompt_tokens: int = Field(64, ge=1)
    max_tokens: int = Field(16, ge=1)


class TraceWorkload(_Workload):
    type: Literal["trace"]
    path: str = Field(description="A Mooncake .jsonl or an Azure .csv trace (../shared/traces/README.md).")
    time_scale: float = Field(1.0, gt=0, description="Replay speed-up (2: an hour in half an hour).")
    token_scale: float = Field(0.125, gt=0, le=1, description="Token counts multiplied by this.")
    max_input_tokens: int = Field(3072, ge=1, description="Prompts are capped here (the model's context).")
    max_output_tokens: int = Field(512, ge=1)
    limit: int | None = Field(None, ge=1, description="Replay at most this many requests.")


Workload = Annotated[
    AgentWorkload | IntentWorkload | ReasoningWorkload | ResponsesWorkload | FanoutWorkload | TraceWorkload,
    Field(discriminator="type"),
]


class Shape(_Model):
    """The offered load: closed loop (`users` in a loop) or open loop (arrivals on a fixed schedule)."""

    kind: Literal["closed", "constant", "poisson", "gamma", "ramp", "trace"]
    users: int | None = Field(None, ge=1, description="closed: concurrent users.")
    rate: float | None = Field(None, gt=0, description="constant / poisson / gamma: requests per second.")
    cv: float = Field(1.0, gt=0, description="gamma: coefficient of variation of the gaps.")
    start_rate: float | None = Field(None, ge=0, description="ramp: the rate at the start...")
    end_rate: float | None = Field(None, ge=0, description="ramp: ...and at the end of the run.")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Shape:
        need = {"closed": ["users"], "constant": ["rate"], "poisson": ["rate"], "gamma": ["rate"],
                "ramp": ["start_rate", "end_rate"], "trace": []}[self.kind]  # fmt: skip
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"shape kind {self.kind} needs {', '.join(missing)}")
        return self


class WorkloadFile(_Model):
    """A whole load test."""

    duration_s: float = Field(60.0, gt=0, le=24 * 3600, description="Each run stops after this long.")
    shape: Shape = Field(description="The offered load.")
    workloads: list[Workload] = Field(min_length=1, description="The request types and their weights.")
    tenant: str | None = Field(None, description="x-tandem-tenant (only honoured with auth disabled).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (default: TANDEM_API_KEY, if set)."
    )
    seed: int = Field(0, description="Seeds the prompts, the mix and the arrivals (a run is repeatable).")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer of the served model (a directory with tokenizer files; default: the local "
        "tiny-intent model): prompt lengths are exact in its tokens.",
    )

    @model_validator(mode="after")
    def _trace_shape(self) -> WorkloadFile:
        traces = [w for w in self.workloads if w.type == "trace"]
        if self.shape.kind == "trace" and (len(traces) != 1 or len(self.workloads) != 1):
            raise ValueError(
                "shape kind trace replays one trace's own timestamps: give exactly one trace workload"
            )
        return self

    def mix(self) -> list[tuple[str, float]]:
        """(name, share) of each workload; shares sum to 1."""
        total = sum(w.weight for w in self.workloads)
        return [(w.name or w.type, w.weight / total) for w in self.workloads]


def parse_workload(data: Any, origin: str = "<workload>") -> WorkloadFile:
    """Validate a workload given as a dict."""
    if not isinstance(data, dict):
        raise WorkloadError(f"{origin}: a workload file must be a mapping with `shape` and `workloads`")
    try:
        return WorkloadFile.model_validate(data)
    except ValidationError as err:
        errors = validation_errors(err, "<workload>")
        raise WorkloadError(f"invalid workload file {origin}:\n{errors}") from None


def load_workload(path: str | Path) -> WorkloadFile:
    """Load and validate a workload file (YAML)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise WorkloadError(f"{p}: not valid YAML: {e}") from None
    return parse_workload(data, str(p))
