"""`engine: openai` pools: OpenAIEngine (one external endpoint) and ExternalPool (routing over them).

The upstream is tests/unit/fake_upstream.py: a real HTTP server on loopback speaking vLLM 0.32's SSE
dialect, so connections, disconnects, timeouts and refusals are real. What the fake mirrors was checked
against a live `vllm serve` of tiny-intent (vLLM 0.32, CPU):

- with `return_token_ids` each event carries `token_ids` (the delta; the first also `prompt_token_ids`);
  with `continuous_usage_stats` each carries `usage` WITHOUT `prompt_tokens_details`; the finishing
  event is followed by `{"choices": [], "usage": {..., "prompt_tokens_details": {"cached_tokens": N}}}`
  (only with --enable-prompt-tokens-details) and `data: [DONE]`;
- a 601-token prompt sent twice with the same cache_salt: 512 cached tokens (4 blocks of 128); with
  another salt: 0;
- a prompt over the context: HTTP 400 `{"error": {"message": "This model's maximum context length is
  4096 tokens...", "type": "BadRequestError", "code": 400}}`; a wrong API key: 401 on /v1/*, while
  /health and /metrics need no key;
- closing the stream after 5 tokens of a 3000-token request: `vllm:num_requests_running` back to 0
  within 50 ms (the aborted requests generated ~11 tokens in all);
- /metrics: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, one
  series each per `{engine, model_name}` (plus `vllm:num_requests_waiting_by_reason`, a longer name).

No Ray here.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from router.contracts import ServeMode
from serving.backends import EngineBackend
from serving.config import RouterSpec, UpstreamSpec
from serving.http.metrics import IngressMetrics
from serving.replicas.engines.base import Chunk, Engine, GenerateRequest, SamplingOptions
from serving.replicas.engines.openai_engine import (
    ErrorKind,
    OpenAIEngine,
    Unsupported,
    UpstreamDown,
    parse_prometheus,
    parse_retry_after,
)
from serving.replicas.external import ExternalPool, endpoint_ids
from serving.upstreams import PROFILES, UpstreamServer
from tests.conftest import free_port
from tests.unit.fake_upstream import FakeUpstream

pytestmark = pytest.mark.timeout(30)

PROMPT = [0, 5, 6, 7, 8, 9, 10, 11]


def decode(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def encode(text: str) -> list[int]:
    """The fake renders token i as " t<i>": recover the ids from the text."""
    return [int(w[1:]) for w in text.split()]


@pytest.fixture(scope="module")
def servers():
    fakes = [FakeUpstream().start() for _ in range(2)]
    yield fakes
    for f in fakes:
        f.stop()


@pytest.fixture
def up(servers) -> FakeUpstream:
    for f in servers:
        f.reset()
    return servers[0]


@pytest.fixture
def up2(servers, up) -> FakeUpstream:
    return servers[1]


def engine(url: str, server: UpstreamServer = UpstreamServer.VLLM, **kw) -> OpenAIEngine:
    kw.setdefault("api_key", "sk-upstream")
    kw.setdefault("connect_timeout_s", 1.0)
    kw.setdefault("stall_timeout_s", 5.0)
    return OpenAIEngine(
        model_name="tandem-model",
        base_url=url,
        profile=PROFILES[server],
        decode_prompt=decode,
        encode_text=encode,
        **kw,
    )


def request(rid: str = "r1", prompt: list[int] | None = None, **sampling) -> GenerateRequest:
    sampling.setdefault("max_tokens", 4)
    salt = sampling.pop("cache_salt", "salt-tenant-a")
    keys = sampling.pop("block_keys", [])
    return GenerateRequest(
        rid, prompt or PROMPT, SamplingOptions(**sampling), cache_salt=salt, block_keys=keys
    )


async def collect(stream) -> list[Chunk]:
    return [c async for c in stream]


# -- request mapping per dialect -----------------------------------------------------------------


async def test_vllm_request_maps_every_field_and_sends_only_the_upstream_key(up):
    eng = engine(up.url, upstream_model="served")
    req = request(
        max_tokens=3, temperature=0.5, top_p=0.9, top_k=7, min_tokens=2, seed=11, stop=["\n"],
        stop_token_ids=[2], ignore_eos=True, presence_penalty=0.1, frequency_penalty=0.2,
    )  # fmt: skip
    chunks = await collect(eng.generate(req))
    await eng.shutdown()
    assert chunks[-1].finish_reason == "length"
    (sent,) = up.completions()
    body = sent["body"]
    assert body["prompt"] == PROMPT and body["model"] == "served" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")} == {
        "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 11, "stop": ["\n"],
    }  # fmt: skip
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.1, 0.2)
    assert {k: body[k] for k in ("top_k", "min_tokens", "stop_token_ids", "ignore_eos")} == {
        "top_k": 7, "min_tokens": 2, "stop_token_ids": [2], "ignore_eos": True,
    }  # fmt: skip
    assert body["cache_salt"] == "salt-tenant-a" and body["return_token_ids"] is True
    headers = sent["headers"]
    assert headers["authorization"] == "Bearer sk-upstream"
    # Nothing of the client's request reaches the upstream: only httpx's own headers and ours.
    assert set(headers) <= {"host", "accept", "accept-encoding", "connection", "user-agent",
                            "content-length", "content-type", "authorization"}  # fmt: skip


async def test_text_dialect_sends_decoded_text_and_no_extension(up):
    eng = engine(up.url, UpstreamServer.TGI, api_key=None, max_model_len=4096)
    # A field the server does not take is refused (400 naming it), never dropped: it would change the answer.
    for field, value in (("top_k", 7), ("min_tokens", 2), ("ignore_eos", True), ("stop_token_ids", [2])):
        refused = await collect(eng.generate(request(**{field: value})))
        assert refused[0].error.status == 400 and refused[0].error.message.startswith(f"{field}: ")
    assert up.completions() == []  # nothing was sent
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    body = up.completions()[0]["body"]
    assert body["prompt"] == decode(PROMPT)
    for field in ("top_k", "min_tokens", "stop_token_ids", "ignore_eos", "cache_salt", "return_token_ids"):
        assert field not in body
    assert body["stream_options"] == {"include_usage": True}
    assert "authorization" not in up.completions()[0]["headers"]
    # No ids on the wire: the streamed text is re-tokenized, so chunks still carry token ids.
    assert [t for c in chunks for t in c.token_ids] == [11, 12, 13, 14]
    assert chunks[-1].completion_tokens == 4


def test_trtllm_gets_extensions_but_no_field_it_would_reject():
    body = engine("http://x:1", UpstreamServer.TRTLLM).body(request(top_k=3, ignore_eos=True))
    assert body["top_k"] == 3 and body["ignore_eos"] is True and body["prompt"] == PROMPT
    assert "cache_salt" not in body and "return_token_ids" not in body
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_llamacpp_turns_its_own_sampling_defaults_off():
    eng = engine("http://x:1", UpstreamServer.LLAMACPP)
    plain = eng.body(request())
    assert plain["top_k"] == 0 and plain["min_p"] == 0.0  # llama.cpp's top_k=40 / min_p=0.05 off
    with pytest.raises(Unsupported, match="min_tokens"):
        eng.body(request(min_tokens=3))
    asked = eng.body(request(top_k=5, ignore_eos=True))
    assert asked["top_k"] == 5 and asked["ignore_eos"] is True


def test_a_text_dialect_needs_a_decoder():
    with pytest.raises(ValueError, match="decode_prompt"):
        OpenAIEngine(model_name="m", base_url="http://x:1", profile=PROFILES[UpstreamServer.TGI])


# -- the stream ----------------------------------------------------------------------------------


async def test_final_chunk_carries_finish_reason_and_usage(up):
    up.config.cached_tokens = 3
    eng = engine(up.url)
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert "".join(c.text for c in chunks) == " t11 t12 t13 t14"
    assert [t for c in chunks for t in c.token_ids] == [11, 12, 13, 14]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4]
    last = chunks[-1]
    # The usage event came after the finish: its counts (cached tokens too) are on the last chunk.
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (len(PROMPT), 4, 3)


async def test_usage_on_the_finishing_event_and_foreign_finish_reasons(up):
    up.config.usage, up.config.empty_finish, up.config.finish_reason = "on_finish", True, "eos_token"
    up.config.cached_tokens = 2
    eng = engine(up.url, UpstreamServer.TGI, max_model_len=4096)
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert [c.finish_reason for c in chunks] == [None, None, None, "stop"]  # "" is not a finish
    assert chunks[-1].cached_tokens == 2 and chunks[-1].completion_tokens == 4


async def test_without_usage_completion_tokens_are_counted_from_ids(up):
    up.config.usage, up.config.send_done = "none", False
    eng = engine(up.url)
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 4


# -- errors are chunks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "want_status", "want_type", "retry"),
    [
        (400, {"error": {"message": "context is 4096 tokens", "type": "BadRequestError", "code": 400}}, {},
         400, "invalid_request_error", None),
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}, 429, "upstream_overloaded", 7.0),
        (500, {"error": {"message": "boom"}}, {}, 502, "upstream_error", None),
        (503, {"object": "error", "message": "draining"}, {"Retry-After": "2"},
         503, "upstream_unavailable", 2.0),
        (401, {"error": "bad key"}, {}, 502, "upstream_auth", None),
    ],
)  # fmt: skip
async def test_upstream_status_errors(up, status, body, headers, want_status, want_type, retry):
    up.config.status, up.config.error_body, up.config.error_headers = status, body, headers
    seen = []
    eng = engine(up.url, on_error=lambda kind, err: seen.append(kind))
    (chunk,) = await collect(eng.generate(request()))
    await eng.shutdown()
    err = chunk.error
    assert (err.status, err.type, err.retry_after_s) == (want_status, want_type, retry)
    if status == 400:
        assert err.message == "context is 4096 tokens"  # the client reads the server's own reason
    assert seen == [ErrorKind.STATUS]


async def test_refused_connection_is_503():
    seen = []
    eng = engine(f"http://127.0.0.1:{free_port()}", upstream_model="m", on_error=lambda k, e: seen.append(k))
    (chunk,) = await collect(eng.generate(request()))
    await eng.shutdown()
    assert (chunk.error.status, chunk.error.type) == (503, "upstream_unavailable")
    assert seen == [ErrorKind.CONNECT]


async def test_a_stalled_stream_ends_with_504(up):
    up.config.stall_after = 1
    seen = []
    eng = engine(up.url, stall_timeout_s=0.3, on_error=lambda k, e: seen.append(k))
    t0 = time.monotonic()
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert chunks[0].text == " t11"
    assert (chunks[-1].error.status, chunks[-1].error.type) == (504, "upstream_stalled")
    assert 0.25 < time.monotonic() - t0 < 1.5 and seen == [ErrorKind.STALLED]


@pytest.mark.parametrize(
    ("setting", "want_type"),
    [("cut_after", "upstream_incomplete"), ("garbage_after", "upstream_protocol")],
)
async def test_broken_streams_are_502(up, setting, want_type):
    setattr(up.config, setting, 2)
    seen = []
    eng = engine(up.url, on_error=lambda k, e: seen.append(k))
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert [c.text for c in chunks[:2]] == [" t11", " t12"]
    assert (chunks[-1].error.status, chunks[-1].error.type) == (502, want_type)
    assert seen == [ErrorKind.PROTOCOL]


async def test_an_error_event_mid_stream_is_an_error_chunk(up):
    up.config.error_event_after = 1
    eng = engine(up.url)
    chunks = await collect(eng.generate(request()))
    await eng.shutdown()
    assert chunks[0].text == " t11"
    assert (chunks[-1].error.status, chunks[-1].error.type) == (502, "upstream_error")
    assert "engine died" in chunks[-1].error.message


def test_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("-3") is None and parse_retry_after("inf") is None  # never negative or endless


# -- disconnects ---------------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_upstream_request(up):
    up.config.tokens, up.config.delay_s = list(range(10, 200)), 0.02
    eng = engine(up.url)
    stream = eng.generate(request(max_tokens=190))
    got = [await anext(stream), await anext(stream)]
    t0 = time.monotonic()
    await stream.aclose()
    assert up.wait_for(lambda: up.disconnects == 1, timeout=1.0), "the upstream never saw the disconnect"
    assert time.monotonic() - t0 < 1.0 and up.active == 0 and len(got) == 2
    await eng.shutdown()


async def test_abort_closes_a_stream_another_task_reads(up):
    up.config.tokens, up.config.delay_s = list(range(10, 200)), 0.02
    eng = engine(up.url)
    got: list[Chunk] = []
    streaming = asyncio.Event()

    async def read():
        async for c in eng.generate(request("r-abort", max_tokens=190)):
            got.append(c)
            if len(got) == 2:
                streaming.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(streaming.wait(), 1.0)
    await eng.abort("r-abort")
    await asyncio.wait_for(task, 1.0)
    assert all(c.error is None for c in got)  # an aborted stream just ends
    assert up.wait_for(lambda: up.disconnects == 1, timeout=1.0)
    await eng.abort("r-abort")  # already gone: a no-op
    await eng.shutdown()


async def test_abort_between_two_reads_ends_the_stream_quietly(up):
    up.config.tokens, up.config.delay_s = list(range(10, 200)), 0.02
    eng = engine(up.url)
    stream = eng.generate(request("r-between", max_tokens=190))
    await anext(stream)
    await eng.abort("r-between")  # no read pending: the next one finds the response closed
    assert [c async for c in stream if c.error is not None] == []
    assert up.wait_for(lambda: up.disconnects == 1, timeout=1.0)
    await eng.shutdown()


async def test_it_is_an_engine_for_engine_backend(up):
    up.config.tokens, up.config.delay_s = list(range(10, 200)), 0.02
    eng = engine(up.url)
    assert isinstance(eng, Engine)
    stream = EngineBackend(eng).stream(request("eb", max_tokens=190))
    await anext(stream)
    await stream.aclose()  # EngineBackend aborts an unfinished request: the stream is already closed
    assert up.wait_for(lambda: up.disconnects == 1, timeout=1.0)
    await eng.shutdown()


# -- discovery, health, stats --------------------------------------------------------------------


async def test_start_learns_the_model_and_context(up):
    up.config.model, up.config.max_model_len = "org/served", 2048
    eng = engine(up.url)
    await eng.start()
    assert eng.upstream_model == "org/served" and eng.model_info().max_model_len == 2048
    assert up.requests[0]["headers"]["authorization"] == "Bearer sk-upstream"
    spec_wins = engine(up.url, max_model_len=1024)
    await spec_wins.start()
    assert spec_wins.model_info().max_model_len == 1024
    await eng.shutdown(), await spec_wins.shutdown()


async def test_start_survives_a_down_server_and_learns_later(up):
    eng = engine(f"http://127.0.0.1:{free_port()}")
    await eng.start()  # no raise
    with pytest.raises(RuntimeError, match="max_model_len"):
        eng.model_info()
    with pytest.raises(UpstreamDown):
        await eng.check_health()
    await eng.shutdown()
    later = engine(up.url)
    assert await later.refresh_info() and later.model_info().max_model_len == 4096
    await later.shutdown()


async def test_health_needs_a_2xx(up):
    eng = engine(up.url)
    await eng.check_health()
    up.config.health_status = 503
    with pytest.raises(UpstreamDown, match="503"):
        await eng.check_health()
    await eng.shutdown()


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="a } b"} 0.25
vllm:kv_cache_usage_perc_other 7
"""


