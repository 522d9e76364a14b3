"""Completion webhooks for background reasoning sessions, following the Standard Webhooks spec
(https://www.standardwebhooks.com/), which OpenAI's webhooks also use.

Every event is a JSON POST carrying three headers:

* ``webhook-id``: the event id; the same on every retry, and for a session's completions the same
  for every delivery of one (session, status) — a session that runs again after a lost write (a
  store crash) reports its end under the id it had — so receivers can deduplicate;
* ``webhook-timestamp``: unix seconds (integer) of this attempt;
* ``webhook-signature``: ``v1,<base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))>``.

The body is ``{"id", "object": "event", "type": "response.<status>", "created_at", "data": {"id"}}``.

A configured secret that starts with ``whsec_`` is base64 of the key bytes (the form OpenAI and
Svix hand out); any other string is used as its UTF-8 bytes.

Pure asyncio + httpx; nothing blocks the event loop and nothing here is a module-level singleton.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from router.resilience import ErrorClass, Retry, RetryPolicy, classify, retry_after_seconds
from serving.config import RetrySpec

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0

# The terminal statuses of a background response, each one an event type ``response.<status>``.
COMPLETION_STATUSES = ("completed", "incomplete", "failed", "cancelled")

# Statuses whose numeric Retry-After header we honour.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Transport errors that another attempt cannot fix.
_FATAL_TRANSPORT_ERRORS = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


class WebhookVerificationError(Exception):
    """A webhook's signature or timestamp did not check out."""


def secret_bytes(secret: str) -> bytes:
    """The HMAC key for a configured secret: base64-decoded after a ``whsec_`` prefix, else UTF-8."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(
                f"webhook secret starts with {SECRET_PREFIX!r} but the rest is not base64"
            ) from e
    else:
        key = secret.encode("utf-8")
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (``v1,<base64 digest>``) for one attempt."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts as well as httpx.Headers."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received webhook; raises WebhookVerificationError unless one of the (space-separated)
    ``v1`` signatures matches and the timestamp is within ``tolerance_s`` of ``now``."""
    msg_id = _header(headers, "webhook-id")
    raw_timestamp = _header(headers, "webhook-timestamp")
    raw_signatures = _header(headers, "webhook-signature")
    if not msg_id or not raw_timestamp or not raw_signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance window")
    expected = sign(secret, msg_id, timestamp, body).encode("ascii")
    for candidate in raw_signatures.split(" "):
        version, _, _ = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        if hmac.compare_digest(candidate.encode("utf-8", "replace"), expected):
            return
    raise WebhookVerificationError("no matching webhook signature")


@dataclass
class WebhookTarget:
    """Where one tenant's webhooks go and the key they are signed with."""

    url: str
    secret: bytes = field(repr=False)


def webhook_from_config(url: str, secret: str) -> WebhookTarget:
    """A WebhookTarget from configured strings; ValueError on an unusable URL or secret."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"webhook url must use http or https, got {parts.scheme or 'no scheme'!r}: {url!r}")
    if not parts.hostname:
        raise ValueError(f"webhook url has no host: {url!r}")
    return WebhookTarget(url=url, secret=secret_bytes(secret))


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(16)}"


def completion_event_id(response_id: str, status: str) -> str:
    """The event id of `response_id` reaching `status`: derived from both, so that every delivery of
    that end (a retry, or a re-run of a session whose finish the store lost) carries the same id."""
    digest = hashlib.sha256(f"{response_id}\x00{status}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def completion_event(
    response_id: str,
    status: str,
    data: dict[str, Any] | None = None,
    now: float | None = None,
    event_id: str | None = None,
) -> tuple[str, bytes]:
    """(event id, JSON body) for a background response that reached a terminal ``status``.

    ``data`` adds fields next to the response id; it cannot override ``id``. ``event_id``: None, a
    new random one (`completion_event_id` gives the stable one of the response and status)."""
    if status not in COMPLETION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(COMPLETION_STATUSES)}, got {status!r}")
    event_id = event_id or new_event_id()
    event = {
        "id": event_id,
        "object": "event",
        "type": f"response.{status}",
        "created_at": int(time.time() if now is None else now),
        "data": {**(data or {}), "id": response_id},
    }
    return event_id, json.dumps(event, separators=(",", ":")).encode("utf-8")


@dataclass
class DeliveryResult:
    delivered: bool
    attempts: int
    last_status: int | None = None
    last_error: str | None = None


def _redact(url: str) -> str:
    """The URL without credentials or query string, safe for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _retry_after_s(response: httpx.Response) -> float | None:
    """A numeric (delta-seconds) Retry-After, or None when absent or not a finite non-negative number
    (an HTTP date falls back to the backoff)."""
    return retry_after_seconds(response.headers.get("retry-after"))


