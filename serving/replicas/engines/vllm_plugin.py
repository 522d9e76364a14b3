"""vLLM general plugin: NIXL's UCX progress thread sleeps in poll() instead of spinning.

NOTE(why): vLLM's NixlConnector creates its NIXL agent with the progress thread on, and NIXL's
Python agent hard-codes `pthrDelay = 0` (nixl `_api.py`, `nixl_agent.__init__`). The UCX backend's
shared progress thread then calls `poll(worker event fds, timeout=ceil(pthrDelay µs → ms))` in a
loop: with 0 that is a busy loop that keeps one core per engine at 100 % while the engine is idle
(measured: 0.99 cores on the `VLLM::Worker` process's progress thread, 0.00 without the
connector). The thread is woken by the UCX workers' event fds (`arm()` before each poll), so a
transfer is progressed as soon as it arrives whatever the timeout; the timeout only bounds a wake-up
that UCX fails to signal (NIXL's own comment: "a temporary workaround for UCX bug"). A timeout of a
few milliseconds therefore costs nothing per transfer and ~0 CPU when idle.

vLLM loads `vllm.general_plugins` entry points in every engine process, workers included
(`vllm.plugins.load_general_plugins`), before the KV connector builds its agent. This plugin does
nothing unless the engine replica set `TANDEM_NIXL_PROGRESS_POLL_US` (serving.replicas.deployments does for
P/D pools, from `disaggregation.nixl_progress_poll_ms` in the spec), so other vLLM users of the
same environment are unaffected.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variable carrying the progress thread's poll timeout in microseconds.
POLL_ENV = "TANDEM_NIXL_PROGRESS_POLL_US"


def _patch_bindings(bindings: Any, poll_us: int) -> bool:
    """Wrap `bindings.nixlAgent` so that agents with a progress thread get `pthrDelay = poll_us`.

    Returns False when the bindings were already wrapped (plugins may load more than once).
    """
    original = bindings.nixlAgent
    if getattr(original, "_tandem_poll_us", None) is not None:
        return False

    def nixl_agent(name: str, config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "useProgThread", False) and not getattr(config, "pthrDelay", 0):
            config.pthrDelay = poll_us
        return original(name, config, *args, **kwargs)

    nixl_agent._tandem_poll_us = poll_us  # type: ignore[attr-defined]
    nixl_agent.__wrapped__ = original  # type: ignore[attr-defined]
    bindings.nixlAgent = nixl_agent
    return True


def register() -> None:
    """The `vllm.general_plugins` entry point (see the module docstring)."""
    raw = os.environ.get(POLL_ENV)
    if not raw:
        return
    try:
        poll_us = int(raw)
    except ValueError:
        logger.warning("%s=%r is not an integer number of microseconds; NIXL left as is", POLL_ENV, raw)
        return
    if poll_us <= 0:
        return
    # vLLM sets this before it first imports NIXL (vllm.distributed.nixl_utils); importing NIXL
    # here first would make it warn that it can no longer set it, so set the same value.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        from nixl import _api  # resolves to nixl_cu12._api / nixl_cu13._api / nixl_rocm._api
    except ImportError:
        return  # no NIXL in this environment: nothing spins
    if _patch_bindings(_api.nixlBind, poll_us):
        logger.info("NIXL progress thread: poll timeout %d µs instead of a busy loop", poll_us)
