"""Hostile input and isolation (issue 18, item 4).

In process, with auth ON (build_api over the tiny models' own tokenizers when they are built, fake
engines, /v1/responses over a SQLite store and a session worker):

- a schemathesis fuzz of every operation of the app's OpenAPI schema with a valid key: no 5xx, no
  cross-tenant read (generated cases also name another tenant's response id), the default checks that
  apply to this schema;
- every route but /health is a 401 without a key or with a wrong one;
- a key removed from `auth.keys_file` is a 401 within `auth.keys_reload_s`.

On the live stack (tests/stack.py: real Ray Serve, real vLLM on CPU, auth off so x-tandem-tenant picks
the tenant), over raw sockets where a normal client would refuse to send the bytes:

- 413 past `http.max_body_bytes` (declared, and a chunked body that declares nothing), 408 past
  `http.body_timeout_s`, 400 for invalid UTF-8, lone surrogates, huge max_tokens / n, deep nesting;
- CR/LF, NUL, non-ASCII and overlong values in x-tandem-tenant / x-tandem-task / x-session-id: 4xx,
  never a 5xx, never reflected;
- tenant B cannot read, stream, cancel, delete or continue tenant A's response (404, the answer for an
  id that never existed: no existence oracle), and gets no hit on A's prefix cache, by prompt or by
  A's session id.

Each check class records a row of the campaign table (tests/faults/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from serving.config import ServingSpec, parse_spec
from serving.http.auth import hash_key

# -- the in-process app, auth on -------------------------------------------------------------------

INTENT, REASONING = "tiny-intent", "tiny-reasoning"
KEY = "tdm-hostile-acme"  # tenant acme: the fuzzer's key
RIVAL_KEY = "tdm-hostile-rival"  # tenant rival: owns the response the fuzzer must not reach
METRICS_KEY = "tdm-hostile-scraper"
KEYS = [
    {"tenant": "acme", "sha256": hash_key(KEY)},
    {"tenant": "rival", "sha256": hash_key(RIVAL_KEY)},
    {"tenant": "scraper", "sha256": hash_key(METRICS_KEY), "scopes": ["metrics"]},
]
#: Bounded: every operation with valid and invalid inputs in well under a minute on 2 cores.
MAX_EXAMPLES = 25
#: Generated requests may ask for the whole context; the fake engine would count it out.
MAX_TOKENS_CAP = 8
BASE_URL = "http://tandem.test"


def _spec(tmp_path: Path, auth: dict, **over: Any) -> ServingSpec:
    def model(name: str, reasoning: bool = False) -> dict:
        m: dict[str, Any] = {"name": name, "source": f"local:{name}", "pools": [{"engine": "fake"}]}
        if reasoning:
            m["reasoning"] = {}
        return m

    return parse_spec(
        {
            "models": [model(INTENT), model(REASONING, reasoning=True)],
            "tiers": [
                {"name": "intent", "model": INTENT},
                {"name": "reasoning", "model": REASONING, "fallback": ["intent"]},
            ],
            "auth": auth,
            "http": {"docs": True},
            "sessions": {
                "store": {"path": str(tmp_path / "sessions.db")},
                "stream_poll_s": 0.01,
                "stream_poll_max_s": 0.05,
            },
            "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02},
            **over,
        }
    )


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, Any]:
    """The tiny models' own tokenizers (serving.tokenizer.PromptTokenizer over `tandem model build`'s
    output); the sessions harness's reversible one where a model is not built."""
    from serving.tokenizer import PromptTokenizer
    from tests.unit.sessions_harness import TOK

    spec = _spec(Path("/nonexistent"), {"enabled": False})
    out: dict[str, Any] = {}
    for m in spec.models:
        path = Path(spec.resolve_source(m))
        out[m.name] = PromptTokenizer(str(path)) if (path / "tokenizer.json").exists() else TOK
    return out


class EdgeApp:
    """The API as the ingress builds it (build_api + Gateway.from_spec: auth, tiers, admission) over
    FakeEngines, with /v1/responses on a SQLite store and a session worker. Start and use it on one
    event loop (its worker, gateway and store threads belong to that loop)."""

    def __init__(self, spec: ServingSpec, tokenizers: dict[str, Any]) -> None:
        self.spec, self.tokenizers = spec, tokenizers

    async def start(self) -> EdgeApp:
        from serving.backends import EngineBackend
        from serving.http.api import build_api
        from serving.http.gateway import Gateway
        from serving.http.metrics import IngressMetrics
        from serving.http.pipeline import ServedModel
        from serving.http.responses import SessionsFrontend
        from serving.replicas.engines.fake import FakeEngine
        from serving.sessions.stores import open_store
        from serving.sessions.worker import SessionModel, SessionWorker, WorkerSettings
        from serving.tokenizer import PromptTokenizer
        from tests.unit.sessions_harness import TAGS

        spec = self.spec
        self.metrics = IngressMetrics()
        self.gateway = Gateway.from_spec(spec, self.metrics)
        models, sessions = {}, {}
        for m in spec.models:
            tok = self.tokenizers[m.name]
            engine = FakeEngine(m.name, max_model_len=4096, vocab_size=tok.vocab_size)
            await engine.start()
            backend = EngineBackend(engine)
            if isinstance(tok, PromptTokenizer):
                served = ServedModel.from_spec(spec, m.name, tok, backend, engine.model_info())
            else:  # the sessions harness's tokenizer, with its tags
                served = ServedModel(m.name, 4096, tok, backend, tags=TAGS if m.reasoning else None)
            models[m.name] = served
            sessions[m.name] = SessionModel(m.name, backend.stream, tok, served.tags)
        self.store = open_store(spec.sessions)
        self.worker = SessionWorker(
            self.store, sessions, WorkerSettings.from_spec(spec.sessions, spec.resilience.streams)
        )
        self.worker.start()
        self.front = SessionsFrontend(self.store, self.worker.submit, spec=spec.sessions)
        self.app = build_api(models, self.metrics, self.gateway, self.front, spec.http)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL)
        return self

    async def close(self) -> None:
        await self.client.aclose()
        await self.worker.close()
        self.front.close()
        self.store.close()
        await self.gateway.close()


