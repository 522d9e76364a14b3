"""A fake OpenAI-compatible server (the `vllm serve` dialect) for the `engine: openai` unit tests.

It runs a small FastAPI app under uvicorn in a daemon thread on a free loopback port, so the client
under test speaks real HTTP and real SSE: connections are opened, refused, closed and dropped the way
they are against a real server. Its stream has the shape vLLM 0.32 sends (checked against a live
`vllm serve`, see the report in tests/unit/test_openai_engine.py):

    data: {"id":..,"object":"text_completion","choices":[{"index":0,"text":" t11","token_ids":[11],
           "finish_reason":null,...}],"usage":{...}}        (usage only with continuous_usage_stats)
    ...
    data: {... "choices":[{"text":" t14","token_ids":[14],"finish_reason":"length"}]}
    data: {... "choices":[],"usage":{"prompt_tokens":P,"completion_tokens":N,"total_tokens":..,
           "prompt_tokens_details":{"cached_tokens":C}}}     (with stream_options.include_usage)
    data: [DONE]

`token_ids` appear only when the request asks `return_token_ids`. Behaviour is set per test through
`FakeUpstream.config` (a `Behaviour`); every request is recorded (path, headers, JSON body), and each
stream notes whether it ended because its client went away (`disconnects`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.conftest import free_port


@dataclass
class Behaviour:
    """What the fake does; tests change fields between requests."""

    model: str = "fake-model"
    max_model_len: int | None = 4096
    #: Output token ids; token i is rendered as " t<id>".
    tokens: list[int] = field(default_factory=lambda: [11, 12, 13, 14])
    finish_reason: str = "length"
    first_delay_s: float = 0.0
    delay_s: float = 0.0
    cached_tokens: int = 0
    #: "separate": a usage event after the finish (OpenAI / vLLM); "on_finish": usage on the finishing
    #: event (TGI); "none": no usage at all.
    usage: str = "separate"
    send_done: bool = True
    #: Answer /v1/completions with this status and body (no stream).
    status: int | None = None
    error_body: Any = None
    error_headers: dict[str, str] = field(default_factory=dict)
    #: After this many tokens: stop sending and hang until the client goes away.
    stall_after: int | None = None
    #: After this many tokens: end the stream with no finish.
    cut_after: int | None = None
    #: After this many tokens: send a malformed event.
    garbage_after: int | None = None
    #: After this many tokens: send an error event (vLLM's mid-stream error).
    error_event_after: int | None = None
    #: Finishing event's "" for not finished (TGI) instead of null.
    empty_finish: bool = False
    health_status: int = 200
    metrics_text: str = ""
    metrics_status: int = 200
    reset_status: int = 200
    require_key: str | None = None


class FakeUpstream:
    """The fake server; `start()` returns once it accepts connections."""

    def __init__(self) -> None:
        self.config = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.finished = 0
        self.active = 0
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.config = Behaviour()
            self.requests = []
            self.disconnects = self.finished = 0

    def completions(self) -> list[dict[str, Any]]:
        """The recorded /v1/completions requests."""
        return [r for r in self.requests if r["path"] == "/v1/completions"]

    def start(self) -> FakeUpstream:
        for _attempt in range(3):
            self.port = free_port()
            config = uvicorn.Config(
                self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._server.run, name="fake-upstream", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 10
            while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._server.started:
                return self
        raise RuntimeError("fake upstream did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)

    def wait_for(self, predicate: Any, timeout: float = 2.0) -> bool:
        """Poll `predicate()` until true (False after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    # -- the app -----------------------------------------------------------------------------

    def _record(self, request: Request, body: Any) -> None:
        with self._lock:
            self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})

    def _authorized(self, request: Request) -> bool:
        key = self.config.require_key
        return key is None or request.headers.get("authorization") == f"Bearer {key}"

    def _app(self) -> FastAPI:
        app = FastAPI()
        fake = self

        @app.get("/health")
        async def health(request: Request) -> Response:
            fake._record(request, None)
            return Response(status_code=fake.config.health_status)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            fake._record(request, None)
            return PlainTextResponse(fake.config.metrics_text, status_code=fake.config.metrics_status)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            fake._record(request, None)
            if not fake._authorized(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            card: dict[str, Any] = {"id": fake.config.model, "object": "model"}
            if fake.config.max_model_len is not None:
                card["max_model_len"] = fake.config.max_model_len
            return JSONResponse({"object": "list", "data": [card]})

        @app.post("/reset_prefix_cache")
        async def reset(request: Request) -> Response:
            fake._record(request, None)
            return Response(status_code=fake.config.reset_status)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            fake._record(request, body)
            cfg = fake.config
            if not fake._authorized(request):
                return JSONResponse({"error": {"message": "Unauthorized", "code": 401}}, status_code=401)
            if cfg.status is not None:
                payload = cfg.error_body if cfg.error_body is not None else {"error": {"message": "boom"}}
                return JSONResponse(payload, status_code=cfg.status, headers=cfg.error_headers)
            return StreamingResponse(fake._stream(body, cfg), media_type="text/event-stream")

        return app

    async def _stream(self, body: dict[str, Any], cfg: Behaviour):
        with self._lock:
            self.active += 1
        finished = False
        try:
            prompt = body.get("prompt")
            n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
            ids_wanted = bool(body.get("return_token_ids"))
            opts = body.get("stream_options") or {}
            continuous = bool(opts.get("continuous_usage_stats"))
            include_usage = bool(opts.get("include_usage"))
            tokens = cfg.tokens[: body.get("max_tokens") or len(cfg.tokens)]
            if cfg.first_delay_s:
                await asyncio.sleep(cfg.first_delay_s)
            for i, tok in enumerate(tokens):
                if cfg.stall_after is not None and i == cfg.stall_after:
                    await asyncio.sleep(3600)
                if cfg.cut_after is not None and i == cfg.cut_after:
                    finished = True
                    return
                if cfg.garbage_after is not None and i == cfg.garbage_after:
                    yield "data: {not json\n\n"
                    finished = True
                    return
                if cfg.error_event_after is not None and i == cfg.error_event_after:
                    err = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
                    yield f"data: {json.dumps(err)}\n\n"
                    finished = True
                    return
                last = i == len(tokens) - 1
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": f" t{tok}",
                    "logprobs": None,
                    "finish_reason": cfg.finish_reason if last else ("" if cfg.empty_finish else None),
                }
                if ids_wanted:
                    choice["token_ids"] = [tok]
                event: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
                usage = _usage(n_prompt, i + 1, cfg.cached_tokens)
                if continuous or (last and cfg.usage == "on_finish"):
                    event["usage"] = usage
                yield f"data: {json.dumps(event)}\n\n"
                if cfg.delay_s and not last:
                    await asyncio.sleep(cfg.delay_s)
            if include_usage and cfg.usage == "separate":
                event = {"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage}
                yield f"data: {json.dumps(event)}\n\n"
            if cfg.send_done:
                yield "data: [DONE]\n\n"
            finished = True
        finally:
            with self._lock:
                self.active -= 1
                if finished:
                    self.finished += 1
                else:
                    self.disconnects += 1


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
