"""What the simulator sends: the jobs of a load-test workload file as calls of known size.

The same workload files Locust replays (`loadtests/workloads/*.yaml`) drive the simulator, with the
same arrival plan (`loadtests.plan.arrivals`: same seed, same due times, same mix). A job becomes
calls the way `loadtests/users/` sends them: an intent call, an agent session of `turns` calls (each
turn's prompt is the whole conversation so far, sent when the previous answer is in), a fan-out
task of `width` calls at once under one task id, one trace request.

A prompt is a run of **units**, `unit_tokens` tokens each: the leading full units carry ids, and
equal ids mean equal tokens (a shared system prompt; the conversation so far; a Mooncake trace's
`hash_ids`, whose 512-token blocks scale with the workload's `token_scale`). The ingress turns unit
ids into block keys with the router's own chained hashing (`KeyChain`, parity-tested against
`router.hashing.BlockHasher`), salted per tenant as the real ingress does.

Chat requests carry the chat template's tokens around each message: `Template` counts them (the
calibration measures them on the real tokenizer's output: `prompt = base + per_message x messages
+ content`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from loadtests import plan, traces
from loadtests.workload import (
    AgentWorkload,
    FanoutWorkload,
    IntentWorkload,
    ReasoningWorkload,
    ResponsesWorkload,
    TraceWorkload,
    WorkloadFile,
)
from router.hashing import DEFAULT_NONE_HASH_SEED, event_key, sha256_pickle

_SHARED = 1 << 60  # unit ids of shared prefixes (system prompts)
_TRACE = 1 << 61  # unit ids of trace blocks
_BLOCK = 1 << 24  # ids one prompt or conversation may use


@dataclass(frozen=True, slots=True)
class Template:
    """Tokens the chat template adds: `base` per request and `per_message` per message."""

    base: int = 0
    per_message: int = 0

    def prompt(self, messages: int, content: int) -> int:
        return self.base + self.per_message * messages + content


@dataclass(slots=True)
class Call:
    """One request of a job."""

    name: str
    type: str
    endpoint: str
    model: str
    task: str | None
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    units: list[int]
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    #: Units the conversation holds once this call is answered (cached for its next turn).
    done_units: list[int] = field(default_factory=list)
    session: str | None = None
    task_id: str | None = None
    reasoning: bool = False
    tags: dict | None = None
    #: Chat messages and their content tokens (what the template's tokens are counted from).
    messages: int = 1
    content_tokens: int = 0


class KeyChain:
    """Chained block keys of unit ids, exactly as `router.hashing.BlockHasher(1)` computes them, but
    extendable: a conversation's next turn only hashes its new units, and a prompt that shares only
    a prefix with the last one (another session on the same system prompt) rehashes past it."""

    __slots__ = ("_digests", "_keys", "_salt", "_units")

    def __init__(self, none_hash: bytes, salt: str | None) -> None:
        self._digests = [none_hash]
        self._keys: list[int] = []
        self._units: list[int] = []
        self._salt = salt

    def keys(self, units: list[int]) -> list[int]:
        """The keys of `units`."""
        known = self._units
        n, limit = 0, min(len(known), len(units))
        while n < limit and known[n] == units[n]:
            n += 1
        if n < len(known):
            del known[n:], self._keys[n:], self._digests[n + 1 :]
        digests, keys = self._digests, self._keys
        for i in range(n, len(units)):
            extra = (("cache_salt", self._salt),) if i == 0 and self._salt else None
            d = sha256_pickle((digests[-1], (units[i],), extra))
            digests.append(d)
            keys.append(event_key(d))
            known.append(units[i])
        return list(keys)


def none_hash(seed: str | None = None) -> bytes:
    """NONE_HASH as `BlockHasher` computes it."""
    return sha256_pickle(seed if seed is not None else DEFAULT_NONE_HASH_SEED)


def units_of(prefix: int, shared_tokens: int, own: int, total_tokens: int, unit: int) -> list[int]:
    """Unit ids of a prompt of `total_tokens`: full units inside the first `shared_tokens` belong to
    the shared prefix `prefix`, the rest to `own` (the conversation or request)."""
    n = total_tokens // unit
    shared = min(n, shared_tokens // unit)
    return [prefix + j for j in range(shared)] + [own + j for j in range(shared, n)]


def unit_tokens_of(wf: WorkloadFile, default: int) -> int:
    """Tokens per unit: a trace workload's scaled block size, else `default`."""
    for w in wf.workloads:
        if isinstance(w, TraceWorkload) and w.path.endswith(".jsonl"):
            return max(1, round(traces.MOONCAKE_BLOCK_TOKENS * w.token_scale))
    return default


