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

A tenant's salt is `tenant_salt(tenant)`: an HMAC of the tenant name under the deployment's secret
(`TANDEM_SALT_SECRET`, read by `salt_secret` and nowhere else). Without a secret the salt is a public
function of the tenant name, so anyone who sees a block hash (a log, an index dump) can test "did
tenant X send prefix P"; with it they cannot compute the hashes. (The engines' KV-event feed carries
token ids and the salts themselves in the clear: only the network protects it, see
`serving.replicas.deployments._kv_events_setup`.)
The ingress computes the salt once per request and sends that one string both ways (the router's
block keys and the engine's `cache_salt`), so router and engine always agree; every ingress replica
must see the same secret, or the same tenant gets a different salt on each (cache misses, no leak).

The index keys blocks by the low 64 bits of the digest read big-endian, which is what vLLM publishes
in KV events with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` (and what `event_key` makes of a bytes
hash from an event).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

#: vLLM's fixed NONE_HASH seed for cryptographic hashes when PYTHONHASHSEED is unset.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
#: Environment variable with the deployment's salt secret (mount it from a Kubernetes Secret into
#: every ingress pod; the engines never compute a salt, they receive it with each request).
SALT_SECRET_ENV = "TANDEM_SALT_SECRET"
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


def salt_secret(environ: Mapping[str, str] | None = None) -> str:
    """The deployment's salt secret: `TANDEM_SALT_SECRET` from `environ` (default: the process
    environment), "" when unset. The one place the secret is read."""
    return (os.environ if environ is None else environ).get(SALT_SECRET_ENV, "")


def tenant_salt(tenant: str, secret: str | None = None) -> str:
    """A per-tenant cache salt (32 hex digits).

    Args:
        tenant: the tenant name.
        secret: the deployment's secret; None reads it with `salt_secret()`. With a secret the salt
            is HMAC-SHA256(secret, tenant), which cannot be computed from the tenant name; without
            one it is SHA-256 of the name (stable, but guessable).
    """
    if secret is None:
        secret = salt_secret()
    if secret:
        return hmac.new(secret.encode(), tenant.encode(), hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(f"\x00{tenant}".encode()).hexdigest()[:32]
