"""API keys -> tenants. Keys are stored only as SHA-256 digests (in the spec or a mounted Secret)."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import yaml

from serving.config import ApiKey, AuthSpec, SpecError

#: Prefix of keys made by `tandem key new` (any string works as a key).
KEY_PREFIX = "tdm-"


class AuthError(Exception):
    """A request without a valid API key (401)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key (what the spec stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys_file(path: str) -> list[ApiKey]:
    """Keys from a YAML or JSON file: a list of {tenant, sha256} (or {"keys": [...]})."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise SpecError(f"auth.keys_file: cannot read {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"auth.keys_file: {p} is not YAML/JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("keys")
    if not isinstance(data, list):
        raise SpecError(f"auth.keys_file: {p} must hold a list of {{tenant, sha256}} entries")
    out = []
    for i, entry in enumerate(data):
        try:
            out.append(ApiKey.model_validate(entry))
        except Exception as e:  # pydantic's message names the field
            raise SpecError(f"auth.keys_file: {p} entry {i}: {json.dumps(entry)[:80]}: {e}") from None
    return out


class Authenticator:
    """Maps `Authorization: Bearer <key>` to a tenant; disabled, every request is `default_tenant`."""

    def __init__(self, spec: AuthSpec, default_tenant: str) -> None:
        self.enabled = spec.enabled
        self.default_tenant = default_tenant
        keys = list(spec.keys)
        if spec.keys_file:
            keys += load_keys_file(spec.keys_file)
        if self.enabled and not keys:
            raise SpecError(
                "auth: enabled but no keys; add auth.keys or auth.keys_file (`tandem key new`), "
                "or set auth.enabled: false"
            )
        self._tenants = {k.sha256: k.tenant for k in keys}

    def tenant(self, authorization: str | None, tenant_header: str | None) -> str:
        """The request's tenant. With auth disabled, `tenant_header` (x-tandem-tenant) picks one."""
        if not self.enabled:
            return (tenant_header or "").strip() or self.default_tenant
        if not authorization:
            raise AuthError("missing", "missing API key: send `Authorization: Bearer <key>`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed", "the Authorization header must be `Bearer <key>`")
        tenant = self._tenants.get(hash_key(key.strip()))
        if tenant is None:
            raise AuthError("invalid", "invalid API key")
        return tenant