class Jobs:
    """The jobs of a workload file as call factories.

    Args:
        wf: the workload file.
        unit: tokens per unit.
        template: the chat template's token counts.
        loaded: trace workloads' requests by path (`loadtests.plan.trace_requests`).
    """

    def __init__(
        self, wf: WorkloadFile, unit: int, template: Template, loaded: dict[str, list[traces.TraceRequest]]
    ) -> None:
        self.wf = wf
        self.unit = unit
        self.template = template
        self.loaded = loaded
        self.rng = random.Random(wf.seed + 2)
        self._next_own = 0

    def own(self) -> int:
        """A fresh id range for one prompt or conversation."""
        self._next_own += _BLOCK
        return self._next_own

    def plan(self, rate: float | None = None, duration_s: float | None = None) -> list[plan.Arrival]:
        return plan.arrivals(self.wf, rate, duration_s, self.loaded)

    # -- one-call jobs ---------------------------------------------------------------------------

    def single(self, w, item: int) -> Call:
        """The call of an intent, reasoning, responses or trace job."""
        name = w.name or w.type
        u, t = self.unit, self.template
        if isinstance(w, IntentWorkload):
            p = t.prompt(1, w.prompt_tokens)
            return Call(name, w.type, "/v1/chat/completions", w.model, w.task, p, w.max_tokens, w.max_tokens,
                        units_of(0, 0, self.own(), p, u), w.slo.ttft_s, w.slo.tpot_s,
                        content_tokens=w.prompt_tokens)  # fmt: skip
        if isinstance(w, ReasoningWorkload):
            p = t.prompt(1, w.prompt_tokens)
            return Call(name, w.type, "/v1/chat/completions", w.model, w.task, p, w.max_tokens, w.max_tokens,
                        units_of(0, 0, self.own(), p, u), w.slo.ttft_s, w.slo.tpot_s, reasoning=True,
                        content_tokens=w.prompt_tokens)  # fmt: skip
        if isinstance(w, ResponsesWorkload):
            p = t.prompt(1, w.prompt_tokens)
            return Call(name, w.type, "/v1/responses", w.model, w.task, p, w.max_output_tokens,
                        w.max_output_tokens, units_of(0, 0, self.own(), p, u), w.slo.ttft_s, w.slo.tpot_s,
                        reasoning=True, content_tokens=w.prompt_tokens)  # fmt: skip
        if isinstance(w, TraceWorkload):
            q = self.loaded[w.path][item % len(self.loaded[w.path])]
            if q.hash_ids:
                n = min(len(q.hash_ids), q.input_tokens // u)
                units = [_TRACE + h for h in q.hash_ids[:n]]
            else:
                units = units_of(0, 0, self.own(), q.input_tokens, u)
            return Call(name, w.type, "/v1/completions", w.model, None, q.input_tokens, q.output_tokens,
                        q.output_tokens, units, w.slo.ttft_s, w.slo.tpot_s, messages=0,
                        content_tokens=q.input_tokens)  # fmt: skip
        raise TypeError(f"{w.type} is not a one-call job")

    def fanout(self, w: FanoutWorkload, task_id: str) -> list[Call]:
        p = self.template.prompt(1, w.prompt_tokens)
        name = w.name or w.type
        return [
            Call(name, w.type, "/v1/chat/completions", w.model, w.task, p, w.max_tokens, w.max_tokens,
                 units_of(0, 0, self.own(), p, self.unit), w.slo.ttft_s, w.slo.tpot_s, task_id=task_id,
                 content_tokens=w.prompt_tokens)
            for _ in range(w.width)
        ]  # fmt: skip

    def agent(self, w: AgentWorkload, position: int, session: str) -> Iterator[Call]:
        """The turns of one agent session (the next is built once the previous is answered).

        NOTE(measured): a turn's cache hit stops at the end of the previous turn's prompt: the
        answer comes back as text inside the chat template, and its tokens do not reproduce the
        blocks the engine cached while generating it. With the answer's blocks counted as cached
        the simulator over-predicted the local stack's hit rate (84 % against 73 % measured); without
        them it predicts 72.5 %."""
        u, t = self.unit, self.template
        sys_i = self.rng.randrange(w.system_prompts)
        prefix = _SHARED + (position * 1024 + sys_i) * _BLOCK
        shared = t.base + t.per_message + w.system_tokens  # the system message, template included
        own = self.own()
        messages, content = 2, w.system_tokens + w.user_tokens
        for turn in range(w.turns):
            p = t.prompt(messages, content)
            yield Call(
                w.name or w.type, w.type, "/v1/chat/completions", w.model, w.task, p, w.max_tokens,
                w.max_tokens, units_of(prefix, shared, own, p, u), w.slo.ttft_s, w.slo.tpot_s,
                session=session,
                tags={"session": session, "turn": turn}, messages=messages, content_tokens=content,
            )  # fmt: skip
            messages += 2
            content += w.max_tokens + w.user_tokens
