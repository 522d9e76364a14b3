"""Multi-turn agent sessions: a shared system prompt with tool definitions, then turns that each append
the answer and a tool result (the prefix of every later turn is the whole conversation so far).

A session picks one of `system_prompts` system prompts (the same text for every session that picks
it, so sessions share that prefix) and sends `x-session-id`, so the cache-aware router keeps the
conversation on the replica that holds it; later turns then report cached prompt tokens.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from loadtests.client import Call
from loadtests.workload import AgentWorkload
from serving.http.protocol import SESSION_HEADER, TASK_HEADER

if TYPE_CHECKING:
    from loadtests.users import Context

#: Block ids of the shared system prompts: prompt `i` is blocks SYSTEM_BLOCK_BASE + i * 1000 + j.
SYSTEM_BLOCK_BASE = 1 << 30


def system_prompt(ctx: Context, w: AgentWorkload, i: int) -> str:
    block = ctx.prompts.block_tokens
    ids = [SYSTEM_BLOCK_BASE + i * 1000 + j for j in range(-(-w.system_tokens // block))]
    return "You are an agent with these tools:" + ctx.prompts.prompt(ids, w.system_tokens)


def run(ctx: Context, w: AgentWorkload, due: float | None, item: int) -> None:
    name = w.name or w.type
    session = f"{name}-{uuid.UUID(int=ctx.rng.getrandbits(128))}"
    headers = {SESSION_HEADER: session}
    if w.task:
        headers[TASK_HEADER] = w.task
    messages = [
        {"role": "system", "content": system_prompt(ctx, w, ctx.rng.randrange(w.system_prompts))},
        {"role": "user", "content": "Task:" + ctx.text(w.user_tokens)},
    ]
    for turn in range(w.turns):
        body = {"model": w.model, "messages": list(messages), "max_tokens": w.max_tokens}
        # Only the first turn was due at `due`; the others follow their answers (a session is closed-loop).
        first_due = due if turn == 0 else None
        tags = {"session": session, "turn": turn}
        result = ctx.client.stream(
            Call(name, w.type, "/v1/chat/completions", body, w.slo, headers, first_due, tags)
        )
        if result.record["outcome"] != "ok":
            return  # a session whose turn failed ends, as an agent's would
        messages.append({"role": "assistant", "content": result.text})
        messages.append({"role": "user", "content": "Tool result:" + ctx.text(w.user_tokens)})
