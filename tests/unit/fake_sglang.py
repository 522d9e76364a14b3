"""An in-process fake of the parts of SGLang's offline Engine API that `SGLangEngine` uses.

It mirrors sglang 0.5.23 (read from the wheel's source), so the adapter is tested against the
real shapes and semantics, not against what we wish SGLang did:

* `Engine(**kwargs)` builds `ServerArgs(**kwargs)`; in 0.5.23 `ServerArgs` is a `msgspec.Struct`, so an
  unknown keyword raises `TypeError` ("Unexpected keyword argument") -- `srt/server_args.py`,
  `srt/entrypoints/engine.py::Engine.__init__`. `Engine.server_args_class` names the class.
* `await Engine.async_generate(input_ids=, sampling_params=, stream=, bootstrap_host=, bootstrap_port=,
  bootstrap_room=, rid=, *, cache_salt=)` returns the final dict (`stream=False`) or an async iterator
  of dicts (`stream=True`). Each dict is `{"text", "output_ids", "meta_info"}`; `meta_info` has `id`,
  `finish_reason` (None while running, else `{"type": "length", "length": n}`, `{"type": "stop",
  "matched": str | int}`, `{"type": "abort", "message", "status_code", "err_type"}`), `prompt_tokens`,
  `completion_tokens`, `cached_tokens` -- `srt/managers/tokenizer_manager.py::_handle_batch_output`,
  `srt/managers/schedule_batch.py` (FINISH_*).
* Streaming text and ids are cumulative unless `incremental_streaming_output=True`; cumulative
  intermediate `output_ids` is the request state's own list (a reference that keeps growing); with
  incremental output, queued chunks are coalesced when the consumer lags (`_stream_one_response`).
* A request aborted while still waiting ends with the tokenizer manager's own output: cumulative
  `text`, `output_ids=[last]` in incremental mode, no `prompt_tokens` (`_handle_abort_req`).
* Request validation errors raise `ValueError` from the first `__anext__` (context length, sampling
  params: `srt/sampling/sampling_params.py::SamplingParams.verify`); a duplicate rid raises
  `ValueError("Duplicate request ID detected: ...")`; an abort with an HTTP status streams as a
  final chunk (raises for `stream=False`: ValueError for 400, an exception with `status_code` else).
* There is no `Engine.abort`: aborts go through `engine.tokenizer_manager.abort_request(rid=,
  abort_all=)`, and the scheduler matches rids by PREFIX (`srt/managers/scheduler.py::abort_request`).
  Closing a stream early aborts its request (`generate_request`'s BaseException handler).
* `tokenizer_manager.get_loads()` (behind GET /v1/loads) returns one `LoadSnapshot` per DP rank;
  `tokenizer_manager.context_len` is the model's context length. `Engine.get_server_info()` is
  synchronous (`loop.run_until_complete`), so it fails inside a running event loop.

PD disaggregation (`srt/disaggregation/{prefill,decode}.py`, `common/conn.py`): the same request goes
to a prefill engine and a decode engine, both carrying `bootstrap_host/port/room`. The prefill
engine's bootstrap server listens on `(ServerArgs.host, disaggregation_bootstrap_port)`; the prefill
runs the prompt, samples the first token and holds the KV until the decode engine with the same room
pulls it (or `SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT` passes: abort, 500). The decode engine waits for
the KV up to `SGLANG_DISAGGREGATION_WAITING_TIMEOUT` (abort, 500), then decodes on from the prefill's
first token; its `cached_tokens` are the prefill's. A prefill finishes with `{"type": "length",
"length": 0}`. `FakeBootstrapRegistry` is the network between the two fakes: create one per test and
hand it to both engine classes.

Tenant cache isolation: SGLang main's `async_generate` takes a keyword-only `cache_salt`
(`GenerateReqInput.cache_salt`, part of the radix-cache key, so prompts under different salts never
share cached tokens). Earlier 0.5.x releases took `extra_key` instead, and some take neither:
`fake_engine_cls(salt_api="extra_key" | None)` builds an engine with that older signature. The radix
cache here is keyed the same way: a prefix only matches under the salt it was cached with.

The model: output token i of a prompt is `(prompt[-1] + i + 1) % vocab_size`, rendered as `" t<id>"`.
"""

from __future__ import annotations

import asyncio
import sys
import types
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

