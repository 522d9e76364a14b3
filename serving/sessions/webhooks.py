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

Delivery is durable and at least once. The session store keeps an outbox
(serving.sessions.store.OutboxEntry): the same transaction (SQLite) or script (Redis) that writes a
session's terminal status records the pending delivery when the session's tenant has a webhook
(``sessions.webhooks``), and a cancel at the ingress records it the same way. `CompletionNotifier`
delivers from it: the worker that ended the session claims the entry at once, and every worker polls
(on start, then every ``sessions.webhook_poll_s``) for entries unclaimed for ``webhook_grace_s`` or
whose claim's lease (``webhook_lease_s``, renewed while the delivery runs) lapsed, so one whose
worker died between the finish and the delivery is delivered by another. An entry is removed after a
2xx, or once the retries are spent or the answer is final (a 4xx other than 429, a redirect: counted in
`failed`). A worker that dies after the receiver's 2xx but before the removal makes another deliver
it again, under the same ``webhook-id`` and body: receivers deduplicate by ``webhook-id``.

Pure asyncio + httpx; nothing blocks the event loop (store calls run in threads) and nothing here is a
module-level singleton.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
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
from serving.config import RetrySpec, SessionsSpec

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
    serving.sessions.worker.SessionWorker). The event id is `completion_event_id(session id, status)`:
    a repeated end gets the same id.

    With a `store` that keeps an outbox (serving.sessions.store.OutboxStore, opened with these
    targets' tenants as its `webhook_tenants`), deliveries come from the outbox: the store recorded
    the entry in the same write that ended the session, the hook claims it and delivers it at once,
    and `start` polls every `poll_s` for entries that no one delivered (unclaimed for `grace_s`, or a
    lease that lapsed: a worker that died, an ingress cancel whose report was lost). An entry is
    removed once it is delivered (2xx) or given up on (the sender's retries spent, or an answer that
    is final); a worker that dies in between leaves it to another, so delivery is at least once.
    Without a store (or with one that has no outbox) a delivery is a background task in this process
    only. `aclose` waits for deliveries in flight.

    Args:
        targets: tenant → its webhook.
        sender: delivers with retries.
        keep_results: the latest delivery results kept in `results` (a worker runs for weeks);
            `delivered` and `failed` count them all.
        store: the session store whose outbox this delivers from (None: in memory only).
        owner: this deliverer's unique id (its lease holder name).
        poll_s / lease_s / grace_s / max_claims: sessions.webhook_poll_s / webhook_lease_s /
            webhook_grace_s / webhook_max_claims (None: their defaults).
        max_in_flight: outbox deliveries this notifier runs at once (a poll claims no more).
    """

    def __init__(
        self,
        targets: Mapping[str, WebhookTarget],
        sender: WebhookSender,
        keep_results: int = 100,
        store: Any | None = None,
        owner: str | None = None,
        poll_s: float | None = None,
        lease_s: float | None = None,
        grace_s: float | None = None,
        max_in_flight: int = 64,
        max_claims: int | None = None,
    ) -> None:
        fields = SessionsSpec.model_fields  # one home for the defaults
        self.targets = dict(targets)
        self.sender = sender
        self.results: deque[DeliveryResult] = deque(maxlen=keep_results)
        self.delivered = 0
        self.failed = 0
        self.owner = owner or f"webhooks-{secrets.token_hex(6)}"
        self.poll_s = fields["webhook_poll_s"].default if poll_s is None else poll_s
        self.lease_s = fields["webhook_lease_s"].default if lease_s is None else lease_s
        self.grace_s = fields["webhook_grace_s"].default if grace_s is None else grace_s
        self.max_claims = fields["webhook_max_claims"].default if max_claims is None else max_claims
        self.max_in_flight = max_in_flight
        self.store = store if store is not None and hasattr(store, "outbox_claim") else None
        if store is not None and self.store is None:
            logger.warning(
                "session store %s keeps no webhook outbox: completion webhooks are delivered from memory "
                "only (one whose worker dies before it is delivered is lost)", type(store).__name__,
            )  # fmt: skip
        if self.store is not None:
            missing = set(self.targets) - set(getattr(self.store, "webhook_tenants", self.targets))
            if missing:
                raise ValueError(
                    f"the session store records no outbox entries for tenants {sorted(missing)}: open it "
                    "with their webhooks (webhook_tenants; open_store reads sessions.webhooks)"
                )
        self._tasks: set[asyncio.Task] = set()
        self._held: set[str] = set()  # outbox entries being delivered here
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task] = []

    def __call__(self, rec: Any, obj: Mapping[str, Any]) -> None:
        if rec.tenant not in self.targets:
            return
        status = obj["status"]
        event_id = completion_event_id(rec.id, status)
        if self.store is not None:
            self._spawn(self._claim_and_deliver([event_id]))
            return
        target = self.targets[rec.tenant]
        _, body = completion_event(rec.id, status, event_id=event_id)
        self._spawn(self._deliver(target, event_id, body))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, target: WebhookTarget, event_id: str, body: bytes) -> DeliveryResult:
        result = await self.sender.deliver(target, event_id, body)
        self._count(result)
        if not result.delivered:
            logger.warning("webhook %s not delivered after %d attempts", event_id, result.attempts)
        return result

    def _count(self, result: DeliveryResult) -> None:
        self.results.append(result)
        if result.delivered:
            self.delivered += 1
        else:
            self.failed += 1

    # -- the outbox --

    def start(self) -> None:
        """Poll the outbox now and every `poll_s`, and renew the leases of the entries being
        delivered (on the running event loop; nothing without an outbox)."""
        if self.store is None or self._loops:
            return
        self._loops = [
            asyncio.create_task(self._every(self.poll_s, self.poll), name="webhooks-outbox-poll"),
            asyncio.create_task(self._every(self.lease_s / 3, self._renew), name="webhooks-outbox-lease"),
        ]

    async def _every(self, period_s: float, fn: Callable[[], Awaitable[object]]) -> None:
        while not self._stop.is_set():
            try:
                await fn()
            except Exception as e:  # a store that does not answer: the next round tries again
                name = getattr(fn, "__name__", fn)
                logger.warning("webhook outbox: %s failed (%s: %s)", name, type(e).__name__, e)
            # Sleep for the period, or less if `aclose` sets the stop: the timeout is the usual end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period_s)

    async def poll(self) -> int:
        """Claim the outbox entries no one delivers (unclaimed for `grace_s`, or a lease that lapsed),
        up to `max_in_flight` deliveries here, and start delivering them; returns how many."""
        if self.store is None:
            return 0
        room = self.max_in_flight - len(self._held)
        if room <= 0:
            return 0
        entries = await asyncio.to_thread(
            self.store.outbox_claim, self.owner, self.lease_s, self.grace_s, room
        )
        self._start_deliveries(entries)
        return len(entries)

    async def _claim_and_deliver(self, event_ids: list[str]) -> None:
        assert self.store is not None
        try:
            entries = await asyncio.to_thread(
                self.store.outbox_claim, self.owner, self.lease_s, 0.0, len(event_ids), event_ids
            )
        except Exception as e:  # the entry stays: a poll (here or elsewhere) delivers it later
            logger.warning("webhook outbox: could not claim %s (%s: %s)", event_ids, type(e).__name__, e)
            return
        self._start_deliveries(entries)

    def _start_deliveries(self, entries: list[Any]) -> None:
        for entry in entries:
            if entry.event_id in self._held:
                continue
            self._held.add(entry.event_id)
            self._spawn(self._deliver_entry(entry))

    async def _deliver_entry(self, entry: Any) -> None:
        """Deliver one claimed outbox entry, then remove it (delivered, or given up on). Cancelled
        (the worker closes) or a store that cannot remove it: the entry stays, for a redelivery."""
        assert self.store is not None
        eid, status = entry.event_id, str(getattr(entry.status, "value", entry.status))
        try:
            target = self.targets.get(entry.tenant)
            if target is None:  # the tenant's webhook was removed from the config since
                result = DeliveryResult(False, 0, None, f"no webhook for tenant {entry.tenant!r}")
                self._count(result)
            elif entry.attempts > self.max_claims:  # every deliverer before died holding it
                error = f"claimed {entry.attempts} times, over webhook_max_claims {self.max_claims}"
                result = DeliveryResult(False, 0, None, error)
                self._count(result)
            else:
                # The body of every delivery of this entry is the same: created_at is the end's time.
                _, body = completion_event(entry.response_id, status, now=entry.created, event_id=eid)
                result = await self._deliver(target, eid, body)
            await asyncio.to_thread(self.store.outbox_remove, eid, self.owner)
            logger.log(
                logging.INFO if result.delivered else logging.WARNING,
                "webhook %s (%s of %s, claim %d): %s; removed from the outbox",
                eid, status, entry.response_id, entry.attempts,
                "delivered" if result.delivered else f"given up ({result.last_error})",
            )  # fmt: skip
        except Exception as e:
            logger.warning("webhook outbox: %s stays for a redelivery (%s: %s)", eid, type(e).__name__, e)
        finally:
            self._held.discard(eid)

    async def _renew(self) -> None:
        if self.store is None or not self._held:
            return
        held = set(self._held)
        kept = await asyncio.to_thread(self.store.outbox_renew, self.owner, held, self.lease_s)
        lost = (held & self._held) - kept  # still delivering here, no longer held
        if lost:
            logger.warning("webhook outbox: lost the leases of %s (delivered twice, maybe)", sorted(lost))

    async def join(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` (None: no bound) for the deliveries in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def aclose(self, wait_s: float = 5.0) -> None:
        """Stop polling, wait up to `wait_s` for deliveries in flight, cancel the rest (their outbox
        entries stay, for another worker once their leases lapse), then close the sender."""
        self._stop.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.join(wait_s)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self.sender.aclose()
