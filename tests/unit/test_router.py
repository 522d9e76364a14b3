"""Router core: vLLM-identical block hashing, the block index, scorers, the per-candidate gate,
baselines. Pure Python: no Ray, no engine (vLLM is imported only as the reference for hashes)."""

from __future__ import annotations

import random

import pytest

from router.contracts import Role
from router.hashing import BlockHasher, event_key, tenant_salt
from router.index import BlockIndex
from router.policy import (
    CacheAwarePolicy,
    ConsistentHashPolicy,
    Gate,
    PowerOfTwoPolicy,
    ReplicaView,
    RoundRobinPolicy,
    RoutingRequest,
    Weights,
    make_policy,
)


def _vllm_hashes(ids: list[int], block: int, salt: str | None, lora: tuple[str, str] | None) -> list[bytes]:
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as k

    k.init_none_hash(sha256)
    parent = None
    out = []
    for i, start in enumerate(range(0, len(ids) - block + 1, block)):
        keys: list = [("lora", lora[0], lora[1])] if lora else []
        if i == 0 and salt:
            keys.append(("cache_salt", salt))
        parent = k.hash_block_tokens(sha256, parent, ids[start : start + block], tuple(keys) or None)
        out.append(bytes(parent))
    return out


@pytest.mark.parametrize(
    ("n", "block", "salt", "lora"),
    [
        (0, 16, None, None),
        (15, 16, None, None),  # no full block: nothing hashed
        (16, 16, None, None),
        (300, 128, None, None),
        (300, 128, "tenant-a", None),
        (100, 16, None, ("adapter", "/loras/a")),
        (100, 16, "t", ("adapter", "/loras/a")),
    ],
)
def test_hashes_match_vllm(n: int, block: int, salt: str | None, lora: tuple[str, str] | None) -> None:
    ids = [random.Random(n).randrange(50_000) for _ in range(n)]
    ours = BlockHasher(block).digests(ids, cache_salt=salt, lora=lora)
    assert ours == _vllm_hashes(ids, block, salt, lora)
    assert len(ours) == n // block


def test_salt_changes_every_block_and_keys_are_64_bit() -> None:
    h = BlockHasher(4)
    ids = list(range(12))
    plain, a, b = h.keys(ids), h.keys(ids, cache_salt="a"), h.keys(ids, cache_salt="b")
    assert len(set(plain) | set(a) | set(b)) == 9  # no block shared across salts
    assert all(0 <= k < 2**64 for k in plain)
    d = h.digests(ids)[0]
    assert event_key(d) == plain[0] == event_key(int.from_bytes(d, "big"))
    assert tenant_salt("acme") != tenant_salt("acme", secret="s") != tenant_salt("other", secret="s")


def test_index_match_is_leading_blocks_per_replica() -> None:
    idx = BlockIndex(block_budget=100)
    idx.add("r1", [1, 2, 3, 4])
    idx.add("r2", [1, 2, 9])
    idx.add("r3", [2, 3])  # holds later blocks but not the first: no prefix hit
    assert idx.match([1, 2, 3, 4, 5]) == {"r1": 4, "r2": 2}
    assert idx.match([1, 2, 3], replicas=["r2", "r3"]) == {"r2": 2}
    assert idx.match([7]) == {} and idx.match([]) == {}


@pytest.mark.parametrize(
    ("ops", "expect_r1", "expect_len"),
    [
        ([("add", [1, 2, 3])], 3, 3),
        ([("add", [1, 2, 3]), ("remove", [2])], 1, 2),
        ([("add", [1, 2, 3]), ("clear", None)], 0, 0),
        ([("add", [1, 2, 3]), ("drop", None)], 0, 0),
        ([("add", [1, 2, 3, 4, 5])], 0, 3),  # budget 3: blocks 1, 2 evicted (LRU)
        ([("add", [1, 2, 3]), ("touch", [1]), ("add", [4])], 1, 3),  # 2 evicted, 1 was touched
    ],
)
def test_index_updates_and_lru_bound(ops: list, expect_r1: int, expect_len: int) -> None:
    idx = BlockIndex(block_budget=3)
    idx.add("r2", [1])
    for op, keys in ops:
        if op == "add":
            idx.add("r1", keys)
        elif op == "remove":
            idx.remove("r1", keys)
        elif op == "touch":
            idx.touch("r1", keys)
        elif op == "clear":
            idx.clear("r1")
        else:
            idx.drop_replica("r1")
    assert idx.match([1, 2, 3]).get("r1", 0) == expect_r1
    assert idx.blocks("r1") == expect_len
    assert idx.match([1]).get("r2") == 1  # other replicas untouched


