"""SGLang engine: the offline `sglang.Engine` in process, colocated or as one side of a P/D pair.

The ingress hands token ids in; we hand deltas out. SGLang detokenizes (its tokenizer stays on:
with `skip_tokenizer_init=True` its outputs carry `output_ids` only, no `text`).

Written against sglang 0.5.23 (wheel source) and the project's docs; the facts it relies on:

* `python/sglang/srt/entrypoints/engine.py`: `Engine(**kwargs)` builds `server_args_class(**kwargs)`
  (`ServerArgs`); `await Engine.async_generate(input_ids=, sampling_params=, stream=True, rid=,
  bootstrap_host=, bootstrap_port=, bootstrap_room=)` returns an async iterator of dicts
  (`stream=False`: the final dict). `Engine` has no abort method; `get_server_info()` is synchronous
  (`loop.run_until_complete`) and cannot be called from a running event loop; `shutdown()` blocks
  while it kills the engine's process tree. Constructing the engine off the main thread is supported
  (signal handlers are skipped there).
* Tenant cache isolation (`GenerateRequest.cache_salt`): SGLang main's `Engine.async_generate` takes a
  keyword-only `cache_salt` (`GenerateReqInput.cache_salt`, "cache namespace used to isolate
  otherwise-identical prefixes", folded into the radix-cache key); earlier 0.5.x releases had only
  `GenerateReqInput.extra_key`, which their OpenAI server fills from the request's `cache_salt`
  (`serving_base._compute_extra_key`). The adapter passes the salt under whichever keyword
  `async_generate` takes (`cache_salt_kwarg`, read at start) and refuses a salted request when it takes
  neither, rather than share the cache across tenants. Before sgl-project/sglang#23300 (April 2026) the
  scheduler dropped the key, so the salt was accepted and ignored: see GPU check 7.
* `python/sglang/srt/server_args.py`, `srt/arg_groups/fields/disagg.py`: `ServerArgs` is a
  `msgspec.Struct` in 0.5.23 (a dataclass in earlier releases); `disaggregation_mode` "null" |
  "prefill" | "decode", `disaggregation_transfer_backend` (SGLang's default "mooncake"),
  `disaggregation_bootstrap_port` (8998), `disaggregation_ib_device`, `incremental_streaming_output`
  (default False: streamed `text` and `output_ids` are CUMULATIVE), `page_size`, `context_length`,
  `host` (127.0.0.1).
* `python/sglang/srt/managers/tokenizer_manager.py`: output dicts `{"text", "output_ids",
  "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", ...}}`;
  `abort_request(rid=, abort_all=)`, which the scheduler applies to every rid that STARTS WITH the
  given one (`srt/managers/scheduler.py::abort_request`), so our rids are a fixed-length random prefix
  plus the request id; closing a stream early aborts its request; an abort with an HTTP status
  (`finish_reason.status_code`) ends a stream as a final dict, and a request aborted while waiting
  ends with cumulative `text` and no token counts (`_handle_abort_req`). Validation failures (context
  length, sampling params) raise `ValueError`.
* `python/sglang/srt/managers/scheduler.py`: an engine in a disaggregation mode rejects (abort, 400) a
  request without `bootstrap_room`, so prefill and decode engines cannot serve colocated requests;
  `flush_cache` (behind `tokenizer_manager.flush_cache()` -> `FlushCacheReqOutput(success, message)`)
  flushes only when nothing is queued or running.
* `python/sglang/srt/managers/schedule_batch.py`: finish reasons `{"type": "length", "length": n}`,
  `{"type": "stop", "matched": str | int}`, `{"type": "abort", "message", "status_code", "err_type"}`.
* `python/sglang/srt/sampling/sampling_params.py`: `max_new_tokens`, `min_new_tokens`, `temperature`,
  `top_p`, `top_k` (-1 = off; 0 is rejected), `stop`, `stop_token_ids`, `ignore_eos` (also disables
  `stop_token_ids`), `presence_penalty`, `frequency_penalty`, `sampling_seed`.
* `python/sglang/srt/managers/tokenizer_control_mixin.py::get_loads` (behind GET /v1/loads,
  `srt/entrypoints/v1_loads.py`): one `LoadSnapshot` per DP rank (`srt/managers/load_snapshot.py`:
  `num_running_reqs`, `num_waiting_reqs`, `num_used_tokens`, `max_total_num_tokens`, `token_usage`).
* P/D (`docs/advanced_features/pd_disaggregation.md`, `srt/disaggregation/{prefill,decode}.py`,
  `srt/disaggregation/common/conn.py`, `srt/managers/disagg_service.py`, and the router
  `python/sglang/srt/disaggregation/mini_lb.py`): the SAME request goes to the prefill and the decode
  engine, both with `bootstrap_host` (the prefill node), `bootstrap_port` (its
  `disaggregation_bootstrap_port`) and `bootstrap_room = random.randint(0, 2**63 - 1)`. The prefill's
  bootstrap server binds `ServerArgs.host`, so a prefill engine here binds 0.0.0.0 unless told
  otherwise. The prefill samples the first token, holds the KV until the decode pulls it (or
  SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT, 300 s), and ends with `{"type": "length", "length": 0}`;
  the decode waits up to SGLANG_DISAGGREGATION_WAITING_TIMEOUT (300 s) and fails with an abort,
  status 500. Either side may arrive first. With DP, the prefill routes by `room % dp_size`.
  Dynamo's SGLang worker (ai-dynamo/dynamo components/src/dynamo/sglang/request_handlers) drives the
  same Engine API the same way (background prefill stream, `tokenizer_manager.abort_request`).

What a GPU run must confirm
---------------------------
1. Construction via `asyncio.to_thread(Engine, **kwargs)` works inside a Ray Serve replica: the
   TokenizerManager (ZMQ asyncio sockets, asyncio locks) is built in a worker thread and first used
   on the replica's loop (`auto_create_handle_loop` picks the running loop), and importing
   `sglang.srt.entrypoints.engine` switches the global loop policy to uvloop without disturbing the
   running loop. If not, construct on the loop thread.
2. Parameter names: `async_generate(input_ids=..., rid=..., bootstrap_*=...)`, sampling keys as above
   (incl. `sampling_seed`, which only takes effect with deterministic inference), ServerArgs names
   `tp_size`, `dp_size`, `ep_size`, `enable_dp_attention` (deprecated for `attn_dp_size` in 0.5.x),
   `mem_fraction_static`, `context_length`, `disaggregation_*`.
3. Streaming semantics: with `incremental_streaming_output=True` every dict carries only new text
   and ids (several steps coalesced when we lag); `meta_info.completion_tokens` and `cached_tokens`
   are cumulative/stable; `text` and `output_ids` stay consistent around stop strings (SGLang streams
   text that later turns out to begin a stop string; it trims only the final piece).
4. Bootstrap handshake: the returned `bootstrap_host` (socket lookup, or the injected callable, or
   `dist_init_addr`'s host) is reachable from decode nodes; the prefill's bootstrap server listens on
   0.0.0.0:`disaggregation_bootstrap_port` (one port per prefill replica on a node); decode-before-
   prefill and prefill-before-decode both work; NIXL and Mooncake both transfer; a prefill that never
   comes fails the decode after SGLANG_DISAGGREGATION_WAITING_TIMEOUT (set it lower than the client
   timeout); a request SGLang rejects outright shows up as `KVHandle.error` within one loop tick.
5. Abort semantics: `tokenizer_manager.abort_request(rid)` ends a running stream with
   `{"type": "abort"}` and frees its KV on both sides (prefill bootstrap queue / decode transfer
   queue); closing the iterator aborts as well; our `<32 hex>-<request id>` rids never prefix-match.
6. Stats: `tokenizer_manager.get_loads()` is cheap and current (SHM snapshot per DP rank),
   `tokenizer_manager.context_len` is the served context length, the resolved `page_size` reads back
   through `resolution_result`, `get_all_child_pids()` lists the scheduler/detokenizer processes, and
   `await tokenizer_manager.flush_cache()` works from the replica's loop.
   (A crashed child makes SGLang SIGQUIT this process -- the replica dies and Serve replaces it.)
7. Cache salt: `async_generate` of the pinned SGLang takes `cache_salt` (or `extra_key`), and two
   requests with the same prompt and different salts report `cached_tokens` 0 for the second (same
   salt: a hit), colocated and on the P/D prefill side. A release that accepts the keyword but
   predates sgl-project/sglang#23300 shares the cache across tenants: pin a release after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import secrets
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.replicas.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    GenerateRequest,
    KVHandle,
    ModelInfo,
    SamplingOptions,
)

logger = logging.getLogger(__name__)

#: Engine role -> SGLang's `disaggregation_mode`.
ROLES: dict[str, str] = {"colocated": "null", "prefill": "prefill", "decode": "decode"}
TRANSFER_BACKENDS = ("nixl", "mooncake")
DEFAULT_TRANSFER_BACKEND = "nixl"
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default `disaggregation_bootstrap_port`
#: ServerArgs the adapter sets itself, and what sets them instead.
_OWNED_ARGS = {
    "model_path": "the model path",
    "served_model_name": "the model name",
    "disaggregation_mode": "the engine role",
}


# ------------------------------------------------------------------------------------------------
# Engine arguments
# ------------------------------------------------------------------------------------------------


def _record_fields(cls: Any) -> frozenset[str] | None:
    """Field names of a ServerArgs-like class: a dataclass (earlier sglang) or a msgspec Struct (0.5.23)."""
    if cls is None:
        return None
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    names = getattr(cls, "__struct_fields__", None)
    return frozenset(names) if names is not None else None


def known_server_args(engine_cls: Any = None, *, import_sglang: bool = True) -> frozenset[str] | None:
    """The keyword arguments the engine accepts, or None when they cannot be known here.

    Order: the engine class's `server_args_class` (what `sglang.Engine.__init__` builds), then
    `sglang.srt.server_args.ServerArgs` if importable (only if already imported, unless
    `import_sglang`: importing SGLang takes seconds), then the class's own signature.
    """
    if engine_cls is not None:
        fields = _record_fields(getattr(engine_cls, "server_args_class", None))
        if fields is not None:
            return fields
    module = sys.modules.get("sglang.srt.server_args")
    if module is None and import_sglang:
        try:
            import sglang.srt.server_args as module
        except ImportError:
            module = None
    fields = _record_fields(getattr(module, "ServerArgs", None))
    if fields is not None or engine_cls is None:
        return fields
    try:
        params = inspect.signature(engine_cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def build_server_args(
    model_name: str, model_path: str, engine_args: dict[str, Any], role: str, known: frozenset[str] | None
) -> dict[str, Any]:
    """Validate `engine_args` and return the full keyword arguments for `sglang.Engine`.

    Raises:
        ValueError: unknown role or argument, an argument the deployment owns, an unsupported
            transfer backend, a bad bootstrap port, or `skip_tokenizer_init` (we need SGLang's text).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    if known is not None:
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(
                f"engine_args: unknown SGLang server argument(s) {unknown}; see "
                "`python -m sglang.launch_server --help` for the names (use underscores, e.g. tp_size)"
            )
    owned = sorted(set(engine_args) & set(_OWNED_ARGS))
    if owned:
        raise ValueError(
            f"engine_args: {owned} are set by the deployment ("
            + ", ".join(f"{k}: {_OWNED_ARGS[k]}" for k in owned)
            + ")"
        )
    if engine_args.get("skip_tokenizer_init"):
        raise ValueError(
            "engine_args: skip_tokenizer_init=True is not supported: SGLang then returns token ids "
            "without text, and the engine must return both"
        )
    backend = engine_args.get("disaggregation_transfer_backend", DEFAULT_TRANSFER_BACKEND)
    if backend not in TRANSFER_BACKENDS:
        raise ValueError(
            f"engine_args: disaggregation_transfer_backend must be one of {list(TRANSFER_BACKENDS)}, "
            f"got {backend!r}"
        )
    port = engine_args.get("disaggregation_bootstrap_port", DEFAULT_BOOTSTRAP_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"engine_args: disaggregation_bootstrap_port must be a TCP port, got {port!r}")

    def settable(name: str) -> bool:
        return known is None or name in known

    kwargs: dict[str, Any] = {"model_path": model_path, "served_model_name": model_name}
    if settable("skip_tokenizer_init"):
        kwargs["skip_tokenizer_init"] = False
    if settable("incremental_streaming_output"):
        kwargs["incremental_streaming_output"] = True
    kwargs["disaggregation_mode"] = ROLES[role]
    if role != "colocated":
        kwargs["disaggregation_transfer_backend"] = backend
        kwargs["disaggregation_bootstrap_port"] = port
    if role == "prefill":
        kwargs["host"] = "0.0.0.0"  # the bootstrap server binds ServerArgs.host; decode nodes must reach it
    kwargs.update(engine_args)
    return kwargs


def sampling_params(opts: SamplingOptions) -> dict[str, Any]:
    """`SamplingOptions` -> SGLang's `sampling_params` dict."""
    params: dict[str, Any] = {
        "max_new_tokens": opts.max_tokens,
        "min_new_tokens": opts.min_tokens,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        # SGLang: -1 disables top-k and 0 is invalid; vLLM (and the ingress) use 0 or None for "off".
        "top_k": opts.top_k if opts.top_k is not None and opts.top_k > 0 else -1,
        "ignore_eos": opts.ignore_eos,
        "presence_penalty": opts.presence_penalty,
        "frequency_penalty": opts.frequency_penalty,
    }
    if opts.stop:
        params["stop"] = list(opts.stop)
    if opts.stop_token_ids:
        params["stop_token_ids"] = list(opts.stop_token_ids)
    if opts.seed is not None:
        params["sampling_seed"] = opts.seed
    return params


def default_host_ip() -> str:
    """This node's address as other nodes see it (what SGLang's `get_ip` does, minus its imports).

    SGLANG_HOST_IP / HOST_IP win; else the source address of a route to a non-local address (a UDP
    `connect` sends nothing); else the hostname's address; else loopback.
    """
    for var in ("SGLANG_HOST_IP", "HOST_IP"):
        if os.environ.get(var):
            return os.environ[var]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.254.254.254", 1))
        ip = s.getsockname()[0]
        if ip and not ip.startswith("127."):
            return ip
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


#: `async_generate` keywords that carry a per-request cache-isolation key, best first.
SALT_KWARGS = ("cache_salt", "extra_key")


def cache_salt_kwarg(async_generate: Any) -> str | None:
    """The keyword SGLang's `Engine.async_generate` takes a tenant cache salt by, or None.

    `cache_salt` (SGLang main), else `extra_key` (earlier 0.5.x). A signature with `**kwargs` is
    checked against `GenerateReqInput`'s fields when SGLang is already imported; anything that
    cannot be inspected counts as None (refuse rather than guess).
    """
    try:
        params = inspect.signature(async_generate).parameters
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name in SALT_KWARGS:
        p = params.get(name)
        if p is not None and p.kind in named:
            return name
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        io_struct = sys.modules.get("sglang.srt.managers.io_struct")
        fields = _record_fields(getattr(io_struct, "GenerateReqInput", None)) or frozenset()
        for name in SALT_KWARGS:
            if name in fields:
                return name
    return None


def _import_engine_cls() -> Any:
    """`sglang.Engine` (a lazy alias of this class); imported only when an engine starts."""
    try:
        from sglang.srt.entrypoints.engine import Engine
    except ImportError as e:
        raise RuntimeError(
            f"engine: sglang needs the SGLang package (pip install 'tandem[sglang]'): {e}"
        ) from e
    return Engine


def _new_rid(request_id: str) -> str:
    """A SGLang rid for one call. The scheduler aborts every rid that starts with the one it is
    given, so each rid starts with 32 random hex digits: no rid is a prefix of another."""
    return f"{uuid.uuid4().hex}-{request_id}"


def _error_type(status: int) -> str:
    if 400 <= status < 500:
        return "invalid_request_error"
    if status == 503:
        return "engine_overloaded"
    return "engine_error"


# ------------------------------------------------------------------------------------------------
# Output mapping
# ------------------------------------------------------------------------------------------------


class _Deltas:
    """Turns one request's SGLang output dicts into `Chunk`s (delta text and ids, cumulative counts).

    Handles both streaming modes: incremental (each dict is a delta) and cumulative (each dict holds
    everything so far; intermediate `output_ids` is SGLang's live list, so it is sliced at once).
    """

    __slots__ = ("incremental", "prompt_tokens", "n_text", "n_ids", "cached_tokens")

    def __init__(self, incremental: bool, prompt_tokens: int) -> None:
        self.incremental = incremental
        self.prompt_tokens = prompt_tokens
        self.n_text = 0
        self.n_ids = 0
        self.cached_tokens = 0

    def chunk(self, out: dict[str, Any]) -> Chunk:
        meta = out.get("meta_info") or {}
        reason = meta.get("finish_reason")
        text = out.get("text") or ""
        ids = out.get("output_ids") or []
        if isinstance(reason, dict) and reason.get("type") == "abort":
            # An abort's last dict may repeat earlier text (a request aborted while waiting gets the
            # cumulative text even in incremental mode): emit nothing new.
            text, ids = "", []
        elif self.incremental:
            ids = list(ids)
        else:
            text = text[self.n_text :]
            ids = list(ids[self.n_ids :])
        self.n_text += len(text)
        self.n_ids += len(ids)
        self.prompt_tokens = meta.get("prompt_tokens", self.prompt_tokens)
        self.cached_tokens = meta.get("cached_tokens", self.cached_tokens)
        finish, error = _finish(reason)
        return Chunk(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=meta.get("completion_tokens", self.n_ids),
            cached_tokens=self.cached_tokens,
            error=error,
        )


def _finish(reason: Any) -> tuple[str | None, EngineError | None]:
    """SGLang finish reason -> (OpenAI finish reason, error)."""
    if reason is None:
        return None, None
    if not isinstance(reason, dict):
        return str(reason), None
    kind = reason.get("type")
    if kind == "abort":
        status = reason.get("status_code")
        if isinstance(status, int) and 400 <= status < 600:
            return None, EngineError(str(reason.get("message") or "aborted"), status, _error_type(status))
        return "abort", None
    if kind in ("stop", "length"):
        return kind, None
    logger.warning("unknown SGLang finish reason %r; reporting stop", reason)
    return "stop", None


def _exception_error(e: Exception, dead: str | None) -> EngineError:
    """An exception out of SGLang -> the error the client sees (the request's fault is a 4xx)."""
    if isinstance(e, ValueError):
        return EngineError(str(e), 400, "invalid_request_error")
    status = getattr(e, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return EngineError(str(getattr(e, "detail", e)), status, _error_type(status))
    if dead is not None:
        return EngineError(f"engine is dead: {dead}", 503, "engine_unavailable")
    return EngineError(f"{type(e).__name__}: {e}", 500)


def _dead_pids(pids: list[int]) -> list[int]:
    """The pids among `pids` that have exited or are zombies (blocking: run in a thread)."""
    dead = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                dead.append(pid)
        except FileNotFoundError:
            dead.append(pid)
        except OSError:  # no /proc: fall back to a signal-0 probe
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                dead.append(pid)
            except PermissionError:  # it exists, owned by someone else: not dead
                continue
    return dead


@dataclasses.dataclass(slots=True)
class _Load:
    running: int = 0
    waiting: int = 0
    used_tokens: int = 0
    capacity_tokens: int = 0
    usage: float = 0.0


@dataclasses.dataclass(slots=True, eq=False)
class _PrefillJob:
    rid: str
    room: int
    task: asyncio.Task[EngineError | None]


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class SGLangEngine:
    """`Engine` over SGLang's offline `Engine`, in one of three roles.

    Args:
        model_name: the name clients use (SGLang's `served_model_name`).
        model_path: weights directory or hub id.
        engine_args: `ServerArgs` keyword arguments (tp_size, dp_size, ep_size, enable_dp_attention,
            mem_fraction_static, context_length, disaggregation_transfer_backend ("nixl" default here,
            or "mooncake"), disaggregation_bootstrap_port, disaggregation_ib_device, ...).
        role: "colocated" | "prefill" | "decode" -> `disaggregation_mode` "null" | "prefill" | "decode".
        engine_cls: the engine class; None imports `sglang.srt.entrypoints.engine.Engine` (what
            `sglang.Engine` names) in `start()`.
        host_ip: returns the address decode engines reach this node's bootstrap server at
            (default: `dist_init_addr`'s host if set, else `default_host_ip`).
        stats_interval_s: how often the load snapshot behind `stats()` is refreshed.
    """

    def __init__(
        self,
        model_name: str,
        model_path: str,
        engine_args: dict[str, Any],
        *,
        role: str = "colocated",
        engine_cls: Any = None,
        host_ip: Callable[[], str] | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self._name = model_name
        self._path = model_path
        self._role = role
        self._engine_cls = engine_cls
        self._engine_args = dict(engine_args)
        # Checked against SGLang's ServerArgs here when that needs no import; else in start().
        known = known_server_args(engine_cls, import_sglang=False)
        self._args_checked = known is not None
        self._kwargs = build_server_args(model_name, model_path, self._engine_args, role, known)
        self._bootstrap_port = int(self._kwargs.get("disaggregation_bootstrap_port", DEFAULT_BOOTSTRAP_PORT))
        self._host_ip = host_ip or self._default_bootstrap_host
        self._stats_interval_s = stats_interval_s
        self._engine: Any = None
        self._tm: Any = None
        self._salt_kwarg: str | None = None  # read from the engine at start (cache_salt_kwarg)
        self._bootstrap_host = ""
        self._max_model_len = 0
        self._page_size = 1
        self._closed = False
        self._streams: dict[str, str] = {}  # request id -> rid of its generate/decode stream
        self._prefills: dict[str, _PrefillJob] = {}  # request id -> background prefill
        self._load: _Load | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._counters = EngineStats()

    @property
    def role(self) -> str:
        return self._role

    @property
    def server_args(self) -> dict[str, Any]:
        """The keyword arguments `start()` passes to the SGLang engine (a copy)."""
        return dict(self._kwargs)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._engine is not None:
            return
        # Importing SGLang, loading weights and spawning the scheduler take minutes: off the loop.
        self._engine = await asyncio.to_thread(self._construct)
        self._tm = getattr(self._engine, "tokenizer_manager", None)
        self._salt_kwarg = cache_salt_kwarg(getattr(self._engine, "async_generate", None))
        try:
            self._max_model_len = self._context_len()
            self._page_size = int(self._resolved_arg("page_size") or 1)
            if self._role == "prefill":
                self._bootstrap_host = await asyncio.to_thread(self._host_ip)
            if callable(getattr(self._tm, "get_loads", None)):
                await self._refresh_load()
                self._stats_task = asyncio.create_task(self._stats_loop(), name=f"sglang-stats-{self._name}")
        except BaseException:
            await self.shutdown()  # do not leave SGLang's processes behind
            raise
        logger.info(
            "SGLang %s engine for %s ready (context=%d, page_size=%d, cache salt as %s%s)",
            self._role,
            self._name,
            self._max_model_len,
            self._page_size,
            self._salt_kwarg or "unsupported",
            f", bootstrap={self._bootstrap_host}:{self._bootstrap_port}" if self._role == "prefill" else "",
        )

    def _construct(self) -> Any:
        """(Worker thread.) Import SGLang if needed, check the arguments against its ServerArgs if
        the constructor could not, and build the engine."""
        cls = self._engine_cls if self._engine_cls is not None else _import_engine_cls()
        if not self._args_checked:
            known = known_server_args(cls)
            self._kwargs = build_server_args(self._name, self._path, self._engine_args, self._role, known)
            self._args_checked = known is not None
        return cls(**self._kwargs)

    @property
    def _incremental(self) -> bool:
        return bool(self._kwargs.get("incremental_streaming_output", False))

    def _context_len(self) -> int:
        value = getattr(self._tm, "context_len", None) or self._kwargs.get("context_length")
        if not value:
            raise RuntimeError("SGLang engine did not report its context length")
        return int(value)

    def _resolved_arg(self, name: str) -> Any:
        """A server argument after SGLang's resolution (0.5.x keeps the input record unchanged)."""
        args = getattr(self._engine, "server_args", None)
        overrides = sys.modules.get("sglang.srt.arg_groups.overrides")  # imported with a real engine
        if overrides is not None:
            with contextlib.suppress(Exception):  # not a real ServerArgs (e.g. an injected engine)
                return overrides.resolution_result(args, name)
        return getattr(args, name, None)

    def _default_bootstrap_host(self) -> str:
        addr = self._kwargs.get("dist_init_addr")
        if addr:  # multi-node: the bootstrap server runs on the node of rank 0
            host = addr.rsplit(":", 1)[0].strip("[]")
            return socket.gethostbyname(host)
        return default_host_ip()

    def model_info(self) -> ModelInfo:
        if self._engine is None:
            raise RuntimeError("SGLang engine not started")
        capacity = self._load.capacity_tokens if self._load is not None else 0
        return ModelInfo(
            name=self._name,
            max_model_len=self._max_model_len,
            path=self._path,
            block_size=self._page_size,
            num_kv_blocks=capacity // self._page_size,
            cache_salt=self._salt_kwarg is not None,
        )

    async def shutdown(self) -> None:
        self._closed = True
        if self._stats_task is not None:
            self._stats_task.cancel()
        jobs = list(self._prefills.values())
        self._prefills.clear()
        for job in jobs:
            self._abort_rid(job.rid)
            job.task.cancel()
        for rid in list(self._streams.values()):
            self._abort_rid(rid)
        pending = [j.task for j in jobs] + ([self._stats_task] if self._stats_task else [])
        await asyncio.gather(*pending, return_exceptions=True)
        self._stats_task = None
        engine, self._engine, self._tm = self._engine, None, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)  # blocks while it kills the process tree

    def _unavailable(self) -> str | None:
        """Why the engine cannot serve right now, or None."""
        if self._closed:
            return "engine is shut down"
        if self._engine is None:
            return "engine not started"
        tm = self._tm
        if getattr(tm, "gracefully_exit", False):
            return "engine is exiting"
        for task in list(getattr(tm, "asyncio_tasks", ()) or ()):
            if task.done() and not task.cancelled() and task.exception() is not None:
                return f"SGLang event handler failed: {task.exception()!r}"
        return None

    async def check_health(self) -> None:
        reason = self._unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        get_pids = getattr(self._engine, "get_all_child_pids", None)
        pids = list(get_pids()) if callable(get_pids) else []
        if pids:
            dead = await asyncio.to_thread(_dead_pids, pids)
            if dead:
                raise RuntimeError(f"SGLang subprocess(es) {dead} exited")

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self._role != "colocated":
            yield Chunk(
                error=EngineError(
                    f"an SGLang {self._role} engine cannot serve a colocated request "
                    "(use prefill() on a prefill engine and decode() on a decode engine)",
                    500,
                )
            )
            return
        async for chunk in self._stream(request, {}):
            yield chunk

    async def decode(self, request: GenerateRequest, kv: KVHandle) -> AsyncIterator[Chunk]:
        if kv.error is not None:
            yield Chunk(error=kv.error)
            return
        if self._role != "decode":
            yield Chunk(error=EngineError(f"decode() called on an SGLang {self._role} engine", 500))
            return
        try:
            bootstrap = {k: kv.params[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}
        except KeyError as e:
            yield Chunk(error=EngineError(f"KV handle lacks SGLang bootstrap parameter {e}", 500))
            return
        async for chunk in self._stream(request, bootstrap):
            yield chunk

    def _salt_error(self, request: GenerateRequest) -> EngineError | None:
        """Why `request` must not run here: it carries a tenant cache salt this SGLang cannot apply
        (serving it unsalted would share the radix cache across tenants)."""
        if not request.cache_salt or self._salt_kwarg is not None:
            return None
        return EngineError(
            "router.tenant_salt: this SGLang cannot salt its prefix cache per tenant (its "
            "Engine.async_generate takes neither cache_salt nor extra_key), so the request is refused "
            "rather than share cached prompts across tenants; upgrade SGLang, or set "
            "router.tenant_salt: false for this model to accept that",
            500,
            "cache_salt_unsupported",
        )

    async def _open(self, request: GenerateRequest, rid: str, bootstrap: dict[str, Any]) -> Any:
        """SGLang's streaming generate for `request` under `rid` (with bootstrap fields on P/D, and
        the tenant cache salt under the keyword this SGLang takes; see `_salt_error`)."""
        salt = {self._salt_kwarg: request.cache_salt} if request.cache_salt and self._salt_kwarg else {}
        return await self._engine.async_generate(
            input_ids=list(request.prompt_token_ids),
            sampling_params=sampling_params(request.sampling),
            stream=True,
            rid=rid,
            **bootstrap,
            **salt,
        )

    async def _stream(self, request: GenerateRequest, bootstrap: dict[str, Any]) -> AsyncIterator[Chunk]:
        """Run one request (colocated, or the decode side of a P/D pair) and stream its chunks."""
        reason = self._unavailable()
        if reason is not None:
            yield Chunk(error=EngineError(reason, 503, "engine_unavailable"))
            return
        salt_error = self._salt_error(request)
        if salt_error is not None:
            yield Chunk(error=salt_error)
            return
        rid = _new_rid(request.request_id)
        deltas = _Deltas(self._incremental, len(request.prompt_token_ids))
        self._streams[request.request_id] = rid
        stream: Any = None
        done = False
        got_output = False
        try:
            stream = await self._open(request, rid, bootstrap)
            async for out in stream:
                chunk = deltas.chunk(out)
                if bootstrap and not got_output:
                    self._count_transfer(chunk)
                got_output = True
                done = chunk.finish_reason is not None or chunk.error is not None
                if done and chunk.error is None:
                    self._count_prompt(deltas.prompt_tokens, deltas.cached_tokens, remote=bool(bootstrap))
                yield chunk
                if done:
                    return
            done = True
            yield Chunk(error=EngineError("SGLang stream ended without a finish reason", 500))
        except Exception as e:  # noqa: BLE001 - an error in a stream is a value (see base)
            done = True
            error = _exception_error(e, self._unavailable())
            if error.status >= 500:
                logger.exception("request %s failed", request.request_id)
            yield Chunk(error=error)
        finally:
            if self._streams.get(request.request_id) == rid:
                del self._streams[request.request_id]
            if not done:  # the consumer went away: free the request's KV now
                self._abort_rid(rid)
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()

    def _count_transfer(self, first: Chunk) -> None:
        """Count a decode's KV transfer by its first chunk: output means the KV (and first token) arrived.

        A server-side failure before any output is the transfer's (SGLang reports it as a 500 abort);
        it is reported like the vLLM engine reports a failed KV load: 502, type "kv_transfer".
        """
        if first.error is None:
            self._counters.kv_transfers += 1
            return
        self._counters.kv_transfer_failures += 1
        if first.error.status >= 500 and first.error.status != 503:
            first.error.status, first.error.type = 502, "kv_transfer"

    def _count_prompt(self, prompt_tokens: int, cached_tokens: int, *, remote: bool) -> None:
        c = self._counters
        if remote:  # decode: the whole prompt's KV came from the prefill engine
            c.prompt_tokens_external += prompt_tokens
            return
        c.prefix_cache_queries += prompt_tokens
        c.prefix_cache_hits += cached_tokens
        c.prompt_tokens_local_cache += cached_tokens
        c.prompt_tokens_computed += max(0, prompt_tokens - cached_tokens)

    # -- P/D: the prefill side ------------------------------------------------------------------------
    async def prefill(self, request: GenerateRequest) -> KVHandle:
        """Start the prefill in the background and return the bootstrap address of its KV.

        SGLang sends the same request to both sides; the decode engine pulls the KV through this
        engine's bootstrap server, whichever side arrives first. Returns at once (after one loop
        tick, which surfaces a request SGLang rejects outright as `KVHandle.error`).
        """
        prompt_tokens = len(request.prompt_token_ids)
        if self._role != "prefill":
            return KVHandle(error=EngineError(f"prefill() called on an SGLang {self._role} engine", 500))
        reason = self._unavailable()
        if reason is not None:
            return KVHandle(error=EngineError(reason, 503, "engine_unavailable"), prompt_tokens=prompt_tokens)
        salt_error = self._salt_error(request)
        if salt_error is not None:
            return KVHandle(error=salt_error, prompt_tokens=prompt_tokens)
        room = secrets.randbits(63)  # SGLang's router: random.randint(0, 2**63 - 1)
        params = {
            "bootstrap_host": self._bootstrap_host,
            "bootstrap_port": self._bootstrap_port,
            "bootstrap_room": room,
        }
        previous = self._prefills.pop(request.request_id, None)
        if previous is not None:
            logger.warning("request %s prefilled again; aborting the earlier prefill", request.request_id)
            self._abort_rid(previous.rid)
            previous.task.cancel()
        rid = _new_rid(request.request_id)
        task = asyncio.create_task(
            self._run_prefill(request, rid, params), name=f"sglang-prefill-{request.request_id}"
        )
        job = _PrefillJob(rid, room, task)
        self._prefills[request.request_id] = job
        task.add_done_callback(lambda t: self._prefill_done(request.request_id, job, t))
        await asyncio.sleep(0)  # let SGLang take the request (and reject it, if it does)
        if task.done() and not task.cancelled() and task.result() is not None:
            return KVHandle(error=task.result(), prompt_tokens=prompt_tokens)
        return KVHandle(params=params, prompt_tokens=prompt_tokens)

    async def _run_prefill(
        self, request: GenerateRequest, rid: str, params: dict[str, Any]
    ) -> EngineError | None:
        """The prefill request, consumed to its end. Returns its error; never raises but CancelledError."""
        stream: Any = None
        last: dict[str, Any] | None = None
        done = False
        try:
            stream = await self._open(request, rid, params)
            async for out in stream:
                last = out
            done = True
        except Exception as e:  # noqa: BLE001 - reported through the task's result
            done = True
            return _exception_error(e, self._unavailable())
        finally:
            if not done:  # cancelled: take the request (and its held KV) out of SGLang
                self._abort_rid(rid)
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        if last is None:
            return EngineError("SGLang prefill ended without output", 500)
        meta = last.get("meta_info") or {}
        _, error = _finish(meta.get("finish_reason"))
        if error is None:
            prompt = meta.get("prompt_tokens", len(request.prompt_token_ids))
            self._count_prompt(prompt, meta.get("cached_tokens", 0), remote=False)
        return error

    def _prefill_done(
        self, request_id: str, job: _PrefillJob, task: asyncio.Task[EngineError | None]
    ) -> None:
        if self._prefills.get(request_id) is job:
            del self._prefills[request_id]
        if task.cancelled():
            return
        error = task.result()
        if error is None:
            return
        self._counters.kv_transfer_failures += 1
        if "timed out" in error.message:  # no decode came for the KV in time
            self._counters.kv_expired += 1
        logger.warning(
            "prefill of request %s (room %d) failed: %s %s", request_id, job.room, error.status, error.message
        )

    # -- control ----------------------------------------------------------------------------------
    async def reset_prefix_cache(self) -> None:
        """Flush SGLang's radix cache (`tokenizer_manager.flush_cache`).

        SGLang flushes only when no request is queued or running; otherwise nothing is dropped and
        this raises RuntimeError with SGLang's reason.
        """
        reason = self._unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        result = await self._tm.flush_cache()
        if not getattr(result, "success", result):
            message = getattr(result, "message", "") or "requests are queued or running"
            raise RuntimeError(f"SGLang did not flush its prefix cache: {message}")

    def _abort_rid(self, rid: str) -> None:
        tm = self._tm
        if tm is None:
            return
        try:
            tm.abort_request(rid=rid)
        except Exception:  # noqa: BLE001 - best effort; the request ends on its own
            logger.exception("aborting SGLang request %s failed", rid)

    async def abort(self, request_id: str) -> None:
        rid = self._streams.get(request_id)
        if rid is not None:
            self._abort_rid(rid)
        job = self._prefills.pop(request_id, None)
        if job is not None:
            self._abort_rid(job.rid)
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)

    # -- stats ------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = dataclasses.replace(self._counters)
        load = self._load
        if load is not None:
            s.running, s.waiting, s.kv_usage = load.running, load.waiting, load.usage
        else:
            s.running = len(self._streams) + len(self._prefills)
        return s

    async def _refresh_load(self) -> None:
        snapshots = await self._tm.get_loads()
        load = _Load()
        usages = []
        for snap in snapshots or ():
            load.running += int(getattr(snap, "num_running_reqs", 0))
            load.waiting += int(getattr(snap, "num_waiting_reqs", 0))
            load.used_tokens += int(getattr(snap, "num_used_tokens", 0))
            load.capacity_tokens += int(getattr(snap, "max_total_num_tokens", 0))
            usages.append(float(getattr(snap, "token_usage", 0.0)))
        if load.capacity_tokens:
            load.usage = load.used_tokens / load.capacity_tokens
        elif usages:
            load.usage = sum(usages) / len(usages)
        self._load = load

    async def _stats_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._stats_interval_s)
            try:
                await self._refresh_load()
                failures = 0
            except Exception:  # noqa: BLE001 - stats must never take the engine down
                failures += 1
                if failures == 1:
                    logger.exception("reading SGLang load snapshot failed")
