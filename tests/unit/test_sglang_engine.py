"""SGLangEngine against a faithful fake of SGLang's offline Engine (tests/unit/fake_sglang.py).

What only a real SGLang on a GPU can check is listed in serving/replicas/engines/sglang_engine.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from router.resilience import ErrorClass, classify
from serving.replicas.engines.base import Chunk, Engine, GenerateRequest, KVHandle, SamplingOptions
from serving.replicas.engines.sglang_engine import (
    SGLangEngine,
    default_host_ip,
    known_server_args,
    sampling_params,
)
from tests.unit.fake_sglang import FakeBootstrapRegistry, FakeEngine, fake_engine_cls, install_as_sglang

PROMPT = [1, 2, 3, 10]  # the fake's output token i is 10 + i + 1, rendered " t<id>"
WAIT_S = 5.0  # upper bound for anything that must not hang


def req(request_id: str = "r1", prompt: list[int] | None = None, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id, list(prompt or PROMPT), SamplingOptions(**{"max_tokens": 4, **sampling})
    )


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    async def run() -> list[Chunk]:
        return [c async for c in chunks]

    return await asyncio.wait_for(run(), WAIT_S)


def fake(cls: type[FakeEngine]) -> FakeEngine:
    assert cls.instances, "the engine was never constructed"
    return cls.instances[-1]


@asynccontextmanager
async def running(
    cls: type[FakeEngine] | None = None,
    role: str = "colocated",
    engine_args: dict[str, Any] | None = None,
    **kw: Any,
) -> AsyncIterator[SGLangEngine]:
    engine = SGLangEngine(
        "tiny", "/models/tiny", engine_args or {}, role=role, engine_cls=cls or fake_engine_cls(), **kw
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def until(predicate: Any, what: str) -> None:
    """Poll `predicate` (state kept by fakes has no events to wait on) for at most WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        if predicate():
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


# ------------------------------------------------------------------------------------------------
# Colocated generation
# ------------------------------------------------------------------------------------------------


def test_implements_the_engine_protocol() -> None:
    engine = SGLangEngine("m", "/m", {}, engine_cls=fake_engine_cls())
    assert isinstance(engine, Engine)


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "cumulative"])
async def test_generate_streams_deltas_not_cumulative_text(incremental: bool) -> None:
    cls = fake_engine_cls(step_delay_s=0.002)
    args = {} if incremental else {"incremental_streaming_output": False}
    async with running(cls, engine_args=args) as engine:
        chunks = await collect(engine.generate(req(max_tokens=5)))
        assert fake(cls).server_args.incremental_streaming_output is incremental
    assert [c.token_ids for c in chunks] == [[11], [12], [13], [14], [15]]
    assert [c.text for c in chunks] == [" t11", " t12", " t13", " t14", " t15"]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
    assert [c.finish_reason for c in chunks] == [None, None, None, None, "length"]
    assert all(c.prompt_tokens == len(PROMPT) and c.error is None for c in chunks)


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "cumulative"])
async def test_slow_consumer_gets_every_token_exactly_once(incremental: bool) -> None:
    args = {} if incremental else {"incremental_streaming_output": False}
    async with running(engine_args=args) as engine:
        chunks = []
        async for c in engine.generate(req(max_tokens=20)):
            chunks.append(c)
            await asyncio.sleep(0.01)  # SGLang queues several steps meanwhile
    assert len(chunks) < 20, "the fake should have merged queued steps"
    assert ids(chunks) == list(range(11, 31))
    assert text(chunks) == "".join(f" t{i}" for i in range(11, 31))
    assert chunks[-1].completion_tokens == 20 and chunks[-1].finish_reason == "length"


async def test_token_counts_and_cached_tokens() -> None:
    cls = fake_engine_cls()
    first = [5, 6, 7, 8, 9, 10, 11, 12]
    second = [5, 6, 7, 8, 9, 10, 40, 41]  # shares 6 tokens with the first
    async with running(cls, engine_args={"page_size": 4}) as engine:
        a = await collect(engine.generate(req("a", first, max_tokens=3)))
        b = await collect(engine.generate(req("b", second, max_tokens=3)))
        stats = engine.stats()
    assert {(c.prompt_tokens, c.cached_tokens) for c in a} == {(8, 0)}
    # SGLang reports prefix hits in whole pages: 6 shared tokens, page_size 4 -> 4 cached.
    assert {(c.prompt_tokens, c.cached_tokens) for c in b} == {(8, 4)}
    assert [c.completion_tokens for c in b] == [1, 2, 3]
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (16, 4)
    assert (stats.prompt_tokens_computed, stats.prompt_tokens_local_cache, stats.prompt_tokens_external) == (
        12,
        4,
        0,
    )


