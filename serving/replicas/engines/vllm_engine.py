"""vLLM engine: AsyncLLM in process (CPU build locally, CUDA build on clusters; same code).

The ingress hands token ids in; we hand deltas out. vLLM does the detokenization (it already owns
an incremental detokenizer), so text and token ids stay consistent with stop strings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
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


def _check_engine_args(engine_args: dict[str, Any]) -> None:
    """Reject unknown engine_args keys with a message naming them (vLLM's own error is a TypeError)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise ValueError(
            f"engine_args: unknown vLLM engine argument(s) {unknown}; see "
            "`vllm serve --help` for the names (use underscores, e.g. max_model_len)"
        )


class _StatsSink:
    """Keeps the last scheduler stats reported by vLLM's stat-logger hook."""

    __slots__ = (
        "running", "waiting", "kv_usage", "queries", "hits", "computed", "local", "external",
        "xfers", "xfer_bytes", "xfer_s", "xfer_failed", "expired",
    )  # fmt: skip

    def __init__(self) -> None:
        self.running = self.waiting = self.queries = self.hits = 0
        self.computed = self.local = self.external = 0
        self.xfers = self.xfer_bytes = self.xfer_failed = self.expired = 0
        self.kv_usage = self.xfer_s = 0.0

    def record_transfers(self, data: dict[str, Any]) -> None:
        """Accumulate NIXL connector stats (`NixlKVConnectorStats.data`)."""
        self.xfers += len(data.get("transfer_duration", ()))
        self.xfer_s += float(sum(data.get("transfer_duration", ())))
        self.xfer_bytes += int(sum(data.get("bytes_transferred", ())))
        self.xfer_failed += len(data.get("num_failed_transfers", ())) + len(
            data.get("num_failed_handshakes", ())
        )
        self.expired += len(data.get("num_kv_expired_reqs", ()))

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if iteration_stats is not None:
                    pts = iteration_stats.prompt_token_stats
                    sink.computed += pts.computed
                    sink.local += pts.local_cache_hit
                    sink.external += pts.external_kv_transfer
                if scheduler_stats is None:
                    return
                if scheduler_stats.kv_connector_stats:
                    sink.record_transfers(scheduler_stats.kv_connector_stats)
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs
                sink.kv_usage = scheduler_stats.kv_cache_usage
                pcs = scheduler_stats.prefix_cache_stats
                sink.queries += pcs.queries
                sink.hits += pcs.hits

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder(vllm_config, engine_index)


