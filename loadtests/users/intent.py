"""Intent classification: short prompts, a few output tokens, `model: auto` routed by `x-tandem-task`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadtests.client import Call
from loadtests.workload import IntentWorkload
from serving.http.protocol import TASK_HEADER

if TYPE_CHECKING:
    from loadtests.users import Context


def run(ctx: Context, w: IntentWorkload, due: float | None, item: int) -> None:
    body = {
        "model": w.model,
        "messages": [{"role": "user", "content": ctx.text(w.prompt_tokens)}],
        "max_tokens": w.max_tokens,
    }
    ctx.client.stream(
        Call(w.name or w.type, w.type, "/v1/chat/completions", body, w.slo, {TASK_HEADER: w.task}, due)
    )
