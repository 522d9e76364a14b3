"""vLLM engine: AsyncLLM in process (CPU build locally, CUDA build on clusters; same code).

The ingress hands token ids in; we hand deltas out. vLLM does the detokenization (it already owns
an incremental detokenizer), so text and token ids stay consistent with stop strings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from serving.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    GenerateRequest,
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

    __slots__ = ("running", "waiting", "kv_usage", "queries", "hits")

    def __init__(self) -> None:
        self.running = self.waiting = self.queries = self.hits = 0
        self.kv_usage = 0.0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is None:
                    return
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
        return ModelInfo(
            name=self._name,
            max_model_len=self._llm.model_config.max_model_len,
            path=self._path,
        )

    @staticmethod
    def _sampling_params(opts: SamplingOptions) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
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

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_tokens = len(request.prompt_token_ids)
        completion_tokens = 0
        try:
            params = self._sampling_params(request.sampling)
            stream = self._llm.generate(
                TokensPrompt(prompt_token_ids=request.prompt_token_ids),
                params,
                request.request_id,
            )
            async for out in stream:
                comp = out.outputs[0]
                completion_tokens += len(comp.token_ids)
                yield Chunk(
                    text=comp.text,
                    token_ids=list(comp.token_ids),
                    finish_reason=comp.finish_reason if out.finished else None,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=out.num_cached_tokens or 0,
                )
        except (VLLMClientError, ValueError) as e:  # the request's fault: 4xx, never 5xx
            yield Chunk(error=EngineError(str(e), 400, "invalid_request_error"))
        except GracefulHTTPError as e:  # e.g. vLLM's own queue overflow (503)
            yield Chunk(error=EngineError(e.message, int(e.http_status), "engine_overloaded"))
        except EngineDeadError as e:
            yield Chunk(error=EngineError(f"engine is dead: {e}", 503, "engine_unavailable"))
        except Exception as e:  # noqa: BLE001 - an error in a stream is a value (see base)
            cause = e.__cause__ if e.__cause__ is not None else e
            logger.exception("request %s failed", request.request_id)
            yield Chunk(error=EngineError(f"{type(cause).__name__}: {cause}", 500))

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
        )

    async def check_health(self) -> None:
        await self._llm.check_health()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
