"""The HTTP ingress deployment: the OpenAI API (serving.http.api) over Ray Serve handles."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import psutil
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.backends import HandleBackend, external_pool
from serving.config import ServingSpec, parse_spec
from serving.http.api import build_api
from serving.http.gateway import Gateway
from serving.http.metrics import IngressMetrics
from serving.http.pipeline import ServedModel
from serving.http.responses import SessionsFrontend
from serving.sessions.stores import open_store
from serving.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)


#: How long the ingress waits for a session worker to take a new session (the sweep takes it otherwise).
NOTIFY_WAIT_S = 2.0


def _notifier(handle: DeploymentHandle) -> Any:
    async def call(session_id: str) -> bool:
        return await handle.start.remote(session_id)

    async def notify(session_id: str) -> bool:
        return await asyncio.wait_for(call(session_id), NOTIFY_WAIT_S)

    return notify


def _reporter(handle: DeploymentHandle) -> Any:
    """Tells a session worker that this ingress cancelled a queued session itself (no worker ran it):
    the worker's `report` fires its webhook."""

    async def report(session_id: str) -> Any:
        return await asyncio.wait_for(handle.report.remote(session_id), NOTIFY_WAIT_S)

    return report


class OpenAIIngress:
    """Ray Serve ingress. Built per replica: tokenizers load here, once.

    Args:
        spec: the deployment spec as a dict (what `ServingSpec.model_dump` gives).
        engines: model name → handle of the engine deployment serving it.
    """

    async def __init__(
        self,
        spec: dict[str, Any],
        engines: dict[str, DeploymentHandle],
        sessions: DeploymentHandle | None = None,
    ) -> None:
        self._spec: ServingSpec = parse_spec(spec)
        self._metrics = IngressMetrics()
        self._gateway = Gateway.from_spec(self._spec, self._metrics)
        models: dict[str, ServedModel] = {}
        self._external: list[Any] = []
        for model in self._spec.models:
            if model.external is not None:
                models[model.name] = await self._external_model(model)
        for name, handle in engines.items():
            model = self._spec.model(name)
            path = self._spec.resolve_source(model)
            tokenizer, info = await asyncio.gather(
                asyncio.to_thread(PromptTokenizer, path), handle.model_info.remote()
            )
            models[name] = ServedModel.from_spec(self._spec, name, tokenizer, HandleBackend(handle), info)
        self._models = models
        self._sessions: SessionsFrontend | None = None
        if sessions is not None:
            self._sessions = SessionsFrontend(
                open_store(self._spec.sessions),
                _notifier(sessions),
                spec=self._spec.sessions,
                on_cancelled=_reporter(sessions),
            )
        self._watcher = asyncio.get_running_loop().create_task(self._watch_pools(), name="pool-watcher")
        logger.info("ingress ready for %s", sorted(models))

    async def _external_model(self, model: Any) -> ServedModel:
        """An `engine: openai` model: its external server called from here (serving.replicas.external);
        the number of healthy endpoints drives the gateway's health state machine."""
        tokenizer = await asyncio.to_thread(PromptTokenizer, self._spec.resolve_source(model))
        pool = external_pool(
            model, tokenizer, self._metrics, lambda up, name=model.name: self._gateway.pool_status(name, up)
        )
        info = await pool.start()
        self._external.append(pool)
        return ServedModel.from_spec(self._spec, model.name, tokenizer, pool, info)

    async def _watch_pools(self) -> None:
        """Feed the gateway each serving pool's running replica count (from the Serve controller)."""
        app = serve.get_replica_context().app_name
        deployments = {
            m.name: m.deployment_name(m.serving_pool)
            for m in self._spec.models
            if m.name in self._models and m.external is None
        }
        period = self._spec.resilience.pool_status_period_s
        while True:
            await asyncio.sleep(period)
            try:
                status = await asyncio.to_thread(serve.status)
                found = status.applications[app].deployments
            except Exception as e:  # the controller may be restarting: keep the last view
                logger.debug("serve.status failed: %s", e)
                continue
            for model, dep in deployments.items():
                if dep in found:
                    states = found[dep].replica_states
                    running = sum(
                        n for state, n in states.items() if getattr(state, "value", state) == "RUNNING"
                    )
                    self._gateway.pool_status(model, running)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Per model, what this ingress replica saw (for the SLO autoscaler, serving.autoscaling):
        requests queued for a pool slot, their wait, capacity rejections and arrivals."""
        return self._gateway.autoscaling_stats()

    async def resource_stats(self, collect: bool = False) -> dict[str, int]:
        """This replica's process: resident memory, open file descriptors, live asyncio tasks (what a
        soak watches for leaks: tests/faults/test_soak.py). `collect` first runs Python's cycle
        collector (a pause of milliseconds), so that what is left is held, not merely not yet collected."""
        collected = gc.collect() if collect else 0
        proc = psutil.Process()
        return {
            "gc_collected": collected,
            "pid": proc.pid,
            "rss_bytes": proc.memory_info().rss,
            "open_fds": proc.num_fds(),
            "tasks": len(asyncio.all_tasks()),
            "threads": proc.num_threads(),
        }

    async def __del__(self) -> None:
        self._watcher.cancel()
        await self._gateway.close()
        for pool in self._external:
            await pool.close()
        if self._sessions is not None:
            self._sessions.close()

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self._models, self._metrics, self._gateway, self._sessions, self._spec.http)


# Late-bound FastAPI app: built after __init__, so the routes close over this replica's state
# rather than a module-level app object.
IngressDeployment = serve.ingress()(OpenAIIngress)
