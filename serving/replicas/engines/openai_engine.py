"""An external OpenAI-compatible server (vllm serve, SGLang, TGI, trtllm-serve, llama.cpp) as an `Engine`.

One `OpenAIEngine` talks to ONE endpoint over HTTP (httpx). The ingress keeps doing what it does for an
in-process engine (tokenize once, plan, admit, route, stream); this class only translates:

- a `GenerateRequest` into a streaming `POST /v1/completions` in the server's dialect
  (`serving.upstreams.UpstreamProfile`: token ids or text, which sampling fields, cache salt, output ids);
- the server's SSE stream back into `Chunk`s with cumulative counts. OpenAI streams carry the usage in
  a separate last event (`choices: []`) AFTER the event with the finish reason, and the ingress reads
  the counts from the last chunk, so the finishing chunk is held until the usage (or the end) arrives
  and is emitted once, with the finish reason and the final counts;
- failures into error chunks, never exceptions (see `serving.replicas.engines.base`): a refused
  connection is a 503, the server's 4xx reach the client as they are (a context-length 400 stays a 400),
  a 429 keeps its Retry-After, a 5xx becomes a 502, a silent stream a 504. `on_error(kind, error)` tells
  the caller which kind of failure it was (the `kind` label of `tandem_upstream_errors`).

Closing the stream early closes the HTTP response, and with it the connection: vLLM and SGLang abort a
request whose client went away, so the upstream frees its KV blocks at once.

Load comes from the server's own Prometheus text (`refresh_stats`, called periodically by the pool),
parsed for the three series the profile names and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from router.resilience import retry_after_seconds
from serving.replicas.engines.base import (
    Chunk,
    EngineError,
    EngineStats,
    GenerateRequest,
    KVHandle,
    ModelInfo,
)
from serving.upstreams import UpstreamProfile

logger = logging.getLogger(__name__)

#: Most bytes of an upstream error body read for its message.
_ERROR_BODY_LIMIT = 64 * 1024
#: Longest upstream message passed on.
_MESSAGE_LIMIT = 2000
#: Finish reasons of other dialects, in OpenAI's words (TGI: eos_token, stop_sequence).
_FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "eos": "stop"}


class ErrorKind(StrEnum):
    """What kind of failure ended a call (the `kind` label of `tandem_upstream_errors`)."""

    CONNECT = "connect"  # no connection: refused, unreachable, connect timeout, dropped before a response
    STATUS = "status"  # the server answered with an error status (or an error event in the stream)
    STALLED = "stalled"  # nothing arrived within stall_timeout_s
    PROTOCOL = "protocol"  # malformed SSE, or a stream that ended without a finish


#: `EngineError.type` of each failure this module produces, and its kind.
ERROR_TYPES: dict[str, ErrorKind] = {
    "upstream_unavailable": ErrorKind.CONNECT,
    "upstream_error": ErrorKind.STATUS,
    "upstream_auth": ErrorKind.STATUS,
    "upstream_stalled": ErrorKind.STALLED,
    "upstream_incomplete": ErrorKind.PROTOCOL,
    "upstream_protocol": ErrorKind.PROTOCOL,
}


class Unsupported(ValueError):
    """A sampling field the server does not take (the request is refused rather than changed)."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class UpstreamDown(RuntimeError):
    """The endpoint's health check failed (raised by `check_health`)."""


