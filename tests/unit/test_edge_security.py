"""The HTTP edge (serving.http.api, protocol, auth): body size and time limits, lone surrogates and deep
nesting in the JSON body, bounds on numbers and lists, Tandem's request headers, the scopes of keys
(/metrics and the docs pages) and keys revoked in the keys file without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.config import HttpSpec, parse_spec
from serving.http.api import _BodyLimit, _error_response, build_api
from serving.http.auth import hash_key
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.pipeline import ServedModel
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_api import WordTokenizer
from tests.unit.test_gateway_api import BASE, CountingBackend, _merge, chat
from tests.unit.test_responses_api import rig

INFERENCE_KEY = "tdm-inference-key"
METRICS_KEY = "tdm-metrics-key"
BOTH_KEY = "tdm-both-key"
KEYS = [
    {"tenant": "acme", "sha256": hash_key(INFERENCE_KEY)},
    {"tenant": "scraper", "sha256": hash_key(METRICS_KEY), "scopes": ["metrics"]},
    {"tenant": "ops", "sha256": hash_key(BOTH_KEY), "scopes": ["inference", "metrics"]},
]
AUTH_ON = {"enabled": True, "keys": KEYS}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class CountingTokenizer(WordTokenizer):
    """WordTokenizer that counts its calls (the prompt must not be tokenized when the edge refuses it)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return super().encode(text)

    def encode_chat(self, messages: list) -> list[int]:
        self.calls += 1
        return super().encode_chat(messages)


