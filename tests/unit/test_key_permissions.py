"""What an API key may do beyond calling /v1/* (review L6, L7; serving.http.auth `Caller`):

- the detailed `x-tandem-route` (deployments, replica ids, router scores, the P/D reason) only for a
  key with the `debug` scope; any other key sees how its request was served, not the topology;
- `x-tandem-disagg: on|off` only for a `debug` key: a 403 naming the header otherwise, before any
  work or charge;
- a key's `models` allow-list: a model or tier off the list is a 403 on `model`, and /v1/models lists
  only what the key may call.

With auth off (local use), every caller has every scope and every model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.contracts import DisaggMode, ServeMode
from serving.http.auth import hash_key
from serving.replicas.engines.base import Chunk, GenerateRequest, Route
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_gateway_api import CountingBackend, FlakyBackend, chat, route, stack
from tests.unit.test_migration import BreakingBackend, _sse

PLAIN_KEY = "tdm-plain"
DEBUG_KEY = "tdm-operator"
LIMITED_KEY = "tdm-intent-only"

KEYS = [
    {"tenant": "acme", "sha256": hash_key(PLAIN_KEY)},
    {"tenant": "ops", "sha256": hash_key(DEBUG_KEY), "scopes": ["inference", "debug"]},
    {"tenant": "kiosk", "sha256": hash_key(LIMITED_KEY), "models": ["intent"]},
]
AUTH = {"enabled": True, "keys": KEYS}


def bearer(key: str, **more: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **more}


def _stamp(chunk: Chunk, name: str) -> None:
    chunk.route = Route(
        ServeMode.DISAGG,
        decode=f"{name}-decode#r1a2b3",
        prefill=f"{name}-prefill#p9",
        reason="short_suffix:12",
        matched_blocks=3,
        score=0.75,
    )


class RoutedBackend(CountingBackend):
    """A FakeEngine whose first chunk names its replicas, as a decode replica's does; it records
    every request it gets."""

    def __init__(self, name: str) -> None:
        super().__init__(FakeEngine(name, max_model_len=256))
        self.name = name
        self.requests: list[GenerateRequest] = []

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        first = True
        async for chunk in super().stream(request):
            if first:
                _stamp(chunk, self.name)
                first = False
            yield chunk


class RoutedBreakingBackend(BreakingBackend):
    """BreakingBackend whose every stream's first chunk names its replicas."""

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        first = True
        async for chunk in super().stream(request):
            if first and chunk.error is None:
                _stamp(chunk, "small")
                first = False
            yield chunk


async def _backends() -> dict[str, RoutedBackend]:
    out = {name: RoutedBackend(name) for name in ("small", "big")}
    for b in out.values():
        await b.engine.start()
    return out


_TOPOLOGY = ("decode", "prefill", "matched_blocks", "score", "reason")


# -- the route header -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_only_a_debug_key_sees_the_replicas_in_the_route_header(stream: bool) -> None:
    async with stack(await _backends(), auth=AUTH) as s:
        body = chat(model="small", stream=stream)
        r = await s.client.post("/v1/chat/completions", json=body, headers=bearer(PLAIN_KEY))
        assert r.status_code == 200, r.text
        plain = route(r)
        assert plain == {"tier": "intent", "model": "small", "how": "model", "mode": "disagg"}
        assert "#" not in r.headers["x-tandem-route"]

        r = await s.client.post("/v1/chat/completions", json=body, headers=bearer(DEBUG_KEY))
        assert r.status_code == 200, r.text
        full = route(r)
        assert full["decode"] == "small-decode#r1a2b3" and full["prefill"] == "small-prefill#p9"
        assert full["matched_blocks"] == "3" and full["score"] == "0.750"
        assert full["reason"] == "short_suffix:12" and full["mode"] == "disagg"


async def test_with_auth_off_the_route_header_has_the_replicas() -> None:
    async with stack(await _backends()) as s:
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"))
        assert r.status_code == 200
        assert all(k in route(r) for k in _TOPOLOGY)


@pytest.mark.parametrize(
    ("key", "want"), [(PLAIN_KEY, "mode=disagg"), (DEBUG_KEY, "decode=small-decode#r1a2b3")]
)
async def test_a_migrations_route_names_the_replicas_only_for_a_debug_key(key: str, want: str) -> None:
    backend = RoutedBreakingBackend("error", after=3)
    await backend.engine.start()
    async with stack({"small": backend}, auth=AUTH) as s:
        body = chat(model="small", max_tokens=8, stream=True)
        r = await s.client.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert r.status_code == 200
        events, done = _sse(r.text)
        assert done
        final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
        (migration,) = final["x_tandem_migrations"]
        assert migration["after_tokens"] == 3
        assert want in migration["route"]
        if key == PLAIN_KEY:
            assert migration["route"] == "mode=disagg"


