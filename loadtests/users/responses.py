"""`/v1/responses` background sessions, followed by polling or by streaming their events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadtests.client import Call
from loadtests.workload import ResponsesWorkload
from serving.http.protocol import TASK_HEADER

if TYPE_CHECKING:
    from loadtests.users import Context


def run(ctx: Context, w: ResponsesWorkload, due: float | None, item: int) -> None:
    body = {"model": w.model, "input": ctx.text(w.prompt_tokens), "max_output_tokens": w.max_output_tokens}
    if w.reasoning_budget is not None:
        body["reasoning"] = {"max_tokens": w.reasoning_budget}
    call = Call(w.name or w.type, w.type, "/v1/responses", body, w.slo, {TASK_HEADER: w.task}, due)
    ctx.client.response(call, w.follow)
