"""P/D: the decider, the decode replica's prefix tracker, and decode-side orchestration over fakes.

The orchestration tests drive `DecodeServer` directly (no Ray cluster): a `FakeEngine` stands in for
the decode engine and a stub handle for the prefill deployment, so each failure path is exact.
The real path (vLLM + NIXL) is in tests/integration/test_pd.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from ray.exceptions import RayError

from router.contracts import RouteFeedback
from router.pd import PrefixTracker, decide
from serving.config import EngineKind, Role
from serving.replicas.deployments import DecodeServer, PrefillServer
from serving.replicas.engines.base import EngineError, GenerateRequest, KVHandle, SamplingOptions
from serving.replicas.engines.fake import FakeEngine

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .EngineServer.__del__. was never awaited")


@pytest.mark.parametrize(
    ("requested", "prompt", "cached", "mode", "reason"),
    [
        ("on", 10, 0, "disagg", "forced"),
        ("off", 5000, 0, "colocated", "forced"),
        ("auto", 1000, 0, "disagg", "suffix:1000>=256"),
        ("auto", 1000, 768, "colocated", "short_suffix:232<256"),
        ("auto", 100, 0, "colocated", "short_suffix:100<256"),
        ("auto", 256, 0, "disagg", "suffix:256>=256"),
        ("auto", 300, 400, "colocated", "short_suffix:0<256"),
    ],
)
def test_decide(requested: str, prompt: int, cached: int, mode: str, reason: str) -> None:
    d = decide(requested, prompt, cached, 256)
    assert (d.mode, d.reason) == (mode, reason)


def test_decide_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="disagg"):
        decide("sometimes", 1, 0, 1)


def test_prefix_tracker_counts_whole_shared_blocks_and_is_bounded() -> None:
    t = PrefixTracker(block_size=4, capacity_blocks=3)
    t.record(list(range(10)))  # two full blocks
    assert len(t) == 2
    assert t.cached_tokens(list(range(12))) == 8
    assert t.cached_tokens([0, 1, 2, 3, 99, 5, 6, 7]) == 4  # chained: block 2 differs
    assert t.cached_tokens([9, 1, 2, 3]) == 0
    t.record([50 + i for i in range(8)])  # two more blocks: the least recently used one goes
    assert len(t) == 3
    # block 0 was looked up last, so block 1 was evicted: only the first block still matches
    assert t.cached_tokens(list(range(8))) == 4


def test_prefix_tracker_never_matches_across_salts() -> None:
    t = PrefixTracker(block_size=4, capacity_blocks=100)
    t.record(list(range(8)), salt="tenant-a")
    assert t.cached_tokens(list(range(12)), salt="tenant-a") == 8
    assert t.cached_tokens(list(range(12)), salt="tenant-b") == 0
    assert t.cached_tokens(list(range(12))) == 0  # unsalted is a namespace of its own


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.calls = 0

    def remote(self, req: GenerateRequest) -> Any:
        self.calls += 1
        return self._fn(req, self.calls)


class _PrefillHandle:
    """Stands in for the prefill deployment's handle: `prefill.remote(req)` is awaitable."""

    def __init__(self, fn: Any) -> None:
        self.prefill = _Method(fn)


class _Died(RayError):
    pass


async def _server(prefill: Any, engine_kw: dict | None = None, **disagg: Any) -> DecodeServer:
    d = {"min_prefill_tokens": 8, "prefill_timeout_s": 0.3, "kv_transfer_timeout_s": 0.3, **disagg}
    server = DecodeServer.__new__(DecodeServer)
    await server.__init__(
        "m", "fake", EngineKind.FAKE, {"block_size": 4, **(engine_kw or {})}, "decode", Role.DECODE,
        prefill=_PrefillHandle(prefill), disaggregation=d,
    )  # fmt: skip
    return server