class LoopThread:
    """An event loop on its own thread: the fuzzer's (synchronous, hypothesis-driven) cases run their
    requests on it, where the app's worker and gateway tasks live."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-app", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _send(edge: EdgeApp, kwargs: dict[str, Any]) -> httpx.Request:
    """schemathesis' transport arguments (requests-style) as an httpx request (the body serialized as
    `requests` would: json.dumps, ASCII, so a lone surrogate travels as its escape)."""
    content = None
    if "json" in kwargs:
        content = json.dumps(kwargs["json"]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        content = data.encode() if isinstance(data, str) else data
    params = {k: v for k, v in (kwargs.get("params") or {}).items() if v is not None}
    return edge.client.build_request(
        kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), params=params, content=content
    )


def _cap(body: Any, seed: int) -> None:
    """Bound what a valid generated body asks the engines for; half the cases name a served model."""
    if not isinstance(body, dict):
        return
    keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            body[key] = min(value, MAX_TOKENS_CAP)
    if not any(k in body for k in keys):
        body["max_output_tokens" if "input" in body else "max_tokens"] = MAX_TOKENS_CAP
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("max_tokens"), int):
        reasoning["max_tokens"] = min(max(reasoning["max_tokens"], 1), MAX_TOKENS_CAP)
    if isinstance(body.get("model"), str) and seed % 2:
        body["model"] = (INTENT, REASONING, "auto")[seed % 3]


def test_schemathesis_fuzz_with_auth_on_finds_no_5xx_and_no_cross_tenant_read(
    tmp_path, tokenizers, campaign
) -> None:
    """Every operation of the app's schema, valid (positive) and invalid (negative) inputs, the
    fuzzer's key in the Authorization header. A third of the cases that take a response id name one
    of the fuzzer's own responses, a third the rival tenant's: those must be 404 (never 2xx, never 403).
    Checks: not_a_server_error, negative_data_rejection (invalid input is a 4xx),
    response_headers_conformance, response_schema_conformance (the schema declares FastAPI's 422 and
    generic 200 bodies only, so status-code and content-type conformance do not apply: errors are
    OpenAI-shaped 400s and streams are text/event-stream)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
    )

    checks = [
        not_a_server_error,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
    ]
    loop = LoopThread()
    edge = loop.run(EdgeApp(_spec(tmp_path, {"enabled": True, "keys": KEYS}), tokenizers).start())
    t0 = time.monotonic()
    try:
        c = edge.client
        # The schema is behind the key too.
        assert loop.run(c.get("/openapi.json")).status_code == 401
        doc = loop.run(c.get("/openapi.json", headers=bearer(KEY)))
        assert doc.status_code == 200
        schema = schemathesis.openapi.from_dict(doc.json())

        def create(key: str) -> str:
            body = {"model": REASONING, "input": "why is the sky blue", "max_output_tokens": 6}
            r = loop.run(c.post("/v1/responses", json=body, headers=bearer(key)))
            assert r.status_code == 200, r.text
            return r.json()["id"]

        mine = [create(KEY), create(KEY)]  # one to read and cancel, one to delete
        theirs = create(RIVAL_KEY)
        before = loop.run(c.get(f"/v1/responses/{theirs}", headers=bearer(RIVAL_KEY))).json()

        statuses: Counter[tuple[str, int]] = Counter()
        failures: list[str] = []
        leaks: list[str] = []
        cases = rival_cases = 0

        def fuzz(op: Any, mode: Any) -> None:
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal cases, rival_cases
                seed = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
                rival = False
                if mode == GenerationMode.POSITIVE:
                    _cap(case.body, seed)
                    if case.path_parameters and "response_id" in case.path_parameters:
                        pick = seed % 3
                        if pick == 1:
                            own = mine[1] if case.method.upper() == "DELETE" else mine[0]
                            case.path_parameters["response_id"] = own
                        elif pick == 2:
                            case.path_parameters["response_id"] = theirs
                            rival = True
                    if isinstance(case.body, dict) and "previous_response_id" in case.body and seed % 2:
                        case.body["previous_response_id"] = theirs
                        rival = True
                kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=bearer(KEY))
                response = loop.run(c.send(_send(edge, kwargs)), timeout=30)
                cases += 1
                rival_cases += rival
                statuses[(op.path, response.status_code // 100)] += 1
                label = f"{op.method.upper()} {op.path} {mode.value}"
                if rival and (200 <= response.status_code < 300 or response.status_code == 403):
                    leaks.append(
                        f"{label}: {response.status_code} for the rival's {theirs}: {response.text[:200]}"
                    )
                try:
                    case.validate_response(
                        response, checks=checks, headers=bearer(KEY), transport_kwargs=kwargs
                    )
                except Exception as e:  # a schemathesis Failure (group): keep going, report them all
                    failures.append(f"{label}: {response.status_code} {response.text[:200]!r}\n{e}"[:1200])

            run()

        operations = [r.ok() for r in schema.get_all_operations()]
        paths = {op.path for op in operations}
        assert paths >= {
            "/health",
            "/metrics",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/responses",
            "/v1/responses/{response_id}",
            "/v1/responses/{response_id}/cancel",
        }, paths
        for op in operations:
            modes = [GenerationMode.POSITIVE]
            # A response id is any string: only a body or a query has an invalid variant.
            if op.get_request_payload_content_types() or len(op.query):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                fuzz(op, mode)
        after = loop.run(c.get(f"/v1/responses/{theirs}", headers=bearer(RIVAL_KEY)))
        elapsed = time.monotonic() - t0
    finally:
        loop.run(edge.close())
        loop.close()
    five = sum(n for (_, cls), n in statuses.items() if cls == 5)
    campaign.record(
        "input",
        "schemathesis fuzz, auth on, every operation",
        operations=len(operations),
        cases=cases,
        status_2xx=sum(n for (_, k), n in statuses.items() if k == 2),
        status_4xx=sum(n for (_, k), n in statuses.items() if k == 4),
        status_5xx=five,
        check_failures=len(failures),
        cases_on_rival_ids=rival_cases,
        cross_tenant_reads=len(leaks),
        seconds=round(elapsed, 1),
    )
    assert rival_cases > 0 and not leaks, "\n".join(leaks[:10])
    assert five == 0 and not failures, "\n\n".join(failures[:8])
    # The rival's response is untouched: still there, same status, same output.
    assert after.status_code == 200 and after.json() == before
    # The fuzz reached the engines (2xx) and the validation paths (4xx) of every generating endpoint.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/{response_id}"):
        assert statuses[(path, 2)] > 0 and statuses[(path, 4)] > 0, dict(statuses)


def test_without_a_valid_key_every_route_but_health_is_a_401(tmp_path, tokenizers, campaign) -> None:
    """Generated requests to every operation with no Authorization header, a wrong key, a malformed
    header, and a metrics-only key on /v1/*: all 401 with `www-authenticate: Bearer` (the body is
    never looked at); /health answers 200. Nothing reached an engine or the store."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    variants: dict[str, dict[str, str]] = {
        "none": {},
        "wrong key": bearer("tdm-not-a-key"),
        "not bearer": {"authorization": f"Basic {KEY}"},
        "empty bearer": {"authorization": "Bearer "},
    }
    loop = LoopThread()
    edge = loop.run(EdgeApp(_spec(tmp_path, {"enabled": True, "keys": KEYS}), tokenizers).start())
    got: Counter[int] = Counter()
    wrong: list[str] = []

    def probe(op: Any, want: int, tries: dict[str, dict[str, str]]) -> None:
        @settings(
            max_examples=5,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            _cap(case.body, 1)
            for name, headers in tries.items():
                kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=headers)
                r = loop.run(edge.client.send(_send(edge, kwargs)), timeout=30)
                got[r.status_code] += 1
                ok = r.status_code == want
                if ok and want == 401:
                    ok = r.headers.get("www-authenticate") == "Bearer"
                    ok = ok and r.json()["error"]["type"] == "authentication_error"
                if not ok:
                    wrong.append(f"{op.method.upper()} {op.path} ({name}): {r.status_code} {r.text[:200]}")

        run()

    try:
        c = edge.client
        schema = schemathesis.openapi.from_dict(loop.run(c.get("/openapi.json", headers=bearer(KEY))).json())
        for op in [r.ok() for r in schema.get_all_operations()]:
            want = 200 if op.path == "/health" else 401
            tries = dict(variants)
            if op.path.startswith("/v1/"):
                tries["metrics-only key"] = bearer(METRICS_KEY)

            probe(op, want, tries)
        # Paths outside the schema too (the docs pages, an unknown path).
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/nothing-here", "/anything"):
            for name, headers in variants.items():
                r = loop.run(c.get(path, headers=headers))
                got[r.status_code] += 1
                if r.status_code != 401:
                    wrong.append(f"GET {path} ({name}): {r.status_code}")
        stored = edge.store._db.execute("SELECT count(*) FROM sessions").fetchone()[0]
        buckets = edge.gateway.admission.snapshot()["buckets"]
    finally:
        loop.run(edge.close())
        loop.close()
    campaign.record(
        "isolation",
        "no / wrong / malformed / metrics-only key",
        requests=sum(got.values()),
        status_401=got[401],
        status_200_health=got[200],
        other=sum(n for s, n in got.items() if s not in (200, 401)),
        sessions_stored=stored,
    )
    assert not wrong, "\n".join(wrong[:10])
    assert stored == 0 and buckets == {}


def _write_keys(path: Path, entries: list[dict]) -> None:
    """Replace the keys file as a Kubernetes Secret update does (a new file renamed over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


async def test_a_key_revoked_in_the_keys_file_is_a_401_within_the_reload_interval(
    tmp_path, tokenizers, campaign
) -> None:
    """A key serves chat and /v1/responses; removed from auth.keys_file, it is a 401 within
    keys_reload_s (on every route, its stored response included), while the key left in the file
    keeps working."""
    reload_s = 0.3
    keys = tmp_path / "keys.json"
    _write_keys(keys, KEYS[:2])
    auth = {"enabled": True, "keys_file": str(keys), "keys_reload_s": reload_s}
    edge = await EdgeApp(_spec(tmp_path, auth), tokenizers).start()
    try:
        c = edge.client
        chat = {"model": INTENT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert (await c.post("/v1/chat/completions", json=chat, headers=bearer(KEY))).status_code == 200
        r = await c.post(
            "/v1/responses",
            json={"model": REASONING, "input": "hi", "max_output_tokens": 4},
            headers=bearer(KEY),
        )
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        _write_keys(keys, KEYS[1:2])  # revoke acme's key; rival's stays
        revoked = time.monotonic()
        while True:
            r = await c.get("/v1/models", headers=bearer(KEY))
            if r.status_code == 401 or time.monotonic() - revoked > 10:
                break
            await asyncio.sleep(0.02)
        took = time.monotonic() - revoked
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
        answers = [
            (await c.post("/v1/chat/completions", json=chat, headers=bearer(KEY))).status_code,
            (await c.get(f"/v1/responses/{rid}", headers=bearer(KEY))).status_code,
            (await c.get(f"/v1/responses/{rid}?stream=true", headers=bearer(KEY))).status_code,
            (await c.post(f"/v1/responses/{rid}/cancel", headers=bearer(KEY))).status_code,
            (await c.delete(f"/v1/responses/{rid}", headers=bearer(KEY))).status_code,
        ]
        still = (await c.post("/v1/chat/completions", json=chat, headers=bearer(RIVAL_KEY))).status_code
        # The stored response was not deleted by the revoked key's DELETE.
        kept = edge.store._db.execute("SELECT count(*) FROM sessions WHERE id = ?", (rid,)).fetchone()[0]
    finally:
        await edge.close()
    campaign.record(
        "isolation",
        "key revoked in auth.keys_file",
        keys_reload_s=reload_s,
        revoked_after_s=round(took, 2),
        revoked_key_statuses=sorted(set(answers)),
        remaining_key_status=still,
    )
    assert took <= reload_s + 0.5, took
    assert answers == [401] * 5 and still == 200 and kept == 1


# -- the live stack: raw HTTP ---------------------------------------------------------------------


def _head(method: str, path: str, headers: Iterable[tuple[bytes, bytes]], host: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), f"host: {host}".encode(), b"connection: close"]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class RawAnswer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, seconds: float) -> None:
        self.status, self.headers, self.body, self.seconds = status, headers, body, seconds

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r}"


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def raw_request(
    url: str, head: bytes, body: Iterable[bytes] = (), gap_s: float = 0.0, timeout: float = 90
) -> RawAnswer:
    """Send `head` then `body`'s pieces (`gap_s` apart) from a thread while the answer is read; the
    sender stops when the server answers or closes (a refused body is never read to its end)."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    answered = threading.Event()

    def sender() -> None:
        try:
            sock.sendall(head)
            for piece in body:
                if answered.is_set():
                    return
                if gap_s:
                    if answered.wait(gap_s):
                        return
                sock.sendall(piece)
        except OSError:  # the server closed after answering: expected for a refused body
            pass

    t0 = time.monotonic()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    data = b""
    try:
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            if not data:
                seconds = time.monotonic() - t0
            data += piece
            answered.set()
    finally:
        answered.set()
        sock.close()
        thread.join(5)
    if not data:
        raise AssertionError("the server closed the connection without an answer")
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    answer = RawAnswer(status, headers, payload, seconds)
    if (answer.header("transfer-encoding") or "").lower() == "chunked":
        answer.body = _dechunk(payload)
    return answer


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _chat(**over: Any) -> dict:
    body: dict[str, Any] = {"model": INTENT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(over)
    return body


def test_live_bodies_past_the_size_limit_are_413s(stack, campaign) -> None:
    """A body over http.max_body_bytes: refused on its Content-Length, and a chunked one (no length) on
    the bytes counted; the stack keeps serving."""
    limit = stack.spec.http.max_body_bytes
    prefix = b'{"model":"tiny-intent","messages":[{"role":"user","content":"'
    filler = b"x" * 65536
    count = limit // len(filler) + 2
    total = len(prefix) + count * len(filler) + 3

    def chunked() -> Iterable[bytes]:
        for piece in (prefix, *([filler] * count), b'"}]}'):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    def send(url: str) -> tuple[RawAnswer | None, RawAnswer | None]:
        def one(headers: list, body: Iterable[bytes]) -> RawAnswer | None:
            try:
                return raw_request(
                    url, _head("POST", "/v1/chat/completions", headers, _host(url)), body, timeout=45
                )
            except TimeoutError:  # no answer at all
                return None

        json_type = (b"content-type", b"application/json")
        return (
            one([json_type, (b"content-length", str(total).encode())], [prefix, *([filler] * count), b'"}]']),
            one([json_type, (b"transfer-encoding", b"chunked")], chunked()),
        )

    declared, undeclared = send(stack.url)
    via = "stack"
    plane = str(stack.spec.server.data_plane)
    if (declared is None or undeclared is None) and plane == "haproxy" and _ingress_ports():
        # NOTE: Ray Serve's HAProxy may not forward an answer the ingress sends before the body is
        # complete (see test_live_a_body_that_trickles_in_is_a_408): what the ingress itself answers.
        declared, undeclared = send(f"http://127.0.0.1:{_ingress_ports()[0]}")
        via = "ingress port (HAProxy forwarded no answer)"
    after = httpx.post(f"{stack.url}/v1/chat/completions", json=_chat(), timeout=60)
    campaign.record(
        "input",
        "body past http.max_body_bytes",
        limit_bytes=limit,
        sent_bytes=total,
        via=via,
        content_length=declared.status if declared else None,
        chunked=undeclared.status if undeclared else None,
        answered_s=round(max(declared.seconds, undeclared.seconds), 2) if declared and undeclared else None,
        then=after.status_code,
    )
    for answer in (declared, undeclared):
        assert answer is not None and answer.status == 413, answer
        err = answer.json()["error"]
        assert err["code"] == "body_too_large" and str(limit) in err["message"], err
    assert after.status_code == 200, after.text
    if via != "stack":
        pytest.xfail(
            "the ingress answered 413, but Ray Serve's HAProxy data plane did not forward it to the client"
        )


def _ingress_ports() -> list[int]:
    """The stack's ingress replicas' own HTTP ports behind Ray Serve's HAProxy, from its config file
    for this node: a diagnostic that bypasses the data plane ([] when there is none, e.g. data_plane:
    proxy). Only ports whose replica serves this stack's /v1/models (another app's ingress, such as
    tests/faults' aux app, answers 404 there)."""
    try:
        import ray
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC as loc

        cfg = Path(loc).parent / ray.get_runtime_context().get_node_id() / Path(loc).name
        text = cfg.read_text()
    except Exception:
        return []
    ports = [int(p) for p in re.findall(r"server SERVE_REPLICA_\S*ingress\S* [\d.]+:(\d+)", text)]
    ours = []
    for port in ports:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200:
                ours.append(port)
        except httpx.HTTPError:
            continue
    return ours


def test_live_a_body_that_trickles_in_is_a_408(stack, campaign) -> None:
    """Headers sent, then one byte a second (the body would take ~90 s): the ingress answers 408
    `body_timeout` once http.body_timeout_s has passed, and frees its slot. Measured through the
    stack's URL (what a client sees) and, with the HAProxy data plane, on the ingress replica's own
    port as well (what the ingress does)."""
    from concurrent.futures import ThreadPoolExecutor

    limit_s = stack.spec.http.body_timeout_s
    body = json.dumps(_chat()).encode()
    pieces = [body[i : i + 1] for i in range(len(body))]
    assert len(pieces) > limit_s + 20  # the body cannot finish in time

    def trickle(url: str) -> RawAnswer | None:
        head = _head(
            "POST",
            "/v1/chat/completions",
            [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            _host(url),
        )
        try:
            return raw_request(url, head, pieces, gap_s=1.0, timeout=limit_s + 15)
        except TimeoutError:  # no answer at all within body_timeout_s + 15 s
            return None

    ports = _ingress_ports()
    with ThreadPoolExecutor(2) as pool:
        client_f = pool.submit(trickle, stack.url)
        ingress_f = pool.submit(trickle, f"http://127.0.0.1:{ports[0]}") if ports else None
        client = client_f.result()
        ingress = ingress_f.result() if ingress_f is not None else None
    plane = str(stack.spec.server.data_plane)
    campaign.record(
        "input",
        "body trickled past http.body_timeout_s",
        body_timeout_s=limit_s,
        data_plane=plane,
        client_status=client.status if client else f"no answer in {limit_s + 15:g} s",
        client_answered_s=round(client.seconds, 1) if client else None,
        ingress_status=ingress.status if ingress else None,
        ingress_answered_s=round(ingress.seconds, 1) if ingress else None,
    )

    def timely_408(a: RawAnswer) -> bool:
        return (
            a.status == 408
            and a.json()["error"]["code"] == "body_timeout"
            and limit_s - 1 <= a.seconds <= limit_s + 10
        )

    if ingress_f is not None:
        assert ingress is not None and timely_408(ingress), ingress
    if client is None and plane == "haproxy" and ingress is not None:
        # NOTE: the ingress answered (above); Ray Serve's HAProxy does not pass an answer the server
        # sends before the request body is complete on to the client (measured on Ray 2.60: the
        # same with a 400 sent before the body), and its config has no `timeout http-request`, so
        # the client's connection stays open while it trickles (`timeout client` 3600 s).
        pytest.xfail(
            f"the ingress answered 408 at {ingress.seconds:.1f} s on its own port, but Ray Serve's "
            "HAProxy data plane never forwarded it to the client"
        )
    assert client is not None and timely_408(client), client


#: (name, path, raw body, the param the 400 names (None: the body as a whole)).
BAD_BODIES: list[tuple[str, str, bytes, str | None]] = [
    (
        "invalid UTF-8",
        "/v1/chat/completions",
        b'{"model":"tiny-intent","messages":[{"role":"user","content":"hi \xff\xfe\xc3"}],"max_tokens":4}',
        None,
    ),
    (
        "lone surrogate escape in content",
        "/v1/chat/completions",
        b'{"model":"tiny-intent","messages":[{"role":"user","content":"hi \\ud800"}],"max_tokens":4}',
        "messages.0.content",
    ),
    (
        "lone surrogate escape in model",
        "/v1/completions",
        b'{"model":"tiny-\\udfff","prompt":"hi","max_tokens":4}',
        "model",
    ),
    (
        "lone surrogate escape in a key",
        "/v1/responses",
        b'{"model":"tiny-intent","input":"hi","metadata":{"\\ud83d":"v"},"max_output_tokens":4}',
        "metadata",
    ),
    (
        "max_tokens 2**40",
        "/v1/chat/completions",
        json.dumps(_chat(max_tokens=2**40)).encode(),
        "max_tokens",
    ),
    (
        "max_tokens 2**40 (completions)",
        "/v1/completions",
        json.dumps({"model": INTENT, "prompt": "hi", "max_tokens": 2**40}).encode(),
        "max_tokens",
    ),
    (
        "max_output_tokens 2**40",
        "/v1/responses",
        json.dumps({"model": INTENT, "input": "hi", "max_output_tokens": 2**40}).encode(),
        "max_output_tokens",
    ),
    ("n 10**6", "/v1/chat/completions", json.dumps(_chat(n=10**6)).encode(), "n"),
    (
        "n 10**6 (completions)",
        "/v1/completions",
        json.dumps({"model": INTENT, "prompt": "hi", "n": 10**6}).encode(),
        "n",
    ),
    (
        "10,000-deep nesting",
        "/v1/chat/completions",
        b'{"model":"tiny-intent","messages":[{"role":"user","content":"hi"}],"stop":'
        + b"[" * 10_000
        + b"]" * 10_000
        + b"}",
        None,
    ),
    (
        "10,000-deep nesting (responses)",
        "/v1/responses",
        b'{"model":"tiny-intent","input":"hi","metadata":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001,
        None,
    ),
    (
        "an integer of 5000 digits",
        "/v1/chat/completions",
        json.dumps(_chat()).encode()[:-1] + b',"seed":' + b"9" * 5000 + b"}",
        None,
    ),
]


def test_live_malformed_bodies_are_400s_naming_the_field(stack, campaign) -> None:
    """Invalid UTF-8, lone surrogate escapes, max_tokens 2**40 (with and without the clamp header),
    n = 10**6, 10,000-deep nesting, a 5000-digit integer: each a 400 naming the field (or the body),
    never a 5xx; the stack keeps serving."""
    got: dict[str, tuple[int, str | None]] = {}
    wrong: list[str] = []
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        for name, path, raw, param in BAD_BODIES:
            for extra in ({}, {"x-tandem-max-tokens": "clamp"}):
                r = c.post(path, content=raw, headers={"content-type": "application/json", **extra})
                got[name + (" +clamp" if extra else "")] = (
                    r.status_code,
                    r.json().get("error", {}).get("param"),
                )
                err = r.json().get("error", {}) if r.status_code == 400 else {}
                if r.status_code != 400 or err.get("param") != param:
                    wrong.append(f"{name} {extra}: {r.status_code} {r.text[:300]}")
                elif param is not None and not err["message"].startswith(f"{param}: "):
                    wrong.append(f"{name}: the message does not name {param}: {err['message']}")
        after = c.post("/v1/chat/completions", json=_chat())
    campaign.record(
        "input",
        "malformed bodies (UTF-8, surrogates, huge numbers, nesting)",
        cases=len(got),
        status_400=sum(1 for s, _ in got.values() if s == 400),
        status_5xx=sum(1 for s, _ in got.values() if s >= 500),
        named_field=sum(1 for (s, p) in got.values() if s == 400 and p is not None),
        then=after.status_code,
    )
    assert not wrong, "\n".join(wrong)
    assert after.status_code == 200


#: Values the HTTP layer carries into a header (raw bytes on the wire) and what each is.
HEADER_VALUES: list[tuple[str, bytes]] = [
    ("CRLF + injected header", b"a\r\nx-injected: 1"),
    ("bare LF", b"a\nx-injected: 1"),
    ("bare CR", b"a\rb"),
    ("NUL", b"a\x00b"),
    ("UTF-8 non-ASCII", "café-é".encode()),
    ("latin-1 byte", b"caf\xe9"),
    ("DEL", b"a\x7fb"),
    ("overlong 300", b"a" * 300),
    ("overlong 20k", b"a" * 20_000),
]
HEADERS = [b"x-tandem-tenant", b"x-tandem-task", b"x-session-id"]


def test_live_header_injection_is_refused_never_a_5xx_never_reflected(stack, campaign) -> None:
    """CR/LF, NUL, DEL, non-ASCII and overlong values in x-tandem-tenant / x-tandem-task /
    x-session-id, sent as raw bytes (on GET /v1/models: every /v1 route checks them before anything
    else, and with no body an early answer cannot race an unread one). A CR/LF pair ends the header
    line on the wire (the HTTP server reads what follows as another header, `x-injected`, which the app
    ignores; HAProxy does the same with a bare LF): that request is served, and nothing of it comes
    back in a response header. Every other value is a 4xx: the app's 400 naming the header (without
    echoing the value), or the HTTP server's own 400/431 for bytes HTTP forbids. Never a 5xx."""
    by_status: Counter[int] = Counter()
    by_app = 0  # 400s the app answered, naming the header (the rest: the HTTP servers' own)
    split = 0  # requests whose header line the HTTP layer split at a line end (and served)
    wrong: list[str] = []
    for name in HEADERS:
        for label, value in HEADER_VALUES:
            head = _head("GET", "/v1/models", [(name, value)], _host(stack.url))
            try:
                a = raw_request(stack.url, head, timeout=30)
            except TimeoutError:
                wrong.append(f"no answer in 30 s: {name.decode()} {label}")
                continue
            by_status[a.status] += 1
            what = f"{name.decode()} {label}: {a!r}"[:400]
            if any(k.lower() == "x-injected" or "x-injected" in v for k, v in a.headers):
                wrong.append("reflected: " + what)
            if a.status >= 500:
                hint = ""
                if name == b"x-session-id" and a.body == b"Internal Server Error":
                    hint = (
                        " [Ray Serve's direct ingress (data_plane: haproxy) decodes its session header, "
                        "x-session-id by default, as UTF-8 before the app runs; RAY_SERVE_SESSION_ID_"
                        "HEADER_KEY set to another name in ServerSpec.ray_env() leaves it to the app]"
                    )
                wrong.append("5xx: " + what + hint)
            elif value.startswith(b"a\r\n") or value.startswith(b"a\n"):
                # A line end: the HTTP layer splits the line (the app sees `a`, valid for all three,
                # and an `x-injected` header it ignores) or refuses it (uvicorn: a bare LF).
                if a.status not in (200, 400):
                    wrong.append("the split request was neither served nor refused: " + what)
                split += a.status == 200
            elif a.status not in (400, 431):
                wrong.append("not refused: " + what)
            elif a.body.startswith(b"{"):
                err = a.json()["error"]
                if err.get("param") != name.decode() or err.get("code") != "invalid_header":
                    wrong.append("the 400 does not name the header: " + what)
                elif value.decode("latin-1") in err["message"]:
                    wrong.append("the value is echoed in the message: " + what)
                by_app += 1
    five = sum(n for s, n in by_status.items() if s >= 500)
    campaign.record(
        "input",
        "header injection (tenant/task/session headers)",
        cases=len(HEADERS) * len(HEADER_VALUES),
        statuses=dict(sorted(by_status.items())),
        split_at_line_end_and_served=split,
        app_400_naming_header=by_app,
        http_server_refusals=sum(n for s, n in by_status.items() if 400 <= s < 500) - by_app,
        status_5xx=five,
        reflected=sum(1 for w in wrong if w.startswith("reflected")),
    )
    assert not wrong, "\n".join(wrong)


# -- the live stack: isolation between tenants --------------------------------------------------------


def _tenant(name: str) -> dict[str, str]:
    return {"x-tandem-tenant": name}


def test_live_tenant_b_cannot_reach_tenant_a_response(stack, campaign) -> None:
    """Tenant A's background response (stored): tenant B's GET, stream, stream from an offset,
    cancel, DELETE and previous_response_id are all 404 with the very answer an id that never existed
    gets (no existence oracle); A's response runs on untouched (not cancelled, not deleted) and A can
    still read, stream and delete it."""
    a, b = f"iso-a-{uuid.uuid4().hex[:6]}", f"iso-b-{uuid.uuid4().hex[:6]}"
    never = f"resp_{uuid.uuid4().hex}"
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        r = c.post(
            "/v1/responses",
            json={
                "model": INTENT,
                "input": "Tell me a long story about the sea.",
                "background": True,
                "store": True,
                "max_output_tokens": 256,
            },
            headers=_tenant(a),
        )
        assert r.status_code == 200, r.text
        rid = r.json()["id"]

        def probes(target: str) -> dict[str, httpx.Response]:
            h = _tenant(b)
            return {
                "get": c.get(f"/v1/responses/{target}", headers=h),
                "stream": c.get(f"/v1/responses/{target}", params={"stream": "true"}, headers=h),
                "stream_after": c.get(
                    f"/v1/responses/{target}", params={"stream": "true", "starting_after": 3}, headers=h
                ),
                "cancel": c.post(f"/v1/responses/{target}/cancel", headers=h),
                "delete": c.delete(f"/v1/responses/{target}", headers=h),
                "continue": c.post(
                    "/v1/responses",
                    json={
                        "model": INTENT,
                        "input": "and then?",
                        "previous_response_id": target,
                        "max_output_tokens": 4,
                    },
                    headers=h,
                ),
            }

        theirs, nothing = probes(rid), probes(never)
        during = c.get(f"/v1/responses/{rid}", headers=_tenant(a)).json()["status"]

        def shape(resp: httpx.Response, target: str) -> tuple:
            err = resp.json()["error"]
            return (
                resp.status_code,
                err["type"],
                err["code"],
                err["param"],
                err["message"].replace(target, "<id>"),
            )

        # A's response is still A's: running or done, never cancelled by B, and readable.
        deadline = time.monotonic() + 120
        while True:
            got = c.get(f"/v1/responses/{rid}", headers=_tenant(a))
            assert got.status_code == 200, got.text
            if got.json()["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        final = got.json()
        events = c.get(
            f"/v1/responses/{rid}", params={"stream": "true", "starting_after": 0}, headers=_tenant(a)
        )
        chained = c.post(
            "/v1/responses",
            json={"model": INTENT, "input": "and then?", "previous_response_id": rid, "max_output_tokens": 4},
            headers=_tenant(a),
        )
        deleted = c.delete(f"/v1/responses/{rid}", headers=_tenant(a))
        gone = c.get(f"/v1/responses/{rid}", headers=_tenant(a))
    statuses = {k: v.status_code for k, v in theirs.items()}
    same = {k: shape(theirs[k], rid) == shape(nothing[k], never) for k in theirs}
    campaign.record(
        "isolation",
        "tenant B on tenant A's response id",
        b_statuses=sorted(set(statuses.values())),
        same_answer_as_unknown_id=all(same.values()),
        a_status_after_b_probes=during,
        a_final_status=final["status"],
        a_output_tokens=(final.get("usage") or {}).get("output_tokens"),
        a_can_chain=chained.status_code,
        a_can_delete=deleted.status_code,
    )
    assert statuses == dict.fromkeys(theirs, 404), {k: v.text[:200] for k, v in theirs.items()}
    assert all(same.values()), {k: (shape(theirs[k], rid), shape(nothing[k], never)) for k in theirs}
    assert final["status"] in ("completed", "incomplete"), final
    assert events.status_code == 200 and f"response.{final['status']}" in events.text, events.text[-300:]
    assert chained.status_code == 200, chained.text
    assert deleted.status_code == 200 and gone.status_code == 404


def _long_prompt(tokenizer: Any, tokens: int) -> str:
    """A text of about `tokens` tokens for `tokenizer`, unique to this run (nothing cached yet)."""
    nonce = uuid.uuid4().hex
    words = f"{nonce} the quick brown fox jumps over the lazy dog while seven sailors count waves".split()
    text, i = nonce, 0
    while len(tokenizer.encode(text)) < tokens:
        text += " " + " ".join(words[(i + j) % len(words)] for j in range(20))
        i += 7
    return text


def _completion(url: str, tenant: str, prompt: str, session: str | None = None) -> tuple[int, float, int]:
    """(cached prompt tokens, seconds to the first token, prompt tokens) of one streamed completion."""
    headers = _tenant(tenant) | ({"x-session-id": session} if session else {})
    body = {
        "model": INTENT,
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    usage = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ttft is None and ev.get("choices"):
                ttft = time.perf_counter() - t0
            usage = ev.get("usage") or usage
    assert usage is not None and ttft is not None
    return usage["prompt_tokens_details"]["cached_tokens"], ttft, usage["prompt_tokens"]


def test_live_a_prefix_cached_for_tenant_a_is_no_hit_for_tenant_b(stack, tokenizers, campaign) -> None:
    """Tenant A sends a ~600-token prompt, then again: the repeats report cached prompt tokens.
    Tenants B (three of them) send the same prompt: 0 cached; each B then hits its own cache on its
    second call (the cache works for B too: the salt, not a cold engine, kept A's blocks from it).

    The times to first token are recorded, not asserted: on the tiny CPU model a 600-token prefill
    is a few ms of a TTFT that is mostly per-request overhead (measured: cold and cached within
    noise of each other), so `cached_tokens` is the evidence."""
    prompt = _long_prompt(tokenizers[INTENT], 600)
    a = f"cache-a-{uuid.uuid4().hex[:6]}"
    bs = [f"cache-b{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    cold_a, ttft_cold_a, n = _completion(stack.url, a, prompt)
    warm = [_completion(stack.url, a, prompt) for _ in range(3)]
    cold_b = [_completion(stack.url, b, prompt) for b in bs]
    warm_b = [_completion(stack.url, b, prompt) for b in bs]
    ttft_warm_a = statistics.median(t for _, t, _ in warm)
    ttft_cold_b = statistics.median(t for _, t, _ in cold_b)
    campaign.record(
        "isolation",
        "salted prefix cache: tenant B on A's prompt",
        prompt_tokens=n,
        a_cached=[c for c, _, _ in warm],
        b_cached=[c for c, _, _ in cold_b],
        b_second_call_cached=[c for c, _, _ in warm_b],
        ttft_a_cold_ms=round(ttft_cold_a * 1000, 1),
        ttft_a_cached_ms=round(ttft_warm_a * 1000, 1),
        ttft_b_cold_ms=round(ttft_cold_b * 1000, 1),
    )
    assert 500 <= n <= 800, n
    assert cold_a == 0
    assert all(c > 0 for c, _, _ in warm), warm
    assert all(c == 0 for c, _, _ in cold_b), cold_b
    assert all(c > 0 for c, _, _ in warm_b), warm_b


def test_live_a_session_id_reused_by_another_tenant_gets_no_cached_prefix(
    stack, tokenizers, campaign
) -> None:
    """Tenant A's session (x-session-id) warms a prefix; tenant B sending the same prompt under the same
    session id is routed by its own tenant's keys: 0 cached tokens. A keeps its hits."""
    prompt = _long_prompt(tokenizers[INTENT], 600)
    session = f"sess-{uuid.uuid4().hex}"
    a, b = f"sess-a-{uuid.uuid4().hex[:6]}", f"sess-b-{uuid.uuid4().hex[:6]}"
    first = _completion(stack.url, a, prompt, session)
    second = _completion(stack.url, a, prompt, session)
    other = _completion(stack.url, b, prompt, session)
    again = _completion(stack.url, a, prompt, session)
    campaign.record(
        "isolation",
        "session id reused by another tenant",
        prompt_tokens=first[2],
        a_cached=[first[0], second[0], again[0]],
        b_cached=other[0],
    )
    assert first[0] == 0 and second[0] > 0 and again[0] > 0
    assert other[0] == 0, other
