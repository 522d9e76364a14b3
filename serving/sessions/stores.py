"""`open_store`: the session store a `config.SessionsSpec` describes (SQLite, Redis, or a custom class).

SQLite and Redis stores are opened with the tenants of `sessions.webhooks` as their `webhook_tenants`,
so every process (ingress and session workers) records those tenants' completion webhooks in the
store's outbox; a custom class is called as before and keeps none unless it does so itself."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from serving.sessions.store import SessionStore, SQLiteStore


def open_store(spec: Any) -> SessionStore:
    """The session store a `config.SessionsSpec` describes."""
    st = spec.store
    bounds = {
        "ttl_s": spec.ttl_s,
        "max_sessions_per_tenant": spec.max_sessions_per_tenant,
        "max_bytes_per_tenant": spec.max_bytes_per_tenant,
    }
    hooks = {"webhook_tenants": [w.tenant for w in getattr(spec, "webhooks", ())]}
    if st.kind == "sqlite":
        return SQLiteStore(Path(st.path).expanduser(), **bounds, **hooks)
    if st.kind == "redis":
        from serving.sessions.store_redis import RedisStore

        url = st.url if st.url is not None else os.environ.get(st.url_env or "")
        if not url:
            raise ValueError(f"sessions.store.url_env: ${st.url_env} is not set")
        client = {
            "socket_timeout": st.socket_timeout_s,
            "socket_connect_timeout": st.socket_connect_timeout_s,
            "retries": st.retries,
            "require_aof": st.require_aof,
            **st.options,  # the Redis client's own keywords win (socket_timeout, …)
        }
        return RedisStore(url, prefix=st.prefix, **client, **bounds, **hooks)
    module, _, name = st.class_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(**st.options, **bounds)
