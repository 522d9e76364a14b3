"""A poison request or an overloaded pool must not take a model down for every tenant (H5), and a
tenant's in-flight cap is answered over HTTP (M6): the request path through serving.http.pipeline
and serving.http.gateway, with fake backends (see tests/unit/test_gateway_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from router.admission import AdmissionRequest
from router.resilience import HealthState
from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_api import WordTokenizer
from tests.unit.test_gateway_api import (
    CountingBackend,
    FlakyBackend,
    HangingBackend,
    Stack,
    chat,
    route,
    stack,
)

#: The token id of the word that makes PoisonBackend's engine fail.
POISON = WordTokenizer().encode("poison")[1]


class PoisonBackend(CountingBackend):
    """A working engine, except that a prompt with the word `poison` makes it raise: the plain 500
    `engine_error` the engines answer for an exception (serving.replicas.engines.vllm_engine)."""

    def __init__(self) -> None:
        super().__init__(FakeEngine("poison", max_model_len=256))
        self.poisoned = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if POISON in request.prompt_token_ids:
            self.calls += 1
            self.poisoned += 1
            yield Chunk(error=EngineError("OverflowError: Python int too large to convert", 500))
            return
        async for chunk in super().stream(request):
            yield chunk


#: One model and one tier: nothing to degrade to, so a terminal model would be a 503 for everyone.
ONE_MODEL = {
    "models": [{"name": "big", "source": "fake", "pools": [{"engine": "fake"}]}],
    "tiers": [{"name": "main", "model": "big"}],
}


def poison_chat() -> dict:
    return chat(model="big", messages=[{"role": "user", "content": "hello poison"}])


async def post(s: Stack, body: dict, tenant: str) -> httpx.Response:
    return await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-tenant": tenant})


async def test_one_poison_request_does_not_take_the_model_down_for_other_tenants() -> None:
    big = PoisonBackend()
    await big.engine.start()
    async with stack({"big": big}, **ONE_MODEL) as s:
        r = await post(s, poison_chat(), "a")
        # Tenant a gets a clean 500 for its own request: not retried there, no engine text echoed.
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_error" and err["type"] == "server_error"
        assert "OverflowError" not in err["message"] and "retry-after" not in r.headers
        assert big.poisoned == 1
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="engine_fault") == 1
        assert s.sample("tandem_retries_total", model="big", error_class="engine_fault") is None
        assert s.gateway.budget.retries == 0
        health = s.gateway.health("big")
        assert health.usable and health.state is HealthState.STICKY_RETRY
        # Tenant b, right after, is served by the same model: no 503 pool_down, no degradation.
        r = await post(s, chat(model="big"), "b")
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "big" and "degraded_from" not in route(r)
        assert health.state is HealthState.HEALTHY
        assert s.sample("tandem_admission_rejections_total", reason="pool_down", model="big") is None
        assert s.gateway.admission.snapshot()["tenant_in_flight"] == {}


async def test_a_tenant_resending_its_poison_request_strikes_once() -> None:
    big = PoisonBackend()
    await big.engine.start()
    async with stack({"big": big}, **ONE_MODEL) as s:
        for _ in range(4):
            r = await post(s, poison_chat(), "a")
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert big.poisoned == 4  # each one tried once, none skipped as terminal
        assert s.gateway.health("big").usable
        r = await post(s, chat(model="big"), "b")
        assert r.status_code == 200 and r.json()["model"] == "big"


async def test_engine_faults_of_two_tenants_in_a_row_make_it_terminal() -> None:
    big = PoisonBackend()
    await big.engine.start()
    async with stack({"big": big}, **ONE_MODEL) as s:
        for tenant in ("a", "b"):
            r = await post(s, poison_chat(), tenant)
            assert r.status_code == 500
        assert s.gateway.health("big").state is HealthState.TERMINAL
        r = await post(s, chat(model="big"), "c")
        assert r.status_code == 503 and r.json()["error"]["code"] == "pool_down"


async def test_a_poison_request_goes_down_the_chain_without_a_retry() -> None:
    big = PoisonBackend()
    await big.engine.start()
    async with stack({"big": big}) as s:  # reasoning (big) falls back to intent (small)
        body = chat(messages=[{"role": "user", "content": "hello poison"}])
        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-task": "reasoning"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "small" and route(r)["degraded_reason"] == "500 engine_error"
        assert big.poisoned == 1 and s.gateway.health("big").usable


async def test_two_distinct_failing_requests_still_make_it_terminal() -> None:
    big = FlakyBackend()  # 503 engine_unavailable on every attempt: the target's fault
    async with stack({"big": big}, **ONE_MODEL) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="big"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "pool_down"
        # All three attempts of that one request failed: one strike, still usable.
        health = s.gateway.health("big")
        assert big.calls == 3 and health.state is HealthState.STICKY_RETRY
        r = await s.client.post("/v1/chat/completions", json=chat(model="big"))
        assert r.status_code == 503
        assert health.state is HealthState.TERMINAL  # two distinct requests in a row
        calls = big.calls
        r = await s.client.post("/v1/chat/completions", json=chat(model="big"))
        assert r.status_code == 503 and "terminal" in r.json()["error"]["message"]
        assert big.calls == calls  # skipped without a call


async def test_first_token_timeouts_of_a_busy_pool_do_not_make_it_terminal() -> None:
    big = HangingBackend()
    over = {
        "resilience": {"first_token_timeout_s": 0.2, "terminal_after": 1, "max_attempts": 1},
        "admission": {"pool_limits": [{"model": "big", "max_concurrency": 2}]},
    }
    async with stack({"big": big}, **over) as s:
        ctl = s.gateway.admission
        # Another tenant holds one of big's two slots and waits for the other: the pool is saturated.
        holder = await ctl.admit(AdmissionRequest("other", 1, 1))
        await holder.enter_pool("big", None)
        queued = await ctl.admit(AdmissionRequest("other", 1, 1))
        headers = {"x-tandem-task": "reasoning"}  # big, falling back to small
        req = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat(), headers=headers))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if big.calls:
                break
        waiter = asyncio.create_task(queued.enter_pool("big", None))
        r = await req
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert route(r)["degraded_reason"] == "timeout after 0.2s"
        # Overload, not death: with terminal_after 1, a strike would have made it terminal.
        assert s.gateway.health("big").state is HealthState.HEALTHY
        assert s.sample("tandem_attempt_failures_total", model="big", error_class="timeout") == 1
        await waiter
        holder.release(None)
        queued.release(None)
        # The same timeout on an idle pool is a strike.
        r = await s.client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200 and r.json()["model"] == "small"
        assert s.gateway.health("big").state is HealthState.TERMINAL


async def test_a_tenant_over_its_in_flight_cap_gets_a_429_with_retry_after() -> None:
    over = {"admission": {"default_tenant": {"max_in_flight": 1}}}
    async with stack(**over) as s:
        held = await s.gateway.admission.admit(AdmissionRequest("a", 1, 1))
        r = await post(s, chat(model="small"), "a")
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "tenant_concurrency"
        assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert s.sample("tandem_admission_rejections_total", reason="tenant_concurrency", model="small") == 1
        # Other tenants are not held back, and a finished request frees the place.
        r = await post(s, chat(model="small"), "b")
        assert r.status_code == 200
        held.release(None)
        r = await post(s, chat(model="small"), "a")
        assert r.status_code == 200
        assert s.gateway.admission.snapshot()["tenant_in_flight"] == {}