async def test_stop_string_ends_with_stop_and_trimmed_text() -> None:
    async with running() as engine:
        chunks = await collect(engine.generate(req(max_tokens=10, stop=[" t13"])))
    assert chunks[-1].finish_reason == "stop"
    assert text(chunks) == " t11 t12"
    assert chunks[-1].completion_tokens == 3


async def test_stop_token_id_ends_with_stop() -> None:
    async with running() as engine:
        chunks = await collect(engine.generate(req(max_tokens=10, stop_token_ids=[12])))
    assert chunks[-1].finish_reason == "stop"
    assert ids(chunks) == [11, 12] and text(chunks) == " t11"


@pytest.mark.parametrize(
    ("sampling", "finish", "n_tokens"),
    [
        ({}, "stop", 2),  # EOS (token 12) ends the request
        ({"ignore_eos": True}, "length", 6),
        ({"min_tokens": 4}, "length", 6),  # EOS before min_new_tokens does not count
    ],
)
async def test_eos_ignore_eos_and_min_tokens(sampling: dict[str, Any], finish: str, n_tokens: int) -> None:
    async with running(fake_engine_cls(eos_token_id=12)) as engine:
        chunks = await collect(engine.generate(req(max_tokens=6, **sampling)))
    assert chunks[-1].finish_reason == finish
    assert len(ids(chunks)) == n_tokens


def test_sampling_options_map_to_sglang_names() -> None:
    opts = SamplingOptions(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=None,
        min_tokens=2,
        seed=42,
        stop=["x"],
        stop_token_ids=[5],
        ignore_eos=True,
        presence_penalty=0.1,
        frequency_penalty=-0.2,
    )
    assert sampling_params(opts) == {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": -1,
        "ignore_eos": True,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "stop": ["x"],
        "stop_token_ids": [5],
        "sampling_seed": 42,
    }
    assert sampling_params(SamplingOptions(max_tokens=1, top_k=0))["top_k"] == -1  # 0 is invalid in SGLang
    assert sampling_params(SamplingOptions(max_tokens=1, top_k=40))["top_k"] == 40
    plain = sampling_params(SamplingOptions(max_tokens=1))
    assert not {"stop", "stop_token_ids", "sampling_seed"} & set(plain)


async def test_generate_passes_token_ids_sampling_params_and_a_unique_rid() -> None:
    cls = fake_engine_cls()
    opts = {"temperature": 0.7, "top_k": 5, "seed": 3, "frequency_penalty": 0.5}
    async with running(cls) as engine:
        chunks = await collect(engine.generate(req("req-7", **opts)))
        await collect(engine.generate(req("req-7", **opts)))  # the same request id again is fine
    sent = fake(cls).requests
    assert chunks[-1].finish_reason == "length"  # the fake's SamplingParams(**params) accepted every name
    assert sent[0]["input_ids"] == PROMPT and sent[0]["stream"] is True
    assert sent[0]["sampling_params"] == sampling_params(req(**opts).sampling)
    assert sent[0]["rid"].endswith("-req-7") and sent[0]["rid"] != sent[1]["rid"]
    assert sent[0]["bootstrap_room"] is None


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (req(temperature=-1.0), "temperature"),
        (req(top_p=0.0), "top_p"),
        (req(prompt=list(range(1, 40)), max_tokens=1), "context length"),
        (req(max_tokens=30), "maximum context length"),
    ],
    ids=["temperature", "top_p", "prompt-too-long", "prompt-plus-max-tokens"],
)
async def test_bad_request_is_a_400_chunk(request_: GenerateRequest, needle: str) -> None:
    cls = fake_engine_cls(model_context_len=32)
    async with running(cls) as engine:
        chunks = await collect(engine.generate(request_))
        assert fake(cls).live_requests == 0
    assert len(chunks) == 1 and chunks[0].error is not None
    assert chunks[0].error.status == 400 and chunks[0].error.type == "invalid_request_error"
    assert needle in chunks[0].error.message


async def test_abort_ends_the_stream_with_abort_and_frees_the_request() -> None:
    cls = fake_engine_cls(step_delay_s=0.005)
    async with running(cls) as engine:
        stream = engine.generate(req(max_tokens=1000))
        chunks = [await anext(stream)]
        await engine.abort("r1")
        chunks += await collect(stream)
        assert fake(cls).live_requests == 0
    assert chunks[-1].finish_reason == "abort" and chunks[-1].error is None
    assert 0 < len(ids(chunks)) < 1000
    assert ids(chunks) == list(range(11, 11 + len(ids(chunks))))


