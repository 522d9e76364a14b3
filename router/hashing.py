"""Block hashing, identical in scheme to vLLM's prefix cache (vllm/v1/core/kv_cache_utils.py, 0.32).

vLLM hashes each *full* block of `block_size` tokens as

    hash_fn((parent_block_hash, tuple(block_token_ids), extra_keys))

with `hash_fn` = SHA-256 over the pickled tuple (`prefix_caching_hash_algo: sha256`, the default),
the first block's parent = NONE_HASH = hash_fn(seed) where the seed is PYTHONHASHSEED if set, else
"vllm-none-hash", and `extra_keys` = LoRA keys `("lora", name, path)` on every block plus
`("cache_salt", salt)` on the first block only (None when there are none). A partial last block is
never cached, so it is never hashed.

Because the salt is folded into the first block's hash, every later hash differs too: two tenants
with different salts never share a cache entry, in the router's index or in the engine (the engine
request carries the same `cache_salt`). Prefix-cache timing is a known cross-tenant side channel,
so Tandem salts per tenant by default.

The index keys blocks by the low 64 bits of the digest read big-endian, which is what vLLM publishes
in KV events with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` (and what `event_key` makes of a bytes
hash from an event).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from typing import Any

#: vLLM's fixed NONE_HASH seed for cryptographic hashes when PYTHONHASHSEED is unset.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


def sha256_pickle(obj: Any) -> bytes:
    """vLLM's `sha256`: SHA-256 of the object pickled with the highest protocol."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def event_key(block_hash: bytes | int) -> int:
    """The index key of a block hash as vLLM reports it (bytes digest, or its 64-bit int form)."""
    if isinstance(block_hash, int):
        return block_hash & _MASK64
    return int.from_bytes(block_hash, byteorder="big") & _MASK64


class BlockHasher:
    """Chained block hashes of token ids, as the engine computes them.

    Args:
        block_size: the engine's KV block size in tokens (128 on vLLM's CPU build, 16 on CUDA).
        seed: NONE_HASH seed; defaults to PYTHONHASHSEED, else vLLM's fixed default.
    """

    __slots__ = ("block_size", "none_hash")

    def __init__(self, block_size: int, seed: str | None = None) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        if seed is None:
            seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
        self.none_hash = sha256_pickle(seed)

    def digests(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        lora: tuple[str, str] | None = None,
    ) -> list[bytes]:
        """SHA-256 digests of the full blocks of `token_ids` (what vLLM's block hasher returns)."""
        b = self.block_size
        lora_keys: list[tuple[str, ...]] = [("lora", lora[0], lora[1])] if lora else []
        out: list[bytes] = []
        parent = self.none_hash
        for i, start in enumerate(range(0, len(token_ids) - b + 1, b)):
            keys = list(lora_keys)
            if i == 0 and cache_salt:
                keys.append(("cache_salt", cache_salt))
            extra = tuple(keys) if keys else None
            parent = sha256_pickle((parent, tuple(token_ids[start : start + b]), extra))
            out.append(parent)
        return out

    def keys(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        lora: tuple[str, str] | None = None,
    ) -> list[int]:
        """64-bit index keys of the full blocks of `token_ids`."""
        return [event_key(d) for d in self.digests(token_ids, cache_salt, lora)]


def tenant_salt(tenant: str, secret: str = "") -> str:
    """A per-tenant cache salt. With a deployment `secret`, salts cannot be guessed from tenant names."""
    return hashlib.sha256(f"{secret}\x00{tenant}".encode()).hexdigest()[:32]
