"""The request path through the gateway over HTTP (serving.http.api + serving.http.gateway): API keys and
tenants, 429s with Retry-After, tier choice, degradation along the chain, target health with
recovery probes, and resources given back when a streaming client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from router.resilience import HealthState
from serving.backends import EngineBackend
from serving.config import parse_spec
from serving.http.api import build_api
from serving.http.auth import hash_key
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.pipeline import ServedModel
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_api import WordTokenizer

#: Prompt tokens of `chat()`'s default message with WordTokenizer.
PROMPT = 6


class CountingBackend:
    """A FakeEngine behind EngineBackend that counts calls and probes."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.inner = EngineBackend(engine)
        self.calls = 0
        self.probes = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        async for chunk in self.inner.stream(request):
            yield chunk

    async def probe(self) -> None:
        self.probes += 1
        await self.inner.probe()


class FlakyBackend(CountingBackend):
    """Fails every request with an error chunk (and every probe) while `fail` is set."""

    def __init__(
        self,
        status: int = 503,
        type_: str = "engine_unavailable",
        fail: bool = True,
        token_delay_s: float = 0.0,
    ) -> None:
        super().__init__(FakeEngine("flaky", max_model_len=256, token_delay_s=token_delay_s))
        self.fail = fail
        self.status = status
        self.type = type_

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.fail:
            self.calls += 1
            yield Chunk(error=EngineError("down", self.status, self.type))
            return
        async for chunk in super().stream(request):
            yield chunk

    async def probe(self) -> None:
        self.probes += 1
        if self.fail:
            raise ConnectionError("still down")


class HangingBackend(CountingBackend):
    """Never yields a first token; records that its stream was cancelled and closed."""

    def __init__(self) -> None:
        super().__init__(FakeEngine("hang", max_model_len=256))
        self.closed = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        try:
            await asyncio.Event().wait()
            yield Chunk()  # pragma: no cover - never reached
        finally:
            self.closed += 1


class EmptyBackend(CountingBackend):
    """Ends every stream without a chunk."""

    def __init__(self) -> None:
        super().__init__(FakeEngine("empty", max_model_len=256))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        return
        yield  # pragma: no cover - makes this an async generator


def _model(name: str) -> dict:
    return {"name": name, "source": "fake", "pools": [{"engine": "fake"}]}


BASE: dict = {
    "models": [_model("small"), _model("big")],
    "tiers": [
        {"name": "intent", "model": "small"},
        {"name": "reasoning", "model": "big", "fallback": ["intent"]},
    ],
    "auth": {"enabled": False},
    "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Stack:
    def __init__(
        self, client: httpx.AsyncClient, gateway: Gateway, metrics: IngressMetrics, app: Any
    ) -> None:
        self.client, self.gateway, self.metrics, self.app = client, gateway, metrics, app

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def stack(
    backends: dict[str, Any] | None = None,
    max_len: dict[str, int] | None = None,
    root_path: str = "",
    tokenizers: dict[str, Any] | None = None,
    **spec_overrides: Any,
) -> AsyncIterator[Stack]:
    """The API over `backends` (default: FakeEngines) with a gateway built from BASE + overrides
    (`tokenizers`: per model, default WordTokenizer)."""
    spec = parse_spec(_merge(BASE, spec_overrides))
    backends = dict(backends or {})
    for m in spec.models:
        if m.name not in backends:
            engine = FakeEngine(m.name, max_model_len=256)
            await engine.start()
            backends[m.name] = CountingBackend(engine)
    max_len = max_len or {}
    toks = tokenizers or {}
    models = {
        name: ServedModel(name, max_len.get(name, 256), toks.get(name) or WordTokenizer(), b)
        for name, b in backends.items()
    }
    metrics = IngressMetrics()
    gateway = Gateway.from_spec(spec, metrics)
    app = build_api(models, metrics, gateway, http=spec.http)  # registers each backend's probe
    try:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield Stack(c, gateway, metrics, app)
    finally:
        await gateway.close()


def chat(**kw: Any) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}
    body.update(kw)
    return body