async def test_abort_leaves_a_request_whose_id_extends_the_aborted_one() -> None:
    # SGLang's scheduler aborts every rid that STARTS WITH the given one.
    async with running(fake_engine_cls(step_delay_s=0.005)) as engine:
        long_ = asyncio.ensure_future(collect(engine.generate(req("r10", max_tokens=40))))
        short = engine.generate(req("r1", max_tokens=1000))
        await anext(short)
        await engine.abort("r1")
        short_chunks = await collect(short)
        long_chunks = await long_
    assert short_chunks[-1].finish_reason == "abort"
    assert long_chunks[-1].finish_reason == "length" and len(ids(long_chunks)) == 40


@pytest.mark.parametrize("engine_aborts_on_close", [True, False])
async def test_closing_the_stream_early_aborts_the_request(engine_aborts_on_close: bool) -> None:
    cls = fake_engine_cls(step_delay_s=0.005, abort_on_close=engine_aborts_on_close)
    async with running(cls) as engine:
        stream = engine.generate(req(max_tokens=1000))
        await anext(stream)
        await stream.aclose()
        await until(lambda: fake(cls).live_requests == 0, "the aborted request to leave SGLang")
        assert len(fake(cls).tokenizer_manager.abort_calls) == 1


async def test_abort_of_a_retracted_request_repeats_no_text() -> None:
    # A request SGLang retracted to its waiting queue ends, when aborted there, with its whole text
    # and its last token again (TokenizerManager._handle_abort_req); the client must not see them twice.
    cls = fake_engine_cls(step_delay_s=0.005)
    async with running(cls, engine_args={"max_running_requests": 1}) as engine:
        a = engine.generate(req("a", max_tokens=1000))
        chunks = [await anext(a), await anext(a)]
        b = asyncio.ensure_future(collect(engine.generate(req("b", max_tokens=30))))
        state = fake(cls).tokenizer_manager.rid_to_state[fake(cls).requests[0]["rid"]]
        fake(cls).retract(state.rid)
        live = fake(cls).tokenizer_manager.rid_to_state
        await until(lambda: not state.running and sum(s.running for s in live.values()) == 1, "b to run")
        await engine.abort("a")
        chunks += await collect(a)
        assert (await b)[-1].finish_reason == "length"
    assert chunks[-1].finish_reason == "abort"
    assert ids(chunks) == list(range(11, 11 + len(ids(chunks))))
    assert text(chunks) == "".join(f" t{i}" for i in ids(chunks))


async def test_abort_while_waiting_and_load_stats() -> None:
    cls = fake_engine_cls(step_delay_s=0.005)
    async with running(cls, engine_args={"max_running_requests": 1}, stats_interval_s=0.01) as engine:
        first = asyncio.ensure_future(collect(engine.generate(req("a", max_tokens=1000))))
        second = asyncio.ensure_future(collect(engine.generate(req("b", max_tokens=5))))
        await until(
            lambda: (engine.stats().running, engine.stats().waiting) == (1, 1), "one running, one waiting"
        )
        assert 0 < engine.stats().kv_usage < 1
        await engine.abort("b")
        waiting = await second
        await engine.abort("a")
        await first
        await until(lambda: (engine.stats().running, engine.stats().waiting) == (0, 0), "an idle engine")
    # A request aborted in SGLang's waiting queue ends without token counts: the prompt size is ours.
    assert [(c.finish_reason, c.text, c.token_ids, c.prompt_tokens) for c in waiting] == [
        ("abort", "", [], len(PROMPT))
    ]


# ------------------------------------------------------------------------------------------------
# Prefill / decode
# ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def pd_pair(
    registry: FakeBootstrapRegistry, prefill_args: dict[str, Any] | None = None, **knobs: Any
) -> AsyncIterator[tuple[SGLangEngine, SGLangEngine, type[FakeEngine], type[FakeEngine]]]:
    pcls, dcls = fake_engine_cls(registry, **knobs), fake_engine_cls(registry, **knobs)
    args = {"disaggregation_bootstrap_port": 9100, **(prefill_args or {})}
    async with (
        running(pcls, "prefill", args, host_ip=lambda: registry.node_ip) as prefill,
        running(dcls, "decode", {"disaggregation_bootstrap_port": 9100}) as decode,
    ):
        yield prefill, decode, pcls, dcls


