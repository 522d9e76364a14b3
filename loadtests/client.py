"""The shared HTTP client of every workload: one streamed request in, one record out.

Each call sends one OpenAI-API request, reads its stream as it arrives, and hands a **record** (see
`loadtests.summary`) to `emit`: the outcome (`ok`, `rejected` for a 429 with the server's reason,
`failed` for anything else), TTFT / TPOT / ITL / E2E from the stream (`loadtests.metrics`), the token
counts of the server's usage, whether the workload's SLOs held, and the generator's own overhead (the
time this code spent building the request, parsing chunks and recording, apart from waiting on the
network). Nothing here imports Locust: the Locust layer (`locustfile.py`) turns records into request
events, and the client works the same under gevent (Locust patches `socket`) or plain threads.

Output events: a chunk counts when it carries text (`content`, `reasoning_content`, `text`, a
Responses `*.delta`), or when a chat chunk with an empty delta is not the opening role-only chunk (a
reasoning model whose reasoning is hidden still sends one chunk per step). That is `vllm bench serve`'s
rule plus hidden reasoning, so TTFT figures compare.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from loadtests.metrics import StreamTiming, Usage
from loadtests.workload import Slo

#: Statuses of a Responses session that end it.
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
#: How often a polled background response is read again (seconds).
POLL_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class Call:
    """What a workload asks for; the client adds the stream options and the headers it owns."""

    name: str
    type: str
    path: str
    body: dict[str, Any]
    slo: Slo
    headers: Mapping[str, str] = field(default_factory=dict)
    #: When it was due, in seconds from the run's start (None: now, a closed loop).
    due: float | None = None
    #: Copied into the record (an agent's session and turn).
    tags: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Result:
    """The answer text (for agents to append) and the record that was emitted."""

    text: str
    record: dict[str, Any]


class Overhead:
    """Time spent in the client's own code for one request (build, parse, record)."""

    __slots__ = ("total", "_start")

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __enter__(self) -> Overhead:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._start


def _sse(lines: Iterator[bytes]) -> Iterator[tuple[str | None, str]]:
    """(event, data) of each server-sent event."""
    event = None
    for raw in lines:
        if not raw:
            event = None
            continue
        line = raw.decode("utf-8")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


def _error_reason(resp: requests.Response) -> str:
    """The OpenAI error's `code` (Tandem's rejection reason), else its type, else the status."""
    try:
        err = resp.json().get("error") or {}
    except ValueError:
        return f"http_{resp.status_code}"
    return str(err.get("code") or err.get("type") or f"http_{resp.status_code}")