class Edge:
    def __init__(self, client: httpx.AsyncClient, app: Any, tokenizer: CountingTokenizer, gateway: Gateway):
        self.client, self.app, self.tokenizer, self.gateway = client, app, tokenizer, gateway

    async def raw(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> tuple:
        """One request straight into the ASGI app (any header bytes): (status, headers, body)."""
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        await self.app(scope, receive, send)
        start = sent[0]
        return start["status"], start["headers"], b"".join(m.get("body", b"") for m in sent[1:])


@contextlib.asynccontextmanager
async def edge(http: HttpSpec | None = None, **spec_overrides: Any) -> AsyncIterator[Edge]:
    """The API (test_gateway_api's BASE spec + overrides, FakeEngines) with a counting tokenizer."""
    spec = parse_spec(_merge(BASE, spec_overrides))
    tokenizer = CountingTokenizer()
    models = {}
    for m in spec.models:
        engine = FakeEngine(m.name, max_model_len=256)
        await engine.start()
        models[m.name] = ServedModel(m.name, 256, tokenizer, CountingBackend(engine))
    metrics = IngressMetrics()
    gateway = Gateway.from_spec(spec, metrics)
    app = build_api(models, metrics, gateway, http=http)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            yield Edge(c, app, tokenizer, gateway)
    finally:
        await gateway.close()


def error(r: httpx.Response) -> dict:
    return r.json()["error"]


# -- H3: body size and time ---------------------------------------------------------------------


async def test_a_200_mb_body_is_a_413_before_it_is_read_and_the_tokenizer_never_runs() -> None:
    content = b'{"model":"small","messages":[{"role":"user","content":"' + b"x" * 200_000_000 + b'"}]}'
    async with edge() as e:
        r = await e.client.post("/v1/chat/completions", content=content)
        assert r.status_code == 413, r.text[:300]
        err = error(r)
        assert err["code"] == "body_too_large" and err["type"] == "invalid_request_error"
        assert str(8 * 1024 * 1024) in err["message"] and "http.max_body_bytes" in err["message"]
        assert r.headers["connection"] == "close"
        assert e.tokenizer.calls == 0
        assert e.gateway.admission.snapshot()["buckets"] == {}
        # A body under the limit is served.
        assert (await e.client.post("/v1/chat/completions", json=chat(model="small"))).status_code == 200
        assert e.tokenizer.calls > 0


async def test_a_chunked_body_past_the_limit_is_a_413_and_is_read_no_further() -> None:
    sent = 0
    chunk = b" " * 65536

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        nonlocal sent
        yield b'{"model":"small","messages":[{"role":"user","content":"hi"}]'
        for _ in range(1600):  # 100 MiB of whitespace if it were all read
            sent += len(chunk)
            yield chunk
        yield b"}"

    async with edge(http=HttpSpec(max_body_bytes=1 << 20)) as e:
        r = await e.client.post("/v1/chat/completions", content=body())
        assert r.status_code == 413, r.text
        assert error(r)["code"] == "body_too_large" and str(1 << 20) in error(r)["message"]
        assert sent <= (1 << 20) + 2 * len(chunk)
        assert e.tokenizer.calls == 0


async def test_a_body_that_trickles_in_is_a_408() -> None:
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"model":"small","messages":'
        await never.wait()  # the rest never comes
        yield b"[]}"

    async with edge(http=HttpSpec(body_timeout_s=0.2)) as e:
        t0 = time.monotonic()
        r = await asyncio.wait_for(e.client.post("/v1/chat/completions", content=body()), 5)
        assert r.status_code == 408, r.text
        assert error(r)["code"] == "body_timeout" and "http.body_timeout_s" in error(r)["message"]
        assert time.monotonic() - t0 < 2
        assert e.tokenizer.calls == 0
        never.set()


async def test_a_trickled_body_under_an_answer_already_started_reads_as_a_disconnect() -> None:
    """An endpoint that streams without reading its body cannot answer 408 any more: it sees the
    client as gone (no exception escapes into a response already under way)."""
    seen: list[dict] = []

    async def streaming_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(await receive())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def never() -> dict:
        await asyncio.Event().wait()
        return {}  # pragma: no cover

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    limit = _BodyLimit(streaming_app, max_bytes=1024, timeout_s=0.05)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await asyncio.wait_for(limit(scope, never, send), 2)
    assert seen == [{"type": "http.disconnect"}] and sent[0]["status"] == 200


async def test_a_bad_content_length_is_a_400() -> None:
    async with edge() as e:
        status, _, body = await e.raw("POST", "/v1/chat/completions", [(b"content-length", b"-5")], b"{}")
        assert status == 400 and json.loads(body)["error"]["param"] == "content-length"


def test_body_limits_live_in_the_spec() -> None:
    spec = parse_spec(_merge(BASE, {"http": {"max_body_bytes": 4096, "body_timeout_s": 5}}))
    assert spec.http.max_body_bytes == 4096 and spec.http.body_timeout_s == 5 and not spec.http.docs
    with pytest.raises(ValueError, match="max_body_bytes"):
        parse_spec(_merge(BASE, {"http": {"max_body_bytes": 10}}))


# -- M1: lone surrogates, invalid UTF-8, deep nesting ---------------------------------------------

SURROGATE_CASES = [
    ("/v1/chat/completions", b'{"model":"\\ud800x","messages":[{"role":"user","content":"hi"}]}', "model"),
    (
        "/v1/chat/completions",
        b'{"model":"small","messages":[{"role":"user","content":"hi \\udc00"}],"max_tokens":2}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"small","messages":[{"role":"user","content":[{"type":"text","text":"\\ud83d"}]}]}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"small","messages":[{"role":"user","content":"hi"}],"stop":["\\ud800"]}',
        "stop.0",
    ),
    (
        "/v1/chat/completions",
        b'{"model":"small","messages":[{"role":"user","content":"hi"}],"user":"\\udfff"}',
        "user",
    ),
    # The UTF-8 form of a surrogate (Python's json decodes bytes with surrogatepass).
    (
        "/v1/chat/completions",
        b'{"model":"small","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
        "messages.0.content",
    ),
    ("/v1/completions", b'{"model":"\\ud800","prompt":"a b"}', "model"),
    ("/v1/completions", b'{"model":"small","prompt":"a \\ud800 b","max_tokens":2}', "prompt"),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATE_CASES)
async def test_a_lone_surrogate_anywhere_in_the_body_is_a_400_naming_the_field(path, raw, param) -> None:
    async with edge() as e:
        r = await e.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = error(r)
        assert err["param"] == param and err["message"].startswith(f"{param}: ")
        assert "surrogate" in err["message"] and err["code"] == "invalid_body"
        assert e.tokenizer.calls == 0
        # The app keeps answering.
        assert (await e.client.post("/v1/chat/completions", json=chat(model="small"))).status_code == 200


async def test_a_valid_surrogate_pair_is_accepted() -> None:
    raw = b'{"model":"small","messages":[{"role":"user","content":"hi \\ud83d\\ude00"}],"max_tokens":2}'
    async with edge() as e:
        r = await e.client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model":"r","input":"hi","metadata":{"k":"\\ud800"}}', "metadata.k"),
        (b'{"model":"r","input":"hi","metadata":{"\\ud800":"v"}}', "metadata"),
        (b'{"model":"r","input":"hi","previous_response_id":"resp_\\udc00"}', "previous_response_id"),
        (b'{"model":"r","input":[{"role":"user","content":"\\ud800"}]}', "input.0.content"),
        (b'{"model":"r","input":"hi","instructions":"\\ud800"}', "instructions"),
    ],
)
async def test_a_lone_surrogate_in_a_responses_request_is_a_400_and_nothing_is_stored(
    tmp_path, body: bytes, param: str
) -> None:
    async with rig(tmp_path) as g:
        for background in (False, True):
            raw = body[:-1] + (b',"background":true}' if background else b"}")
            r = await g.client.post("/v1/responses", content=raw, headers={"x-tandem-tenant": "a"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        assert g.store._db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
        assert g.legs.requests == []
        # The API keeps answering: a later response is created and read back.
        r = await g.post(input="why", max_output_tokens=4)
        assert r.status_code == 200, r.text
        got = await g.get(r.json()["id"])
        assert got.status_code == 200, got.text
        assert (await g.get("resp_unknown")).status_code == 404


async def test_invalid_utf8_is_a_400() -> None:
    raw = b'{"model":"small","messages":[{"role":"user","content":"hi \xff\xfe"}]}'
    async with edge() as e:
        r = await e.client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400 and "UTF-8" in error(r)["message"]


@pytest.mark.parametrize("levels", [100, 100_000])
async def test_deeply_nested_json_is_a_400_not_a_recursion_error(levels: int, caplog) -> None:
    raw = b'{"model":"small","messages":[{"role":"user","content":"hi"}],"logprobs":' + b"[" * levels
    raw += b"]" * levels + b"}"
    caplog.set_level(logging.DEBUG)
    async with edge() as e:
        r = await e.client.post("/v1/chat/completions", content=raw)
        assert r.status_code == 400, r.text
        assert "nested" in error(r)["message"] and "64 levels" in error(r)["message"]
        assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def test_error_bodies_render_whatever_they_quote() -> None:
    resp = _error_response(404, "model '\ud800x' not found", "not_found_error", "model")
    assert json.loads(resp.body)["error"]["message"] == "model '\ud800x' not found"


# -- numbers, lists and strings past any sane bound -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"top_k": 2**70}, "top_k"),
        ("/v1/chat/completions", {"top_k": 1e21}, "top_k"),
        ("/v1/chat/completions", {"min_tokens": 2**70}, "min_tokens"),
        ("/v1/chat/completions", {"max_tokens": 1e21}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 2**70}, "max_completion_tokens"),
        ("/v1/chat/completions", {"max_reasoning_tokens": 2**70}, "max_reasoning_tokens"),
        ("/v1/chat/completions", {"n": 2**70}, "n"),
        ("/v1/chat/completions", {"logprobs": True}, None),
        ("/v1/chat/completions", {"stop_token_ids": [2**40]}, "stop_token_ids.0"),
        ("/v1/chat/completions", {"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ("/v1/chat/completions", {"stop": ["x" * 1025]}, "stop"),
        ("/v1/chat/completions", {"stop": "x" * 1025}, "stop"),
        ("/v1/chat/completions", {"model": "m" * 257}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 2049}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2049}]},
            "messages.0.content",
        ),
        ("/v1/completions", {"prompt": [5, 2**40]}, "prompt.1"),
    ],
)
async def test_numbers_and_lists_past_their_bound_are_400s_naming_the_field(path, fields, param) -> None:
    body = chat(model="small") if path.endswith("chat/completions") else {"model": "small", "prompt": "a"}
    body.update(fields)
    async with edge() as e:
        # clamp: without a bound, a huge max_tokens would be lowered to the context, not refused.
        r = await e.client.post(path, json=body, headers={"x-tandem-max-tokens": "clamp"})
        assert r.status_code == 400, r.text
        err = error(r)
        assert err["param"] == param, err
        if param is not None:
            assert err["message"].startswith(f"{param}: ")
        assert e.tokenizer.calls == 0