def test_dropped_replica_is_purged() -> None:
    idx = BlockIndex(10)
    idx.add("r1", [1, 2])
    idx.drop_replica("r1")
    assert "r1" not in idx.replicas() and len(idx) == 0


W = Weights(prefix=2.0, load=1.0, kv=0.5, session=1.0)
G = Gate(ratio=1.5, slack=4.0)


def _policy(weights: Weights = W, gate: Gate = G, stale: float = 5.0) -> CacheAwarePolicy:
    return CacheAwarePolicy(BlockIndex(1000), weights, gate, stale, sessions=100, rng=random.Random(0))


def _views(**loads: int) -> list[ReplicaView]:
    return [ReplicaView(r, running=n, updated_at=100.0) for r, n in loads.items()]


def test_prefix_scorer_prefers_the_replica_holding_the_prefix() -> None:
    p = _policy()
    p.index.add("b", [1, 2, 3])
    d = p.route(RoutingRequest("x", [1, 2, 3, 4]), _views(a=1, b=1, c=1), now=100.0)
    assert d.chosen == "b" and d.matched_blocks == 3 and d.total_blocks == 4
    assert d.ranked[0] == ["b"] and sorted(sum(d.ranked, [])) == ["a", "b", "c"]


def test_load_scorer_breaks_even_prefix() -> None:
    p = _policy()
    d = p.route(RoutingRequest("x", [1]), _views(a=3, b=0, c=2), now=100.0)
    assert d.chosen == "b"


def test_kv_scorer() -> None:
    p = _policy(Weights(prefix=0, load=0, kv=1, session=0))
    views = [ReplicaView("a", kv_usage=0.9, updated_at=1), ReplicaView("b", kv_usage=0.1, updated_at=1)]
    assert p.route(RoutingRequest("x"), views, now=1.0).chosen == "b"


def test_session_affinity() -> None:
    p = _policy(Weights(prefix=0, load=0.1, kv=0, session=1))
    req = RoutingRequest("x", session_id="s1")
    p.on_sent(req, "c")
    assert p.route(RoutingRequest("y", session_id="s1"), _views(a=0, b=0, c=1), now=100.0).chosen == "c"
    assert p.route(RoutingRequest("z", session_id="s2"), _views(a=0, b=0, c=1), now=100.0).chosen != "c"


def test_gate_is_per_candidate_not_fleet_wide() -> None:
    p = _policy()
    p.index.add("hot", [1, 2, 3, 4])
    p.index.add("warm", [1, 2])
    views = _views(hot=40, warm=2, cold=1, idle=0)
    d = p.route(RoutingRequest("x", [1, 2, 3, 4]), views, now=100.0)
    # The hot replica loses its cache pull; the others keep theirs, so "warm" still wins on prefix.
    assert d.chosen == "warm" and d.matched_blocks == 2
    # Without the hot replica's overload the full match wins.
    d = p.route(RoutingRequest("x", [1, 2, 3, 4]), _views(hot=2, warm=2, cold=1, idle=0), now=100.0)
    assert d.chosen == "hot" and d.matched_blocks == 4


def test_stale_stats_fall_back_to_the_routers_own_in_flight_count() -> None:
    p = _policy(Weights(prefix=0, load=1, kv=0, session=0), stale=5.0)
    views = [ReplicaView("a", running=0, updated_at=0.0), ReplicaView("b", running=50, updated_at=0.0)]
    for _ in range(3):
        p.on_sent(RoutingRequest("q"), "a")  # the stale stats say a is idle; we know better
    assert p.route(RoutingRequest("x"), views, now=100.0).chosen == "b"
    assert p.route(RoutingRequest("x"), views, now=2.0).chosen == "a"  # fresh stats are trusted


def test_approximate_feed_records_sent_requests() -> None:
    p = _policy()
    p.on_sent(RoutingRequest("x", [5, 6]), "a")
    assert p.index.match([5, 6, 7]) == {"a": 2}
    p.drop_replica("a")
    assert p.index.match([5, 6]) == {}