async def test_prefill_returns_a_handle_with_bootstrap_host_port_and_room() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, _, pcls, _):
        kv = await prefill.prefill(req("p1"))
        kv2 = await prefill.prefill(req("p2"))
        sent = fake(pcls).requests[0]
        server_args = fake(pcls).server_args
    assert kv.error is None and kv.prompt_tokens == len(PROMPT)
    assert set(kv.params) == {"bootstrap_host", "bootstrap_port", "bootstrap_room"}
    assert kv.params["bootstrap_host"] == registry.node_ip and kv.params["bootstrap_port"] == 9100
    assert (
        0 <= kv.params["bootstrap_room"] < 2**63
        and kv.params["bootstrap_room"] != kv2.params["bootstrap_room"]
    )
    # The prefill-side request carries the same triple, and the bootstrap server listens on all interfaces.
    assert (sent["bootstrap_host"], sent["bootstrap_port"], sent["bootstrap_room"]) == tuple(
        kv.params.values()
    )
    assert (server_args.disaggregation_mode, server_args.host) == ("prefill", "0.0.0.0")


async def test_decode_streams_the_same_tokens_as_colocated_generate() -> None:
    registry = FakeBootstrapRegistry()
    opts = {"max_tokens": 6, "stop": [" t16"]}
    async with running() as colocated:
        expected = await collect(colocated.generate(req(**opts)))
    async with pd_pair(registry) as (prefill, decode, pcls, dcls):
        kv = await prefill.prefill(req(**opts))
        chunks = await collect(decode.decode(req(**opts), kv))
        await until(lambda: fake(pcls).live_requests == 0, "the prefill to finish after the handoff")
        p_stats, d_stats = prefill.stats(), decode.stats()
        decode_sent = fake(dcls).requests[0]
    assert [(c.text, c.token_ids, c.finish_reason, c.completion_tokens) for c in chunks] == [
        (c.text, c.token_ids, c.finish_reason, c.completion_tokens) for c in expected
    ]
    assert [h.room for h in registry.handoffs] == [kv.params["bootstrap_room"]]
    assert decode_sent["bootstrap_room"] == kv.params["bootstrap_room"]
    assert decode_sent["bootstrap_host"] == registry.node_ip and decode_sent["bootstrap_port"] == 9100
    assert (d_stats.kv_transfers, d_stats.kv_transfer_failures, d_stats.prompt_tokens_external) == (1, 0, 4)
    assert (p_stats.prefix_cache_queries, p_stats.prompt_tokens_computed, p_stats.kv_transfer_failures) == (
        4,
        4,
        0,
    )


async def test_decode_reports_the_prefills_cached_tokens() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, decode, _, _):
        for request_id, prompt in (("a", [7, 8, 9, 10, 11, 12]), ("b", [7, 8, 9, 10, 50, 51])):
            kv = await prefill.prefill(req(request_id, prompt))
            chunks = await collect(decode.decode(req(request_id, prompt), kv))
    assert {c.cached_tokens for c in chunks} == {4}
    assert chunks[-1].finish_reason == "length"


async def test_decode_whose_prefill_never_comes_ends_in_an_error_chunk() -> None:
    registry = FakeBootstrapRegistry(waiting_timeout_s=0.2)
    async with pd_pair(registry) as (_, decode, _, dcls):
        orphan = KVHandle(
            params={"bootstrap_host": registry.node_ip, "bootstrap_port": 9100, "bootstrap_room": 7}
        )
        chunks = await collect(decode.decode(req(), orphan))
        assert fake(dcls).live_requests == 0
        stats = decode.stats()
    assert len(chunks) == 1 and chunks[0].error is not None
    assert (chunks[0].error.status, chunks[0].error.type) == (502, "kv_transfer")
    assert "WaitingForInput" in chunks[0].error.message
    assert (stats.kv_transfers, stats.kv_transfer_failures) == (0, 1)


@pytest.mark.parametrize("failure", ["kv_never_arrives", "unknown_bootstrap_server"])
async def test_a_failed_kv_transfer_on_decode_is_a_502_kv_transfer_not_an_engine_fault(failure: str) -> None:
    # SGLang aborts the decode with a plain 500 (KVPoll.WaitingForInput timed out, or no prefill
    # server behind the bootstrap address). Left as is, that 500 would be an `engine_error`, which the
    # ingress reads as an engine fault (the input's fault: never retried on the target, a strike per
    # tenant); the adapter reports it as the vLLM engine reports a failed KV load: 502 `kv_transfer`,
    # a server error that is retried.
    registry = FakeBootstrapRegistry(waiting_timeout_s=0.2)
    async with pd_pair(registry) as (_, decode, _, dcls):
        host = registry.node_ip if failure == "kv_never_arrives" else "10.9.9.9"
        kv = KVHandle(params={"bootstrap_host": host, "bootstrap_port": 9100, "bootstrap_room": 7})
        chunks = await collect(decode.decode(req(), kv))
        assert fake(dcls).live_requests == 0
        stats = decode.stats()
    (chunk,) = chunks
    assert chunk.error is not None
    assert (chunk.error.status, chunk.error.type) == (502, "kv_transfer")
    assert classify(chunk.error.status, False, chunk.error.type) is ErrorClass.SERVER
    assert (stats.kv_transfers, stats.kv_transfer_failures) == (0, 1)