def test_prometheus_parsing_reads_only_the_wanted_series():
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "absent"]
    assert parse_prometheus(VLLM_METRICS, names) == {
        "vllm:num_requests_running": 5.0,  # summed over label sets
        "vllm:num_requests_waiting": 4.0,  # not the _by_reason series
        "vllm:kv_cache_usage_perc": 0.25,
    }
    assert parse_prometheus("llamacpp:requests_processing 2\nllamacpp:requests_deferred NaN\n",
                            ["llamacpp:requests_processing", "llamacpp:requests_deferred"]) == {
        "llamacpp:requests_processing": 2.0}  # fmt: skip


async def test_refresh_stats_from_the_metrics_path(up):
    up.config.metrics_text = VLLM_METRICS
    eng = engine(up.url, clock=lambda: 123.0)
    assert await eng.refresh_stats()
    s = eng.stats()
    assert (s.running, s.waiting, s.kv_usage, eng.stats_known, eng.stats_at) == (5, 4, 0.25, True, 123.0)
    up.config.metrics_status = 404  # e.g. SGLang without --enable-metrics
    assert not await eng.refresh_stats() and not eng.stats_known
    none = engine(up.url, UpstreamServer.OPENAI, max_model_len=4096)
    scrapes = len(up.requests)
    assert not await none.refresh_stats()  # nothing to read: the router counts its own requests
    assert len(up.requests) == scrapes  # and it did not even ask
    await eng.shutdown(), await none.shutdown()


