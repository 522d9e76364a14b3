"""Completion webhooks (serving.sessions.webhooks): Standard Webhooks signing and verification, the event
body, and delivery with retries. Retry logic runs against httpx.MockTransport with an injected
sleep; one test delivers to a real HTTP/1.1 server on a local socket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging

import httpx
import pytest

from router.resilience import RetryPolicy
from serving.config import RetrySpec
from serving.sessions.webhooks import (
    DeliveryResult,
    WebhookSender,
    WebhookTarget,
    WebhookVerificationError,
    completion_event,
    secret_bytes,
    sign,
    verify,
    webhook_from_config,
)

KEY = b"super-secret-key-bytes"
MSG_ID = "evt_0123456789abcdef"
TS = 1_700_000_000
BODY = b'{"id":"evt_0123456789abcdef","object":"event"}'


def signed_headers(secret: bytes = KEY, msg_id: str = MSG_ID, ts: int = TS, body: bytes = BODY) -> dict:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


class Sleeps:
    """An injected sleep that records its delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class TopOfRange:
    """An rng whose jitter always picks the top of the range, so backoff ceilings are observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Counter:
    def __init__(self, start: float = TS) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 1
        return self.t


def mock_sender(handler, **kwargs) -> tuple[WebhookSender, Sleeps, list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return handler(request, len(requests))

    sleeps = Sleeps()
    client = httpx.AsyncClient(transport=httpx.MockTransport(recording))
    kwargs.setdefault("sleep", sleeps)
    return WebhookSender(client=client, retry=retry(kwargs), **kwargs), sleeps, requests


def retry(kwargs: dict) -> RetryPolicy:
    """The sender's retry policy: the spec's defaults (sessions.webhook_retry) with the given overrides."""
    fields = RetrySpec().model_dump()
    return RetryPolicy(**{k: kwargs.pop(k, v) for k, v in fields.items()})


TARGET = WebhookTarget(url="https://hooks.example.com/tandem", secret=KEY)


# --- secrets --------------------------------------------------------------------------------------


def test_secret_bytes_whsec_prefix_is_base64():
    raw = bytes(range(32))
    assert secret_bytes("whsec_" + base64.b64encode(raw).decode()) == raw


def test_secret_bytes_plain_string_is_utf8():
    assert secret_bytes("héllo-secret") == "héllo-secret".encode()
    # Without the prefix a base64-looking string is *not* decoded.
    assert secret_bytes("AAAA") == b"AAAA"


@pytest.mark.parametrize("bad", ["whsec_not base64!!", "whsec_", ""])
def test_secret_bytes_rejects_bad_secrets(bad):
    with pytest.raises(ValueError):
        secret_bytes(bad)


# --- signing and verification ---------------------------------------------------------------------


def test_sign_matches_independent_hmac():
    ts = 1614265330
    body = b'{"type":"response.completed"}'
    digest = hmac.new(KEY, f"{MSG_ID}.{ts}.".encode() + body, hashlib.sha256).digest()
    assert sign(KEY, MSG_ID, ts, body) == "v1," + base64.b64encode(digest).decode()


def test_sign_matches_published_standard_webhooks_vector():
    # The test vector from the Standard Webhooks / Svix reference libraries.
    secret = secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_verify_round_trip():
    verify(KEY, signed_headers(), BODY, now=TS)
    verify(KEY, httpx.Headers(signed_headers()), BODY, now=TS + 299)


def test_verify_header_names_are_case_insensitive():
    headers = {k.title(): v for k, v in signed_headers().items()}
    verify(KEY, headers, BODY, now=TS)


def test_verify_rejects_tampered_body():
    with pytest.raises(WebhookVerificationError):
        verify(KEY, signed_headers(), BODY + b" ", now=TS)


def test_verify_rejects_wrong_secret():
    with pytest.raises(WebhookVerificationError):
        verify(b"another-key", signed_headers(), BODY, now=TS)


def test_verify_rejects_changed_id_or_timestamp():
    headers = signed_headers()
    with pytest.raises(WebhookVerificationError):
        verify(KEY, {**headers, "webhook-id": "evt_other"}, BODY, now=TS)
    with pytest.raises(WebhookVerificationError):
        verify(KEY, {**headers, "webhook-timestamp": str(TS + 1)}, BODY, now=TS)


@pytest.mark.parametrize("now", [TS + 301, TS - 301])
def test_verify_rejects_stale_or_future_timestamp(now):
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(KEY, signed_headers(), BODY, now=now)


def test_verify_tolerance_is_configurable():
    verify(KEY, signed_headers(), BODY, tolerance_s=3600, now=TS + 3000)
    with pytest.raises(WebhookVerificationError):
        verify(KEY, signed_headers(), BODY, tolerance_s=10, now=TS + 11)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_header(missing):
    headers = signed_headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(KEY, headers, BODY, now=TS)


def test_verify_rejects_non_integer_timestamp():
    with pytest.raises(WebhookVerificationError):
        verify(KEY, {**signed_headers(), "webhook-timestamp": "soon"}, BODY, now=TS)


def test_verify_accepts_any_of_several_signatures():
    good = sign(KEY, MSG_ID, TS, BODY)
    bad = sign(b"old-key", MSG_ID, TS, BODY)
    headers = {**signed_headers(), "webhook-signature": f"v1a,xyz {bad} {good}"}
    verify(KEY, headers, BODY, now=TS)
    with pytest.raises(WebhookVerificationError):
        verify(KEY, {**headers, "webhook-signature": f"{bad} v2,{good.split(',', 1)[1]}"}, BODY, now=TS)


# --- config and events ----------------------------------------------------------------------------


def test_webhook_from_config():
    target = webhook_from_config("https://example.com/hook", "whsec_" + base64.b64encode(b"k3y").decode())
    assert target == WebhookTarget("https://example.com/hook", b"k3y")
    assert b"k3y" not in repr(target).encode()
    assert webhook_from_config("http://10.0.0.1:8080/x", "plain").secret == b"plain"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "example.com/hook", "file:///etc/passwd", "https://"]
)
def test_webhook_from_config_rejects_bad_urls(url):
    with pytest.raises(ValueError, match="webhook url"):
        webhook_from_config(url, "secret")


def test_completion_event_body():
    event_id, body = completion_event("resp_abc", "completed", now=1_700_000_123.9)
    assert event_id.startswith("evt_") and len(event_id) > 8
    int(event_id.removeprefix("evt_"), 16)  # hex
    assert json.loads(body) == {
        "id": event_id,
        "object": "event",
        "type": "response.completed",
        "created_at": 1_700_000_123,
        "data": {"id": "resp_abc"},
    }


def test_completion_event_extra_data_and_unique_ids():
    first, body = completion_event("resp_abc", "failed", data={"tenant": "t1", "id": "spoofed"})
    second, _ = completion_event("resp_abc", "failed")
    assert first != second
    event = json.loads(body)
    assert event["type"] == "response.failed"
    assert event["data"] == {"id": "resp_abc", "tenant": "t1"}


@pytest.mark.parametrize("status", ["completed", "incomplete", "failed", "cancelled"])
def test_completion_event_types(status):
    _, body = completion_event("resp_1", status)
    assert json.loads(body)["type"] == f"response.{status}"


def test_completion_event_rejects_unknown_status():
    with pytest.raises(ValueError):
        completion_event("resp_1", "in_progress")


# --- delivery (MockTransport) ---------------------------------------------------------------------


async def test_delivery_success_first_try_sends_signed_json():
    sender, sleeps, requests = mock_sender(lambda req, n: httpx.Response(204))
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert result == DeliveryResult(delivered=True, attempts=1, last_status=204, last_error=None)
    assert sleeps.delays == []
    (req,) = requests
    assert req.method == "POST" and str(req.url) == TARGET.url
    assert req.headers["content-type"] == "application/json"
    assert req.content == BODY
    assert req.headers["webhook-id"] == MSG_ID
    verify(KEY, req.headers, req.content, now=int(req.headers["webhook-timestamp"]))


async def test_400_is_not_retried():
    sender, sleeps, requests = mock_sender(lambda req, n: httpx.Response(400))
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert result == DeliveryResult(delivered=False, attempts=1, last_status=400, last_error="HTTP 400")
    assert len(requests) == 1 and sleeps.delays == []


async def test_redirect_is_not_followed_or_retried():
    sender, _, requests = mock_sender(
        lambda req, n: httpx.Response(302, headers={"location": "https://elsewhere.example/"})
    )
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert not result.delivered and result.last_status == 302 and len(requests) == 1


async def test_429_retry_after_is_honoured():
    def handler(req, n):
        return httpx.Response(429, headers={"retry-after": "7"}) if n == 1 else httpx.Response(200)

    sender, sleeps, requests = mock_sender(handler, rng=TopOfRange())
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert result.delivered and result.attempts == 2
    assert sleeps.delays == [7.0]


async def test_503_retry_after_is_capped_by_backoff_max():
    def handler(req, n):
        return httpx.Response(503, headers={"retry-after": "3600"}) if n == 1 else httpx.Response(200)

    sender, sleeps, _ = mock_sender(handler, backoff_max_s=12.0)
    assert (await sender.deliver(TARGET, MSG_ID, BODY)).delivered
    assert sleeps.delays == [12.0]


async def test_non_numeric_retry_after_falls_back_to_backoff():
    def handler(req, n):
        if n == 1:
            return httpx.Response(429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
        return httpx.Response(200)

    sender, sleeps, _ = mock_sender(handler, rng=TopOfRange(), backoff_base_s=0.25)
    assert (await sender.deliver(TARGET, MSG_ID, BODY)).delivered
    assert sleeps.delays == [0.25]


async def test_gives_up_after_max_attempts_with_exponential_capped_backoff():
    sender, sleeps, requests = mock_sender(
        lambda req, n: httpx.Response(500),
        max_attempts=6,
        backoff_base_s=0.5,
        backoff_max_s=5.0,
        rng=TopOfRange(),
    )
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert result == DeliveryResult(delivered=False, attempts=6, last_status=500, last_error="HTTP 500")
    assert len(requests) == 6
    # No sleep after the final attempt; ceilings double and stop at backoff_max_s.
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 5.0]


async def test_backoff_is_full_jitter():
    sender, sleeps, _ = mock_sender(
        lambda req, n: httpx.Response(502), max_attempts=40, backoff_base_s=1.0, backoff_max_s=4.0
    )
    await sender.deliver(TARGET, MSG_ID, BODY)
    ceilings = [min(4.0, 2.0**i) for i in range(39)]
    assert all(0.0 <= d <= c for d, c in zip(sleeps.delays, ceilings, strict=True))
    # Jittered, not the ceiling every time.
    assert any(d < c * 0.9 for d, c in zip(sleeps.delays, ceilings, strict=True))


async def test_connection_errors_and_timeouts_are_retried():
    def handler(req, n):
        if n == 1:
            raise httpx.ConnectError("connection refused", request=req)
        if n == 2:
            raise httpx.ReadTimeout("timed out", request=req)
        return httpx.Response(200)

    sender, sleeps, requests = mock_sender(handler)
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert result == DeliveryResult(delivered=True, attempts=3, last_status=200, last_error=None)
    assert len(sleeps.delays) == 2


async def test_connection_error_reported_when_giving_up():
    def handler(req, n):
        raise httpx.ConnectError("connection refused", request=req)

    sender, _, requests = mock_sender(handler, max_attempts=3)
    result = await sender.deliver(TARGET, MSG_ID, BODY)
    assert not result.delivered and result.attempts == 3 and result.last_status is None
    assert "ConnectError" in result.last_error and "refused" in result.last_error


async def test_same_webhook_id_and_fresh_signature_every_attempt():
    sender, _, requests = mock_sender(
        lambda req, n: httpx.Response(500 if n < 4 else 200), clock=Counter(), rng=TopOfRange()
    )
    assert (await sender.deliver(TARGET, MSG_ID, BODY)).attempts == 4
    assert {r.headers["webhook-id"] for r in requests} == {MSG_ID}
    timestamps = [int(r.headers["webhook-timestamp"]) for r in requests]
    assert timestamps == [TS + 1, TS + 2, TS + 3, TS + 4]
    assert len({r.headers["webhook-signature"] for r in requests}) == 4
    for r, ts in zip(requests, timestamps, strict=True):
        verify(KEY, r.headers, r.content, now=ts)


async def test_request_timeout_is_applied():
    seen = []

    def handler(req, n):
        seen.append(req.extensions["timeout"])
        return httpx.Response(200)

    sender, _, _ = mock_sender(handler, request_timeout_s=2.5)
    await sender.deliver(TARGET, MSG_ID, BODY)
    assert seen == [{"connect": 2.5, "read": 2.5, "write": 2.5, "pool": 2.5}]


async def test_failed_attempts_are_logged_without_the_secret(caplog):
    secret = b"do-not-log-me"
    target = WebhookTarget(url="https://user:pw@hooks.example.com/t?token=abc", secret=secret)
    sender, _, _ = mock_sender(lambda req, n: httpx.Response(503), max_attempts=2)
    with caplog.at_level(logging.WARNING, logger="serving.sessions.webhooks"):
        await sender.deliver(target, MSG_ID, BODY)
    records = [r for r in caplog.records if r.name == "serving.sessions.webhooks"]
    assert len(records) == 2 and all(r.levelno == logging.WARNING for r in records)
    text = caplog.text
    assert MSG_ID in text and "503" in text and "hooks.example.com" in text
    for leaked in ("do-not-log-me", base64.b64encode(secret).decode(), "pw", "token=abc"):
        assert leaked not in text


async def test_aclose_only_closes_own_client():
    external = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: httpx.Response(200)))
    await WebhookSender(client=external).aclose()
    assert not external.is_closed
    await external.aclose()

    owned = WebhookSender()
    await owned.aclose()
    assert owned._client.is_closed


def test_sender_rejects_zero_attempts():
    with pytest.raises(ValueError):
        WebhookSender(client=httpx.AsyncClient(), retry=retry({"max_attempts": 0}))


# --- delivery to a real HTTP server ---------------------------------------------------------------


class FlakyServer:
    """A minimal HTTP/1.1 server on 127.0.0.1 that answers with ``statuses`` in turn and records
    each request's headers and body."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FlakyServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/hook"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            assert lines[0].startswith("POST /hook HTTP/1.1"), lines[0]
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            reason = {200: "OK", 500: "Internal Server Error"}.get(status, "Status")
            payload = b"ok" if status == 200 else b"boom"
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