async def test_decode_from_an_unknown_bootstrap_server_fails_fast() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (_, decode, _, _):
        kv = KVHandle(params={"bootstrap_host": "10.9.9.9", "bootstrap_port": 9100, "bootstrap_room": 1})
        chunks = await collect(decode.decode(req(), kv))
    assert chunks[-1].error is not None and chunks[-1].error.status == 502
    assert "bootstrap" in chunks[-1].error.message


async def test_prefill_bound_to_loopback_is_unreachable_from_other_nodes() -> None:
    # SGLang's default host (127.0.0.1) would hide the bootstrap server; the adapter binds 0.0.0.0.
    registry = FakeBootstrapRegistry(waiting_timeout_s=0.2)
    async with pd_pair(registry, prefill_args={"host": "127.0.0.1"}) as (prefill, decode, _, _):
        kv = await prefill.prefill(req())
        chunks = await collect(decode.decode(req(), kv))
    assert chunks[-1].error is not None and "bootstrap" in chunks[-1].error.message


async def test_prefill_whose_decode_never_comes_expires_without_leaking() -> None:
    registry = FakeBootstrapRegistry(bootstrap_timeout_s=0.2)
    async with pd_pair(registry) as (prefill, _, pcls, _):
        kv = await prefill.prefill(req())
        assert kv.error is None
        await until(lambda: prefill.stats().kv_expired == 1, "the held KV to expire")
        stats = prefill.stats()
        assert fake(pcls).live_requests == 0 and registry.open_rooms == 0
    assert stats.kv_transfer_failures == 1 and stats.prefix_cache_queries == 0


async def test_abort_cancels_the_background_prefill() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, _, pcls, _):
        await prefill.prefill(req("p1"))
        await until(
            lambda: fake(pcls).live_requests == 1 and registry.open_rooms == 1, "the prefill to hold KV"
        )
        await prefill.abort("p1")
        await until(lambda: fake(pcls).live_requests == 0, "the prefill to leave SGLang")
        assert registry.open_rooms == 0
        assert len(fake(pcls).tokenizer_manager.abort_calls) == 1
        assert prefill.stats().running == 0


async def test_prefill_of_a_bad_request_returns_an_error_handle() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, decode, _, _):
        kv = await prefill.prefill(req(temperature=-1.0))
        chunks = await collect(decode.decode(req(temperature=-1.0), kv))
    assert kv.error is not None and kv.error.status == 400 and not kv.params
    assert chunks == [Chunk(error=kv.error)]


async def test_engines_refuse_work_their_role_cannot_do() -> None:
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, decode, _, _), running() as colocated:
        on_decode = await collect(decode.generate(req()))
        on_prefill = await collect(prefill.decode(req(), KVHandle(params={"bootstrap_room": 1})))
        handle = await colocated.prefill(req())
        no_params = await collect(decode.decode(req(), KVHandle(params={})))
    assert on_decode[0].error is not None and "decode engine" in on_decode[0].error.message
    assert on_prefill[0].error is not None and on_prefill[0].error.status == 500
    assert handle.error is not None and handle.error.status == 500
    assert no_params[0].error is not None and "bootstrap" in no_params[0].error.message


# ------------------------------------------------------------------------------------------------
# Engine arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "mode", "backend"),
    [("colocated", "null", "mooncake"), ("prefill", "prefill", "nixl"), ("decode", "decode", "nixl")],
)
async def test_role_maps_to_disaggregation_mode_and_nixl_is_the_default_backend(
    role: str, mode: str, backend: str
) -> None:
    registry = FakeBootstrapRegistry()
    cls = fake_engine_cls(registry)
    async with running(cls, role) as engine:
        server_args = fake(cls).server_args
    assert engine.role == role
    assert server_args.disaggregation_mode == mode
    assert server_args.disaggregation_transfer_backend == backend  # colocated: SGLang's own default
    assert server_args.model_path == "/models/tiny" and server_args.served_model_name == "tiny"
    assert server_args.skip_tokenizer_init is False and server_args.incremental_streaming_output is True