async def test_reset_prefix_cache(up):
    eng = engine(up.url)
    await eng.reset_prefix_cache()
    up.config.reset_status = 404
    with pytest.raises(NotImplementedError, match="VLLM_SERVER_DEV_MODE"):
        await eng.reset_prefix_cache()
    tgi = engine(up.url, UpstreamServer.TGI, max_model_len=4096)
    with pytest.raises(NotImplementedError):
        await tgi.reset_prefix_cache()
    with pytest.raises(NotImplementedError):
        await eng.prefill(request())
    await eng.shutdown(), await tgi.shutdown()


# -- ExternalPool --------------------------------------------------------------------------------


def pool_for(
    urls: list[str], statuses: list[int] | None = None, metrics: IngressMetrics | None = None, **spec
) -> ExternalPool:
    spec.setdefault("health_period_s", 0.05)
    spec.setdefault("connect_timeout_s", 1.0)
    spec.setdefault("max_model_len", 4096)
    upstream = UpstreamSpec(endpoints=urls, **spec)
    router = RouterSpec(stats_period_s=0.05)
    return ExternalPool(
        "tandem-model", upstream, router, decode_prompt=decode, encode_text=encode,
        metrics=metrics, rng=random.Random(0), on_status=None if statuses is None else statuses.append,
    )  # fmt: skip