FAKE_VERSION = "0.5.23-fake"
TRANSFER_BACKEND_CHOICES = ("mooncake", "nixl", "ascend", "fake", "mori", "mooncake_tcp")
TOP_K_ALL = 1 << 30
_NO_ROOM = "Invalid request: Disaggregated request received without bootstrap room id."


class ServerArgs(msgspec.Struct, kw_only=True):
    """The subset of sglang 0.5.23's `ServerArgs` fields the tests touch (same names and defaults)."""

    model_path: str
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    context_length: int | None = None
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 30000
    log_level: str = "info"
    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1
    attn_dp_size: int = 1
    enable_dp_attention: bool = False
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    mem_fraction_static: float | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int | None = None
    page_size: int | None = None
    disable_radix_cache: bool = False
    random_seed: int | None = None
    stream_interval: int = 1
    incremental_streaming_output: bool = False
    enable_metrics: bool = False
    disaggregation_mode: str = "null"
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_bootstrap_port: int = 8998
    disaggregation_ib_device: str | None = None
    disaggregation_decode_enable_radix_cache: bool = False
    load_balance_method: str = "auto"

    def __post_init__(self) -> None:
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(
                f"disaggregation_mode must be null, prefill or decode: {self.disaggregation_mode!r}"
            )
        if self.disaggregation_transfer_backend not in TRANSFER_BACKEND_CHOICES:
            raise ValueError(
                f"invalid disaggregation_transfer_backend {self.disaggregation_transfer_backend!r}"
            )