@dataclass(slots=True)
class _Counts:
    """Cumulative counts of one stream."""

    prompt: int
    completion: int = 0
    cached: int = 0


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    seconds = retry_after_seconds(value)
    if seconds is not None:
        return seconds
    try:  # not a number: an HTTP date, or unreadable
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_message(body: bytes) -> str:
    """The message of an upstream error body, whatever its dialect: OpenAI/vLLM `{"error": {"message"}}`,
    vLLM/SGLang `{"object": "error", "message"}`, TGI `{"error": "..."}`, FastAPI `{"detail": ...}`, text."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return _short(text) or "no message"
    if not isinstance(obj, dict):
        return _short(text)
    err = obj.get("error")
    if isinstance(err, dict):
        return _short(str(err.get("message") or err))
    if isinstance(err, str):
        return _short(err)
    for key in ("message", "detail"):
        if key in obj:
            return _short(str(obj[key]))
    return _short(text)


def status_error(status: int, message: str, retry_after_s: float | None = None) -> EngineError:
    """The error the client should see for an upstream HTTP error status.

    NOTE(why): a 401/403/404 from the upstream is not the client's fault: our credentials or the
    configured model name are wrong, which the operator must fix, so it is a 502 (the model is marked
    unhealthy) rather than a 401 that would tell the client its own key was refused.
    """
    if status == 429:
        return EngineError(message, 429, "upstream_overloaded", retry_after_s=retry_after_s)
    if status in (401, 403):
        return EngineError(
            f"upstream refused Tandem's credentials ({status}): {message}", 502, "upstream_auth"
        )
    if status == 404:
        return EngineError(f"upstream answered 404 (wrong model or path?): {message}", 502, "upstream_error")
    if 400 <= status < 500:
        # The servers' own type names differ (vLLM: "BadRequestError"); the client gets OpenAI's.
        return EngineError(message, status, "invalid_request_error")
    if status == 503:
        return EngineError(message, 503, "upstream_unavailable", retry_after_s=retry_after_s)
    return EngineError(f"upstream error {status}: {message}", 502, "upstream_error")


def _event_error(obj: dict[str, Any]) -> EngineError:
    """An error event inside a stream (vLLM/SGLang: `data: {"error": {"message", "code"}}`)."""
    err = obj.get("error")
    if isinstance(err, dict):
        message, code = _short(str(err.get("message") or err)), err.get("code")
    else:
        message, code = _short(str(err if err is not None else obj.get("message", "error"))), obj.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return status_error(status, message)


def parse_prometheus(text: str, names: list[str]) -> dict[str, float]:
    """The value of each series in `names`, summed over its label sets (absent series are left out).

    Only the lines of the wanted series are looked at (vLLM's /metrics is ~100 KB of histograms).
    """
    out: dict[str, float] = {}
    for name in names:
        pos = 0
        while True:
            i = text.find(name, pos)
            if i < 0:
                break
            pos = i + len(name)
            if i > 0 and text[i - 1] != "\n":
                continue  # inside another line (# HELP, # TYPE, a longer name's suffix)
            end = text.find("\n", pos)
            line = text[pos : end if end >= 0 else len(text)]
            if line.startswith("{"):
                close = line.rfind("}")
                if close < 0:
                    continue
                rest = line[close + 1 :]
            elif line.startswith((" ", "\t")):
                rest = line
            else:
                continue  # a longer name with this prefix (vllm:num_requests_running_total)
            parts = rest.split()
            if not parts:
                continue
            try:
                value = float(parts[0])
            except ValueError:
                continue
            if value == value:  # NaN: no value
                out[name] = out.get(name, 0.0) + value
    return out


class OpenAIEngine:
    """`Engine` over one external OpenAI-compatible endpoint.

    Args:
        model_name: the name clients use (Tandem's model).
        base_url: the endpoint, `http://host:port` (without /v1).
        profile: the server's dialect (`serving.upstreams.PROFILES[server]`).
        upstream_model: the server's model name; None: the first of its `/v1/models`.
        api_key: sent as `Authorization: Bearer` to the server (None: no header).
        connect_timeout_s: time to open a connection (and the health check's limit).
        stall_timeout_s: most time between two reads of a stream; past it the stream ends with a 504.
        max_model_len: context length (None: the `max_model_len` the server reports).
        block_size: the server's KV block size (reported in `model_info`).
        decode_prompt: ids -> text WITH special tokens, for servers without token prompts. NOTE: the
            server tokenizes that text and adds its own BOS (vLLM turned "<|begin_of_text|>..." into
            [bos, bos, ...]), so the callback should leave out a leading BOS the tokenizer adds.
        encode_text: text -> ids WITHOUT adding special tokens, for servers that stream no ids.
        on_error: called with the kind and the error of every failed call.
        client: an httpx client to use (tests; not closed by `shutdown`); else one is made.
        transport: the transport of the client made here (tests: `httpx.MockTransport`).
        clock: wall clock of the stats' timestamps.
    """

    def __init__(
        self,
        *,
        model_name: str,
        base_url: str,
        profile: UpstreamProfile,
        upstream_model: str | None = None,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        stall_timeout_s: float = 120.0,
        max_model_len: int | None = None,
        block_size: int = 16,
        decode_prompt: Callable[[list[int]], str] | None = None,
        encode_text: Callable[[str], list[int]] | None = None,
        on_error: Callable[[ErrorKind, EngineError], None] | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not profile.token_prompt and decode_prompt is None:
            raise ValueError(f"{base_url}: this server takes text prompts; give decode_prompt")
        self.model_name = model_name
        self.base_url = base_url.rstrip("/")
        self.profile = profile
        self._configured_model = upstream_model
        self.upstream_model = upstream_model
        self._connect_timeout_s = connect_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._spec_max_model_len = max_model_len
        self.reported_max_model_len: int | None = None
        self._block_size = block_size
        self._decode_prompt = decode_prompt
        self._encode_text = encode_text
        self._on_error = on_error
        self._clock = clock
        self._owns_client = client is None
        # NOTE(why): no connection cap (admission bounds concurrency at the ingress; a cap here would
        # queue requests inside httpx, invisible to admission), and trust_env=False: the upstream is
        # an internal service, never reached through an HTTP(S)_PROXY of the environment.
        self._client = client or httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(
                connect=connect_timeout_s, read=stall_timeout_s, write=stall_timeout_s, pool=connect_timeout_s
            ),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,
        )
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._inflight: dict[str, httpx.Response] = {}
        self._aborted: set[str] = set()
        self._stats = EngineStats()
        #: Whether the last `refresh_stats` read the server's load (else the router counts its own).
        self.stats_known = False
        #: When the stats were read (clock time; 0.0: never).
        self.stats_at = 0.0
        #: The last failure, for status pages ("" when none yet).
        self.last_error = ""
        self.info_error = ""

    # -- discovery -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn the served model and context length; an endpoint that is down now is not an error
        (the server may start later: `refresh_info` retries, and `generate` does when still unknown)."""
        if not await self.refresh_info():
            logger.warning(
                "upstream %s: model discovery failed (%s); will retry", self.base_url, self.info_error
            )

    async def refresh_info(self) -> bool:
        """GET /v1/models: the model id (unless configured) and its `max_model_len`. True on success."""
        try:
            resp = await self._client.get(
                self._url("/v1/models"), headers=self._headers, timeout=self._short_timeout()
            )
            if resp.status_code >= 300:
                raise UpstreamDown(f"/v1/models answered {resp.status_code}")
            data = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError, UpstreamDown) as e:
            self.info_error = f"{type(e).__name__}: {e}"
            return False
        entry = next((m for m in data if isinstance(m, dict) and m.get("id") == self._configured_model), None)
        if entry is None and data and isinstance(data[0], dict):
            entry = data[0]
        if entry is None:
            self.info_error = "/v1/models lists no model"
            return False
        if self._configured_model is None:
            self.upstream_model = str(entry.get("id"))
        elif entry.get("id") != self._configured_model:
            logger.warning(
                "upstream %s does not list model %r (it serves %s)",
                self.base_url, self._configured_model, [m.get("id") for m in data if isinstance(m, dict)],
            )  # fmt: skip
        mml = entry.get("max_model_len")
        if isinstance(mml, int) and mml > 0:
            self.reported_max_model_len = mml
        self.info_error = ""
        return True

    def model_info(self) -> ModelInfo:
        mml = self._spec_max_model_len or self.reported_max_model_len
        if mml is None:
            raise RuntimeError(
                f"upstream {self.base_url}: context length unknown (no answer from /v1/models yet: "
                f"{self.info_error or 'not started'}); set upstream.max_model_len"
            )
        return ModelInfo(name=self.model_name, max_model_len=mml, path="", block_size=self._block_size)

    # -- generation ------------------------------------------------------------------------------

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        """The `/v1/completions` body of `request` in this server's dialect."""
        p, s = self.profile, request.sampling
        prompt: list[int] | str
        if p.token_prompt:
            prompt = list(request.prompt_token_ids)
        else:
            assert self._decode_prompt is not None  # checked in __init__
            prompt = self._decode_prompt(request.prompt_token_ids)
        stream_options: dict[str, bool] = {"include_usage": True}
        if p.usage_per_chunk:
            stream_options["continuous_usage_stats"] = True
        body: dict[str, Any] = dict(p.fixed_fields)
        body.update(
            model=self.upstream_model or self.model_name,
            prompt=prompt,
            stream=True,
            stream_options=stream_options,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
        )
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        takes = (lambda _: True) if p.sampling_extensions else p.extension_fields.__contains__
        asked = {
            "top_k": s.top_k,
            "min_tokens": s.min_tokens or None,
            "stop_token_ids": list(s.stop_token_ids) or None,
            "ignore_eos": s.ignore_eos or None,
        }
        for name, value in asked.items():
            if value is None:
                continue
            if not takes(name):
                # NOTE(why): dropping it silently would change the answer (the API's rule for fields).
                raise Unsupported(name)
            body[name] = value
        if p.cache_salt and request.cache_salt:
            body["cache_salt"] = request.cache_salt
        if p.return_token_ids:
            body["return_token_ids"] = True
        return body

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        rid = request.request_id
        if self.upstream_model is None:
            await self.refresh_info()  # the server was down at start: learn its model name now
        try:
            body = self.body(request)
        except Unsupported as e:
            msg = f"{e.field}: the external server of model `{self.model_name}` does not take it; omit it"
            yield Chunk(error=EngineError(msg, 400, "invalid_request_error"))
            return
        except Exception as e:  # noqa: BLE001 - a decode callback failing is this request's 500, not a crash
            yield self._fail(ErrorKind.PROTOCOL, EngineError(f"cannot build the request: {e}", 500))
            return
        resp: httpx.Response | None = None
        try:
            try:
                req = self._client.build_request(
                    "POST", self._url("/v1/completions"), json=body, headers=self._headers
                )
                resp = await self._client.send(req, stream=True)
            except httpx.HTTPError as e:
                yield self._transport_error(e, before_response=True)
                return
            self._inflight[rid] = resp
            if resp.status_code >= 400:
                yield await self._status_chunk(resp)
                return
            async with contextlib.aclosing(self._chunks(resp, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._inflight.pop(rid, None)
            self._aborted.discard(rid)
            if resp is not None:
                # Closing an unfinished response drops the connection: the server aborts the request.
                # NOTE(why): shielded. A client that leaves cancels the ingress's request under an anyio
                # cancel scope (Starlette), which cancels every await of this cleanup again: unshielded,
                # the close never ran and the server generated on (found by the live vllm serve test).
                await asyncio.shield(resp.aclose())

    async def _chunks(self, resp: httpx.Response, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The stream's chunks; the finishing one is held until the usage event or the end."""
        counts = _Counts(prompt=len(request.prompt_token_ids))
        held: Chunk | None = None
        done = False
        try:
            async with contextlib.aclosing(_sse_data(resp)) as events:
                async for data in events:
                    if data == "[DONE]":
                        done = True
                        break
                    obj, err = _decode_event(data)
                    if err is not None:
                        kind = ErrorKind.PROTOCOL if err.type == "upstream_protocol" else ErrorKind.STATUS
                        yield self._fail(kind, err)
                        return
                    chunk = self._chunk(obj, counts)
                    if held is not None:
                        _absorb(held, chunk)
                    elif chunk is None:
                        continue
                    elif chunk.finish_reason == "abort":
                        err = EngineError("the upstream aborted the request", 502, "upstream_incomplete")
                        yield self._fail(ErrorKind.PROTOCOL, err)
                        return
                    elif chunk.finish_reason is not None:
                        held = chunk
                    else:
                        yield chunk
        except (httpx.HTTPError, httpx.StreamError) as e:
            # NOTE: abort() closing the response under the read raises ReadError, or StreamClosed (not
            # an HTTPError) when it lands between two reads.
            if request.request_id in self._aborted:
                return
            if held is None:
                yield self._transport_error(e, before_response=False)
                return
            # Finished: only the usage (or [DONE]) is missing; the output is whole, send it.
        if held is not None:
            held.prompt_tokens = counts.prompt
            held.completion_tokens = counts.completion
            held.cached_tokens = counts.cached
            yield held
        elif request.request_id not in self._aborted:
            why = (
                "sent [DONE] without a finish reason" if done else "ended the stream without a finish reason"
            )
            yield self._fail(ErrorKind.PROTOCOL, EngineError(f"upstream {why}", 502, "upstream_incomplete"))

    def _chunk(self, obj: dict[str, Any], counts: _Counts) -> Chunk | None:
        """The chunk of one SSE event (None: nothing to send), updating `counts`."""
        usage = obj.get("usage")
        choices = obj.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else None
        text, ids, finish = "", [], None
        if choice is not None:
            text = choice.get("text") or ""
            raw_ids = choice.get("token_ids")
            if isinstance(raw_ids, list):
                ids = raw_ids
            elif text and self._encode_text is not None:
                ids = self._encode_text(text)
            reason = choice.get("finish_reason")
            if reason:  # TGI sends "" until the end
                finish = _FINISH_REASONS.get(reason, reason)
        counts.completion += len(ids)
        if isinstance(usage, dict):
            _apply_usage(usage, counts)
        if not text and not ids and finish is None:
            return None
        return Chunk(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=counts.prompt,
            completion_tokens=counts.completion,
            cached_tokens=counts.cached,
        )

    async def _status_chunk(self, resp: httpx.Response) -> Chunk:
        body = b""
        try:
            async for part in resp.aiter_bytes():
                body += part
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
        except httpx.HTTPError:
            # The body is only the error's message: a connection lost while reading it still leaves
            # the status, which is what the client is told.
            logger.debug("upstream %s: error body cut short", self.base_url)
        message = _error_message(body[:_ERROR_BODY_LIMIT])
        retry = parse_retry_after(resp.headers.get("retry-after"))
        return self._fail(ErrorKind.STATUS, status_error(resp.status_code, message, retry))

    def _transport_error(self, e: httpx.HTTPError | httpx.StreamError, before_response: bool) -> Chunk:
        name = type(e).__name__
        if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout):
            err = EngineError(
                f"upstream {self.base_url} did not accept a connection: {name}", 503, "upstream_unavailable"
            )
            return self._fail(ErrorKind.CONNECT, err)
        if isinstance(e, httpx.TimeoutException):
            err = EngineError(
                f"upstream {self.base_url} sent nothing for {self._stall_timeout_s:g}s",
                504,
                "upstream_stalled",
            )
            return self._fail(ErrorKind.STALLED, err)
        if before_response:
            err = EngineError(
                f"upstream {self.base_url} unavailable: {name}: {e}", 503, "upstream_unavailable"
            )
            return self._fail(ErrorKind.CONNECT, err)
        err = EngineError(
            f"upstream {self.base_url} broke off the stream: {name}", 502, "upstream_incomplete"
        )
        return self._fail(ErrorKind.PROTOCOL, err)

    def _fail(self, kind: ErrorKind, err: EngineError) -> Chunk:
        self.last_error = f"{err.status} {err.type}: {err.message}"
        if self._on_error is not None:
            try:
                self._on_error(kind, err)
            except Exception:  # noqa: BLE001 - a metrics callback must not break a stream
                logger.exception("on_error callback failed")
        return Chunk(error=err)

    async def abort(self, request_id: str) -> None:
        """Close `request_id`'s in-flight stream (the server aborts it); no-op if unknown or finished."""
        resp = self._inflight.pop(request_id, None)
        if resp is not None:
            self._aborted.add(request_id)
            await resp.aclose()

    async def prefill(self, request: GenerateRequest) -> KVHandle:
        raise NotImplementedError("external pools are colocated: no prefill/decode split")

    def decode(self, request: GenerateRequest, kv: KVHandle) -> AsyncIterator[Chunk]:
        raise NotImplementedError("external pools are colocated: no prefill/decode split")

    # -- load and health -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self._stats

    async def refresh_stats(self) -> bool:
        """Read the server's load from its Prometheus text. True when at least one series was there."""
        p = self.profile
        names = [n for n in (p.running_metric, p.waiting_metric, p.kv_metric) if n]
        if not names:
            return False
        try:
            resp = await self._client.get(
                self._url(p.metrics_path), headers=self._headers, timeout=self._short_timeout()
            )
            if resp.status_code >= 300:
                raise UpstreamDown(f"{p.metrics_path} answered {resp.status_code}")
            values = parse_prometheus(resp.text, names)
        except (httpx.HTTPError, UpstreamDown) as e:
            self.stats_known = False
            logger.debug("upstream %s: no stats: %s", self.base_url, e)
            return False
        self._stats = EngineStats(
            running=round(values.get(p.running_metric or "", 0.0)),
            waiting=round(values.get(p.waiting_metric or "", 0.0)),
            kv_usage=min(1.0, max(0.0, values.get(p.kv_metric or "", 0.0))),
        )
        self.stats_known = bool(values)
        self.stats_at = self._clock() if values else 0.0
        return self.stats_known

    async def check_health(self) -> None:
        """Raise `UpstreamDown` unless the health path answers 2xx (within the connect timeout)."""
        try:
            resp = await self._client.get(
                self._url(self.profile.health_path), headers=self._headers, timeout=self._short_timeout()
            )
        except httpx.HTTPError as e:
            raise UpstreamDown(
                f"{self.base_url}{self.profile.health_path}: {type(e).__name__}: {e}"
            ) from None
        if not 200 <= resp.status_code < 300:
            raise UpstreamDown(f"{self.base_url}{self.profile.health_path} answered {resp.status_code}")

    async def reset_prefix_cache(self) -> None:
        """POST the profile's cache-reset path (vLLM: only served with VLLM_SERVER_DEV_MODE=1)."""
        path = self.profile.reset_cache_path
        if path is None:
            raise NotImplementedError(f"upstream {self.base_url}: this server has no prefix-cache reset")
        resp = await self._client.post(self._url(path), headers=self._headers, timeout=self._short_timeout())
        if resp.status_code == 404:
            hint = (
                " (vLLM serves it only with VLLM_SERVER_DEV_MODE=1)" if path == "/reset_prefix_cache" else ""
            )
            raise NotImplementedError(f"upstream {self.base_url}{path} answered 404{hint}")
        if resp.status_code >= 300:
            raise RuntimeError(
                f"upstream {self.base_url}{path} answered {resp.status_code}: {resp.text[:200]}"
            )

    async def shutdown(self) -> None:
        for rid in list(self._inflight):
            await self.abort(rid)
        if self._owns_client:
            await self._client.aclose()

    # -- helpers ---------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _short_timeout(self) -> httpx.Timeout:
        t = min(self._connect_timeout_s, 5.0)
        return httpx.Timeout(t)


def _apply_usage(usage: dict[str, Any], counts: _Counts) -> None:
    """Take the server's counts (authoritative over our own) from a usage object."""
    if isinstance(usage.get("prompt_tokens"), int):
        counts.prompt = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        counts.completion = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        counts.cached = details["cached_tokens"]


def _decode_event(data: str) -> tuple[dict[str, Any], EngineError | None]:
    """One SSE event's JSON object, or the error it is (malformed data; an error event)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return {}, EngineError(
            f"upstream sent malformed SSE data: {_short(data)[:200]!r}", 502, "upstream_protocol"
        )
    if not isinstance(obj, dict):
        return {}, EngineError(
            "upstream sent an SSE event that is not a JSON object", 502, "upstream_protocol"
        )
    if "error" in obj or obj.get("object") == "error":
        return obj, _event_error(obj)
    return obj, None


def _absorb(held: Chunk, later: Chunk | None) -> None:
    """Fold what came after the finishing chunk (normally only usage, already in `counts`) into it."""
    if later is not None and (later.text or later.token_ids):
        held.text += later.text
        held.token_ids = held.token_ids + later.token_ids


async def _sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines; comments skipped)."""
    lines: list[str] = []
    async for line in resp.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        # other fields (event:, id:, retry:) and comments (":") carry nothing we need
    if lines:
        yield "\n".join(lines)