def test_filters_role_health() -> None:
    p = _policy()
    views = [
        ReplicaView("pre", role=Role.PREFILL, updated_at=1),
        ReplicaView("sick", healthy=False, updated_at=1),
        ReplicaView("ok", updated_at=1),
    ]
    d = p.route(RoutingRequest("x"), views, now=1.0)
    assert sum(d.ranked, []) == ["ok"]
    assert p.route(RoutingRequest("x", role=Role.PREFILL), views, now=1.0).chosen == "pre"
    assert p.route(RoutingRequest("x", role="none"), views, now=1.0).ranked == []


def test_baselines() -> None:
    views = _views(a=5, b=0, c=9)
    rr = RoundRobinPolicy()
    assert [rr.route(RoutingRequest("x"), views, 0).chosen for _ in range(4)] == ["a", "b", "c", "a"]
    p2 = PowerOfTwoPolicy(random.Random(1))
    for _ in range(20):
        d = p2.route(RoutingRequest("x"), views, 0)
        assert d.chosen != "c"  # c is never the less loaded of a pair
    ch = ConsistentHashPolicy()
    first = ch.route(RoutingRequest("x", session_id="s"), views, 0).chosen
    assert all(ch.route(RoutingRequest("y", session_id="s"), views, 0).chosen == first for _ in range(5))
    # Removing another replica does not move the session (rendezvous hashing).
    others = [v for v in views if v.replica_id != first][:1] + [v for v in views if v.replica_id == first]
    assert ch.route(RoutingRequest("z", session_id="s"), others, 0).chosen == first


def test_make_policy_names_the_choices() -> None:
    kw = dict(index_budget=10, weights=W, gate=G, stale_after_s=1.0, sessions=1, rng=random.Random())
    assert isinstance(make_policy("cache_aware", **kw), CacheAwarePolicy)
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("best", **kw)


def test_fresh_stats_count_the_sends_made_since_the_report() -> None:
    p = _policy(Weights(prefix=0, load=1, kv=0, session=0))
    views = [ReplicaView("a", running=1, updated_at=10.0), ReplicaView("b", running=2, updated_at=10.0)]
    assert p.route(RoutingRequest("x"), views, now=11.0).chosen == "a"
    for _ in range(3):
        p.on_sent(RoutingRequest("x"), "a")  # a burst between two reports
    assert p.route(RoutingRequest("y"), views, now=11.5).chosen == "b"
    # Once a report newer than the sends arrives, it alone counts.
    fresh = [ReplicaView("a", running=1, updated_at=12.0), ReplicaView("b", running=2, updated_at=12.0)]
    assert p.route(RoutingRequest("z"), fresh, now=12.5).chosen == "a"


def test_approximate_feed_evicts_a_prefix_tail_first() -> None:
    p = CacheAwarePolicy(BlockIndex(3), W, G, 5.0, sessions=10, rng=random.Random(0))
    p.on_sent(RoutingRequest("x", [1, 2, 3]), "a")
    p.on_sent(RoutingRequest("y", [9]), "a")  # over budget: block 3 (the tail) goes, not block 1
    assert p.index.match([1, 2, 3]) == {"a": 2}


def test_tenant_salt_takes_the_deployment_secret_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import hmac

    from router.hashing import SALT_SECRET_ENV, salt_secret

    monkeypatch.delenv(SALT_SECRET_ENV, raising=False)
    public = tenant_salt("acme")
    assert public == hashlib.sha256(b"\x00acme").hexdigest()[:32]  # unchanged without a secret
    monkeypatch.setenv(SALT_SECRET_ENV, "s3cret")
    assert salt_secret() == "s3cret" and salt_secret({}) == ""
    secret = tenant_salt("acme")
    assert secret == hmac.new(b"s3cret", b"acme", hashlib.sha256).hexdigest()[:32]
    assert tenant_salt("acme", "s3cret") == secret
    assert secret != public and len(secret) == 32
    assert tenant_salt("acme", secret="") == public  # an explicit secret wins over the environment
    # The salt reaches the router's keys and the engine's cache_salt as one string: they still agree
    # with vLLM's own block hashes.
    ids = list(range(40))
    assert BlockHasher(16).digests(ids, cache_salt=secret) == _vllm_hashes(ids, 16, secret, None)
