"""The sessions benchmark's pure parts: arguments, bodies, batches, summaries, checks, store figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import sessions as bsess
from benchmarks.common import BenchmarkError
from serving.http.protocol import ChatCompletionRequest, ResponsesRequest
from serving.sessions.store import Event, SessionRecord, SQLiteStore, Status


def _params(**kw: object) -> bsess.Params:
    params, _ = bsess.parse_args([])
    return bsess.Params(**{**params.__dict__, **kw})


def test_parse_args_defaults_and_overrides() -> None:
    params, path = bsess.parse_args([])
    assert path is None
    assert (params.model, params.requests, params.concurrency) == ("tiny-reasoning", 8, 4)
    assert (params.max_output_tokens, params.reasoning_budget, params.checkpoint_tokens) == (256, 64, 16)
    assert params.checkpoint_interval_s is None and params.stream_poll_s is None  # the spec's
    assert params.get_poll_s == 0.05 and params.gc_freeze and params.prompt
    params, path = bsess.parse_args(
        ["--requests", "3", "--concurrency", "2", "--checkpoint-tokens", "4", "--stream-poll", "0.01"]
        + ["--no-gc-freeze", "--json", "out.json"]
    )
    assert (params.requests, params.concurrency, params.checkpoint_tokens) == (3, 2, 4)
    assert params.stream_poll_s == 0.01 and not params.gc_freeze and path == "out.json"


@pytest.mark.parametrize(
    "argv",
    [
        ["--requests", "0"],
        ["--concurrency", "0"],
        ["--warmup", "-1"],
        ["--reasoning-budget", "256"],  # no room for </think> and an answer
        ["--reasoning-budget", "0"],
        ["--checkpoint-tokens", "0"],
        ["--get-poll", "0"],
        ["--checkpoint-interval", "-1"],
        ["--prompt", "  "],
    ],
)
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bsess.parse_args(argv)


def test_bodies_are_valid_requests_of_the_same_generation() -> None:
    params = _params()
    chat = ChatCompletionRequest(**bsess.chat_body(params))
    assert chat.stream and chat.stream_options.include_usage
    assert chat.max_reasoning_tokens == 64 and chat.requested_max_tokens() == 256 and chat.temperature == 0
    assert chat.messages[0].text() == params.prompt
    stream = ResponsesRequest(**bsess.responses_body(params, background=False))
    background = ResponsesRequest(**bsess.responses_body(params, background=True))
    assert stream.stream and not stream.background
    assert background.background and not background.stream
    for r in (stream, background):
        assert r.input == params.prompt and r.max_output_tokens == 256 and r.temperature == 0
        assert r.reasoning is not None and r.reasoning.max_tokens == 64 and r.reasoning.summary is None


def test_batches_rotate_the_modes_and_cover_every_request() -> None:
    assert bsess.batches(2, 1) == [("chat", 1), ("stream", 1), ("background", 1)] + [
        ("stream", 1),
        ("background", 1),
        ("chat", 1),
    ]
    out = bsess.batches(10, 4)
    assert [n for _, n in out] == [4, 4, 4, 4, 4, 4, 2, 2, 2]
    assert [m for m, _ in out[6:]] == ["background", "chat", "stream"]
    for mode in bsess.MODES:
        assert sum(n for m, n in out if m == mode) == 10


def _sample(mode: str, total: float, first: float | None = None, **kw: object) -> bsess.Sample:
    return bsess.Sample(mode, total, 256, 64, first_s=first, **kw)


def test_summarize_mode_and_overheads() -> None:
    chat = [_sample("chat", t, 0.01) for t in (0.4, 0.5, 0.6)]
    stream = [_sample("stream", t, 0.05, first_text_s=0.2) for t in (0.5, 0.6, 0.7)]
    s = bsess.summarize_mode(chat)
    assert s["requests"] == 3 and s["total_p50_s"] == pytest.approx(0.5)
    assert s["total_p90_s"] == pytest.approx(0.58)
    assert s["wall_s"] == pytest.approx(1.5) and s["phase_tokens_per_s"] == pytest.approx(768 / 1.5)
    assert s["tokens_per_s_p50"] == pytest.approx(512.0)
    assert math.isnan(s["first_text_p50_s"])
    modes = {"chat": s, "stream": bsess.summarize_mode(stream, wall_s=1.0)}
    assert modes["stream"]["first_text_p50_s"] == pytest.approx(0.2)
    assert modes["stream"]["phase_tokens_per_s"] == pytest.approx(768.0)
    bsess.add_overheads(modes)
    assert modes["chat"]["overhead_p50_pct"] == 0.0
    assert modes["stream"]["overhead_p50_pct"] == pytest.approx(20.0)
    assert modes["stream"]["throughput_vs_chat_pct"] == pytest.approx(50.0)
    assert math.isnan(bsess.overhead_pct(1.0, 0.0)) and math.isnan(bsess.overhead_pct(math.nan, 1.0))


def _usage(done: int = 256, reasoning: int = 64) -> dict:
    return {"completion_tokens": done, "completion_tokens_details": {"reasoning_tokens": reasoning}}


def test_check_chat() -> None:
    assert bsess.check_chat(_usage(), 64, None) == 256
    assert bsess.check_chat(_usage(), 64, 256) == 256
    with pytest.raises(BenchmarkError, match="usage"):
        bsess.check_chat(None, 64, None)
    with pytest.raises(BenchmarkError, match="reasoning"):
        bsess.check_chat(_usage(reasoning=63), 64, None)
    with pytest.raises(BenchmarkError, match="generated 200"):
        bsess.check_chat(_usage(done=200), 64, 256)


def _response(status: str = "incomplete", out: int = 256, reasoning: int = 64, text: str = "ab") -> dict:
    return {
        "id": "resp_1",
        "status": status,
        "error": None,
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": text}]},
        ],
        "usage": {"output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning}},
    }


def test_check_session() -> None:
    assert bsess.check_session(_response(), 64, 256) == (256, 64)
    assert bsess.check_session(_response("completed"), 64, None) == (256, 64)
    with pytest.raises(BenchmarkError, match="failed"):
        bsess.check_session(_response("failed"), 64, 256)
    with pytest.raises(BenchmarkError, match="reasoning"):
        bsess.check_session(_response(reasoning=65), 64, 256)
    with pytest.raises(BenchmarkError, match="greedy chat completion 256"):
        bsess.check_session(_response(out=255), 64, 256)
    assert bsess.answer_text(_response(text="hello")) == "hello" and bsess.answer_text({}) == ""


def _events(deltas: list[str], final: str) -> list[dict]:
    evs = [{"type": "response.created"}] + [
        {"type": "response.output_text.delta", "delta": d} for d in deltas
    ]
    evs.append({"type": "response.incomplete", "response": _response(text=final)})
    for i, e in enumerate(evs):
        e["sequence_number"] = i
    return evs


def test_check_events() -> None:
    assert bsess.check_events(_events(["a", "b"], "ab"))["id"] == "resp_1"
    with pytest.raises(BenchmarkError, match="no events"):
        bsess.check_events([])
    with pytest.raises(BenchmarkError, match="differ"):
        bsess.check_events(_events(["a"], "ab"))
    gap = _events(["a", "b"], "ab")
    gap[2]["sequence_number"] = 5
    with pytest.raises(BenchmarkError, match="numbered"):
        bsess.check_events(gap)
    twice = _events(["ab"], "ab")
    twice.insert(1, {"type": "response.completed", "sequence_number": 1})
    for i, e in enumerate(twice):
        e["sequence_number"] = i
    with pytest.raises(BenchmarkError, match="terminal"):
        bsess.check_events(twice)


def test_store_summary() -> None:
    rows = [
        {"id": i, "bytes": b, "token_chunks": 16, "events": 22, "token_bytes": 2048, "event_bytes": 10_000}
        | {"request_bytes": 900, "result_bytes": 2000}
        for i, b in (("a", 15_000), ("b", 16_000), ("other", 1))
    ]
    calls = [
        {"session_id": "a", "method": "checkpoint", "s": 0.001, "tokens": 16},
        {"session_id": "a", "method": "checkpoint", "s": 0.003, "tokens": 0},
        {"session_id": "b", "method": "checkpoint", "s": 0.002, "tokens": 16},
        {"session_id": "b", "method": "finish", "s": 0.004, "tokens": 0},
        {"session_id": "other", "method": "checkpoint", "s": 9.0, "tokens": 16},
    ]
    s = bsess.store_summary(rows, calls, {"a", "b"})
    assert s["sessions"] == 2 and s["bytes_per_session"] == 15_500 and s["token_chunks_per_session"] == 16
    assert s["checkpoint_calls_per_session"] == 1.5
    assert s["checkpoint_mean_s"] == pytest.approx(0.002)
    assert s["token_checkpoint_mean_s"] == pytest.approx(0.0015)
    assert s["finish_mean_s"] == pytest.approx(0.004)
    assert s["store_write_s_per_session"] == pytest.approx(0.005)
    empty = bsess.store_summary(rows, calls, set())
    assert empty["sessions"] == 0 and math.isnan(empty["bytes_per_session"])


def test_timed_store_and_database_figures(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, 3600, 100, 10**8)
    timer = bsess.TimedStore(store)
    empty = bsess.file_bytes(path)
    store.create(SessionRecord(id="r1", tenant="t", model="m", request={"prompt_ids": [1, 2]}))
    assert store.claim("r1", "w", 10.0) is not None
    ev = Event(0, "response.created", {"type": "response.created", "sequence_number": 0})
    store.checkpoint("r1", "w", 0, [], [ev])
    store.checkpoint("r1", "w", 0, [5, 6, 7], [])
    store.checkpoint("r1", "w", 3, [8], [])
    store.finish("r1", "w", Status.INCOMPLETE, {"id": "r1"}, [])
    assert [(c["method"], c["tokens"]) for c in timer.calls] == [
        ("checkpoint", 0),
        ("checkpoint", 3),
        ("checkpoint", 1),
        ("finish", 0),
    ]
    assert all(c["session_id"] == "r1" and c["s"] >= 0 for c in timer.calls)
    (row,) = bsess.read_sessions(path)
    assert row["id"] == "r1" and row["token_chunks"] == 2 and row["token_bytes"] == 32 and row["events"] == 1
    assert (
        row["bytes"] == row["request_bytes"] + row["token_bytes"] + row["event_bytes"] + row["result_bytes"]
    )
    store.close()
    assert bsess.file_bytes(path) >= empty > 0


def test_format_report_renders_a_result() -> None:
    params = _params()
    phase = {
        "chat": bsess.summarize_mode([_sample("chat", 0.5, 0.01)]),
        "stream": bsess.summarize_mode([_sample("stream", 0.55, 0.05, first_text_s=0.2)]),
        "background": bsess.summarize_mode([_sample("background", 0.6, 0.002)]),
    }
    bsess.add_overheads(phase)
    rows = [{"id": "a", "bytes": 15_000, "token_chunks": 16, "events": 22, "token_bytes": 2048}
            | {"event_bytes": 10_000, "request_bytes": 900, "result_bytes": 2000}]  # fmt: skip
    store = {"all": bsess.store_summary(rows, [], {"a"}), "file_bytes_per_session": 20_000.0}
    res = {
        "params": params.__dict__,
        "worker_settings": {"checkpoint_tokens": 16, "checkpoint_interval_s": 0.25, "stream_poll_s": 0.05},
        "reference_completion_tokens": 256,
        "machine": {"cpu_count": 2},
        "phases": {"sequential": phase, "concurrent": phase},
        "store": {**store, "sessions_in_file": 1},
        "load_average": {},
    }
    text = bsess.format_report(res)
    assert "stream" in text and "+10.0 %" in text and "20000 bytes per session" in text