class SamplingParams(msgspec.Struct, kw_only=True):
    """sglang's `SamplingParams` API fields and `verify()` rules (srt/sampling/sampling_params.py)."""

    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = TOP_K_ALL

    def verify(self) -> None:
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.min_new_tokens < 0 or (
            self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens
        ):
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")

    @property
    def stop_strs(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class FlushCacheReqOutput(msgspec.Struct, kw_only=True):
    """srt/managers/io_struct.py::FlushCacheReqOutput."""

    success: bool
    message: str = ""


class HTTPStatusError(Exception):
    """What a non-streaming call raises for an abort with a non-400 status (fastapi.HTTPException)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass
class LoadSnapshot:
    """The `LoadSnapshot` fields the adapter reads (srt/managers/load_snapshot.py)."""

    dp_rank: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0


# ------------------------------------------------------------------------------------------------
# PD disaggregation: the "network" between a fake prefill and a fake decode engine
# ------------------------------------------------------------------------------------------------


@dataclass
class _Room:
    """One bootstrap room on a prefill engine's bootstrap server."""

    kv: asyncio.Future[dict[str, Any]]
    decode_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    has_prefill: bool = False
    has_decode: bool = False


@dataclass
class Handoff:
    """A completed KV transfer, for assertions."""

    room: int
    prompt: list[int]
    first_token: int
    cached_tokens: int


class FakeBootstrapRegistry:
    """Bootstrap servers and their rooms, shared by the fake engines of one test.

    Args:
        node_ip: the address other nodes reach this node at. A bootstrap server bound to `0.0.0.0`
            answers on it and on loopback; one bound to `127.0.0.1` answers on loopback only.
        bootstrap_timeout_s: how long a prefill holds its KV for a decode to arrive
            (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT, 300 s in SGLang).
        waiting_timeout_s: how long a decode waits for the KV (SGLANG_DISAGGREGATION_WAITING_TIMEOUT).
    """

    def __init__(
        self,
        *,
        node_ip: str = "10.0.0.5",
        bootstrap_timeout_s: float = 300.0,
        waiting_timeout_s: float = 300.0,
    ) -> None:
        self.node_ip = node_ip
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.waiting_timeout_s = waiting_timeout_s
        self._servers: dict[tuple[str, int], FakeEngine] = {}
        self._rooms: dict[tuple[int, int], _Room] = {}
        self.handoffs: list[Handoff] = []

    def bind(self, host: str, port: int, engine: FakeEngine) -> None:
        for bound_host, bound_port in self._servers:
            if bound_port == port and (bound_host == host or "0.0.0.0" in (host, bound_host)):
                raise OSError(98, f"bootstrap port {port} already in use on {bound_host}")
        self._servers[(host, port)] = engine

    def unbind(self, engine: FakeEngine) -> None:
        for key in [k for k, v in self._servers.items() if v is engine]:
            del self._servers[key]
        for key in [k for k in self._rooms if k[0] == engine.server_args.disaggregation_bootstrap_port]:
            room = self._rooms.pop(key)
            if not room.kv.done():
                room.kv.cancel()

    def resolve(self, host: str, port: int) -> FakeEngine | None:
        """The prefill engine reachable at host:port, honouring the bind address."""
        for (bound_host, bound_port), engine in self._servers.items():
            if bound_port != port:
                continue
            reachable = {bound_host}
            if bound_host == "0.0.0.0":
                reachable |= {self.node_ip, "127.0.0.1", "localhost"}
            elif bound_host in ("127.0.0.1", "localhost"):
                reachable |= {"127.0.0.1", "localhost"}
            if host in reachable:
                return engine
        return None

    def room(self, port: int, room: int) -> _Room:
        key = (port, room)
        if key not in self._rooms:
            self._rooms[key] = _Room(kv=asyncio.get_running_loop().create_future())
        return self._rooms[key]

    def release(self, port: int, room: int) -> None:
        self._rooms.pop((port, room), None)

    @property
    def open_rooms(self) -> int:
        return len(self._rooms)


# ------------------------------------------------------------------------------------------------
# Request state and the tokenizer manager
# ------------------------------------------------------------------------------------------------


@dataclass
class _ReqState:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool
    bootstrap: tuple[str | None, int | None, int | None]
    salt: str | None = None  # the radix-cache namespace (cache_salt / extra_key)
    dp_rank: int = 0
    out_list: list[dict[str, Any]] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    last_output_offset: int = 0
    abort_sent: bool = False
    dispatched: bool = False
    running: bool = False
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    cached_tokens: int = 0
    retract: bool = False
    task: asyncio.Task[None] | None = None


class FakeTokenizerManager:
    """`engine.tokenizer_manager`: request state, streaming, aborts, loads."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self.server_args = engine.server_args
        self.context_len = engine.server_args.context_length or engine.model_context_len
        self.incremental_streaming_output = engine.server_args.incremental_streaming_output
        self.rid_to_state: dict[str, _ReqState] = {}
        self.asyncio_tasks: set[asyncio.Task[None]] = set()
        self.gracefully_exit = False
        self.abort_calls: list[str] = []
        self._crash: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def auto_create_handle_loop(self) -> None:
        if self._crash is not None:
            return
        self._crash = asyncio.get_running_loop().create_future()
        self.asyncio_tasks.add(asyncio.create_task(self._handle_loop()))

    async def _handle_loop(self) -> None:
        assert self._crash is not None
        await self._crash  # raises when the fake "scheduler" crashes

    def crash(self, exc: BaseException) -> None:
        if self._crash is not None and not self._crash.done():
            self._crash.set_exception(exc)

    # -- generate -------------------------------------------------------------------------------
    async def generate_request(self, obj: dict[str, Any]):  # noqa: C901 - mirrors the real flow
        self.auto_create_handle_loop()
        rid = obj["rid"] or uuid.uuid4().hex
        if rid in self.rid_to_state:
            raise ValueError(f"Duplicate request ID detected: {rid}")
        state = _ReqState(
            rid=rid,
            input_ids=[],
            sampling=SamplingParams(),
            stream=obj["stream"],
            bootstrap=(obj["bootstrap_host"], obj["bootstrap_port"], obj["bootstrap_room"]),
            salt=obj.get("cache_salt") or obj.get("extra_key") or None,
        )
        self.rid_to_state[rid] = state
        try:
            if obj["input_ids"] is None:
                raise ValueError("the fake tokenizer takes input_ids only")
            state.input_ids = list(obj["input_ids"])
            n = len(state.input_ids)
            if n >= self.context_len:
                raise ValueError(
                    f"The input ({n} tokens) is longer than the model's context length "
                    f"({self.context_len} tokens)."
                )
            state.sampling = SamplingParams(**(obj["sampling_params"] or {}))
            state.sampling.verify()
            max_new = state.sampling.max_new_tokens
            if max_new is not None and n + max_new > self.context_len:
                raise ValueError(
                    "Requested token count exceeds the model's maximum context length of "
                    f"{self.context_len} tokens. You requested a total of {n + max_new} tokens"
                )
            self._engine.dispatch(state)
            async for out in self._stream_one_response(state):
                yield out
        except BaseException:
            self._release_on_failure(state)
            raise

    def _release_on_failure(self, state: _ReqState) -> None:
        if self.rid_to_state.get(state.rid) is not state:
            return
        if state.dispatched:
            if self._engine.abort_on_close:
                self.abort_request(state.rid)
        else:
            del self.rid_to_state[state.rid]

    async def _stream_one_response(self, state: _ReqState):
        incremental_stream = state.stream and self.incremental_streaming_output
        while True:
            await state.event.wait()
            out_list, state.out_list = state.out_list, []
            finished = state.finished
            state.event.clear()
            if incremental_stream and len(out_list) > 1:
                out = dict(out_list[-1])
                out["text"] = "".join(o.get("text") or "" for o in out_list)
                out["output_ids"] = [t for o in out_list for t in o["output_ids"]]
            else:
                out = out_list[-1]
            if state.stream and not incremental_stream and out.get("text", "") is None:
                out["text"] = state.text
            if finished:
                reason = out["meta_info"]["finish_reason"]
                status = reason.get("status_code") if isinstance(reason, dict) else None
                if reason.get("type") == "abort" and status is not None and 400 <= status < 600:
                    self.rid_to_state.pop(state.rid, None)
                    if not state.stream:
                        if status == 400:
                            raise ValueError(reason["message"])
                        raise HTTPStatusError(status, reason["message"])
                yield out
                return
            if state.stream:
                yield out

    # -- outputs (the scheduler + detokenizer → tokenizer manager path) ----------------------------
    def handle_batch_output(
        self, state: _ReqState, delta_ids: list[int], delta_text: str, finish: dict[str, Any] | None
    ) -> None:
        meta_info = {
            "id": state.rid,
            "finish_reason": finish,
            "prompt_tokens": len(state.input_ids),
            "weight_version": "default",
            "completion_tokens": len(state.output_ids) + len(delta_ids),
            "cached_tokens": state.cached_tokens,
        }
        state.finished = finish is not None
        state.text += delta_text
        state.output_ids.extend(delta_ids)
        incremental = state.stream and self.incremental_streaming_output
        if state.stream and incremental:
            out = {"text": delta_text, "output_ids": list(delta_ids), "meta_info": meta_info}
            state.last_output_offset = len(state.output_ids)
        elif state.stream and not state.finished:
            # Non-incremental intermediate: the state's own list, text resolved by the reader.
            out = {"text": None, "output_ids": state.output_ids, "meta_info": meta_info}
        elif state.finished:
            out = {"text": state.text, "output_ids": state.output_ids.copy(), "meta_info": meta_info}
        else:
            return
        if state.finished:
            self.rid_to_state.pop(state.rid, None)
        state.out_list.append(out)
        state.event.set()

    def handle_abort_req(self, state: _ReqState, finished_reason: dict[str, Any] | None = None) -> None:
        """Abort of a request that never ran (waiting queue): the tokenizer manager builds the output."""
        if self.rid_to_state.get(state.rid) is not state:
            return
        state.finished = True
        output_ids = state.output_ids
        if state.stream and self.incremental_streaming_output:
            output_ids = output_ids[-1:]
        out = {
            "text": state.text,
            "output_ids": list(output_ids),
            "meta_info": {
                "id": state.rid,
                "finish_reason": finished_reason or {"type": "abort", "message": "Abort in waiting queue"},
                "weight_version": "default",
                "completion_tokens": len(state.output_ids),
            },
        }
        del self.rid_to_state[state.rid]
        state.out_list.append(out)
        state.event.set()

    # -- control ----------------------------------------------------------------------------------
    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        if not abort_all and not rid:
            return
        state = None if abort_all else self.rid_to_state.get(rid)
        if not abort_all:
            if state is None:
                return
            if state.abort_sent:
                return
            state.abort_sent = True
        self.abort_calls.append(rid)
        self._engine.scheduler_abort(rid, abort_all)

    async def flush_cache(self, timeout_s: float | None = None) -> FlushCacheReqOutput:
        """Flushes only when nothing is queued or running (Scheduler.flush_cache)."""
        if self.rid_to_state:
            return FlushCacheReqOutput(success=False)
        self._engine.cache.clear()
        return FlushCacheReqOutput(success=True)

    async def get_loads(
        self, include: list[str] | None = None, dp_rank: int | None = None
    ) -> list[LoadSnapshot]:
        return self._engine.loads(dp_rank)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class FakeEngine:
    """`sglang.Engine` (srt/entrypoints/engine.py), modelled in process.

    Configure a per-test subclass with `fake_engine_cls(...)`; its `instances` lists the engines built.
    """

    server_args_class = ServerArgs
    # Per-test knobs (set by fake_engine_cls on a subclass; no module-level state).
    registry: FakeBootstrapRegistry | None = None
    vocab_size: int = 32000
    eos_token_id: int | None = None
    model_context_len: int = 4096
    max_total_num_tokens: int = 65536
    step_delay_s: float = 0.0
    #: sglang 0.5.23 aborts a request whose stream is closed early (generate_request's BaseException
    #: handler); False models an engine that does not, which the adapter must not rely on.
    abort_on_close: bool = True
    instances: list[FakeEngine] | None = None  # a fresh list per fake_engine_cls subclass

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        self.server_args = self.server_args_class(**kwargs)
        self.tokenizer_manager = FakeTokenizerManager(self)
        self.requests: list[dict[str, Any]] = []
        self.shutdown_called = False
        self.cache: list[tuple[str | None, tuple[int, ...]]] = []  # (salt, cached token ids)
        self._running = 0
        self._queue: list[_ReqState] = []  # the waiting queue, FIFO
        self._slot_freed = asyncio.Event()
        self._submitted = 0
        mode = self.server_args.disaggregation_mode
        if mode != "null" and self.registry is None:
            raise RuntimeError("fake PD engines need a FakeBootstrapRegistry (fake_engine_cls(registry=...))")
        if mode == "prefill":
            assert self.registry is not None
            self.registry.bind(self.server_args.host, self.server_args.disaggregation_bootstrap_port, self)
        if self.instances is not None:
            self.instances.append(self)

    # -- public API -------------------------------------------------------------------------------
    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        routed_dp_rank: int | None = None,
        rid: str | None = None,
        priority: int | None = None,
        *,
        cache_salt: str | None = None,
    ) -> Any:
        return await self._submit(
            prompt, sampling_params, input_ids, stream, bootstrap_host, bootstrap_port, bootstrap_room,
            rid, {"cache_salt": cache_salt},
        )  # fmt: skip

    async def _submit(
        self,
        prompt: str | None,
        sampling_params: dict[str, Any] | None,
        input_ids: list[int] | None,
        stream: bool,
        bootstrap_host: str | None,
        bootstrap_port: int | None,
        bootstrap_room: int | None,
        rid: str | None,
        salt: dict[str, str | None],
    ) -> Any:
        """`async_generate`'s body; `salt` is the cache-key keyword of this API version and its value."""
        if self.shutdown_called:
            raise RuntimeError("engine is shut down")
        obj = {
            "prompt": prompt,
            "sampling_params": sampling_params,
            "input_ids": input_ids,
            "stream": stream,
            "bootstrap_host": bootstrap_host,
            "bootstrap_port": bootstrap_port,
            "bootstrap_room": bootstrap_room,
            "rid": rid,
            **salt,
        }
        self.requests.append(dict(obj))
        generator = self.tokenizer_manager.generate_request(obj)
        if stream is True:
            return generator
        return await generator.__anext__()

    def get_server_info(self) -> dict[str, Any]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # the real one calls loop.run_until_complete
            raise RuntimeError("Cannot run the event loop while another loop is running")
        return {
            **msgspec.structs.asdict(self.server_args),
            "max_total_num_tokens": self.max_total_num_tokens,
            "version": FAKE_VERSION,
        }

    def get_all_child_pids(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        self.shutdown_called = True
        tm = self.tokenizer_manager
        tm.gracefully_exit = True
        for state in list(tm.rid_to_state.values()):
            if state.task is not None:
                state.task.cancel()
            if not state.finished:
                self._emit_abort(state, "engine shut down", 503)
        for task in tm.asyncio_tasks:
            task.cancel()
        if self.registry is not None:
            self.registry.unbind(self)

    # -- test hooks -----------------------------------------------------------------------------
    def crash(self, message: str = "scheduler died") -> None:
        """A scheduler subprocess died: the tokenizer manager's handle loop fails."""
        self.tokenizer_manager.crash(RuntimeError(message))

    @property
    def live_requests(self) -> int:
        return len(self.tokenizer_manager.rid_to_state)

    # -- the "scheduler" -------------------------------------------------------------------------
    def dispatch(self, state: _ReqState) -> None:
        state.dispatched = True
        state.dp_rank = self._submitted % max(1, self.server_args.dp_size)
        self._submitted += 1
        state.task = asyncio.create_task(self._run(state))

    def scheduler_abort(self, rid: str, abort_all: bool) -> None:
        for state in list(self.tokenizer_manager.rid_to_state.values()):
            if abort_all or state.rid.startswith(rid):  # SGLang's scheduler matches by prefix
                state.aborted.set()

    def loads(self, dp_rank: int | None) -> list[LoadSnapshot]:
        ranks = range(max(1, self.server_args.dp_size)) if dp_rank is None else [dp_rank]
        out = []
        for r in ranks:
            states = [s for s in self.tokenizer_manager.rid_to_state.values() if s.dp_rank == r]
            used = sum(len(s.input_ids) + len(s.output_ids) for s in states if s.running)
            out.append(
                LoadSnapshot(
                    dp_rank=r,
                    num_running_reqs=sum(s.running for s in states),
                    num_waiting_reqs=sum(not s.running for s in states),
                    num_used_tokens=used,
                    max_total_num_tokens=self.max_total_num_tokens,
                    token_usage=used / self.max_total_num_tokens,
                )
            )
        return out

    def _token(self, prompt: list[int], i: int) -> int:
        return ((prompt[-1] if prompt else 0) + i + 1) % self.vocab_size

    @staticmethod
    def _render(token: int) -> str:
        return f" t{token}"

    def _match_prefix(self, ids: list[int], salt: str | None) -> int:
        if self.server_args.disable_radix_cache:
            return 0
        best = 0
        for seq_salt, seq in self.cache:
            if seq_salt != salt:  # another namespace of the radix cache
                continue
            n = 0
            for a, b in zip(seq, ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        page = self.server_args.page_size or 1
        return min(best, len(ids) - 1) // page * page if ids else 0

    async def _step(self) -> None:
        await asyncio.sleep(self.step_delay_s)

    async def _admit(self, state: _ReqState) -> bool:
        """Wait in the FIFO waiting queue for a running slot; False if aborted while waiting."""
        limit = self.server_args.max_running_requests or 1 << 30
        self._queue.append(state)
        try:
            while True:
                if state.aborted.is_set():
                    return False
                if self._queue[0] is state and self._running < limit:
                    self._queue.pop(0)
                    self._running += 1
                    state.running = True
                    return True
                self._slot_freed.clear()
                await _wait_any([self._slot_freed, state.aborted], None)
        finally:
            if state in self._queue:
                self._queue.remove(state)
                self._slot_freed.set()  # the next in line may go now

    def _release_slot(self, state: _ReqState) -> None:
        if state.running:
            self._running -= 1
            state.running = False
            self._slot_freed.set()

    def retract(self, rid: str) -> None:
        """What SGLang's scheduler does under KV pressure: the running request goes back to the end
        of the waiting queue with its output so far, and resumes when it gets a slot again."""
        self.tokenizer_manager.rid_to_state[rid].retract = True

    async def _run(self, state: _ReqState) -> None:
        tm = self.tokenizer_manager
        await asyncio.sleep(0)  # the request reaches the scheduler on a later tick
        if not await self._admit(state):
            tm.handle_abort_req(state)
            return
        try:
            mode = self.server_args.disaggregation_mode
            if mode == "prefill":
                await self._run_prefill(state)
            elif mode == "decode":
                await self._run_decode(state)
            else:
                state.cached_tokens = self._match_prefix(state.input_ids, state.salt)
                await self._decode_loop(state, start=0, first_token=None)
        finally:
            self._release_slot(state)

    def _finish_for(self, state: _ReqState, token: int, n_out: int) -> dict[str, Any] | None:
        """Stop string, then stop token / EOS, then length (Req.update_finish_state)."""
        sp = state.sampling
        if n_out >= sp.min_new_tokens:
            text = state.text + self._render(token)
            for s in sp.stop_strs:
                if s and s in text[max(0, len(state.text) - len(s)) :]:
                    return {"type": "stop", "matched": s}
            if not sp.ignore_eos:
                if sp.stop_token_ids and token in sp.stop_token_ids:
                    return {"type": "stop", "matched": token}
                if self.eos_token_id is not None and token == self.eos_token_id:
                    return {"type": "stop", "matched": token}
        if sp.max_new_tokens is not None and n_out >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        return None

    def _emit_token(self, state: _ReqState, token: int, finish: dict[str, Any] | None) -> None:
        """The detokenizer: a delta per step; at a finish, trim the matched stop and send the tail."""
        sent = len(state.text)
        new_text = self._render(token)
        if finish is None:
            delta = new_text
        else:
            matched = finish.get("matched")
            if isinstance(matched, int):
                full = state.text  # the stop token's text is trimmed
            else:
                full = state.text + new_text
                if isinstance(matched, str) and not state.sampling.no_stop_trim:
                    pos = full.find(matched)
                    full = full[:pos] if pos != -1 else full
            delta = full[sent:]
        self.tokenizer_manager.handle_batch_output(state, [token], delta, finish)

    def _emit_abort(self, state: _ReqState, message: str = "Aborted", status: int | None = None) -> None:
        finish = {"type": "abort", "message": message, "status_code": status, "err_type": None}
        self.tokenizer_manager.handle_batch_output(state, [], "", finish)

    async def _decode_loop(self, state: _ReqState, start: int, first_token: int | None) -> None:
        max_new = state.sampling.max_new_tokens if state.sampling.max_new_tokens is not None else 128
        i = start
        while True:
            await self._step()
            if state.aborted.is_set():
                self._emit_abort(state)
                return
            if state.retract:
                state.retract = False
                self._release_slot(state)
                if not await self._admit(state):
                    self.tokenizer_manager.handle_abort_req(state)  # aborted while back in the queue
                    return
            token = (
                first_token if (first_token is not None and i == start) else self._token(state.input_ids, i)
            )
            finish = self._finish_for(state, token, i + 1)
            if max_new == 0:
                finish = {"type": "length", "length": 0}
            self._emit_token(state, token, finish)
            if finish is not None:
                self.cache.append((state.salt, tuple(state.input_ids + state.output_ids)))
                return
            i += 1

    async def _run_prefill(self, state: _ReqState) -> None:
        assert self.registry is not None
        host, port, room_id = state.bootstrap
        if room_id is None:
            self._emit_abort(state, _NO_ROOM, 400)
            return
        port = self.server_args.disaggregation_bootstrap_port
        room = self.registry.room(port, room_id)
        if room.has_prefill:
            self._emit_abort(state, f"bootstrap room {room_id} is already in use", 500)
            return
        room.has_prefill = True
        state.cached_tokens = self._match_prefix(state.input_ids, state.salt)
        await self._step()
        first = self._token(state.input_ids, 0)
        room.kv.set_result(
            {
                "prompt": list(state.input_ids),
                "first_token": first,
                "cached_tokens": state.cached_tokens,
                "backend": self.server_args.disaggregation_transfer_backend,
                "room": room_id,
            }
        )
        arrived = await _wait_any([room.decode_arrived, state.aborted], self.registry.bootstrap_timeout_s)
        if arrived is None:
            self.registry.release(port, room_id)
            self._emit_abort(
                state,
                f"Request {room_id} timed out after {self.registry.bootstrap_timeout_s:.1f}s "
                "in KVPoll.Bootstrapping",
                500,
            )
            return
        if arrived is state.aborted and not room.decode_arrived.is_set():
            self.registry.release(port, room_id)
            self._emit_abort(state)
            return
        self.cache.append((state.salt, tuple(state.input_ids)))
        self.tokenizer_manager.handle_batch_output(state, [first], "", {"type": "length", "length": 0})

    async def _run_decode(self, state: _ReqState) -> None:
        assert self.registry is not None
        host, port, room_id = state.bootstrap
        if host is None or port is None or room_id is None:
            self._emit_abort(state, _NO_ROOM, 400)
            return
        prefill = self.registry.resolve(host, port)
        if prefill is None:
            await self._step()
            self._emit_abort(state, f"Failed to get prefill server info from bootstrap {host}:{port}", 500)
            return
        room = self.registry.room(port, room_id)
        room.has_decode = True
        room.decode_arrived.set()
        done = await _wait_any([state.aborted], self.registry.waiting_timeout_s, also=room.kv)
        if done is state.aborted:
            self.registry.release(port, room_id)
            self._emit_abort(state)
            return
        if not room.kv.done() or room.kv.cancelled():
            self.registry.release(port, room_id)
            self._emit_abort(
                state,
                f"Request {room_id} timed out after {self.registry.waiting_timeout_s:.1f}s "
                "in KVPoll.WaitingForInput",
                500,
            )
            return
        kv = room.kv.result()
        self.registry.release(port, room_id)
        if kv["backend"] != self.server_args.disaggregation_transfer_backend:
            self._emit_abort(
                state, "KV transfer failed: prefill and decode use different transfer backends", 500
            )
            return
        if kv["prompt"] != state.input_ids:
            self._emit_abort(state, "KV transfer failed: the prefill ran a different prompt", 500)
            return
        self.registry.handoffs.append(Handoff(room_id, kv["prompt"], kv["first_token"], kv["cached_tokens"]))
        state.cached_tokens = kv["cached_tokens"]
        await self._decode_loop(state, start=0, first_token=kv["first_token"])


async def _wait_any(
    events: list[asyncio.Event], wait_s: float | None, also: asyncio.Future[Any] | None = None
) -> Any:
    """Wait until one of `events` is set (returned) or `also` completes (returned), or time out (None)."""
    waiters: dict[asyncio.Future[Any], Any] = {asyncio.ensure_future(ev.wait()): ev for ev in events}
    if also is not None:
        waiters[also] = also
    try:
        done, _ = await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            if w is not also:
                w.cancel()
    for w in waiters:  # deterministic preference: events first, in order
        if w in done:
            return waiters[w]
    return None


class _ExtraKeyEngine(FakeEngine):
    """An earlier 0.5.x `Engine`: the radix-cache key is `extra_key`, there is no `cache_salt`."""

    async def async_generate(  # type: ignore[override]
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        rid: str | None = None,
        extra_key: str | None = None,
    ) -> Any:
        return await self._submit(
            prompt, sampling_params, input_ids, stream, bootstrap_host, bootstrap_port, bootstrap_room,
            rid, {"extra_key": extra_key},
        )  # fmt: skip


class _UnsaltedEngine(FakeEngine):
    """An `Engine` whose `async_generate` takes no cache-isolation key at all."""

    async def async_generate(  # type: ignore[override]
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        rid: str | None = None,
    ) -> Any:
        return await self._submit(
            prompt, sampling_params, input_ids, stream, bootstrap_host, bootstrap_port, bootstrap_room,
            rid, {},
        )  # fmt: skip


_SALT_APIS: dict[str | None, type[FakeEngine]] = {
    "cache_salt": FakeEngine,
    "extra_key": _ExtraKeyEngine,
    None: _UnsaltedEngine,
}


def fake_engine_cls(
    registry: FakeBootstrapRegistry | None = None, salt_api: str | None = "cache_salt", **knobs: Any
) -> type[FakeEngine]:
    """A `FakeEngine` subclass configured for one test (knobs: vocab_size, eos_token_id,
    model_context_len, max_total_num_tokens, step_delay_s, abort_on_close). `salt_api` is the
    keyword its `async_generate` takes a cache salt by: "cache_salt" (SGLang main), "extra_key"
    (earlier 0.5.x) or None (neither)."""
    allowed = {
        "vocab_size",
        "eos_token_id",
        "model_context_len",
        "max_total_num_tokens",
        "step_delay_s",
        "abort_on_close",
    }
    unknown = set(knobs) - allowed
    if unknown:
        raise TypeError(f"unknown fake knobs {sorted(unknown)}")
    if salt_api not in _SALT_APIS:
        raise TypeError(f"salt_api must be one of {sorted(map(str, _SALT_APIS))}, got {salt_api!r}")
    attrs: dict[str, Any] = {"registry": registry, "instances": [], **knobs}
    return type("FakeEngine", (_SALT_APIS[salt_api],), attrs)


def install_as_sglang(monkeypatch: Any, engine_cls: type[FakeEngine]) -> None:
    """Make `import sglang...` resolve to this fake for one test (for the adapter's lazy-import path)."""
    names = (
        "sglang",
        "sglang.srt",
        "sglang.srt.server_args",
        "sglang.srt.entrypoints",
        "sglang.srt.entrypoints.engine",
    )
    modules = {name: types.ModuleType(name) for name in names}
    modules["sglang"].Engine = engine_cls  # type: ignore[attr-defined]
    modules["sglang"].__version__ = FAKE_VERSION  # type: ignore[attr-defined]
    modules["sglang.srt.server_args"].ServerArgs = engine_cls.server_args_class  # type: ignore[attr-defined]
    modules["sglang.srt.entrypoints.engine"].Engine = engine_cls  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
