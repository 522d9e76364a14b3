"""One module per request type; each has `run(ctx, workload, due)`: one job (a call, a session, a
fan-out task, a trace request), its requests sent through `ctx.client` (which records them).

`Context` is what the jobs of one Locust user share: the client, the prompt builder on the model's
tokenizer, a seeded RNG, and the replayed traces.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtests.client import Client
from loadtests.prompts import PromptBuilder
from loadtests.traces import TraceRequest
from loadtests.users import agent, fanout, intent, reasoning, responses, trace
from loadtests.workload import TraceWorkload

#: Block size of the synthetic prompts (vLLM's default KV block is 16 tokens; 64 keeps the text varied).
SYNTHETIC_BLOCK_TOKENS = 64
#: Block ids of one-off text start here (trace ids are small; system prompts use the next range).
UNIQUE_BLOCK_BASE = 1 << 40


@dataclass
class Context:
    client: Client
    prompts: PromptBuilder
    rng: random.Random
    #: Scaled requests of each trace workload, by path (read once per process, before the run).
    traces: dict[str, list[TraceRequest]] = field(default_factory=dict)

    def unique_block(self) -> int:
        """A block id no other request uses (a different first block: no shared prefix)."""
        return UNIQUE_BLOCK_BASE + self.rng.getrandbits(39)

    def text(self, tokens: int) -> str:
        """`tokens` tokens of text no other request shares."""
        return self.prompts.prompt([self.unique_block()], tokens)

    def trace(self, w: TraceWorkload) -> list[TraceRequest]:
        """The workload's requests, read before the run started (never on the request path)."""
        return self.traces[w.path]


#: The job of each request type.
JOBS: dict[str, Callable[[Context, Any, float | None, int], None]] = {
    "agent": agent.run,
    "intent": intent.run,
    "reasoning": reasoning.run,
    "responses": responses.run,
    "fanout": fanout.run,
    "trace": trace.run,
}