class WebhookSender:
    """Delivers signed webhook events with retries (router.resilience.RetryPolicy: exponential backoff
    with full jitter; `None`: the spec's default `sessions.webhook_retry`)."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = 10.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(follow_redirects=False)
        self.retry = retry if retry is not None else RetrySpec().policy()
        self.request_timeout_s = request_timeout_s
        self._sleep = sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this sender created it."""
        if self._owns_client:
            await self._client.aclose()

    def _headers(self, target: WebhookTarget, event_id: str, body: bytes) -> dict[str, str]:
        timestamp = int(self._clock())
        return {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(target.secret, event_id, timestamp, body),
        }

    async def _attempt(self, target: WebhookTarget, event_id: str, body: bytes) -> httpx.Response:
        # Stream so that the receiver's response body is never read into memory.
        async with self._client.stream(
            "POST",
            target.url,
            content=body,
            headers=self._headers(target, event_id, body),
            timeout=self.request_timeout_s,
        ) as response:
            return response

    async def deliver(self, target: WebhookTarget, event_id: str, body: bytes) -> DeliveryResult:
        """POST ``body`` to ``target`` until a 2xx, a non-retryable answer, or ``max_attempts``."""
        last_status: int | None = None
        last_error: str | None = None
        url = _redact(target.url)
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self._attempt(target, event_id, body)
            except httpx.HTTPError as e:
                last_status = None
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                retryable = isinstance(e, httpx.TransportError) and not isinstance(e, _FATAL_TRANSPORT_ERRORS)
                failure = ErrorClass.SERVER if retryable else ErrorClass.CLIENT
            else:
                last_status = response.status_code
                if response.is_success:
                    return DeliveryResult(True, attempt, last_status, None)
                last_error = f"HTTP {last_status}"
                # 429 and 5xx are worth another attempt; other 4xx (and a redirect, which is not
                # followed) are the receiver's final word.
                failure = classify(last_status) if last_status >= 400 else ErrorClass.CLIENT
                if last_status in _RETRY_AFTER_STATUSES:
                    retry_after = _retry_after_s(response)
            step = self.retry.next_step(failure, attempt, retry_after_s=retry_after, rng=self._rng)
            will_retry = isinstance(step, Retry)
            logger.warning(
                "webhook %s to %s: attempt %d/%d failed (%s)%s",
                event_id,
                url,
                attempt,
                self.retry.max_attempts,
                last_error,
                "; retrying" if will_retry else "; giving up",
            )
            if not isinstance(step, Retry):
                return DeliveryResult(False, attempt, last_status, last_error)
            await self._sleep(step.delay_s)


class CompletionNotifier:
    """Calls the tenant's webhook when one of its sessions finishes (the `on_finished` hook of
    serving.sessions.worker.SessionWorker). Deliveries run as background tasks; `aclose` waits for them.
    The event id is `completion_event_id(session id, status)`: a repeated end gets the same id.

    Args:
        targets: tenant → its webhook.
        sender: delivers with retries.
        keep_results: the latest delivery results kept in `results` (a worker runs for weeks);
            `delivered` and `failed` count them all.
    """

    def __init__(
        self, targets: Mapping[str, WebhookTarget], sender: WebhookSender, keep_results: int = 100
    ) -> None:
        self.targets = dict(targets)
        self.sender = sender
        self.results: deque[DeliveryResult] = deque(maxlen=keep_results)
        self.delivered = 0
        self.failed = 0
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, rec: Any, obj: Mapping[str, Any]) -> None:
        target = self.targets.get(rec.tenant)
        if target is None:
            return
        status = obj["status"]
        event_id, body = completion_event(rec.id, status, event_id=completion_event_id(rec.id, status))
        task = asyncio.get_running_loop().create_task(self._deliver(target, event_id, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, target: WebhookTarget, event_id: str, body: bytes) -> None:
        result = await self.sender.deliver(target, event_id, body)
        self.results.append(result)
        if result.delivered:
            self.delivered += 1
        else:
            self.failed += 1
            logger.warning("webhook %s not delivered after %d attempts", event_id, result.attempts)

    async def aclose(self, wait_s: float = 5.0) -> None:
        """Wait up to `wait_s` for deliveries in flight, then close the sender."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_s)
        await self.sender.aclose()