def route(r: httpx.Response) -> dict[str, str]:
    return dict(part.split("=", 1) for part in r.headers["x-tandem-route"].split("; "))


async def wait_until(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


# -- auth ------------------------------------------------------------------------------------------

GOOD_KEY = "tdm-good-key"


async def test_auth_requires_a_valid_key_on_v1_only() -> None:
    auth = {"enabled": True, "keys": [{"tenant": "acme", "sha256": hash_key(GOOD_KEY)}]}
    async with stack(auth=auth) as s:
        c = s.client
        r = await c.post("/v1/chat/completions", json=chat(model="small"))
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert "missing API key" in err["message"]

        r = await c.post(
            "/v1/chat/completions", json=chat(model="small"), headers={"authorization": "Bearer wrong"}
        )
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
        r = await c.post(
            "/v1/chat/completions", json=chat(model="small"), headers={"authorization": f"Basic {GOOD_KEY}"}
        )
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        r = await c.get("/v1/models")
        assert r.status_code == 401
        # 401 comes before the body is looked at.
        r = await c.post("/v1/chat/completions", content=b"{bad")
        assert r.status_code == 401
        assert s.gateway.admission.snapshot()["buckets"] == {}  # nothing reached admission

        ok = {"authorization": f"Bearer {GOOD_KEY}", "x-tandem-tenant": "someone-else"}
        r = await c.post("/v1/chat/completions", json=chat(model="small"), headers=ok)
        assert r.status_code == 200, r.text
        # The tenant comes from the key; the header is ignored with auth on.
        assert set(s.gateway.admission.snapshot()["buckets"]) == {"acme"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200

        assert (await c.get("/health")).status_code == 200
        # /metrics needs a key with the metrics scope (tests/unit/test_edge_security.py).
        r = await c.get("/metrics", headers=ok)
        assert r.status_code == 401
        assert s.sample("tandem_auth_failures_total", reason="scope") == 1
        assert s.sample("tandem_auth_failures_total", reason="missing") == 3
        assert s.sample("tandem_auth_failures_total", reason="invalid") == 1
        assert s.sample("tandem_auth_failures_total", reason="malformed") == 1


async def test_auth_under_a_route_prefix() -> None:
    """Ray Serve mounts an app with route_prefix "/rt" as root_path "/rt", with "/rt" kept in path."""
    auth = {"enabled": True, "keys": [{"tenant": "acme", "sha256": hash_key(GOOD_KEY)}]}
    async with stack(auth=auth, root_path="/rt") as s:
        r = await s.client.post("/rt/v1/chat/completions", json=chat(model="small"))
        assert r.status_code == 401
        ok = {"authorization": f"Bearer {GOOD_KEY}"}
        r = await s.client.post("/rt/v1/chat/completions", json=chat(model="small"), headers=ok)
        assert r.status_code == 200, r.text
        assert set(s.gateway.admission.snapshot()["buckets"]) == {"acme"}
        assert (await s.client.get("/rt/health")).status_code == 200


async def test_auth_disabled_tenant_header_picks_the_tenant() -> None:
    async with stack() as s:
        r = await s.client.post(
            "/v1/chat/completions", json=chat(model="small"), headers={"x-tandem-tenant": "team-a"}
        )
        assert r.status_code == 200
        await s.client.post("/v1/chat/completions", json=chat(model="small"))
        assert set(s.gateway.admission.snapshot()["buckets"]) == {"team-a", "default"}


# -- admission -------------------------------------------------------------------------------------


async def test_tenant_over_its_bucket_gets_429_while_others_are_served() -> None:
    admission = {"tenants": [{"name": "tiny", "tokens_per_s": 1, "burst_tokens": 25}]}
    async with stack(admission=admission) as s:
        tiny = {"x-tandem-tenant": "tiny"}
        for _ in range(2):  # 6 prompt + 4 reserved = 10 tokens each
            r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=tiny)
            assert r.status_code == 200, r.text
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=tiny)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "tenant_rate_limited" and err["type"] == "rate_limit_error"
        # 5 tokens left, 10 needed, 1 token/s: about 5 s.
        assert int(r.headers["retry-after"]) in (4, 5)
        r = await s.client.post(
            "/v1/chat/completions", json=chat(model="small"), headers={"x-tandem-tenant": "big"}
        )
        assert r.status_code == 200
        text = (await s.client.get("/metrics")).text
        lines = [ln for ln in text.splitlines() if ln.startswith("tandem_admission_rejections_total{")]
        assert lines == ['tandem_admission_rejections_total{model="small",reason="tenant_rate_limited"} 1.0']
        assert s.sample("tandem_admission_bucket_tokens", tenant="tiny") == pytest.approx(5, abs=0.5)


