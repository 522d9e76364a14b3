"""Trace replay: one request of a Mooncake or Azure trace as a text completion of exactly its input
length (prefix blocks as deterministic text: equal ids, equal tokens) and its output length
(`ignore_eos`, so the engine generates as many tokens as the trace's request did)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadtests.client import Call
from loadtests.traces import MOONCAKE_BLOCK_TOKENS
from loadtests.workload import TraceWorkload

if TYPE_CHECKING:
    from loadtests.users import Context


def run(ctx: Context, w: TraceWorkload, due: float | None, item: int) -> None:
    reqs = ctx.trace(w)
    req = reqs[item % len(reqs)]
    # An Azure request has no block ids: its first block is unique, so no two requests share a prefix.
    ids = req.hash_ids or (ctx.unique_block(),)
    prompts = ctx.prompts.resized(max(1, round(MOONCAKE_BLOCK_TOKENS * w.token_scale)))
    body = {
        "model": w.model,
        "prompt": prompts.prompt(ids, req.input_tokens),
        "max_tokens": req.output_tokens,
        "min_tokens": req.output_tokens,
        "ignore_eos": True,
    }
    ctx.client.stream(Call(w.name or w.type, w.type, "/v1/completions", body, w.slo, {}, due))