async def test_engine_args_pass_through_to_server_args() -> None:
    registry = FakeBootstrapRegistry()
    cls = fake_engine_cls(registry)
    args = {
        "tp_size": 2,
        "dp_size": 2,
        "ep_size": 4,
        "enable_dp_attention": True,
        "mem_fraction_static": 0.8,
        "context_length": 2048,
        "disaggregation_transfer_backend": "mooncake",
        "disaggregation_bootstrap_port": 9300,
        "disaggregation_ib_device": "mlx5_0",
    }
    async with running(cls, "prefill", args, host_ip=lambda: "10.1.1.1") as engine:
        server_args = fake(cls).server_args
        kv = await engine.prefill(req())
        info = engine.model_info()
    for key, value in args.items():
        assert getattr(server_args, key) == value, key
    assert kv.params["bootstrap_port"] == 9300 and kv.params["bootstrap_host"] == "10.1.1.1"
    assert info.max_model_len == 2048


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"tp": 2}, "['tp']"),
        ({"tp_size": 2, "bogus_flag": 1, "another": 2}, "['another', 'bogus_flag']"),
        ({"disaggregation_transfer_backend": "ascend"}, "nixl"),
        ({"disaggregation_transfer_backend": "tcp"}, "mooncake"),
        ({"model_path": "/x"}, "set by the deployment"),
        ({"disaggregation_mode": "decode"}, "engine role"),
        ({"skip_tokenizer_init": True}, "skip_tokenizer_init"),
        ({"disaggregation_bootstrap_port": 0}, "TCP port"),
        ({"disaggregation_bootstrap_port": "9000"}, "TCP port"),
    ],
)
def test_bad_engine_args_are_rejected_with_a_clear_message(args: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as err:
        SGLangEngine("m", "/m", args, role="prefill", engine_cls=fake_engine_cls())
    assert needle in str(err.value)


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role"):
        SGLangEngine("m", "/m", {}, role="encode", engine_cls=fake_engine_cls())


def test_fake_server_args_reject_unknown_kwargs_like_sglang() -> None:
    with pytest.raises(TypeError, match="bogus"):
        fake_engine_cls()(model_path="/m", bogus=1)


def test_known_server_args_reads_dataclass_struct_or_signature() -> None:
    @dataclasses.dataclass
    class OldServerArgs:  # earlier sglang releases: ServerArgs was a dataclass
        model_path: str
        tp_size: int = 1

    class OldEngine:
        server_args_class = OldServerArgs

    class PlainEngine:
        def __init__(self, model_path: str, tp_size: int = 1) -> None:
            pass

    assert known_server_args(OldEngine) == {"model_path", "tp_size"}
    assert "disaggregation_bootstrap_port" in (known_server_args(fake_engine_cls()) or set())
    assert known_server_args(PlainEngine) == {"model_path", "tp_size"}
    with pytest.raises(ValueError, match="'dp_size'"):
        SGLangEngine("m", "/m", {"dp_size": 2}, engine_cls=OldEngine)


async def test_without_engine_cls_sglang_is_imported_lazily_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = fake_engine_cls()
    install_as_sglang(monkeypatch, cls)
    with pytest.raises(ValueError, match="'tpsize'"):  # checked against sglang.srt.server_args.ServerArgs
        SGLangEngine("m", "/m", {"tpsize": 2})
    engine = SGLangEngine("m", "/m", {"tp_size": 2})
    assert cls.instances == []
    await engine.start()
    try:
        assert fake(cls).server_args.tp_size == 2
    finally:
        await engine.shutdown()


async def test_engine_args_are_checked_at_start_if_sglang_was_not_imported_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "sglang.srt.server_args", raising=False)
    engine = SGLangEngine("m", "/m", {"tpsize": 2})  # nothing to check against without importing SGLang
    cls = fake_engine_cls()
    install_as_sglang(monkeypatch, cls)
    with pytest.raises(ValueError, match="'tpsize'"):
        await engine.start()
    assert cls.instances == []
    with pytest.raises(RuntimeError, match="not started"):
        engine.model_info()


def test_importing_the_adapter_does_not_import_sglang() -> None:
    code = "import sys, serving.replicas.engines.sglang_engine; assert 'sglang' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_default_host_ip_honours_sglang_host_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_HOST_IP", "192.0.2.7")
    assert default_host_ip() == "192.0.2.7"
    monkeypatch.delenv("SGLANG_HOST_IP")
    monkeypatch.delenv("HOST_IP", raising=False)
    assert default_host_ip().count(".") == 3


async def test_multi_node_bootstrap_host_is_the_dist_init_addr_host() -> None:
    registry = FakeBootstrapRegistry()
    async with running(fake_engine_cls(registry), "prefill", {"dist_init_addr": "127.0.0.1:5000"}) as engine:
        kv = await engine.prefill(req())
    assert kv.params["bootstrap_host"] == "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# Model info, health, shutdown
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "context", "page"), [({}, 4096, 1), ({"context_length": 1024, "page_size": 16}, 1024, 16)]
)
async def test_model_info_reports_context_length_and_page_size(
    args: dict[str, Any], context: int, page: int
) -> None:
    async with running(fake_engine_cls(max_total_num_tokens=8192), engine_args=args) as engine:
        info = engine.model_info()
    assert (info.name, info.path, info.max_model_len, info.block_size) == (
        "tiny",
        "/models/tiny",
        context,
        page,
    )
    assert info.num_kv_blocks == 8192 // page