async def test_max_tokens_beyond_the_bucket_is_a_400_on_max_tokens() -> None:
    admission = {"default_tenant": {"burst_tokens": 50}}
    async with stack(admission=admission) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small", max_tokens=100))
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and err["param"] == "max_tokens"
        assert "retry-after" not in r.headers


async def test_bad_priority_header_is_a_400_naming_it() -> None:
    async with stack() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-priority": "urgent"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "x-tandem-priority" and "urgent" in err["message"]
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-priority": "Batch"})
        assert r.status_code == 200


# -- tiers -----------------------------------------------------------------------------------------


async def test_auto_with_task_header_goes_to_that_tier() -> None:
    async with stack() as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "Reasoning"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "big"
        assert route(r) == {"tier": "reasoning", "model": "big", "how": "task"}
        r = await s.client.post("/v1/chat/completions", json=chat())
        assert r.json()["model"] == "small" and route(r)["how"] == "default"
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "poems"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-tandem-task"
        r = await s.client.post("/v1/chat/completions", json=chat(model="gpt-9"))
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert (
            s.sample(
                "tandem_tier_requests_total", tier="reasoning", model="big", how="task", degraded="false"
            )
            == 1
        )


async def test_auto_by_rule() -> None:
    routing = {"rules": [{"tier": "reasoning", "when": {"reasoning_effort": ["high"]}}]}
    async with stack(routing=routing) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(reasoning_effort="high"))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "big" and route(r)["how"] == "rule:0" and route(r)["tier"] == "reasoning"
        r = await s.client.post("/v1/chat/completions", json=chat(reasoning_effort="low"))
        assert r.json()["model"] == "small" and route(r) == {
            "tier": "intent",
            "model": "small",
            "how": "default",
        }
        r = await s.client.post("/v1/completions", json={"model": "auto", "prompt": "a b c", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "small"


# -- degradation and health ------------------------------------------------------------------------


async def test_client_error_from_a_backend_is_returned_as_is_and_not_retried() -> None:
    big = FlakyBackend(status=400, type_="invalid_request_error")
    async with stack({"big": big}) as s:
        small: CountingBackend = s.app.state.api.models["small"].backend
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "down"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert big.calls == 1 and small.calls == 0
        assert s.gateway.health("big").state is HealthState.HEALTHY
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="client") == 1
        assert s.sample("tandem_retries_total", model="big", error_class="client") is None
        # The reservation was given back in full.
        snap = s.gateway.admission.snapshot()
        assert snap["tenant_in_flight"] == {}
        assert snap["buckets"]["default"] == pytest.approx(100_000, abs=1)


async def test_engine_429_is_retried_on_the_same_target_then_returned() -> None:
    big = FlakyBackend(status=429, type_="engine_overloaded")
    async with stack({"big": big}, resilience={"max_attempts": 3}) as s:
        small: CountingBackend = s.app.state.api.models["small"].backend
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "engine_overloaded"
        assert r.headers["retry-after"] == "1"
        assert big.calls == 3 and small.calls == 0  # overload is not a reason to degrade
        assert s.gateway.health("big").state is HealthState.HEALTHY  # nor a failure of the target
        assert s.sample("tandem_retries_total", model="big", error_class="rate_limited") == 2
        assert s.gateway.admission.snapshot()["tenant_in_flight"] == {}


async def test_every_target_failing_is_a_503_pool_down() -> None:
    big, small = FlakyBackend(), FlakyBackend()
    resilience = {"terminal_after": 1, "probe_interval_s": 2.5}
    async with stack({"big": big, "small": small}, resilience=resilience) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "pool_down" and err["type"] == "service_unavailable_error"
        assert "big: 503 engine_unavailable" in err["message"] and "small: 503" in err["message"]
        assert r.headers["retry-after"] == "3"  # probe_interval_s rounded up
        assert big.calls == 1 and small.calls == 1
        # Both terminal now: the next one fails fast without calling either.
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 503 and "terminal" in r.json()["error"]["message"]
        assert big.calls == 1 and small.calls == 1
        assert s.sample("tandem_admission_rejections_total", reason="pool_down", model="big") == 2
        assert s.gateway.admission.snapshot()["tenant_in_flight"] == {}


async def test_first_token_timeout_counts_as_a_failure() -> None:
    big = HangingBackend()
    resilience = {"first_token_timeout_s": 0.2, "terminal_after": 1}
    async with stack({"big": big}, resilience=resilience) as s:
        t0 = time.perf_counter()
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "small"
        assert route(r)["degraded_reason"] == "timeout after 0.2s"
        assert 0.2 <= elapsed < 2.0
        assert big.calls == 1 and big.closed == 1  # the hung attempt was cancelled
        assert s.gateway.health("big").state is HealthState.TERMINAL
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="timeout") == 1