async def test_a_long_responses_input_is_a_400(tmp_path) -> None:
    async with rig(tmp_path) as g:
        r = await g.post(input=[{"role": "user", "content": "a"}] * 2049)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = await g.post(max_output_tokens=2**70)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
        r = await g.post(reasoning={"max_tokens": 2**70})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning.max_tokens"


async def test_bounds_leave_long_legitimate_requests_alone() -> None:
    messages = [{"role": "user", "content": "a b"}] * 40
    body = chat(
        model="small", messages=messages, stop=["x" * 1024] * 4, stop_token_ids=list(range(64)), top_k=50
    )
    async with edge() as e:
        r = await e.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text


# -- request headers -----------------------------------------------------------------------------

BAD_VALUES = [b"a\r\nset-cookie: x=1", b"a\nb", b"a\x00b", b"caf\xc3\xa9", b"x" * 257]


@pytest.mark.parametrize(
    "name", [b"x-tandem-task", b"x-session-id", b"x-tandem-task-id", b"x-tandem-priority"]
)
@pytest.mark.parametrize("value", BAD_VALUES)
async def test_a_bad_tandem_header_is_a_400_naming_it_and_never_reflected(name: bytes, value: bytes) -> None:
    async with edge() as e:
        body = json.dumps(chat(model="small")).encode()
        status, headers, raw = await e.raw("POST", "/v1/chat/completions", [(name, value)], body)
        assert status == 400
        err = json.loads(raw)["error"]
        assert err["param"] == name.decode() and err["code"] == "invalid_header"
        assert name.decode() in err["message"]
        assert all(value not in v and b"\r" not in v and b"\n" not in v for _, v in headers)
        assert value.decode("latin-1") not in err["message"]
        assert e.tokenizer.calls == 0