def _req(n: int = 32, disagg: str = "auto", rid: str = "r1") -> GenerateRequest:
    return GenerateRequest(rid, list(range(1, n + 1)), SamplingOptions(max_tokens=5), disagg=disagg)


async def _run(server: DecodeServer, req: GenerateRequest) -> tuple[list, list[int]]:
    chunks = [c async for c in server.generate(req)]
    return chunks, [t for c in chunks for t in c.token_ids]


async def _ok(req: GenerateRequest, calls: int) -> KVHandle:
    n = len(req.prompt_token_ids)
    return KVHandle(params={"p": req.request_id}, prompt_tokens=n, cached_tokens=16, replica="pre#1")


async def test_long_prompt_is_disaggregated_and_route_names_both_replicas() -> None:
    server = await _server(_ok)
    chunks, tokens = await _run(server, _req(32))
    assert chunks[0].route.mode == "disagg" and chunks[0].route.prefill == "pre#1"
    assert chunks[0].route.header().startswith("mode=disagg; prefill=pre#1; decode=local")
    assert all(c.route is None for c in chunks[1:])
    assert tokens == [33, 34, 35, 36, 37] and chunks[-1].finish_reason == "length"
    assert chunks[-1].cached_tokens == 16  # the prefill engine's cache hits reach the usage
    assert server._engine.decoded == ["r1-d"]  # decoded with the KV handle, not re-prefilled


async def test_cached_prefix_makes_the_next_turn_colocated() -> None:
    server = await _server(_ok)
    await _run(server, _req(32, rid="t1"))
    chunks, _ = await _run(server, _req(36, rid="t2"))  # 32 cached + 4 new < 8
    assert chunks[0].route.mode == "colocated" and chunks[0].route.reason.startswith("short_suffix")
    assert server._prefill.prefill.calls == 1


async def test_the_routers_block_match_is_the_cached_prefix_when_it_sends_one() -> None:
    server = await _server(_ok, {"block_size": 16})
    keys = [101, 102, 103, 104]  # the ingress's keys of a 64-token prompt (16-token blocks)

    async def route(rid: str, matched: int | None) -> Any:
        feedback = {"local": RouteFeedback(matched, 0.5)}
        req = dataclasses.replace(_req(64, rid=rid), block_keys=keys, routing=feedback)
        chunks, _ = await _run(server, req)
        return chunks[0].route

    # The tracker knows nothing, but the router's index says every block is here: colocated.
    r = await route("t1", 4)
    assert (r.mode, r.reason, r.matched_blocks) == ("colocated", "short_suffix:0<8", 4)
    # The tracker now holds the 4 blocks, but the router says they were evicted: disaggregated.
    assert (await route("t2", 0)).mode == "disagg"
    # A policy without a block index sends no match: the tracker decides (all 4 blocks held).
    r = await route("t3", None)
    assert (r.mode, r.reason) == ("colocated", "short_suffix:0<8")


async def test_header_overrides_the_decider() -> None:
    server = await _server(_ok)
    chunks, _ = await _run(server, _req(4, disagg="on"))
    assert chunks[0].route.mode == "disagg"
    chunks, _ = await _run(server, _req(64, disagg="off", rid="r2"))
    assert chunks[0].route.mode == "colocated" and server._prefill.prefill.calls == 1


async def test_dead_prefill_replica_is_retried_then_served() -> None:
    async def flaky(req: GenerateRequest, calls: int) -> KVHandle:
        if calls == 1:
            raise _Died("actor died")
        return await _ok(req, calls)

    server = await _server(flaky)
    chunks, tokens = await _run(server, _req())
    assert server._prefill.prefill.calls == 2
    assert chunks[0].route.mode == "disagg" and len(tokens) == 5