async def test_real_server_fails_twice_then_succeeds():
    secret = secret_bytes("whsec_" + base64.b64encode(b"real-server-key").decode())
    event_id, body = completion_event("resp_real", "completed")
    sleeps = Sleeps()
    async with FlakyServer([500, 500, 200]) as server:
        async with WebhookSender(sleep=sleeps, request_timeout_s=5.0) as sender:
            result = await sender.deliver(WebhookTarget(server.url, secret), event_id, body)
    assert result == DeliveryResult(delivered=True, attempts=3, last_status=200, last_error=None)
    assert len(server.requests) == 3
    assert len(sleeps.delays) == 2
    assert {h["webhook-id"] for h, _ in server.requests} == {event_id}
    for headers, received in server.requests:
        assert received == body
        assert headers["content-type"] == "application/json"
        verify(secret, headers, received)
        with pytest.raises(WebhookVerificationError):
            verify(b"wrong", headers, received)
    assert json.loads(server.requests[0][1])["data"] == {"id": "resp_real"}


async def test_real_server_connection_refused_is_retried():
    async with FlakyServer([]) as server:
        url = server.url
    # The server is gone: every attempt is refused.
    sleeps = Sleeps()
    async with WebhookSender(sleep=sleeps, retry=retry({"max_attempts": 3}), request_timeout_s=5.0) as sender:
        result = await sender.deliver(WebhookTarget(url, KEY), MSG_ID, BODY)
    assert not result.delivered and result.attempts == 3 and result.last_status is None
    assert result.last_error.startswith("ConnectError")
    assert len(sleeps.delays) == 2