@pytest.mark.parametrize("value", [*BAD_VALUES, b"Team-A"])
async def test_the_tenant_header_must_be_a_tenant_name_with_auth_off(value: bytes) -> None:
    async with edge() as e:
        body = json.dumps(chat(model="small")).encode()
        status, _, raw = await e.raw("POST", "/v1/chat/completions", [(b"x-tandem-tenant", value)], body)
        assert status == 400 and json.loads(raw)["error"]["param"] == "x-tandem-tenant"
        assert e.gateway.admission.snapshot()["buckets"] == {}
        status, _, _ = await e.raw("POST", "/v1/chat/completions", [(b"x-tandem-tenant", b"team-a")], body)
        assert status == 200 and set(e.gateway.admission.snapshot()["buckets"]) == {"team-a"}


async def test_the_tenant_header_is_ignored_with_auth_on() -> None:
    async with edge(auth=AUTH_ON) as e:
        body = json.dumps(chat(model="small")).encode()
        key = (b"authorization", f"Bearer {INFERENCE_KEY}".encode())
        status, _, raw = await e.raw(
            "POST", "/v1/chat/completions", [key, (b"x-tandem-tenant", b"a\r\nb")], body
        )
        assert status == 200, raw
        assert set(e.gateway.admission.snapshot()["buckets"]) == {"acme"}


# -- M5: /metrics and the docs pages ----------------------------------------------------------------


