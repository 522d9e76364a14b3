"""loadtests.client against a scripted local HTTP server: what it measures from a stream, and how it
tells a 429 (by reason) from a failure. The server is a script of SSE frames with delays; the client
is the real one (requests, plain threads)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtests.client import Call, Client
from loadtests.workload import Slo

SCRIPTS: dict[str, tuple[int, list]] = {}


def chunk(delta=None, text=None, usage=None, finish=None):
    if usage is not None:
        return {"choices": [], "usage": usage}
    choice = {"index": 0, "finish_reason": finish}
    if text is not None:
        choice["text"] = text
    else:
        choice["delta"] = delta
    return {"choices": [choice]}


USAGE = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        status, frames = SCRIPTS[body["script"]]
        if status != 200:
            payload = json.dumps(
                {"error": {"message": "no", "type": "rate_limit", "code": "tokens"}}
            ).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for delay, frame in frames:
            time.sleep(delay)
            data = f"data: {frame if isinstance(frame, str) else json.dumps(frame)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def call(script: str, path="/v1/chat/completions", slo: Slo | None = None) -> Call:
    return Call("w", "intent", path, {"script": script}, slo or Slo())


def client(host: str, out: list) -> Client:
    return Client(host, out.append, time.perf_counter())


def test_ttft_itl_tpot_and_tokens_from_a_chat_stream(server) -> None:
    SCRIPTS["chat"] = (200, [
        (0.0, chunk({"role": "assistant", "content": ""})),  # vLLM's role-only opening chunk
        (0.15, chunk({"content": "a"})),
        (0.05, chunk({"content": "b"})),
        (0.05, chunk({"content": "c"})),
        (0.0, chunk({}, finish="length")),  # an empty closing chunk is no token
        (0.0, chunk(usage=USAGE)),
        (0.0, "[DONE]"),
    ])  # fmt: skip
    out: list = []
    res = client(server, out).stream(call("chat", slo=Slo(ttft_s=1.0, tpot_s=0.01)))
    (rec,) = out
    assert res.text == "abc" and rec["outcome"] == "ok"
    assert rec["ttft"] == pytest.approx(0.15, abs=0.04)  # the role chunk at 0 s is not the first token
    assert len(rec["itl"]) == 2 and all(g == pytest.approx(0.05, abs=0.03) for g in rec["itl"])
    assert rec["tpot"] == pytest.approx((rec["e2e"] - rec["ttft"]) / 2)
    assert (rec["input"], rec["cached"], rec["output"]) == (40, 32, 3)
    assert rec["slo_met"] is False  # TPOT ~50 ms > 10 ms
    assert 0 <= rec["overhead"] < rec["e2e"]


def test_hidden_reasoning_steps_count_as_output(server) -> None:
    SCRIPTS["hidden"] = (200, [(0.1, chunk({"content": "", "role": "assistant"})),
                               (0.1, chunk({"content": ""})), (0.0, chunk({"content": "x"})),
                               (0.0, chunk(usage=USAGE))])  # fmt: skip
    out: list = []
    client(server, out).stream(call("hidden"))
    assert out[0]["ttft"] == pytest.approx(0.2, abs=0.05)  # the first empty step after the role chunk
    assert len(out[0]["itl"]) == 1


def test_text_completions_count_every_chunk(server) -> None:
    SCRIPTS["text"] = (200, [(0.1, chunk(text="a")), (0.0, chunk(text="b")), (0.0, chunk(usage=USAGE))])
    out: list = []
    client(server, out).stream(call("text", path="/v1/completions"))
    assert out[0]["ttft"] == pytest.approx(0.1, abs=0.04) and out[0]["outcome"] == "ok"


def test_a_429_is_a_rejection_with_its_reason(server) -> None:
    SCRIPTS["limited"] = (429, [])
    out: list = []
    client(server, out).stream(call("limited"))
    assert (out[0]["outcome"], out[0]["status"], out[0]["reason"], out[0]["slo_met"]) == (
        "rejected", 429, "tokens", False)  # fmt: skip


def test_errors_and_cut_streams_are_failures(server) -> None:
    SCRIPTS["error"] = (200, [(0.0, chunk({"content": "a"})), (0.0, {"error": {"code": "engine_dead"}})])
    SCRIPTS["cut"] = (200, [(0.0, chunk({"content": "a"}))])  # no usage, no [DONE]
    SCRIPTS["503"] = (503, [])
    out: list = []
    c = client(server, out)
    for s in ("error", "cut", "503"):
        c.stream(call(s))
    assert [(r["outcome"], r["reason"]) for r in out] == [
        ("failed", "engine_dead"), ("failed", "no_usage"), ("failed", "tokens")]  # fmt: skip
    assert out[2]["status"] == 503


def test_a_server_that_is_not_there_is_a_failure() -> None:
    out: list = []
    client("http://127.0.0.1:9", out).stream(call("chat"))
    assert out[0]["outcome"] == "failed" and out[0]["status"] == 0 and out[0]["reason"] == "ConnectionError"