def sample(metrics: IngressMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "tandem-model", **labels})


async def wait_until(predicate, within_s: float = 1.5) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


KEYS = [101, 102, 103, 104, 105, 106]


async def test_pool_routes_a_shared_prefix_to_the_same_endpoint(up, up2):
    statuses: list[int] = []
    pool = pool_for([up.url, up2.url], statuses)
    info = await pool.start()
    assert (info.name, info.max_model_len, info.block_size) == ("tandem-model", 4096, 16)
    assert statuses == [2]
    first = await collect(pool.stream(request("p1", block_keys=KEYS)))
    chosen = first[0].route.decode
    assert chosen in endpoint_ids([up.url, up2.url]) and first[0].route.mode is ServeMode.COLOCATED
    assert "decode=127.0.0.1:" in first[0].route.header()
    for i in range(3):
        again = await collect(pool.stream(request(f"p{i + 2}", block_keys=KEYS)))
        assert again[0].route.decode == chosen and again[0].route.matched_blocks == len(KEYS)
        assert again[-1].finish_reason == "length"
    await pool.close()


async def test_pool_skips_an_endpoint_that_is_down(up):
    dead = f"http://127.0.0.1:{free_port()}"
    statuses: list[int] = []
    pool = pool_for([dead, up.url], statuses)
    await pool.start()
    assert statuses == [1] and not pool.status()[endpoint_ids([dead])[0]]["up"]
    for i in range(4):
        chunks = await collect(pool.stream(request(f"d{i}", block_keys=[i + 1, i + 2])))
        assert chunks[0].route.decode == endpoint_ids([up.url])[0] and chunks[-1].error is None
    await pool.close()


