"""API keys -> tenants. Keys are stored only as SHA-256 digests (in the spec or a mounted Secret).

The keys file is re-read when it changes (checked at most every `auth.keys_reload_s`, on a request),
so a key removed from the Secret stops working without a restart; a change that does not parse keeps
the keys in use and is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import yaml

from serving.config import ApiKey, AuthSpec, KeyScope, SpecError

logger = logging.getLogger(__name__)

#: Prefix of keys made by `tandem key new` (any string works as a key).
KEY_PREFIX = "tdm-"


class AuthError(Exception):
    """A request without a valid API key (401)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: its tenant, its key's scopes, and the models and tiers the key may call
    (None: every one). With auth disabled, every caller has every scope and every model."""

    tenant: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None

    @property
    def debug(self) -> bool:
        """An operator's key: the detailed x-tandem-route and the x-tandem-disagg override."""
        return "debug" in self.scopes


#: The scopes of every caller while auth is disabled (local use: the operator is the client).
ALL_SCOPES: frozenset[str] = frozenset(get_args(KeyScope))


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key (what the spec stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_keys(text: str, where: str) -> list[ApiKey]:
    """Keys from the text of a YAML or JSON keys file: a list of {tenant, sha256, scopes}
    (or {"keys": [...]}); SpecError naming `where` and the entry otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"auth.keys_file: {where} is not YAML/JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("keys")
    if not isinstance(data, list):
        raise SpecError(f"auth.keys_file: {where} must hold a list of {{tenant, sha256}} entries")
    out = []
    for i, entry in enumerate(data):
        try:
            out.append(ApiKey.model_validate(entry))
        except Exception as e:  # pydantic's message names the field
            raise SpecError(f"auth.keys_file: {where} entry {i}: {json.dumps(entry)[:80]}: {e}") from None
    return out


def load_keys_file(path: str) -> list[ApiKey]:
    """Keys from a YAML or JSON file (see `parse_keys`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"auth.keys_file: cannot read {p}: {e.strerror}") from None
    return parse_keys(text, str(p))


def _signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file does (a Secret update swaps the file: a new inode); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Authenticator:
    """Maps `Authorization: Bearer <key>` to a tenant; disabled, every request is `default_tenant`.

    Args:
        spec: the auth settings (inline keys, the keys file and how often it is checked).
        default_tenant: the tenant of requests when auth is disabled and no tenant header is sent.
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self, spec: AuthSpec, default_tenant: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = spec.enabled
        self.default_tenant = default_tenant
        self._inline = list(spec.keys)
        self._file = spec.keys_file
        self._reload_s = spec.keys_reload_s
        self._clock = clock
        self._signature: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._refreshing: asyncio.Task | None = None
        keys = list(self._inline)
        if self._file:
            # Stat before reading: a change after the stat shows up as another signature next time.
            self._signature = _signature(self._file)
            text = self._read()
            self._digest = hashlib.sha256(text.encode()).hexdigest()
            keys += parse_keys(text, self._file)
        if self.enabled and not keys:
            raise SpecError(
                "auth: enabled but no keys; add auth.keys or auth.keys_file (`tandem key new`), "
                "or set auth.enabled: false"
            )
        self._keys = self._index(keys)
        self._next_check = clock() + self._reload_s

    def _read(self) -> str:
        assert self._file is not None
        try:
            return Path(self._file).read_text()
        except OSError as e:
            raise SpecError(f"auth.keys_file: cannot read {self._file}: {e.strerror}") from None

    @staticmethod
    def _index(keys: list[ApiKey]) -> dict[str, Caller]:
        return {
            k.sha256: Caller(k.tenant, frozenset(k.scopes), None if k.models is None else frozenset(k.models))
            for k in keys
        }

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the keys file if it changed (blocking: call it off the event loop); True if the
        keys changed. A file that is missing or does not parse keeps the keys in use (logged)."""
        if not self._file:
            return False
        sig = _signature(self._file)
        if sig == self._signature:
            return False
        try:
            text = self._read()
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest == self._digest:
                self._signature = sig
                return False
            keys = parse_keys(text, self._file)
        except SpecError as e:
            # Logged once per change: the next change (the fixed file) is read again.
            self._signature = sig
            logger.warning(
                "auth.keys_file changed but was not loaded; keeping the %d keys in use: %s",
                len(self._keys),
                e,
            )
            return False
        keys = self._inline + keys
        if self.enabled and not keys:
            logger.warning("auth.keys_file %s now holds no keys: every request will get a 401", self._file)
        self._keys = self._index(keys)
        self._signature, self._digest = sig, digest
        logger.info("auth.keys_file %s reloaded: %d keys", self._file, len(keys))
        return True

    async def refresh(self) -> None:
        """Check the keys file if `keys_reload_s` passed since the last check (off the event loop; one
        check at a time, concurrent requests wait for it)."""
        task = self._refreshing
        if task is None or task.done():
            if not self._file or self._clock() < self._next_check:
                return
            self._next_check = self._clock() + self._reload_s
            task = self._refreshing = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.reload), name="auth-keys-reload"
            )
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in reload must not fail requests: the keys in use stay
            logger.exception("auth.keys_file reload failed")

    # -- requests ------------------------------------------------------------------------------

    def tenant(
        self, authorization: str | None, tenant_header: str | None, scope: KeyScope = "inference"
    ) -> str:
        """The request's tenant, for a key that has `scope`. With auth disabled, `tenant_header`
        (x-tandem-tenant) picks one and any scope is allowed."""
        return self.caller(authorization, tenant_header, scope).tenant

    def caller(
        self, authorization: str | None, tenant_header: str | None, scope: KeyScope = "inference"
    ) -> Caller:
        """The request's caller, for a key that has `scope` (see `tenant`)."""
        if not self.enabled:
            return Caller((tenant_header or "").strip() or self.default_tenant, ALL_SCOPES)
        found = self._lookup(authorization)
        if scope not in found.scopes:
            raise AuthError(
                "scope",
                f"this API key lacks the `{scope}` scope (it has: {', '.join(sorted(found.scopes))}); "
                f"use a key whose `scopes` include {scope}",
            )
        return found

    def check_key(self, authorization: str | None) -> None:
        """AuthError unless auth is disabled or `authorization` holds a known key (whatever its scopes)."""
        if self.enabled:
            self._lookup(authorization)

    def _lookup(self, authorization: str | None) -> Caller:
        if not authorization:
            raise AuthError("missing", "missing API key: send `Authorization: Bearer <key>`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed", "the Authorization header must be `Bearer <key>`")
        found = self._keys.get(hash_key(key.strip()))
        if found is None:
            raise AuthError("invalid", "invalid API key")
        return found