async def test_metrics_need_a_key_with_the_metrics_scope_when_auth_is_on() -> None:
    async with edge(auth=AUTH_ON) as e:
        c = e.client
        assert (
            await c.post("/v1/chat/completions", json=chat(model="small"), headers=bearer(INFERENCE_KEY))
        ).status_code == 200
        r = await c.get("/metrics")
        assert r.status_code == 401 and "tandem_admission_bucket_tokens" not in r.text
        assert error(r)["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        r = await c.get("/metrics", headers=bearer(INFERENCE_KEY))
        assert r.status_code == 401 and "metrics" in error(r)["message"]
        r = await c.get("/metrics", headers=bearer(METRICS_KEY))
        assert r.status_code == 200 and 'tandem_admission_bucket_tokens{tenant="acme"}' in r.text
        assert (await c.get("/metrics", headers=bearer(BOTH_KEY))).status_code == 200
        # A metrics-only key cannot call the API.
        r = await c.post("/v1/chat/completions", json=chat(model="small"), headers=bearer(METRICS_KEY))
        assert r.status_code == 401 and "inference" in error(r)["message"]
        assert (await c.get("/v1/models", headers=bearer(METRICS_KEY))).status_code == 401
        assert (await c.get("/v1/models", headers=bearer(BOTH_KEY))).status_code == 200
        # Liveness stays open; any other path needs a key.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/anything")).status_code == 401


async def test_metrics_stay_open_with_auth_off() -> None:
    async with edge() as e:
        r = await e.client.get("/metrics")
        assert r.status_code == 200 and "tandem_" in r.text


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
async def test_docs_are_off_by_default(path: str) -> None:
    async with edge() as e:
        assert (await e.client.get(path)).status_code == 404
    async with edge(auth=AUTH_ON) as e:
        assert (await e.client.get(path, headers=bearer(INFERENCE_KEY))).status_code == 404


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
async def test_docs_when_enabled_need_a_key_with_auth_on(path: str) -> None:
    async with edge(http=HttpSpec(docs=True), auth=AUTH_ON) as e:
        assert (await e.client.get(path)).status_code == 401
        assert (await e.client.get(path, headers=bearer("tdm-wrong"))).status_code == 401
        for key in (INFERENCE_KEY, METRICS_KEY):
            assert (await e.client.get(path, headers=bearer(key))).status_code == 200
    async with edge(http=HttpSpec(docs=True)) as e:
        r = await e.client.get(path)
        assert r.status_code == 200
        if path == "/openapi.json":
            assert "/v1/chat/completions" in r.json()["paths"]


# -- L6: revocation through the keys file -----------------------------------------------------------


def _write_keys(path: Path, entries: list[dict]) -> None:
    """Replace the file the way a Kubernetes Secret update does (a new file renamed over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


async def test_a_key_removed_from_the_keys_file_gets_a_401_within_the_reload_interval(tmp_path) -> None:
    keys = tmp_path / "keys.json"
    _write_keys(keys, KEYS[:2])
    auth = {"enabled": True, "keys_file": str(keys), "keys_reload_s": 0.1}
    async with edge(auth=auth) as e:
        c = e.client
        assert (await c.get("/v1/models", headers=bearer(INFERENCE_KEY))).status_code == 200
        assert (await c.get("/v1/models", headers=bearer(BOTH_KEY))).status_code == 401
        _write_keys(keys, KEYS[1:])  # revoke the inference key, add the other
        await asyncio.sleep(0.15)
        r = await c.get("/v1/models", headers=bearer(INFERENCE_KEY))
        assert r.status_code == 401 and error(r)["message"] == "invalid API key"
        assert (await c.get("/v1/models", headers=bearer(BOTH_KEY))).status_code == 200


async def test_a_broken_keys_file_keeps_the_keys_in_use_and_is_logged(tmp_path, caplog) -> None:
    keys = tmp_path / "keys.json"
    _write_keys(keys, KEYS[:1])
    auth = {"enabled": True, "keys_file": str(keys), "keys_reload_s": 0.05}
    async with edge(auth=auth) as e:
        c = e.client
        for broken in ("[{tenant: acme, sha256: nothex}]", "{not yaml: [", None):
            if broken is None:
                keys.unlink()
            else:
                tmp = keys.with_suffix(".tmp")
                tmp.write_text(broken)
                os.replace(tmp, keys)
            await asyncio.sleep(0.08)
            with caplog.at_level(logging.WARNING, logger="serving.http.auth"):
                caplog.clear()
                assert (await c.get("/v1/models", headers=bearer(INFERENCE_KEY))).status_code == 200
            assert "keeping the 1 keys in use" in caplog.text
        _write_keys(keys, KEYS[1:2])  # fixed: read again
        await asyncio.sleep(0.08)
        assert (await c.get("/v1/models", headers=bearer(INFERENCE_KEY))).status_code == 401