async def test_stream_ending_without_a_chunk_is_a_server_failure() -> None:
    big = EmptyBackend()
    async with stack({"big": big}, resilience={"terminal_after": 1}) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert route(r)["degraded_reason"] == "502 empty"
        assert big.calls == 1
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="server") == 1


async def test_tier_first_token_timeout_overrides_the_default() -> None:
    big = HangingBackend()
    tiers = [
        {"name": "intent", "model": "small"},
        {"name": "reasoning", "model": "big", "fallback": ["intent"], "first_token_timeout_s": 0.1},
    ]
    resilience = {"first_token_timeout_s": 30, "terminal_after": 1}
    async with stack({"big": big}, tiers=tiers, resilience=resilience) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 200 and route(r)["degraded_reason"] == "timeout after 0.1s"


async def test_fallback_with_too_small_a_context_is_skipped() -> None:
    big = FlakyBackend()
    resilience = {"terminal_after": 1}
    async with stack({"big": big}, max_len={"small": 8}, resilience=resilience) as s:
        small: CountingBackend = s.app.state.api.models["small"].backend
        # 6 prompt + 4 output tokens do not fit small's 8.
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "pool_down"
        assert "context window 8" in r.json()["error"]["message"]
        assert small.calls == 0
        # 6 + 2 does.
        r = await s.client.post(
            "/v1/chat/completions", json=chat(max_tokens=2), headers={"x-tandem-task": "reasoning"}
        )
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert small.calls == 1


async def test_probe_brings_a_recovered_target_back() -> None:
    # Once healthy, its first token takes a moment: a stale "went down" signal would cut it off.
    big = FlakyBackend(token_delay_s=0.05)
    resilience = {"terminal_after": 1, "probe_interval_s": 0.1, "probe_timeout_s": 1}
    async with stack({"big": big}, resilience=resilience) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.json()["model"] == "small"
        health = s.gateway.health("big")
        assert health.state is HealthState.TERMINAL
        # While it is down, probes fail and it stays terminal.
        assert await wait_until(lambda: big.probes >= 1)
        assert health.state is HealthState.TERMINAL
        big.fail = False
        assert await wait_until(lambda: health.state is HealthState.HEALTHY)
        assert s.sample("tandem_health_probes_total", model="big", result="ok") == 1
        assert s.sample("tandem_health_probes_total", model="big", result="failed") >= 1
        assert s.sample("tandem_target_health", model="big") == 0
        calls = big.calls
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 200 and r.json()["model"] == "big"
        assert "degraded_from" not in route(r)
        assert big.calls == calls + 1