async def test_reset_prefix_cache_flushes_an_idle_engine_and_refuses_a_busy_one() -> None:
    prompt = [5, 6, 7, 8, 9]
    async with running(fake_engine_cls(step_delay_s=0.002)) as engine:
        warm = await collect(engine.generate(req("a", prompt, max_tokens=2)))
        hit = await collect(engine.generate(req("b", prompt, max_tokens=2)))
        await engine.reset_prefix_cache()
        cold = await collect(engine.generate(req("c", prompt, max_tokens=2)))
        busy = engine.generate(req("d", max_tokens=1000))
        await anext(busy)
        with pytest.raises(RuntimeError, match="did not flush"):
            await engine.reset_prefix_cache()
        await busy.aclose()
    assert [warm[-1].cached_tokens, hit[-1].cached_tokens, cold[-1].cached_tokens] == [0, 4, 0]


async def test_a_crashed_engine_fails_health_checks_and_refuses_requests() -> None:
    cls = fake_engine_cls()
    async with running(cls) as engine:
        await collect(engine.generate(req()))  # starts SGLang's event handler
        await engine.check_health()
        fake(cls).crash("scheduler died")
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="scheduler died"):
            await engine.check_health()
        chunks = await collect(engine.generate(req()))
        kv = await engine.prefill(req())
    assert chunks[0].error is not None and (chunks[0].error.status, chunks[0].error.type) == (
        503,
        "engine_unavailable",
    )
    assert kv.error is not None


async def test_a_failed_start_shuts_sglang_down() -> None:
    def no_address() -> str:
        raise OSError("no route")

    registry = FakeBootstrapRegistry()
    cls = fake_engine_cls(registry)
    engine = SGLangEngine("m", "/m", {}, role="prefill", engine_cls=cls, host_ip=no_address)
    with pytest.raises(OSError, match="no route"):
        await engine.start()
    assert fake(cls).shutdown_called
    assert registry.resolve("127.0.0.1", 8998) is None  # its bootstrap port is free again


async def test_shutdown_releases_the_engine_and_background_prefills() -> None:
    registry = FakeBootstrapRegistry()
    cls = fake_engine_cls(registry)
    engine = SGLangEngine("m", "/m", {}, role="prefill", engine_cls=cls, host_ip=lambda: registry.node_ip)
    await engine.start()
    kv = await engine.prefill(req())
    await until(lambda: registry.open_rooms == 1, "the prefill to hold its KV")
    await engine.shutdown()
    assert fake(cls).shutdown_called
    assert registry.resolve(registry.node_ip, kv.params["bootstrap_port"]) is None
    # The adapter took its background prefill out of SGLang before shutting SGLang down.
    assert len(fake(cls).tokenizer_manager.abort_calls) == 1
    assert fake(cls).live_requests == 0 and engine.stats().running == 0
    with pytest.raises(RuntimeError, match="shut down"):
        await engine.check_health()
    late = await engine.prefill(req())
    assert late.error is not None and late.error.status == 503


# ------------------------------------------------------------------------------------------------
# Tenant cache isolation (router.tenant_salt)
# ------------------------------------------------------------------------------------------------


def salted(request_id: str, salt: str | None, prompt: list[int] | None = None) -> GenerateRequest:
    return dataclasses.replace(req(request_id, prompt), cache_salt=salt)


async def test_the_tenant_salt_reaches_sglang_on_generate_prefill_and_decode() -> None:
    cls = fake_engine_cls()
    async with running(cls) as engine:
        await collect(engine.generate(salted("c", "salt-a")))
        await collect(engine.generate(salted("u", None)))
        assert engine.model_info().cache_salt
    assert [r["cache_salt"] for r in fake(cls).requests] == ["salt-a", None]
    registry = FakeBootstrapRegistry()
    async with pd_pair(registry) as (prefill, decode, pcls, dcls):
        kv = await prefill.prefill(salted("p", "salt-b"))
        chunks = await collect(decode.decode(salted("p", "salt-b"), kv))
    assert chunks[-1].finish_reason == "length"
    assert fake(pcls).requests[0]["cache_salt"] == fake(dcls).requests[0]["cache_salt"] == "salt-b"


