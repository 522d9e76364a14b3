"""The session worker deployment: detached Serve replicas that own background sessions.

Each replica runs a `serving.sessions.worker.SessionWorker` over the shared store and calls the model
deployments through Serve handles, like the ingress does. Serve restarts a replica that dies; its
sessions are taken over (by it or another replica) when their leases lapse, and resume from their
checkpoints. The ingress calls `start` (a hint: workers also sweep the store for orphans) and
`report` for a queued session it cancelled itself (so that its webhook goes out at once; the cancel
recorded it in the store's outbox, which every worker polls, so a lost report only delays it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.backends import HandleBackend, external_pool
from serving.config import WebhookSpec, parse_spec
from serving.replicas.deployments import replica_name
from serving.sessions.stores import open_store
from serving.sessions.webhooks import CompletionNotifier, WebhookSender, WebhookTarget, webhook_from_config
from serving.sessions.worker import SessionModel, SessionWorker, WorkerSettings
from serving.thinking import reasoning_tags
from serving.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)


def webhook_target(hook: WebhookSpec) -> WebhookTarget:
    """The webhook of a tenant, its secret read from the environment or a mounted file."""
    if hook.secret_env is not None:
        secret = os.environ.get(hook.secret_env)
        if not secret:
            raise ValueError(f"sessions.webhooks[{hook.tenant}]: ${hook.secret_env} is not set")
    else:
        secret = Path(hook.secret_file or "").read_text().strip()
    return webhook_from_config(hook.url, secret)


class _SessionMetrics:
    """Finished sessions and their tokens as Ray metrics (exported as `ray_tandem_sessions_finished_total`
    and `ray_tandem_session_tokens_total`; `ray.serve.metrics` adds the deployment/replica labels).
    The ingress's `tandem_*_tokens_total` count chat and text completions; these count sessions."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter

        self._finished = Counter(
            "tandem_sessions_finished",
            description="Background sessions that ended, by model and status.",
            tag_keys=("model", "status"),
        )
        self._tokens = Counter(
            "tandem_session_tokens",
            description="Tokens of finished sessions: input, cached, output, reasoning (by kind).",
            tag_keys=("model", "kind"),
        )

    def __call__(self, rec: Any, obj: dict[str, Any]) -> None:
        self._finished.inc(1, {"model": rec.model, "status": obj["status"]})
        u = obj.get("usage") or {}
        counts = {
            "input": u.get("input_tokens", 0),
            "cached": (u.get("input_tokens_details") or {}).get("cached_tokens", 0),
            "output": u.get("output_tokens", 0),
            "reasoning": (u.get("output_tokens_details") or {}).get("reasoning_tokens", 0),
        }
        for kind, n in counts.items():
            if n:
                self._tokens.inc(n, {"model": rec.model, "kind": kind})


class SessionServer:
    """A session worker replica.

    Args:
        spec: the deployment spec as a dict.
        engines: model name → handle of the engine deployment serving it.
    """

    async def __init__(self, spec: dict[str, Any], engines: dict[str, DeploymentHandle]) -> None:
        self._spec = parse_spec(spec)
        s = self._spec.sessions
        self._store = open_store(s)
        models: dict[str, SessionModel] = {}
        for name, handle in engines.items():
            path = self._spec.resolve_source(self._spec.model(name))
            tok = await asyncio.to_thread(PromptTokenizer, path)
            models[name] = SessionModel(
                name, HandleBackend(handle).stream, tok, reasoning_tags(self._spec, name, tok)
            )
        self._external: list[Any] = []
        for model in self._spec.models:
            if model.external is None:
                continue
            tok = await asyncio.to_thread(PromptTokenizer, self._spec.resolve_source(model))
            pool = external_pool(model, tok)
            await pool.start()
            self._external.append(pool)
            models[model.name] = SessionModel(
                model.name, pool.stream, tok, reasoning_tags(self._spec, model.name, tok)
            )
        owner = f"{replica_name()}/{uuid.uuid4().hex[:8]}"
        hooks = {h.tenant: webhook_target(h) for h in s.webhooks}
        self._notifier: CompletionNotifier | None = None
        if hooks:
            self._notifier = CompletionNotifier(
                hooks,
                WebhookSender(retry=s.webhook_retry.policy()),
                store=self._store,
                owner=owner,
                poll_s=s.webhook_poll_s,
                lease_s=s.webhook_lease_s,
                grace_s=s.webhook_grace_s,
                max_claims=s.webhook_max_claims,
            )
            self._notifier.start()  # delivers what a worker that stopped left in the outbox
        self._metrics = _SessionMetrics()
        settings = WorkerSettings.from_spec(s, self._spec.resilience.streams)
        self._worker = SessionWorker(self._store, models, settings, owner, on_finished=self._finished)
        self._worker.start()
        logger.info("session worker %s ready for %s", owner, sorted(models))

    def _finished(self, rec: Any, obj: dict[str, Any]) -> None:
        self._metrics(rec, obj)
        if self._notifier is not None:
            self._notifier(rec, obj)

    async def start(self, session_id: str) -> bool:
        """Claim and run a new session here (False: full, or another worker has it)."""
        return await self._worker.submit(session_id)

    async def report(self, session_id: str) -> bool:
        """Report a session the ingress cancelled while it was queued (its webhook, from the outbox,
        and metrics), since no worker ran it (the ingress's `SessionsFrontend.on_cancelled`)."""
        return await self._worker.report(session_id)

    def status(self) -> dict[str, Any]:
        """This worker's sessions (for tests and operators)."""
        w = self._worker
        return {"owner": w.owner, "active": w.active, "resumed": w.resumed, "finished": dict(w.completed)}

    async def check_health(self) -> None:
        """Serve's health probe: the store must answer."""
        await asyncio.to_thread(self._store.last_seq, "health-probe")

    async def __del__(self) -> None:
        await self._worker.close()
        for pool in self._external:
            await pool.close()
        if self._notifier is not None:
            await self._notifier.aclose()
