"""An httpx transport that runs an ASGI app in-process and streams its response (benchmarks).

httpx's own `ASGITransport` (0.28) returns a response only once the app has sent all of it, which
makes a streamed response's time to first byte read as its whole latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httpx

_END = object()


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """An httpx transport that calls an ASGI app in this event loop and streams its response body.

    Each request runs the app as a task; body messages reach the client as the app sends them.
    Closing a response before its end (or cancelling the request) tells the app the client left
    (`http.disconnect`, OSError on send, ASGI spec 2.4) and cancels the app task.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        url = request.url
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": url.scheme,
            "path": unquote(url.path),
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "root_path": "",
            "server": (url.host, url.port or 80),
            "client": ("127.0.0.1", 50000),
        }
        loop = asyncio.get_running_loop()
        started: asyncio.Future[tuple[int, list]] = loop.create_future()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        gone = asyncio.Event()
        sent_request = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if gone.is_set():
                raise OSError("client disconnected")
            if message["type"] == "http.response.start":
                started.set_result((message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(_END)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as e:  # noqa: BLE001 - handed to the reader
                if not started.done():
                    started.set_exception(e)
                else:
                    chunks.put_nowait(e)
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("the app ended without a response"))
                chunks.put_nowait(_END)

        task = loop.create_task(run())

        async def close(complete: bool) -> None:
            gone.set()
            if not complete and not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        try:
            status, headers = await asyncio.shield(started)
        except BaseException:
            await asyncio.shield(close(False))
            if started.done() and not started.cancelled():
                started.exception()  # retrieved: the caller's own exception is what propagates
            raise
        return httpx.Response(status, headers=headers, stream=_AppBody(chunks, close), request=request)


class _AppBody(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[Any], close: Callable[[bool], Awaitable[None]]) -> None:
        self._chunks = chunks
        self._close = close
        self._complete = False

    async def __aiter__(self):
        while True:
            item = await self._chunks.get()
            if item is _END:
                self._complete = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        await asyncio.shield(self._close(self._complete))