async def test_pool_fails_over_before_the_first_chunk(up, up2):
    statuses: list[int] = []
    metrics = IngressMetrics()
    pool = pool_for([up.url, up2.url], statuses, metrics)
    await pool.start()
    first = await collect(pool.stream(request("f1", block_keys=KEYS)))
    by_id = dict(zip(endpoint_ids([up.url, up2.url]), (up, up2), strict=True))
    pinned = first[0].route.decode
    other = next(e for e in by_id if e != pinned)
    by_id[pinned].config.status = 503  # its health still answers: only the request fails
    chunks = await collect(pool.stream(request("f2", block_keys=KEYS)))
    assert chunks[0].route.decode == other and chunks[0].route.reason == "failover"
    assert chunks[-1].finish_reason == "length" and chunks[-1].error is None
    assert len(by_id[pinned].completions()) == 2  # it was tried first (prefix affinity), once
    # It left routing at once (its health, which still answers, may bring it back 50 ms later).
    assert statuses[:2] == [2, 1]
    assert sample(metrics, "tandem_upstream_errors_total", endpoint=pinned, kind="status") == 1.0
    await pool.close()


async def test_a_500_fails_over_but_leaves_the_endpoint_in_routing(up, up2):
    statuses: list[int] = []
    pool = pool_for([up.url, up2.url], statuses)
    await pool.start()
    first = await collect(pool.stream(request("g1", block_keys=KEYS)))
    by_id = dict(zip(endpoint_ids([up.url, up2.url]), (up, up2), strict=True))
    pinned = first[0].route.decode
    by_id[pinned].config.status = 500  # maybe this request's doing: try elsewhere, keep routing there
    chunks = await collect(pool.stream(request("g2", block_keys=KEYS)))
    assert chunks[0].route.reason == "failover" and chunks[-1].finish_reason == "length"
    assert pool.status()[pinned]["up"] and statuses == [2]
    assert pool.status()[pinned]["last_error"].startswith("502 upstream_error")
    await pool.close()


