"""Fan-out tasks: one agent task issuing `width` calls at once under one `x-tandem-task-id` (the
tenant's fan-out semaphore admits `fanout_width` of them at a time; the rest are 429 `fanout`)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import gevent

from loadtests.client import Call
from loadtests.workload import FanoutWorkload
from serving.http.protocol import TASK_HEADER, TASK_ID_HEADER

if TYPE_CHECKING:
    from loadtests.users import Context


def run(ctx: Context, w: FanoutWorkload, due: float | None, item: int) -> None:
    name = w.name or w.type
    headers = {TASK_HEADER: w.task, TASK_ID_HEADER: f"{name}-{uuid.UUID(int=ctx.rng.getrandbits(128))}"}
    calls = [
        Call(
            name,
            w.type,
            "/v1/chat/completions",
            {
                "model": w.model,
                "messages": [{"role": "user", "content": ctx.text(w.prompt_tokens)}],
                "max_tokens": w.max_tokens,
            },
            w.slo,
            headers,
            due,
        )
        for _ in range(w.width)
    ]
    gevent.joinall([gevent.spawn(ctx.client.stream, c) for c in calls], raise_error=True)
