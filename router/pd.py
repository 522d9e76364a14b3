"""The P/D decider: prefill remotely, or on the decode replica itself?

Pure policy (no Ray, no engine). A remote prefill pays a hand-off and a KV transfer; it is worth it
when the part of the prompt the decode replica would have to compute is long. The decode replica
knows best what it already holds, so it asks `decide` with its own estimate of cached tokens.

`PrefixTracker` is that estimate for one replica: an LRU of chained block hashes of what the replica
has prefilled (the engine's own prefix cache, approximately), salted per tenant like the engine's
cache, so one tenant's decision (and the `short_suffix:<n>` it reports) never reflects another
tenant's prompts. The cache-aware router's block index
(fed by engine KV events) gives the precise figure: the decode replica uses that match when the
router sends one (`router.contracts.RouteFeedback`) and its tracker otherwise; the decider takes either.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from router.contracts import DisaggMode, ServeMode


@dataclass(frozen=True, slots=True)
class PDDecision:
    """How to prefill; `reason` says why (it reaches the route header)."""

    mode: ServeMode
    reason: str


def decide(
    requested: DisaggMode | str, prompt_tokens: int, cached_tokens: int, min_prefill_tokens: int
) -> PDDecision:
    """Choose how to prefill one request on the decode replica it was routed to.

    Args:
        requested: on | off | auto (the request's header, else the model's default).
        prompt_tokens: prompt length.
        cached_tokens: prompt tokens already in the decode replica's prefix cache.
        min_prefill_tokens: auto mode disaggregates when the non-cached suffix is at least this long.
    """
    try:
        mode = DisaggMode(requested)
    except ValueError:
        raise ValueError(f"disagg: {requested!r} is not one of on, off, auto") from None
    if mode is DisaggMode.ON:
        return PDDecision(ServeMode.DISAGG, "forced")
    if mode is DisaggMode.OFF:
        return PDDecision(ServeMode.COLOCATED, "forced")
    suffix = max(0, prompt_tokens - cached_tokens)
    if suffix < min_prefill_tokens:
        return PDDecision(ServeMode.COLOCATED, f"short_suffix:{suffix}<{min_prefill_tokens}")
    return PDDecision(ServeMode.DISAGG, f"suffix:{suffix}>={min_prefill_tokens}")


class PrefixTracker:
    """Approximate prefix cache of one engine: chained hashes of full token blocks, LRU-bounded.

    A `salt` (the request's tenant cache salt) is folded into the first block's hash, as the engine
    folds its `cache_salt`: prompts of different salts never match.

    Args:
        block_size: the engine's KV block size in tokens.
        capacity_blocks: blocks remembered (the engine's KV block count is the natural bound).
    """

    __slots__ = ("_block", "_cap", "_blocks")

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError("block_size and capacity_blocks must be >= 1")
        self._block = block_size
        self._cap = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    @property
    def block_size(self) -> int:
        """Tokens per tracked block."""
        return self._block

    def _hashes(self, token_ids: list[int], salt: str | None) -> list[int]:
        out = []
        parent = hash(("cache_salt", salt)) if salt else 0
        b = self._block
        for start in range(0, len(token_ids) - b + 1, b):
            parent = hash((parent, tuple(token_ids[start : start + b])))
            out.append(parent)
        return out

    def cached_tokens(self, token_ids: list[int], salt: str | None = None) -> int:
        """Tokens of the longest cached prefix of `token_ids` under `salt` (whole blocks); refreshes
        their LRU slot."""
        return self.cached_keys(self._hashes(token_ids, salt))

    def cached_keys(self, keys: list[int]) -> int:
        """Like `cached_tokens`, for block keys computed elsewhere (the ingress's salted keys)."""
        n = 0
        for h in keys:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        return n * self._block

    def record(self, token_ids: list[int], salt: str | None = None) -> None:
        """Remember the full blocks of `token_ids` (a prompt plus its output) under `salt` as cached."""
        self.record_keys(self._hashes(token_ids, salt))

    def record_keys(self, keys: list[int]) -> None:
        """Remember blocks by key."""
        for h in keys:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self._cap:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the engine's prefix cache was reset)."""
        self._blocks.clear()

    def __len__(self) -> int:
        return len(self._blocks)
