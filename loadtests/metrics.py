"""Per-request latency and token metrics, read from a streamed response (pure; no Locust, no I/O).

Definitions (the ones `vllm bench serve` and GuideLLM use, so that figures compare):

- **TTFT**: from sending the request to the first stream event that carries output (text, reasoning
  text or, for a reasoning model whose reasoning is hidden, an empty delta: the first *event* after the
  role-only chunk counts, since hidden reasoning tokens are still generated);
- **E2E**: from sending to the end of the stream;
- **TPOT** = (E2E − TTFT) / (output tokens − 1): the mean time per output token after the first
  (undefined for a one-token answer);
- **ITL**: the gaps between consecutive output events (a server that batches tokens per message shows
  fewer, longer gaps; TPOT does not change);
- tokens: input, cached (`prompt_tokens_details.cached_tokens` / `input_tokens_details`), output,
  reasoning (`completion_tokens_details.reasoning_tokens` / `output_tokens_details`), from the usage the
  server reports (`stream_options.include_usage` for chat and text completions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token counts of one request, as the server reports them."""

    input: int = 0
    cached: int = 0
    output: int = 0
    reasoning: int = 0

    @classmethod
    def from_openai(cls, usage: Mapping[str, Any] | None) -> Usage:
        """From a chat / completions `usage` or a Responses `usage` object (missing fields are 0)."""
        if not usage:
            return cls()
        if "input_tokens" in usage:  # the Responses API's names
            return cls(
                int(usage.get("input_tokens") or 0),
                int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
                int(usage.get("output_tokens") or 0),
                int((usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0),
            )
        return cls(
            int(usage.get("prompt_tokens") or 0),
            int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
        )


@dataclass(slots=True)
class StreamTiming:
    """When one streamed request's events arrived, relative to when it was sent (seconds)."""

    #: Arrival time of each output event, in order.
    events: list[float] = field(default_factory=list)
    end: float | None = None
    usage: Usage = field(default_factory=Usage)

    def event(self, t: float) -> None:
        """An output event arrived at `t`."""
        if self.events and t < self.events[-1]:
            raise ValueError("events must arrive in order")
        self.events.append(t)

    def finish(self, t: float, usage: Usage | None = None) -> None:
        """The stream ended at `t` (with the server's usage, if it sent one)."""
        self.end = t
        if usage is not None:
            self.usage = usage

    @property
    def ttft(self) -> float | None:
        return self.events[0] if self.events else None

    @property
    def e2e(self) -> float | None:
        return self.end

    @property
    def tpot(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None for fewer than 2 output tokens or an unfinished stream."""
        n = self.usage.output or len(self.events)
        if self.end is None or self.ttft is None or n < 2:
            return None
        return (self.end - self.ttft) / (n - 1)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive output events."""
        return [b - a for a, b in zip(self.events, self.events[1:], strict=False)]

    def meets(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
        """Whether this request met its SLOs (an unset SLO always holds; an unfinished request never)."""
        if self.end is None or self.ttft is None:
            return False
        if ttft_slo_s is not None and self.ttft > ttft_slo_s:
            return False
        tpot = self.tpot
        return not (tpot_slo_s is not None and tpot is not None and tpot > tpot_slo_s)