async def test_pool_returns_client_errors_without_failing_over(up, up2):
    pool = pool_for([up.url, up2.url])
    await pool.start()
    up.config.status = up2.config.status = 400
    up.config.error_body = up2.config.error_body = {"error": {"message": "prompt too long"}}
    (chunk,) = await collect(pool.stream(request("c1")))
    assert chunk.error.status == 400 and chunk.error.message == "prompt too long"
    assert len(up.completions()) + len(up2.completions()) == 1 and pool.healthy == 2
    await pool.close()


async def test_pool_down_then_recovers(up, up2):
    statuses: list[int] = []
    metrics = IngressMetrics()
    pool = pool_for([up.url, up2.url], statuses, metrics)
    await pool.start()
    assert sample(metrics, "tandem_upstream_up", endpoint=endpoint_ids([up.url])[0]) == 1.0
    up.config.health_status = up2.config.health_status = 503
    assert await wait_until(lambda: statuses[-1:] == [0]), statuses
    (chunk,) = await collect(pool.stream(request("x1")))
    assert (chunk.error.status, chunk.error.type) == (503, "upstream_unavailable")
    assert all(e in chunk.error.message for e in endpoint_ids([up.url, up2.url]))
    assert not up.completions() and not up2.completions()
    with pytest.raises(RuntimeError, match="no endpoint"):
        await pool.probe()
    assert sample(metrics, "tandem_upstream_up", endpoint=endpoint_ids([up.url])[0]) == 0.0
    up.config.health_status = up2.config.health_status = 200
    assert await wait_until(lambda: statuses[-1:] == [2]), statuses
    await pool.probe()
    chunks = await collect(pool.stream(request("x2")))
    assert chunks[-1].finish_reason == "length"
    await pool.close()


