"""The stored request of a background session: written by the ingress, read by the workers.

The ingress plans a `/v1/responses` request like any other (serving.http.pipeline: tier, prompt ids,
limits, salt, block keys) and stores the plan as a `SessionRequest`; a worker generates from it, and
`serving.sessions.events.response_object` echoes its client-facing fields. In the store it is the
JSON object of `to_dict` (the record's `request`), and `from_dict` is the one place that reads it
back: records written by an older version (fewer keys) read with the defaults below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The `reasoning` echoed for a request that set none.
NO_REASONING: dict[str, Any] = {"effort": None, "summary": None, "max_tokens": None}
#: The truncation record of a request that dropped nothing.
NO_TRUNCATION: dict[str, Any] = {"mode": "disabled", "dropped_items": 0, "dropped_tokens": 0}


@dataclass(slots=True)
class SessionRequest:
    """One session's request.

    Generation (what a worker uses):
        prompt_ids: the prompt, tokenized with the model's chat template.
        sampling: `SamplingOptions` fields (temperature, top_p, seed).
        max_output_tokens: output tokens the session may generate (the client's, else the context's rest).
        reasoning_budget: reasoning tokens before `</think>` is forced (reasoning models).
        summary: how reasoning is summarized in the events (None: not shown).
        cache_salt / block_keys: the tenant's prefix-cache salt and the prompt's block keys (router).

    Echoed in the response object:
        max_output_tokens_asked, background, instructions, metadata, previous_response_id,
        reasoning (effort, summary, max_tokens), messages (the conversation, for a follow-up turn, as the
        client gave it: no template, nothing dropped), truncation's mode.

    Recorded (how the gateway shaped the request):
        template: `name@version` of the prompt template put first (None: none); template_tokens: its
        tokens at the prompt's start; truncation: {mode, dropped_items, dropped_tokens};
        max_output_tokens_clamped_from: the max_output_tokens asked when it was clamped to fit.
    """

    prompt_ids: list[int]
    sampling: dict[str, Any]
    max_output_tokens: int
    reasoning_budget: int | None = None
    summary: str | None = None
    cache_salt: str | None = None
    block_keys: list[int] = field(default_factory=list)
    max_output_tokens_asked: int | None = None
    background: bool = False
    instructions: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = field(default_factory=lambda: dict(NO_REASONING))
    messages: list[dict[str, Any]] = field(default_factory=list)
    template: str | None = None
    template_tokens: int = 0
    truncation: dict[str, Any] = field(default_factory=lambda: dict(NO_TRUNCATION))
    max_output_tokens_clamped_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON) form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, r: dict[str, Any]) -> SessionRequest:
        """Read a stored request (missing keys take their defaults)."""
        return cls(
            prompt_ids=list(r.get("prompt_ids") or []),
            sampling=dict(r.get("sampling") or {}),
            max_output_tokens=int(r.get("max_output_tokens") or 0),
            reasoning_budget=r.get("reasoning_budget"),
            summary=r.get("summary"),
            cache_salt=r.get("cache_salt"),
            block_keys=list(r.get("block_keys") or []),
            max_output_tokens_asked=r.get("max_output_tokens_asked"),
            background=bool(r.get("background")),
            instructions=r.get("instructions"),
            metadata=dict(r.get("metadata") or {}),
            previous_response_id=r.get("previous_response_id"),
            reasoning=dict(r.get("reasoning") or NO_REASONING),
            messages=list(r.get("messages") or []),
            template=r.get("template"),
            template_tokens=int(r.get("template_tokens") or 0),
            truncation=dict(r.get("truncation") or NO_TRUNCATION),
            max_output_tokens_clamped_from=r.get("max_output_tokens_clamped_from"),
        )
