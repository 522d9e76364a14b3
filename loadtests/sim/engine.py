"""A modelled engine replica: vLLM-style continuous batching over an `EngineProfile`.

Each step the scheduler does what vLLM v1's does, in its order:

1. every running sequence that is decoding gets one token;
2. sequences still prefilling get their next chunk (chunked prefill), first come first served,
   within the step's token budget (`max_num_batched_tokens`);
3. waiting sequences are admitted while there is a free sequence slot (`max_num_seqs`), token
   budget and KV memory: a newcomer's leading prompt blocks already in the prefix cache are hits (a
   cache stops at the first miss) and cost no compute.

The step lasts `StepCost` of what it ran; then its tokens exist: a sequence whose last prompt chunk
ran emits its first token, decoding ones their next. A decoding sequence's progress is implicit (the
step counter), so a step costs O(1) plus what starts or ends in it, whatever the batch size.

KV memory is counted in blocks of `unit_tokens` (the request's block-key granularity: a Mooncake
trace's 512-token blocks, the router's block size for synthetic prompts). A sequence reserves the
blocks of its prompt and its whole output when admitted (the simulator knows the output length, so
no preemption is modelled: a conservative stand-in for vLLM's recompute preemption). Finished
sequences' full blocks stay cached, least recently used evicted first; `on_stored` / `on_removed`
report that as vLLM's KV events do (the router's block index listens).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtests.sim.profile import EngineProfile


@dataclass(slots=True, eq=False)
class Sequence:
    """One request on one engine.

    Attributes:
        prompt_tokens: prompt length.
        output_tokens: tokens to generate (1: a prefill-only request, as a P/D prefill is).
        keys: block keys of the prompt's full blocks (chained; the router's keys).
        done_keys: keys of further full blocks the sequence holds once finished (prompt + output),
            cached for whoever continues the conversation.
        preloaded: the prompt's KV arrives computed (a P/D hand-off): no prefill compute.
        on_first(now): the first token exists.  on_done(now): the last one does.
    """

    prompt_tokens: int
    output_tokens: int
    keys: list[int]
    on_first: Callable[[float], None]
    on_done: Callable[[float], None]
    done_keys: list[int] = field(default_factory=list)
    preloaded: bool = False
    # scheduler state
    cached_tokens: int = 0
    computed: int = 0
    blocks: int = 0
    hit_keys: int = 0
    finish_step: int = 0
    admitted_at: float = 0.0
    first_at: float | None = None


class Engine:
    """One replica (see the module docstring).

    Args:
        replica_id: its id in the router's views.
        profile: costs and limits.
        loop: the (simulated) event loop.
        unit_tokens: tokens per block key.
        slowdown: multiplies every step's time (the calibrated serving overhead on a shared host).
        on_stored, on_removed: KV events (block keys now cached / evicted).
    """

    def __init__(
        self,
        replica_id: str,
        profile: EngineProfile,
        loop: Any,
        unit_tokens: int,
        slowdown: float = 1.0,
        on_stored: Callable[[str, list[int]], None] | None = None,
        on_removed: Callable[[str, list[int]], None] | None = None,
    ) -> None:
        if unit_tokens < 1:
            raise ValueError("unit_tokens must be >= 1")
        self.id = replica_id
        self.p = profile
        self.cost = profile.step
        self._loop = loop
        self.unit = unit_tokens
        self.slowdown = slowdown
        self.capacity = max(1, profile.kv_tokens // unit_tokens)
        self._on_stored = on_stored
        self._on_removed = on_removed
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self._decoding: list[tuple[int, int, Sequence]] = []  # heap of (finish_step, seq no, seq)
        self.n_decoding = 0
        self.decode_ctx = 0  # context tokens of the decoding sequences (grows by n_decoding a step)
        self.steps = 0
        self._seqno = 0
        self._busy = False
        self.fresh = 0  # blocks of running sequences that are not (yet) cached
        self._held: dict[int, int] = {}  # cached block key -> running sequences using it
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # evictable, LRU first
        # utilisation and counters
        self.busy_s = 0.0
        self.seq_s = 0.0  # integral of running sequences over time (mean batch = seq_s / span)
        self.kv_s = 0.0  # integral of KV usage over time
        self.prefill_tokens = 0
        self.cached_hit_tokens = 0
        self.decode_tokens = 0
        self.itl_sink: Callable[[float, int], None] | None = None
        # A run of pure decode steps simulated as one event (see `_fast_forward`).
        self._ff_handle: Any = None
        self._ff_start = 0.0
        self._ff_steps = 0

    # -- what the router sees ------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.prefilling) + self.n_decoding

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Blocks in use by running sequences / capacity (vLLM's usage: cached free blocks are free)."""
        return min(1.0, (self.fresh + len(self._held)) / self.capacity)

    def cached_prefix(self, keys: list[int]) -> int:
        """Leading blocks of `keys` this engine's cache holds now."""
        n = 0
        for k in keys:
            if k in self._held or k in self._free_cached:
                n += 1
            else:
                break
        return n

    # -- requests ------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; it starts at the next step that has room."""
        blocks = math.ceil((seq.prompt_tokens + seq.output_tokens) / self.unit)
        if blocks > self.capacity:
            raise ValueError(
                f"{self.id}: a request of {seq.prompt_tokens} + {seq.output_tokens} tokens needs {blocks} "
                f"KV blocks of {self.unit} tokens; the engine holds {self.capacity}"
            )
        self.waiting.append(seq)
        if not self._busy:
            self._busy = True
            self._loop.call_soon(self._step)
        elif self._ff_handle is not None:
            self._interrupt()

    # -- KV blocks -----------------------------------------------------------------------------
    #
    # Memory = fresh blocks of running sequences (not shared) + cached blocks in use (`_held`, shared,
    # counted once) + cached blocks nobody uses (`_free_cached`, evictable) <= capacity.

    def _reserve(self, seq: Sequence) -> bool:
        """Take the blocks `seq` needs (hits first); False if they do not fit now."""
        hit = 0 if seq.preloaded else self.cached_prefix(seq.keys)
        need = math.ceil((seq.prompt_tokens + seq.output_tokens) / self.unit)
        held, free = self._held, self._free_cached
        revived = sum(1 for k in seq.keys[:hit] if k not in held)
        if self.fresh + len(held) + revived + need - hit > self.capacity:
            return False
        for k in seq.keys[:hit]:
            if k in free:
                del free[k]
            held[k] = held.get(k, 0) + 1
        seq.blocks = need - hit
        seq.hit_keys = hit
        self.fresh += seq.blocks
        self._evict()
        return True

    def _cache_prompt(self, seq: Sequence) -> None:
        """`seq`'s prompt is computed: its full blocks are in the prefix cache (held by it)."""
        held, free = self._held, self._free_cached
        stored = []
        for k in seq.keys[seq.hit_keys :]:
            n = held.get(k)
            if n is not None:  # a concurrent twin computed it too; ours stays a private copy
                held[k] = n + 1
                continue
            if k in free:
                del free[k]
            else:
                stored.append(k)
                seq.blocks -= 1
                self.fresh -= 1
            held[k] = 1
        seq.hit_keys = len(seq.keys)
        if stored and self._on_stored is not None:
            self._on_stored(self.id, stored)

    def _release(self, seq: Sequence) -> None:
        """`seq` finished: its blocks go back; its full blocks stay cached (evictable, LRU)."""
        held, free = self._held, self._free_cached
        for k in seq.keys[: seq.hit_keys]:
            n = held[k] - 1
            if n:
                held[k] = n
            else:
                del held[k]
                free[k] = None
        stored = []
        for k in seq.done_keys:
            if seq.blocks <= 0:
                break
            if k in held or k in free:
                continue
            free[k] = None
            stored.append(k)
            seq.blocks -= 1
            self.fresh -= 1
        self.fresh -= seq.blocks
        seq.blocks = 0
        if stored and self._on_stored is not None:
            self._on_stored(self.id, stored)
        self._evict()

    def _evict(self) -> None:
        free = self._free_cached
        overflow = self.fresh + len(self._held) + len(free) - self.capacity
        if overflow > 0:
            evicted = [free.popitem(last=False)[0] for _ in range(min(overflow, len(free)))]
            if self._on_removed is not None:
                self._on_removed(self.id, evicted)

    # -- the step loop -------------------------------------------------------------------------

    def _step(self) -> None:
        p = self.p
        budget = p.max_num_batched_tokens - self.n_decoding
        chunks: list[tuple[Sequence, int]] = []
        new_tokens = 0
        attn = 0.0
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(seq.prompt_tokens - seq.computed, budget)
            chunks.append((seq, take))
            attn += take * (seq.computed + take / 2)
            new_tokens += take
            budget -= take
        now = self._loop.time()
        handoffs: list[Sequence] = []
        waiting = self.waiting
        while waiting and budget > 0 and self.running < p.max_num_seqs:
            seq = waiting[0]
            if not self._reserve(seq):
                break
            waiting.popleft()
            seq.admitted_at = now
            if seq.preloaded:  # its KV came from a prefill replica: it decodes from this step on
                seq.computed = seq.prompt_tokens
                self._cache_prompt(seq)
                handoffs.append(seq)
                self._start_decoding(seq, now, first_step=True)
                budget -= 1
                continue
            cached = min(seq.hit_keys * self.unit, seq.prompt_tokens - 1)
            seq.cached_tokens = cached
            seq.computed = cached
            self.cached_hit_tokens += cached
            self.prefilling.append(seq)
            take = min(seq.prompt_tokens - cached, budget)
            chunks.append((seq, take))
            attn += take * (cached + take / 2)
            new_tokens += take
            budget -= take
        n_dec = self.n_decoding
        if not chunks and not handoffs:
            if not n_dec:
                self._busy = False
            else:
                self._fast_forward(now)
            return
        c = self.cost
        dt = (
            c.base_s
            + c.per_prefill_token_s * new_tokens
            + c.per_prefill_attn_s * attn / 1e6
            + c.per_decode_seq_s * n_dec
            + c.per_context_token_s * self.decode_ctx
        ) * self.slowdown
        self.busy_s += dt
        self.seq_s += (n_dec + len(chunks)) * dt
        self.kv_s += self.kv_usage * dt
        self.prefill_tokens += new_tokens
        self._loop.call_at(now + dt, self._end_step, chunks, handoffs, dt)

    # NOTE(speed): while every running sequence decodes and nothing new can start, the steps
    # differ only by the context growing a token per sequence, so the time of the next k steps has
    # a closed form. One event then covers the steps up to the next sequence's end; a request that
    # arrives meanwhile cuts it at the step in progress (it joins at the next step, as in vLLM).

    def _ff_time(self, k: int) -> float:
        """Seconds of the next `k` pure decode steps."""
        c, n = self.cost, self.n_decoding
        return (
            k * (c.base_s + c.per_decode_seq_s * n)
            + c.per_context_token_s * (k * self.decode_ctx + n * k * (k - 1) / 2)
        ) * self.slowdown

    def _fast_forward(self, now: float) -> None:
        k = self._decoding[0][0] - self.steps
        self._ff_start, self._ff_steps = now, k
        self._ff_handle = self._loop.call_at(now + self._ff_time(k), self._end_ff, k)

    def _interrupt(self) -> None:
        """A request arrived during a fast-forward: end it with the step in progress."""
        elapsed = self._loop.time() - self._ff_start
        lo, hi = 0, self._ff_steps
        while lo < hi:  # steps already finished: the largest j with _ff_time(j) <= elapsed
            mid = (lo + hi + 1) // 2
            if self._ff_time(mid) <= elapsed:
                lo = mid
            else:
                hi = mid - 1
        m = lo + 1
        if m >= self._ff_steps:
            return
        self._ff_handle.cancel()
        self._ff_steps = m
        self._ff_handle = self._loop.call_at(self._ff_start + self._ff_time(m), self._end_ff, m)

    def _end_ff(self, k: int) -> None:
        now = self._loop.time()
        t = self._ff_time(k)
        self._ff_handle = None
        n = self.n_decoding
        self.busy_s += t
        self.seq_s += n * t
        self.kv_s += self.kv_usage * t
        self.steps += k
        self.decode_ctx += k * n
        self.decode_tokens += k * n
        if self.itl_sink is not None:
            self.itl_sink(t / k, k * n)
        self._finish_due(now)
        self._step()

    def _start_decoding(self, seq: Sequence, now: float, first_step: bool = False) -> None:
        """`seq` has its prompt computed; it decodes its remaining tokens from the next step on.
        `first_step`: its first token comes from the next step too (a P/D hand-off)."""
        remaining = seq.output_tokens - (0 if first_step else 1)
        if remaining <= 0:
            self._finish(seq, now)
            return
        self._seqno += 1
        seq.finish_step = self.steps + remaining
        heapq.heappush(self._decoding, (seq.finish_step, self._seqno, seq))
        self.n_decoding += 1
        self.decode_ctx += seq.prompt_tokens + (0 if first_step else 1)

    def _end_step(self, chunks: list[tuple[Sequence, int]], handoffs: list[Sequence], dt: float) -> None:
        now = self._loop.time()
        for seq in handoffs:
            seq.first_at = now
            seq.on_first(now)
        n_dec = self.n_decoding
        self.steps += 1
        self.decode_ctx += n_dec
        self.decode_tokens += n_dec
        if n_dec and self.itl_sink is not None:
            self.itl_sink(dt, n_dec)
        self._finish_due(now)
        for seq, take in chunks:
            seq.computed += take
            if seq.computed >= seq.prompt_tokens:
                self.prefilling.remove(seq)
                self._cache_prompt(seq)
                seq.first_at = now
                seq.on_first(now)
                self._start_decoding(seq, now)
        self._step()

    def _finish_due(self, now: float) -> None:
        """Every decoding sequence whose last token came with the step just done."""
        heap = self._decoding
        while heap and heap[0][0] <= self.steps:
            _, _, seq = heapq.heappop(heap)
            self.n_decoding -= 1
            self.decode_ctx -= seq.prompt_tokens + seq.output_tokens
            self._finish(seq, now)

    def _finish(self, seq: Sequence, now: float) -> None:
        self._release(seq)
        seq.on_done(now)