# -- x-tandem-disagg ------------------------------------------------------------------------------


async def test_forcing_the_prefill_split_needs_the_debug_scope() -> None:
    backends = await _backends()
    async with stack(backends, auth=AUTH) as s:
        for value in ("on", "off", " ON "):
            r = await s.client.post(
                "/v1/chat/completions",
                json=chat(model="small"),
                headers=bearer(PLAIN_KEY, **{"x-tandem-disagg": value}),
            )
            assert r.status_code == 403, r.text
            err = r.json()["error"]
            assert err["param"] == "x-tandem-disagg" and err["code"] == "insufficient_scope"
            assert err["type"] == "permission_error" and "`debug` scope" in err["message"]
        assert backends["small"].requests == []  # refused before any work
        assert s.gateway.admission.snapshot()["buckets"] == {}  # and before anything was charged

        h = bearer(PLAIN_KEY, **{"x-tandem-disagg": "auto"})
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 200
        h = bearer(PLAIN_KEY, **{"x-tandem-disagg": "sometimes"})
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-tandem-disagg"

        h = bearer(DEBUG_KEY, **{"x-tandem-disagg": "on"})
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 200, r.text
        assert [q.disagg for q in backends["small"].requests] == [DisaggMode.AUTO, DisaggMode.ON]


async def test_with_auth_off_any_client_may_force_the_prefill_split() -> None:
    backends = await _backends()
    async with stack(backends) as s:
        h = {"x-tandem-disagg": "on"}
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 200
        assert backends["small"].requests[0].disagg == DisaggMode.ON


# -- model allow-lists ----------------------------------------------------------------------------


async def test_a_key_limited_to_a_tier_gets_a_403_elsewhere_and_sees_only_its_models() -> None:
    backends = await _backends()
    async with stack(backends, auth=AUTH) as s:
        c, h = s.client, bearer(LIMITED_KEY)
        r = await c.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions", json=chat(), headers=h)  # auto: the default tier
        assert r.status_code == 200 and r.json()["model"] == "small"

        r = await c.post("/v1/chat/completions", json=chat(model="big"), headers=h)
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["param"] == "model" and err["code"] == "model_not_allowed"
        assert err["type"] == "permission_error"
        assert "may not call tier `reasoning` (model `big`)" in err["message"]
        assert "small, auto (tiers intent)" in err["message"]
        h_task = bearer(LIMITED_KEY, **{"x-tandem-task": "reasoning"})
        r = await c.post("/v1/chat/completions", json=chat(), headers=h_task)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = await c.post(
            "/v1/completions", json={"model": "big", "prompt": "a b", "max_tokens": 2}, headers=h
        )
        assert r.status_code == 403 and r.json()["error"]["param"] == "model"
        assert backends["big"].requests == []
        # An unknown model is still a 404, whatever the key.
        r = await c.post("/v1/chat/completions", json=chat(model="gpt-9"), headers=h)
        assert r.status_code == 404

        listed = (await c.get("/v1/models", headers=h)).json()["data"]
        assert [m["id"] for m in listed] == ["small", "auto"]
        assert listed[1]["tiers"] == ["intent"]
        everything = (await c.get("/v1/models", headers=bearer(PLAIN_KEY))).json()["data"]
        assert [m["id"] for m in everything] == ["small", "big", "auto"]
        assert everything[2]["tiers"] == ["intent", "reasoning"]


async def test_a_limited_tier_still_degrades_along_its_chain() -> None:
    """The allow-list checks the resolved target; the chain is the operator's: a key limited to
    `reasoning` is served by `intent` (its fallback) while `big` fails."""
    backends: dict = await _backends()
    backends["big"] = FlakyBackend()
    keys = [{"tenant": "acme", "sha256": hash_key(PLAIN_KEY), "models": ["reasoning"]}]
    async with stack(backends, auth={"enabled": True, "keys": keys}) as s:
        h = bearer(PLAIN_KEY)
        r = await s.client.post("/v1/chat/completions", json=chat(model="big"), headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "small" and route(r)["degraded_from"] == "reasoning"
        assert backends["big"].calls >= 1
        r = await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        assert r.status_code == 403


async def test_a_keys_file_entry_may_carry_an_allow_list(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps([{"tenant": "kiosk", "sha256": hash_key(LIMITED_KEY), "models": ["small"]}])
    )
    async with stack(await _backends(), auth={"enabled": True, "keys_file": str(keys_file)}) as s:
        h = bearer(LIMITED_KEY)
        assert (
            await s.client.post("/v1/chat/completions", json=chat(model="small"), headers=h)
        ).status_code == 200
        r = await s.client.post("/v1/chat/completions", json=chat(model="big"), headers=h)
        assert (
            r.status_code == 403 and "it may call: small, auto (tiers intent)" in r.json()["error"]["message"]
        )