async def test_pool_uses_reported_load_and_reports_status(up, up2):
    up.config.metrics_text = 'vllm:num_requests_running{engine="0"} 40\nvllm:kv_cache_usage_perc 0.9\n'
    up2.config.metrics_text = 'vllm:num_requests_running{engine="0"} 0\nvllm:kv_cache_usage_perc 0.1\n'
    pool = pool_for([up.url, up2.url])
    await pool.start()
    busy, idle = endpoint_ids([up.url, up2.url])
    st = pool.status()
    assert (st[busy]["running"], st[busy]["kv_usage"], st[busy]["stats_known"]) == (40, 0.9, True)
    for i in range(3):  # no prefix anywhere: the least loaded endpoint wins
        chunks = await collect(pool.stream(request(f"l{i}", block_keys=[900 + i])))
        assert chunks[0].route.decode == idle
    await pool.close()


async def test_pool_starts_with_every_endpoint_down_and_plans_for_the_specs_context(up, caplog):
    ok = pool_for([f"http://127.0.0.1:{free_port()}"], max_model_len=2048)
    assert (await ok.start()).max_model_len == 2048  # down endpoints are not an error
    await ok.close()
    # An endpoint reporting another context length: the spec's is used, and the mismatch is logged.
    other = pool_for([up.url], max_model_len=1000)
    assert (await other.start()).max_model_len == 1000
    assert "endpoints report [4096]" in caplog.text
    await other.close()


async def test_pool_follows_the_endpoints_kv_events(up, up2):
    """A vLLM endpoint's BlockStored events (its ZMQ publisher) steer requests for those blocks to it."""
    import msgspec
    import zmq

    ports = [free_port(), free_port()]
    ctx = zmq.Context.instance()
    pubs = [ctx.socket(zmq.PUB) for _ in ports]
    for sock, port in zip(pubs, ports, strict=True):
        sock.bind(f"tcp://127.0.0.1:{port}")
    pool = pool_for([up.url, up2.url], kv_events=[f"tcp://127.0.0.1:{p}" for p in ports])
    await pool.start()
    target = endpoint_ids([up.url, up2.url])[1]
    keys = [7001, 7002, 7003, 7004]
    batch = msgspec.msgpack.encode([time.time(), [{"type": "BlockStored", "block_hashes": keys}], 0])
    try:
        seq = 0
        deadline = time.monotonic() + 5
        # PUB/SUB drops what is sent before the subscription is live: publish until it lands.
        while pool.route(request("probe", block_keys=keys))[1].matched.get(target) != len(keys):
            assert time.monotonic() < deadline, "no KV event reached the index"
            pubs[1].send_multipart([b"", seq.to_bytes(8, "big", signed=True), batch])
            seq += 1
            await asyncio.sleep(0.05)
        chunks = await collect(pool.stream(request("kv", block_keys=keys)))
        assert chunks[0].route.decode == target and chunks[0].route.matched_blocks == len(keys)
    finally:
        await pool.close()
        for sock in pubs:
            sock.close(linger=0)


async def test_a_client_leaving_the_ingress_stream_closes_the_upstream_request(up):
    # The whole path as a client sees it: Tandem's API under uvicorn (Starlette cancels a request whose
    # client left under an anyio cancel scope), an ExternalPool, a real HTTP upstream.
    import httpx
    import uvicorn

    from serving.http.api import build_api
    from serving.http.pipeline import ServedModel
    from tests.unit.test_api import WordTokenizer

    up.config.tokens = list(range(20, 3000))
    up.config.delay_s = 0.005
    pool = pool_for([up.url])
    await pool.start()
    app = build_api({"m": ServedModel("m", 4096, WordTokenizer(), pool)})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "m", "messages": messages, "max_tokens": 2900, "stream": True}
        async with httpx.AsyncClient() as c:
            async with c.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                frames = 0
                async for line in r.aiter_lines():
                    frames += line.startswith("data: ")
                    if frames >= 3:
                        break
                assert up.active == 1
        left = time.monotonic()
        assert await asyncio.to_thread(up.wait_for, lambda: up.active == 0, 2.0), "upstream still generating"
        assert up.disconnects == 1 and time.monotonic() - left < 1.0
    finally:
        server.should_exit = True
        await serving
        await pool.close()