async def test_tenants_never_share_sglangs_prefix_cache() -> None:
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    async with running() as engine:
        a = await collect(engine.generate(salted("a", "tenant-a", prompt)))
        b = await collect(engine.generate(salted("b", "tenant-b", prompt)))
        a2 = await collect(engine.generate(salted("a2", "tenant-a", prompt)))
    assert [a[-1].cached_tokens, b[-1].cached_tokens] == [0, 0]  # B does not hit A's prompt
    assert a2[-1].cached_tokens == len(prompt) - 1  # A still hits its own


async def test_an_sglang_with_only_extra_key_gets_the_salt_as_extra_key() -> None:
    cls = fake_engine_cls(salt_api="extra_key")
    prompt = [5, 6, 7, 8, 9, 10]
    async with running(cls) as engine:
        await collect(engine.generate(salted("a", "tenant-a", prompt)))
        b = await collect(engine.generate(salted("b", "tenant-b", prompt)))
    assert fake(cls).requests[0]["extra_key"] == "tenant-a" and "cache_salt" not in fake(cls).requests[0]
    assert b[-1].cached_tokens == 0


async def test_an_sglang_without_a_cache_key_refuses_salted_requests() -> None:
    registry = FakeBootstrapRegistry()
    cls = fake_engine_cls(salt_api=None)
    async with running(cls) as engine:
        assert not engine.model_info().cache_salt
        refused = await collect(engine.generate(salted("a", "tenant-a")))
        unsalted = await collect(engine.generate(salted("u", None)))  # router.tenant_salt: false
    assert len(refused) == 1 and refused[0].error is not None
    assert (refused[0].error.status, refused[0].error.type) == (500, "cache_salt_unsupported")
    assert "router.tenant_salt" in refused[0].error.message
    assert [r["rid"].endswith("-u") for r in fake(cls).requests] == [True]  # only the unsalted one ran
    assert unsalted[-1].finish_reason == "length"
    pcls = fake_engine_cls(registry, salt_api=None)
    async with running(pcls, "prefill", host_ip=lambda: registry.node_ip) as prefill:
        kv = await prefill.prefill(salted("p", "tenant-a"))
    assert kv.error is not None and "router.tenant_salt" in kv.error.message
    assert fake(pcls).requests == []


def test_cache_salt_kwarg_reads_the_signature_then_generate_req_input(monkeypatch: Any) -> None:
    from serving.replicas.engines.sglang_engine import cache_salt_kwarg

    async def both(input_ids=None, extra_key=None, *, cache_salt=None): ...  # noqa: ANN001, ANN202
    async def wrapper(**kwargs): ...  # noqa: ANN003, ANN202

    assert cache_salt_kwarg(both) == "cache_salt"
    assert cache_salt_kwarg(fake_engine_cls(salt_api="extra_key").async_generate) == "extra_key"
    assert cache_salt_kwarg(fake_engine_cls(salt_api=None).async_generate) is None
    assert cache_salt_kwarg(wrapper) is None  # nothing to check **kwargs against: refuse, do not guess

    @dataclasses.dataclass
    class GenerateReqInput:
        input_ids: list[int] | None = None
        extra_key: str | None = None

    io_struct = type(sys)("sglang.srt.managers.io_struct")
    io_struct.GenerateReqInput = GenerateReqInput  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.io_struct", io_struct)
    assert cache_salt_kwarg(wrapper) == "extra_key"


@pytest.mark.filterwarnings("ignore:coroutine .EngineServer.__del__. was never awaited")
async def test_a_replica_with_tenant_salt_refuses_to_start_on_an_sglang_that_cannot_salt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.config import EngineKind, Role
    from serving.replicas.deployments import EngineServer

    cls = fake_engine_cls(salt_api=None)
    install_as_sglang(monkeypatch, cls)
    server = EngineServer.__new__(EngineServer)
    with pytest.raises(RuntimeError, match=r"router\.tenant_salt.*set router\.tenant_salt: false"):
        await server.__init__("m", "/m", EngineKind.SGLANG, {}, "p", Role.COLOCATED, tenant_salt=True)
    assert fake(cls).shutdown_called  # no SGLang processes left behind
    # Salting turned off: the same SGLang serves (tenants may share its cache, as configured).
    ok = EngineServer.__new__(EngineServer)
    await ok.__init__("m", "/m", EngineKind.SGLANG, {}, "p", Role.COLOCATED, tenant_salt=False)
    await ok._engine.shutdown()
    # An SGLang that takes the salt starts with salting on.
    install_as_sglang(monkeypatch, fake_engine_cls())
    salted_ok = EngineServer.__new__(EngineServer)
    await salted_ok.__init__("m", "/m", EngineKind.SGLANG, {}, "p", Role.COLOCATED, tenant_salt=True)
    await salted_ok._engine.shutdown()