class Client:
    """Sends calls to one Tandem (or any OpenAI-compatible) endpoint.

    Args:
        host: base URL, e.g. http://127.0.0.1:8000.
        emit: called with each request's record.
        start: `time.perf_counter()` at the run's start (records are relative to it).
        headers: sent with every request (the tenant, the API key).
        session: a `requests.Session` (one per Locust user keeps its connections).
    """

    def __init__(
        self,
        host: str,
        emit: Callable[[dict[str, Any]], None],
        start: float,
        headers: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.host = host.rstrip("/")
        self.emit = emit
        self.start = start
        self.headers = dict(headers or {})
        self.http = session or requests.Session()
        self.timeout_s = timeout_s

    def now(self) -> float:
        return time.perf_counter() - self.start

    def _record(self, call: Call, sent: float, timing: StreamTiming, cost: Overhead) -> dict[str, Any]:
        return {
            "name": call.name,
            "type": call.type,
            "endpoint": call.path,
            "due": sent if call.due is None else call.due,
            "sent": sent,
            "outcome": "ok",
            "status": 200,
            "reason": None,
            "ttft": timing.ttft,
            "tpot": timing.tpot,
            "e2e": timing.e2e,
            "itl": [round(g, 6) for g in timing.itl],
            "input": timing.usage.input,
            "cached": timing.usage.cached,
            "output": timing.usage.output,
            "reasoning": timing.usage.reasoning,
            "slo_met": timing.meets(call.slo.ttft_s, call.slo.tpot_s),
            "overhead": cost.total,
            **({"tags": dict(call.tags)} if call.tags else {}),
        }

    def _fail(self, rec: dict[str, Any], status: int, reason: str, t: float) -> None:
        rec.update(outcome="rejected" if status == 429 else "failed", status=status, reason=reason)
        rec.update(slo_met=False, e2e=t)

    def stream(self, call: Call) -> Result:
        """A streamed chat or text completion (`stream_options.include_usage` on)."""
        cost = Overhead()
        with cost:
            body = {**call.body, "stream": True, "stream_options": {"include_usage": True}}
            headers = {**self.headers, **call.headers}
            url = self.host + call.path
            chat = call.path.endswith("/chat/completions")
            timing = StreamTiming()
            text: list[str] = []
        sent = self.now()
        t0 = time.perf_counter()
        try:
            resp = self.http.post(url, json=body, headers=headers, stream=True, timeout=self.timeout_s)
        except requests.RequestException as e:
            with cost:
                rec = self._record(call, sent, timing, cost)
                self._fail(rec, 0, type(e).__name__, time.perf_counter() - t0)
            self.emit(rec)
            return Result("", rec)
        with resp:
            if resp.status_code != 200:
                with cost:
                    rec = self._record(call, sent, timing, cost)
                    self._fail(rec, resp.status_code, _error_reason(resp), time.perf_counter() - t0)
                self.emit(rec)
                return Result("", rec)
            usage, error, first = None, None, True
            try:
                for _, data in _sse(resp.iter_lines(chunk_size=None)):
                    t = time.perf_counter() - t0
                    with cost:
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = str((chunk["error"] or {}).get("code") or "stream_error")
                            break
                        if chunk.get("usage"):
                            usage = Usage.from_openai(chunk["usage"])
                        for choice in chunk.get("choices") or ():
                            piece = _piece(choice, chat)
                            role_only = chat and first and not piece and "role" in (choice.get("delta") or {})
                            closing = not piece and choice.get("finish_reason") is not None
                            first = False
                            if piece is not None and not role_only and not closing:
                                timing.event(t)
                                text.append(piece)
            except (requests.RequestException, ValueError) as e:
                error = type(e).__name__
            end = time.perf_counter() - t0
        with cost:
            timing.finish(end, usage)
            rec = self._record(call, sent, timing, cost)
            if error is None and usage is None:
                error = "no_usage"  # the stream ended before its last chunk
            if error is not None:
                self._fail(rec, 200, error, end)
        self.emit(rec)
        return Result("".join(text), rec)

    def response(self, call: Call, follow: str = "poll") -> Result:
        """A `/v1/responses` background session, followed by polling or by streaming its events."""
        cost = Overhead()
        with cost:
            body = {**call.body, "background": True}
            headers = {**self.headers, **call.headers}
            timing = StreamTiming()
        sent = self.now()
        t0 = time.perf_counter()
        rec: dict[str, Any]
        try:
            resp = self.http.post(self.host + call.path, json=body, headers=headers, timeout=self.timeout_s)
            if resp.status_code != 200:
                rec = self._record(call, sent, timing, cost)
                self._fail(rec, resp.status_code, _error_reason(resp), time.perf_counter() - t0)
                self.emit(rec)
                return Result("", rec)
            rid = resp.json()["id"]
            url = f"{self.host}{call.path}/{rid}"
            obj = self._stream_events(url, headers, t0, timing, cost) if follow == "stream" else None
            while obj is None or obj.get("status") not in TERMINAL:
                if obj is not None:
                    time.sleep(POLL_INTERVAL_S)
                obj = self.http.get(url, headers=headers, timeout=self.timeout_s).json()
        except (requests.RequestException, ValueError, KeyError) as e:
            rec = self._record(call, sent, timing, cost)
            self._fail(rec, 0, type(e).__name__, time.perf_counter() - t0)
            self.emit(rec)
            return Result("", rec)
        with cost:
            timing.finish(time.perf_counter() - t0, Usage.from_openai(obj.get("usage")))
            rec = self._record(call, sent, timing, cost)
            if follow == "poll":
                # Polling sees no tokens arrive: only E2E is measured, and a TTFT SLO cannot be checked.
                rec["slo_met"] = obj["status"] in {"completed", "incomplete"}
            # `incomplete` is a response cut at max_output_tokens: it ran to its bound, as a chat
            # completion with finish_reason `length` does.
            if obj["status"] not in {"completed", "incomplete"}:
                self._fail(rec, 200, f"response_{obj['status']}", timing.end or 0.0)
            text = "".join(
                c.get("text", "")
                for item in obj.get("output") or ()
                if item.get("type") == "message"
                for c in item.get("content") or ()
            )
        self.emit(rec)
        return Result(text, rec)

    def _stream_events(
        self, url: str, headers: Mapping[str, str], t0: float, timing: StreamTiming, cost: Overhead
    ) -> dict[str, Any] | None:
        """Follow a response's event stream to its terminal event; the response object it carries."""
        with self.http.get(url, params={"stream": "true"}, headers=headers, stream=True) as resp:
            resp.raise_for_status()
            for event, data in _sse(resp.iter_lines(chunk_size=None)):
                t = time.perf_counter() - t0
                with cost:
                    ev = json.loads(data)
                    kind = event or ev.get("type", "")
                    if kind.endswith(".delta"):
                        timing.event(t)
                    elif kind in {f"response.{s}" for s in TERMINAL}:
                        return ev.get("response")
        return None


def _piece(choice: Mapping[str, Any], chat: bool) -> str | None:
    """The text an output chunk carries ("" for an empty step); None for a chunk with no delta."""
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta")
    if delta is None:
        return None
    return (delta.get("reasoning_content") or "") + (delta.get("content") or "")
