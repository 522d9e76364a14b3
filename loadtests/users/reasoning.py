"""Reasoning calls: streamed chat on the reasoning tier with a reasoning budget (`max_reasoning_tokens`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadtests.client import Call
from loadtests.workload import ReasoningWorkload
from serving.http.protocol import TASK_HEADER

if TYPE_CHECKING:
    from loadtests.users import Context


def run(ctx: Context, w: ReasoningWorkload, due: float | None, item: int) -> None:
    body = {
        "model": w.model,
        "messages": [{"role": "user", "content": ctx.text(w.prompt_tokens)}],
        "max_tokens": w.max_tokens,
    }
    if w.reasoning_budget is not None:
        body["max_reasoning_tokens"] = w.reasoning_budget
    ctx.client.stream(
        Call(w.name or w.type, w.type, "/v1/chat/completions", body, w.slo, {TASK_HEADER: w.task}, due)
    )