async def test_prefill_timeouts_fall_back_to_colocated_in_bounded_time() -> None:
    async def hang(req: GenerateRequest, calls: int) -> KVHandle:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    server = await _server(hang, prefill_attempts=2)
    t0 = time.perf_counter()
    chunks, tokens = await _run(server, _req())
    assert time.perf_counter() - t0 < 2.0
    assert chunks[0].route.mode == "colocated" and chunks[0].route.reason == "fallback:prefill_timeout"
    assert tokens == [33, 34, 35, 36, 37]


class _Response:
    """A Ray Serve `DeploymentResponse` of a call running on a prefill replica: awaiting it and
    giving up (`wait_for`'s timeout) leaves the call running; `cancel()` cancels it at the replica
    (ray.cancel of an async actor task: CancelledError inside the replica's coroutine)."""

    def __init__(self, call: Any) -> None:
        self._task = asyncio.ensure_future(call)
        self.cancel_calls = 0

    def __await__(self) -> Any:
        return asyncio.shield(self._task).__await__()

    def cancel(self) -> None:
        self.cancel_calls += 1
        self._task.cancel()


async def test_a_timed_out_prefill_is_cancelled_at_its_replica_before_the_retry() -> None:
    slow = PrefillServer.__new__(PrefillServer)
    await slow.__init__("m", "fake", EngineKind.FAKE, {"prefill_delay_s": 30.0}, "prefill", Role.PREFILL)
    fast = PrefillServer.__new__(PrefillServer)
    await fast.__init__("m", "fake", EngineKind.FAKE, {"block_size": 4}, "prefill", Role.PREFILL)
    responses: list[_Response] = []
    cancelled_before: list[list[int]] = []

    def call(req: GenerateRequest, calls: int) -> _Response:
        cancelled_before.append([r.cancel_calls for r in responses])
        responses.append(_Response((slow if calls == 1 else fast).prefill(req)))
        return responses[-1]

    server = await _server(call, prefill_timeout_s=0.2, prefill_attempts=2)
    chunks, tokens = await _run(server, _req())
    await asyncio.sleep(0.05)  # the replica's abort runs once its task sees the cancellation
    assert chunks[0].route.mode == "disagg" and len(tokens) == 5  # the retry served it
    assert cancelled_before == [[], [1]]  # attempt 1 was cancelled before attempt 2 was sent
    assert slow._engine.aborted == ["r1-p0"]  # ... and its prefill aborted at the engine
    assert responses[0]._task.cancelled()


async def test_a_client_gone_during_the_prefill_cancels_it_at_its_replica() -> None:
    slow = PrefillServer.__new__(PrefillServer)
    await slow.__init__("m", "fake", EngineKind.FAKE, {"prefill_delay_s": 30.0}, "prefill", Role.PREFILL)
    responses: list[_Response] = []

    def call(req: GenerateRequest, calls: int) -> _Response:
        responses.append(_Response(slow.prefill(req)))
        return responses[-1]

    server = await _server(call, prefill_timeout_s=10.0)
    task = asyncio.ensure_future(anext(server.generate(_req())))
    await asyncio.sleep(0.1)  # the decode replica is now waiting for the prefill
    assert slow._engine.prefilled == ["r1-p0"] and not task.done()
    task.cancel()  # Ray Serve cancels the streaming call when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert responses[0].cancel_calls == 1 and slow._engine.aborted == ["r1-p0"]


async def test_prefill_4xx_is_the_clients_error_not_retried() -> None:
    async def bad(req: GenerateRequest, calls: int) -> KVHandle:
        return KVHandle(error=EngineError("prompt too long", 400, "invalid_request_error"))

    server = await _server(bad)
    chunks, _ = await _run(server, _req())
    assert len(chunks) == 1 and chunks[0].error.status == 400
    assert server._prefill.prefill.calls == 1