async def test_waiting_attempt_moves_down_the_chain_when_the_pool_goes_down() -> None:
    big = HangingBackend()
    async with stack({"big": big}, resilience={"first_token_timeout_s": 30}) as s:
        req = asyncio.create_task(
            s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        )
        assert await wait_until(lambda: big.calls == 1)
        assert not req.done()
        s.gateway.pool_status("small", 2)  # replicas running: nothing changes
        assert s.gateway.health("small").state is HealthState.HEALTHY
        t0 = time.perf_counter()
        s.gateway.pool_status("big", 0)  # its last replica is gone
        r = await asyncio.wait_for(req, 2.0)
        assert time.perf_counter() - t0 < 1.0
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert route(r)["degraded_from"] == "reasoning"
        assert route(r)["degraded_reason"] == "503 pool_down"
        assert big.calls == 1 and big.closed == 1
        health = s.gateway.health("big")
        assert health.state is HealthState.TERMINAL and health.reason == "no running replica"
        assert s.gateway.terminal_event("big").is_set()
        # A request arriving now skips it without an attempt.
        r = await s.client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-task": "reasoning"})
        assert r.json()["model"] == "small" and big.calls == 1


# -- a streaming client that leaves early ----------------------------------------------------------


async def test_stream_abandoned_by_the_client_gives_back_tokens_and_fanout_slot() -> None:
    import socket

    import uvicorn

    slow = FakeEngine("small", max_model_len=512, token_delay_s=0.02)
    admission = {"default_tenant": {"tokens_per_s": 0.001, "burst_tokens": 10_000, "fanout_width": 2}}
    async with stack({"small": CountingBackend(slow)}, max_len={"small": 512}, admission=admission) as s:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(s.app, host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
            ctl = s.gateway.admission
            body = chat(model="small", stream=True, max_tokens=400)
            headers = {"x-tandem-task-id": "job-1"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status_code == 200
                    seen = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            json.loads(line[6:])
                            seen += 1
                        if seen == 3:
                            snap = ctl.snapshot()
                            assert snap["tenant_in_flight"] == {"default": 1}
                            assert snap["fanout_in_use"] == {"default": 1}
                            assert snap["pools"]["small"]["in_use"] == 1
                            assert snap["buckets"]["default"] <= 10_000 - (PROMPT + 400) + 1
                            break
            assert await wait_until(lambda: ctl.snapshot()["tenant_in_flight"] == {})
            snap = ctl.snapshot()
            assert sum(snap["fanout_in_use"].values()) == 0 and snap["fanout_tasks"] == 0
            assert snap["pools"]["small"] == {"in_use": 0, "queued": 0}
            # Only what was really used stays spent: the prompt and the tokens generated so far.
            spent = 10_000 - snap["buckets"]["default"]
            assert PROMPT + 3 - 0.01 <= spent <= PROMPT + 200  # not the 400 reserved
            assert await wait_until(lambda: slow.stats().running == 0)
            assert s.sample("tandem_client_disconnects_total", model="small") == 1
        finally:
            server.should_exit = True
            await task


def test_pool_status_ignores_a_pool_that_may_scale_to_zero() -> None:
    def model(name: str, lo: int) -> dict:
        return {"name": name, "source": "x", "pools": [{"engine": "fake", "replicas": {"min": lo, "max": 2}}]}

    spec = parse_spec({"models": [model("zero", 0), model("one", 1)], "auth": {"enabled": False}})
    g = Gateway.from_spec(spec, IngressMetrics())
    g.pool_status("zero", 0)  # Serve starts a replica for the next request: not down
    g.pool_status("one", 0)
    g.pool_status("one", 0)
    assert g.health("zero").usable and g.health("zero").state.value == "healthy"
    assert not g.health("one").usable and g.health("one").reason == "no running replica"


async def test_a_probe_registered_after_the_target_went_terminal_is_used() -> None:
    # An external server down while the ingress starts: its pool reports 0 endpoints (terminal) before
    # build_api registers the pool's probe. The probe loop must pick the probe up, or never recover.
    spec = parse_spec(_merge(BASE, {"resilience": {"probe_interval_s": 0.02, "probe_timeout_s": 1}}))
    gateway = Gateway.from_spec(spec, IngressMetrics())
    try:
        gateway.pool_status("big", 0)
        assert gateway.health("big").state is HealthState.TERMINAL
        calls: list[int] = []

        async def probe() -> None:
            calls.append(1)

        await asyncio.sleep(0.05)  # a few probe rounds with no probe registered: still terminal
        assert gateway.health("big").state is HealthState.TERMINAL
        gateway.register_probe("big", probe)
        assert await wait_until(lambda: gateway.health("big").usable)
        assert calls
    finally:
        await gateway.close()


async def test_a_failing_target_goes_terminal_after_terminal_after_distinct_failed_requests() -> None:
    # A 503 (a server error, not a 500 engine_error): retried on the target, then degraded to the
    # fallback. Strikes count distinct requests (router.resilience NOTE(strikes)): the 3 attempts of
    # one request are one strike, so the second failing request, not the second attempt, makes it
    # terminal (terminal_after 2).
    big = FlakyBackend()
    resilience = {"max_attempts": 3, "terminal_after": 2}
    async with stack({"big": big}, resilience=resilience) as s:
        small: CountingBackend = s.app.state.api.models["small"].backend
        task = {"x-tandem-task": "reasoning"}

        r = await s.client.post("/v1/chat/completions", json=chat(), headers=task)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "small"
        assert route(r)["degraded_from"] == "reasoning"
        assert route(r)["degraded_reason"] == "503 engine_unavailable"
        assert big.calls == 3 and small.calls == 1  # every attempt on the target, then the fallback
        assert s.gateway.health("big").state is HealthState.STICKY_RETRY  # one request: one strike
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="server") == 3
        assert s.sample("tandem_retries_total", model="big", error_class="server") == 2

        r = await s.client.post("/v1/chat/completions", json=chat(), headers=task)
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert route(r)["degraded_reason"] == "503 engine_unavailable"
        assert s.gateway.health("big").state is HealthState.TERMINAL  # the second distinct request
        assert big.calls == 4 and small.calls == 2  # terminal at its first failure: no retry there
        assert s.sample("tandem_health_transitions_total", model="big", state="sticky_retry") == 1
        assert s.sample("tandem_health_transitions_total", model="big", state="terminal") == 1
        assert s.sample("tandem_target_health", model="big") == 2

        # Terminal: skipped at once, down the chain to the fallback.
        r = await s.client.post("/v1/chat/completions", json=chat(), headers=task)
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert route(r)["degraded_reason"].startswith("terminal")
        assert big.calls == 4 and small.calls == 3
        assert s.gateway.admission.snapshot()["tenant_in_flight"] == {}


# -- prompt size before tokenizing -----------------------------------------------------------------


class CountingTokenizer:
    """Counts the tokenizer calls (`calls`) it passes on to `inner`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)

    def encode_chat(self, messages: list) -> list[int]:
        self.calls += 1
        return self.inner.encode_chat(messages)

    def __getattr__(self, name: str) -> Any:  # vocab_size, decode, ...
        return getattr(self.inner, name)


#: A tenant with a token bucket: admission would record it (snapshot()["buckets"]) had it been charged.
_METERED = {"default_tenant": {"tokens_per_s": 1, "burst_tokens": 100_000}}


async def test_a_prompt_far_beyond_the_context_is_a_400_before_it_is_tokenized() -> None:
    tok = CountingTokenizer(WordTokenizer())
    async with stack(tokenizers={"small": tok}, admission=_METERED) as s:
        words = "w " * (20 * 256)  # 40 x max_model_len characters, 5,120 words: 5,120 tokens
        body = chat(model="small", messages=[{"role": "user", "content": words}])
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded"
        assert err["param"] == "messages"
        assert f"{40 * 256} characters, more than 2048" in err["message"]  # 256 tokens x 8 characters
        assert "max_prompt_chars_per_token" in err["message"]
        assert tok.calls == 0  # never tokenized
        # Nothing was charged or held: the request never reached admission.
        snap = s.gateway.admission.snapshot()
        assert snap["buckets"] == {} and snap["tenant_in_flight"] == {}

        # Every message counts, the system prompt too: two halves of the limit and a bit are over it.
        half = "w " * 512
        body = chat(
            model="small",
            messages=[{"role": "system", "content": half + "w"}, {"role": "user", "content": half}],
        )
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "2049 characters" in r.json()["error"]["message"] and tok.calls == 0

        # Under the character cap but over the context in tokens: tokenized, then the same 400 in tokens.
        body = chat(model="small", messages=[{"role": "user", "content": "w " * 300}])
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and tok.calls == 1
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "tokens; model `small`" in err["message"]

        r = await s.client.post("/v1/chat/completions", json=chat(model="small"))
        assert r.status_code == 200, r.text
        assert tok.calls == 2 and set(s.gateway.admission.snapshot()["buckets"]) == {"default"}


async def test_the_character_cap_is_the_specs() -> None:
    tok = CountingTokenizer(WordTokenizer())
    async with stack(tokenizers={"small": tok}, http={"max_prompt_chars_per_token": 64}) as s:
        body = chat(model="small", messages=[{"role": "user", "content": "w" * (40 * 256)}])
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text  # one 10,240-character word: one token, under 256 x 64
        assert tok.calls == 1


async def test_a_text_completion_too_long_is_a_400_before_any_work() -> None:
    tok = CountingTokenizer(WordTokenizer())
    async with stack(tokenizers={"small": tok}, admission=_METERED) as s:
        r = await s.client.post("/v1/completions", json={"model": "small", "prompt": "w " * (20 * 256)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
        assert "more than 2048" in err["message"]
        # Token ids: more than the context is a 400 too, before the ids are looked at one by one.
        r = await s.client.post("/v1/completions", json={"model": "small", "prompt": [11] * 300})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
        assert "the prompt is 300 tokens; model `small` has a context of 256 tokens" in err["message"]
        assert tok.calls == 0
        assert s.gateway.admission.snapshot()["buckets"] == {}
        r = await s.client.post(
            "/v1/completions", json={"model": "small", "prompt": [11] * 8, "max_tokens": 2}
        )
        assert r.status_code == 200, r.text


async def test_responses_instructions_and_input_are_capped_before_tokenizing(tmp_path) -> None:
    from serving.http.responses import SessionsFrontend
    from tests.unit.sessions_harness import TAGS, TOK, close_store, new_store

    store = new_store(tmp_path)
    tok = CountingTokenizer(TOK)
    engine = FakeEngine("r", max_model_len=256)
    models = {"r": ServedModel("r", 256, tok, EngineBackend(engine), tags=TAGS)}
    spec = parse_spec({"models": [_model("r")], "auth": {"enabled": False}, "admission": _METERED})
    metrics = IngressMetrics()
    gateway = Gateway.from_spec(spec, metrics)

    async def nobody(_: str) -> bool:
        return False

    front = SessionsFrontend(store, nobody)
    app = build_api(models, metrics, gateway, sessions=front, http=spec.http)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            big = "w " * (20 * 256)
            for body in ({"input": "hello", "instructions": big}, {"input": big}):
                r = await c.post("/v1/responses", json={"model": "r", "background": True, **body})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["code"] == "context_length_exceeded" and err["param"] == "input"
                assert "more than 2048" in err["message"]
            assert tok.calls == 0
            assert gateway.admission.snapshot()["buckets"] == {}  # no ticket, nothing charged
            assert store.orphans(None, 10) == []  # and no session stored
    finally:
        front.close()
        await gateway.close()
        close_store(store)