class VLLMEngine:
    """`Engine` over vLLM's AsyncLLM.

    Args:
        model_name: the name clients use (vLLM's served_model_name).
        model_path: weights directory or hub id.
        engine_args: passed through to `AsyncEngineArgs`.
    """

    def __init__(self, model_name: str, model_path: str, engine_args: dict[str, Any]) -> None:
        _check_engine_args(engine_args)
        self._name = model_name
        self._path = model_path
        self._engine_args = dict(engine_args)
        self._llm: Any = None
        self._stats = _StatsSink()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self._path, served_model_name=[self._name], **self._engine_args)
        vllm_config = args.create_engine_config()
        # NOTE: disable_log_stats=True turns vLLM's periodic log line off; our own stat logger
        # still receives every scheduler snapshot.
        self._llm = AsyncLLM.from_vllm_config(
            vllm_config, stat_loggers=[self._stats.factory], disable_log_stats=True
        )
        logger.info(
            "vLLM engine for %s ready (max_model_len=%d)", self._name, vllm_config.model_config.max_model_len
        )

    def model_info(self) -> ModelInfo:
        cache = self._llm.vllm_config.cache_config
        return ModelInfo(
            name=self._name,
            max_model_len=self._llm.model_config.max_model_len,
            path=self._path,
            block_size=cache.block_size,
            num_kv_blocks=cache.num_gpu_blocks or 0,
        )

    @staticmethod
    def _sampling_params(opts: SamplingOptions, kv_transfer_params: dict[str, Any] | None = None) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else None
        return SamplingParams(
            extra_args=extra,
            max_tokens=opts.max_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k if opts.top_k is not None else 0,
            min_tokens=opts.min_tokens,
            seed=opts.seed,
            stop=opts.stop or None,
            stop_token_ids=opts.stop_token_ids or None,
            ignore_eos=opts.ignore_eos,
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
        )

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self._stream(request, None)

    def decode(self, request: GenerateRequest, kv: KVHandle) -> AsyncIterator[Chunk]:
        """Stream `request`, pulling the prompt's KV over NIXL from the prefill engine in `kv`."""
        return self._stream(request, kv.params)

    async def prefill(self, request: GenerateRequest) -> KVHandle:
        """Run the prompt with max_tokens=1 and keep its KV for a decode engine to pull.

        The returned params (remote engine id, block ids, side-channel host/port) are what the
        decode engine's NixlConnector needs; the KV blocks stay here until pulled or the lease ends.
        """
        one = dataclasses.replace(
            request.sampling, max_tokens=1, min_tokens=0, stop=[], stop_token_ids=[], ignore_eos=True
        )
        req = dataclasses.replace(request, sampling=one)
        params: dict[str, Any] | None = None
        last: Chunk | None = None
        async for chunk, out in self._outputs(req, {"do_remote_decode": True, "do_remote_prefill": False}):
            if chunk.error is not None:
                return KVHandle(error=chunk.error)
            last = chunk
            if out is not None and out.kv_transfer_params:
                params = out.kv_transfer_params
        if params is None or last is None:
            return KVHandle(error=EngineError("prefill returned no kv_transfer_params", 500))
        return KVHandle(params=params, prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens)

    async def _stream(
        self, request: GenerateRequest, kv_transfer_params: dict[str, Any] | None
    ) -> AsyncIterator[Chunk]:
        async for chunk, _ in self._outputs(request, kv_transfer_params):
            yield chunk

    async def _outputs(
        self, request: GenerateRequest, kv_transfer_params: dict[str, Any] | None
    ) -> AsyncIterator[tuple[Chunk, Any]]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_tokens = len(request.prompt_token_ids)
        completion_tokens = 0
        try:
            params = self._sampling_params(request.sampling, kv_transfer_params)
            prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
            if request.cache_salt:
                prompt["cache_salt"] = request.cache_salt
            stream = self._llm.generate(
                prompt,
                params,
                request.request_id,
            )
            async for out in stream:
                comp = out.outputs[0]
                completion_tokens += len(comp.token_ids)
                chunk = Chunk(
                    text=comp.text,
                    token_ids=list(comp.token_ids),
                    finish_reason=comp.finish_reason if out.finished else None,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=out.num_cached_tokens or 0,
                )
                if comp.finish_reason == "error":
                    # vLLM ends a request whose KV load failed (policy `fail`) with this reason.
                    chunk = Chunk(error=EngineError("KV transfer failed at the engine", 502, "kv_transfer"))
                yield chunk, out
        except (VLLMClientError, ValueError) as e:  # the request's fault: 4xx, never 5xx
            yield Chunk(error=EngineError(str(e), 400, "invalid_request_error")), None
        except GracefulHTTPError as e:  # e.g. vLLM's own queue overflow (503)
            yield Chunk(error=EngineError(e.message, int(e.http_status), "engine_overloaded")), None
        except EngineDeadError as e:
            yield Chunk(error=EngineError(f"engine is dead: {e}", 503, "engine_unavailable")), None
        except Exception as e:  # noqa: BLE001 - an error in a stream is a value (see base)
            cause = e.__cause__ if e.__cause__ is not None else e
            logger.exception("request %s failed", request.request_id)
            yield Chunk(error=EngineError(f"{type(cause).__name__}: {cause}", 500)), None

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        s = self._stats
        running = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        return EngineStats(
            running=running,
            waiting=s.waiting,
            kv_usage=s.kv_usage,
            prefix_cache_queries=s.queries,
            prefix_cache_hits=s.hits,
            prompt_tokens_computed=s.computed,
            prompt_tokens_local_cache=s.local,
            prompt_tokens_external=s.external,
            kv_transfers=s.xfers,
            kv_transfer_bytes=s.xfer_bytes,
            kv_transfer_s=s.xfer_s,
            kv_transfer_failures=s.xfer_failed,
            kv_expired=s.expired,
        )

    async def reset_prefix_cache(self) -> None:
        await self._llm.reset_prefix_cache()

    async def check_health(self) -> None:
        await self._llm.check_health()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