async def test_slow_kv_transfer_aborts_the_pull_and_prefills_locally() -> None:
    server = await _server(_ok, {"kv_delay_s": 5.0})
    t0 = time.perf_counter()
    chunks, tokens = await _run(server, _req())
    assert time.perf_counter() - t0 < 2.0
    assert chunks[0].route.mode == "colocated"
    assert chunks[0].route.reason == "fallback:kv_transfer_timeout" and chunks[0].route.prefill == ""
    assert "r1-d" in server._engine.aborted  # the pull's blocks are released
    assert tokens == [33, 34, 35, 36, 37]
    assert server._engine.stats().running == 0


async def test_another_tenants_prompt_is_not_this_tenants_cached_prefix() -> None:
    # Block size 8 < 16: the ingress's keys are not the engine's, so the replica's own tracker decides.
    server = await _server(_ok, {"block_size": 8})
    assert not server._keyed
    prompt = _req(32).prompt_token_ids

    async def turn(rid: str, salt: str, ids: list[int]) -> Any:
        req = dataclasses.replace(_req(rid=rid), prompt_token_ids=ids, cache_salt=salt)
        chunks, _ = await _run(server, req)
        return chunks[0].route

    await turn("a1", "salt-a", prompt)
    b = await turn("b1", "salt-b", prompt + [900, 901, 902, 903])  # A's prompt + a short suffix
    assert b.mode == "disagg" and b.reason == "suffix:36>=8"  # not "short_suffix:4<8" (A's prefix)
    a = await turn("a2", "salt-a", prompt + [900, 901, 902, 903])
    assert a.mode == "colocated" and a.reason.startswith("short_suffix")  # A's own prefix still counts


async def test_fake_engine_is_the_engine_used() -> None:
    server = await _server(_ok)
    assert isinstance(server._engine, FakeEngine)


async def test_sglang_decode_always_pulls_from_a_prefill_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.replicas.engines.sglang_engine import SGLangEngine
    from tests.unit.fake_sglang import FakeBootstrapRegistry, fake_engine_cls, install_as_sglang

    cls = fake_engine_cls(FakeBootstrapRegistry())
    install_as_sglang(monkeypatch, cls)
    pre = SGLangEngine("m", "/m", {}, role="prefill", host_ip=lambda: "127.0.0.1")
    await pre.start()

    async def via_prefill_engine(req: GenerateRequest, calls: int) -> KVHandle:
        kv = await pre.prefill(req)
        kv.replica = "pre#sgl"
        return kv

    server = DecodeServer.__new__(DecodeServer)
    await server.__init__(
        "m", "/m", EngineKind.SGLANG, {}, "decode", Role.DECODE,
        prefill=_PrefillHandle(via_prefill_engine), disaggregation={"min_prefill_tokens": 1000},
    )  # fmt: skip
    try:
        # A short prompt, even with x-tandem-disagg: off, still needs the prefill engine.
        chunks, tokens = await _run(server, _req(8, disagg="off"))
        assert chunks[0].route.mode == "disagg" and chunks[0].route.reason == "engine_needs_remote_prefill"
        assert chunks[0].route.prefill == "pre#sgl" and len(tokens) == 5
    finally:
        await server._engine.shutdown()
        await pre.shutdown()


async def test_sglang_decode_without_prefill_is_a_clean_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.fake_sglang import FakeBootstrapRegistry, fake_engine_cls, install_as_sglang

    install_as_sglang(monkeypatch, fake_engine_cls(FakeBootstrapRegistry()))

    async def dead(req: GenerateRequest, calls: int) -> KVHandle:
        raise _Died("prefill replica died")

    server = DecodeServer.__new__(DecodeServer)
    await server.__init__(
        "m", "/m", EngineKind.SGLANG, {}, "decode", Role.DECODE,
        prefill=_PrefillHandle(dead), disaggregation={"prefill_attempts": 2},
    )  # fmt: skip
    try:
        chunks, _ = await _run(server, _req(8))
        assert len(chunks) == 1 and chunks[0].error.status == 503
        assert "prefill_replica_died" in chunks[0].error.message
        assert server._prefill.prefill.calls == 2
    finally:
        await server._engine.shutdown()
