"""The OpenAI API over the fake engine: parsing, errors, streaming shape, usage, abort on close."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.backends import EngineBackend
from serving.http.api import build_api
from serving.http.metrics import IngressMetrics
from serving.http.pipeline import ServedModel
from serving.replicas.engines.fake import FakeEngine


class WordTokenizer:
    """One token per whitespace-separated word (ids by hash); chat = role/content words."""

    vocab_size = 4096

    def encode(self, text: str) -> list[int]:
        return [1] + [hash(w) % 4000 + 10 for w in text.split()]

    def encode_chat(self, messages: list) -> list[int]:
        ids = [1]
        for m in messages:
            ids += [2] + self.encode(m.text())[1:] + [3]
        return ids + [2]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("tiny", max_model_len=256, block_size=16)


@pytest.fixture
def metrics() -> IngressMetrics:
    return IngressMetrics()


@pytest.fixture
async def client(engine: FakeEngine, metrics: IngressMetrics):
    await engine.start()
    models = {"tiny": ServedModel("tiny", 256, WordTokenizer(), EngineBackend(engine))}
    app = build_api(models, metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def chat(**kw) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}
    body.update(kw)
    return body


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    assert (await client.get("/health")).json()["models"] == ["tiny"]


async def test_chat_non_streaming_has_text_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].count(" t") == 4
    assert body["choices"][0]["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 4
    assert u["total_tokens"] == u["prompt_tokens"] + 4
    assert u["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_streaming_frames_and_usage(client: httpx.AsyncClient) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    assert frames[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [f["choices"][0]["delta"]["content"] for f in frames if f["choices"]]
    assert len(content) == 3
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["completion_tokens"] == 3
    assert frames[-2]["choices"][0]["finish_reason"] == "length"


async def test_completion_with_token_ids(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " t8 t9"
    assert r.json()["usage"]["prompt_tokens"] == 3


async def test_cached_tokens_reported_for_shared_prefix(client: httpx.AsyncClient) -> None:
    prompt = list(range(10, 50))  # 40 tokens: two full blocks of 16
    await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt + [99], "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny"}, 400, "messages"),
        (chat(messages=[]), 400, "messages"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
        (chat(temperature=5), 400, "temperature"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(n=3), 400, "n"),
        (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (chat(model="nope"), 404, "model"),
        (chat(stop_token_ids=[10**9]), 400, "stop_token_ids"),
        (chat(max_tokens=10_000), 400, "max_tokens"),
        (chat(max_completion_tokens=10_000), 400, "max_completion_tokens"),
        (chat(messages=[{"role": "user", "content": "w " * 300}]), 400, "messages"),
    ],
)
async def test_bad_input_is_4xx_naming_the_field(
    client: httpx.AsyncClient, body: dict, status: int, param: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["message"]


async def test_malformed_json_and_form_bodies(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{bad")
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    # curl -d sends a form content type; the body is still read as JSON.
    r = await client.post(
        "/v1/chat/completions",
        content=json.dumps(chat()).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", content=b"[1, 2]")
    assert r.status_code == 400


async def test_unknown_route_is_openai_shaped_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


async def test_token_id_out_of_vocabulary(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": [10**6], "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


async def test_client_disconnect_aborts_the_engine_request(metrics: IngressMetrics) -> None:
    """Over a real HTTP server (uvicorn): closing the connection mid-stream aborts the request."""
    import socket

    import uvicorn

    slow = FakeEngine("tiny", max_model_len=256, token_delay_s=0.01)
    app = build_api({"tiny": ServedModel("tiny", 256, WordTokenizer(), EngineBackend(slow))}, metrics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            async with c.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=200)) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        assert slow.stats().running == 1
                        break
        for _ in range(100):
            if slow.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert slow.stats().running == 0
        sample = metrics.registry.get_sample_value
        assert sample("tandem_requests_in_flight", {"model": "tiny"}) == 0
        assert sample("tandem_client_disconnects_total", {"model": "tiny"}) == 1
    finally:
        server.should_exit = True
        await task


async def test_metrics_endpoint_counts_requests(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat())
    text = (await client.get("/metrics")).text
    assert 'tandem_requests_total{endpoint="chat",model="tiny",status="200"} 1.0' in text
    assert 'tandem_completion_tokens_total{model="tiny"} 4.0' in text


class _RoutedBackend:
    """Wraps a backend: records the disagg choice it was given and stamps a route on the first chunk."""

    def __init__(self, inner: EngineBackend) -> None:
        self.inner = inner
        self.seen: list[str] = []

    async def stream(self, request):
        from serving.replicas.engines.base import Route

        self.seen.append(request.disagg)
        first = True
        async for chunk in self.inner.stream(request):
            if first:
                chunk.route = Route(mode="disagg", decode="dec#1", prefill="pre#2", reason="forced")
                first = False
            yield chunk


@pytest.fixture
async def routed(engine: FakeEngine, metrics: IngressMetrics):
    await engine.start()
    backend = _RoutedBackend(EngineBackend(engine))
    app = build_api({"tiny": ServedModel("tiny", 256, WordTokenizer(), backend)}, metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c, backend


@pytest.mark.parametrize("stream", [False, True])
async def test_route_header_and_disagg_choice_reach_through(routed, stream: bool) -> None:
    client, backend = routed
    r = await client.post("/v1/chat/completions", json=chat(stream=stream), headers={"x-tandem-disagg": "ON"})
    assert r.status_code == 200
    assert r.headers["x-tandem-route"] == (
        "tier=-; model=tiny; how=model; mode=disagg; prefill=pre#2; decode=dec#1; reason=forced"
    )
    assert backend.seen == ["on"]
    await client.post("/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 2})
    assert backend.seen == ["on", "auto"]


async def test_bad_disagg_header_is_rejected_before_the_engine(routed) -> None:
    client, backend = routed
    r = await client.post("/v1/chat/completions", json=chat(), headers={"x-tandem-disagg": "sometimes"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "x-tandem-disagg" and "on, off, auto" in err["message"]
    assert backend.seen == []
