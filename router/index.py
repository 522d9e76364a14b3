"""Block index: which replicas hold which KV blocks, with bounded memory.

Fed two ways:

- **approximate**: after the router sends a request to a replica, the request's blocks are recorded
  there (`add`), since the engine will cache them;
- **precise**: engines publish KV events (vLLM `kv_events_config`: BlockStored, BlockRemoved,
  AllBlocksCleared) which `apply_stored` / `apply_removed` / `clear` mirror.

Each replica keeps at most `block_budget` blocks in LRU order (the router's memory bound, also a
good model of the engine's own eviction); a dropped replica is purged (`drop_replica`).
`match` returns, per replica, how many *leading* blocks of a request it holds: a prefix cache only
helps up to the first missing block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class BlockIndex:
    """Block key → replicas holding it; LRU-bounded per replica.

    Args:
        block_budget: most blocks remembered per replica.
    """

    __slots__ = ("_budget", "_holders", "_lru")

    def __init__(self, block_budget: int) -> None:
        if block_budget < 1:
            raise ValueError("block_budget must be >= 1")
        self._budget = block_budget
        # A block held by one replica maps to that replica's id (most blocks); by several, to a set.
        self._holders: dict[int, str | set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def add(self, replica: str, keys: Iterable[int]) -> None:
        """Record that `replica` holds `keys` (most recently used last), evicting past the budget."""
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        holders = self._holders
        for k in keys:
            if k in lru:
                lru.move_to_end(k)
                continue
            lru[k] = None
            h = holders.get(k)
            if h is None:
                holders[k] = replica
            elif isinstance(h, str):
                if h != replica:
                    holders[k] = {h, replica}
            else:
                h.add(replica)
        while len(lru) > self._budget:
            old, _ = lru.popitem(last=False)
            self._unhold(old, replica)

    def touch(self, replica: str, keys: Iterable[int]) -> None:
        """Mark `keys` as recently used on `replica` (those it holds)."""
        lru = self._lru.get(replica)
        if lru is None:
            return
        for k in keys:
            if k in lru:
                lru.move_to_end(k)

    def remove(self, replica: str, keys: Iterable[int]) -> None:
        """`replica` evicted `keys`."""
        lru = self._lru.get(replica)
        if lru is None:
            return
        for k in keys:
            if lru.pop(k, 0) is None:
                self._unhold(k, replica)

    def clear(self, replica: str) -> None:
        """`replica` dropped its whole cache (AllBlocksCleared); it stays known."""
        lru = self._lru.get(replica)
        if lru is None:
            return
        for k in lru:
            self._unhold(k, replica)
        lru.clear()

    def drop_replica(self, replica: str) -> None:
        """Forget `replica` entirely (it left the pool)."""
        self.clear(replica)
        self._lru.pop(replica, None)

    def _unhold(self, key: int, replica: str) -> None:
        h = self._holders.get(key)
        if h is None:
            return
        if isinstance(h, str):
            if h == replica:
                del self._holders[key]
            return
        h.discard(replica)
        if len(h) == 1:
            self._holders[key] = next(iter(h))
        elif not h:
            del self._holders[key]

    def match(self, keys: Sequence[int], replicas: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of `keys` held by each replica (only replicas with at least one; restricted
        to `replicas` when given)."""
        if not keys:
            return {}
        first = self._holders.get(keys[0])
        if not first:
            return {}
        alive = {first} if isinstance(first, str) else set(first)
        if replicas is not None:
            alive.intersection_update(replicas)
        matched: dict[str, int] = {}
        depth = 1
        holders = self._holders
        while alive and depth < len(keys):
            nxt = holders.get(keys[depth])
            if nxt is None:
                keep: set[str] = set()
            elif isinstance(nxt, str):
                keep = {nxt} if nxt in alive else set()
            else:
                keep = alive.intersection(nxt)
            for r in alive - keep:
                matched[r] = depth
            alive = keep
            depth += 1
        for r in alive:
            matched[r] = depth
        return matched

    def blocks(self, replica: str) -> int:
        """Blocks currently indexed for `replica`."""
        lru = self._lru.get(replica)
        return len(lru) if lru is not None else 0

    def replicas(self) -> list[str]:
        """Replicas the index knows."""
        return list(self._lru)

    def __len__(self) -> int:
        """Distinct block keys indexed."""
        return len(self._holders)
