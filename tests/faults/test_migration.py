"""Faults on the live stack (real Ray Serve, real vLLM on CPU): a decode replica killed in the middle of a
greedy chat stream. The ingress continues the same response on the restarted replica from prompt + the
tokens already sent (serving.http.migration): the client gets one stream whose text equals an
uninterrupted run's, token for token."""

from __future__ import annotations

import json
import threading
import time

import httpx

INTENT = "tiny-intent"
#: Long enough that the kill lands mid-stream (ignore_eos keeps the tiny model going).
TOKENS = 600


def _body() -> dict:
    return {
        "model": INTENT,
        "messages": [{"role": "user", "content": "Count slowly and tell me about the sea."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _stream(url: str, on_chunk=None) -> tuple[str, list[dict], float]:
    """The streamed text, every event, and the longest gap between two events."""
    events: list[dict] = []
    text: list[str] = []
    gap, prev = 0.0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(), timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.monotonic()
            gap = max(gap, now - prev) if prev is not None else 0.0
            prev = now
            ev = json.loads(line[6:])
            events.append(ev)
            if ev.get("choices"):
                text.append(ev["choices"][0]["delta"].get("content") or "")
            if on_chunk is not None:
                on_chunk(len(events))
    return "".join(text), events, gap


def test_decode_replica_killed_mid_stream_the_client_gets_the_uninterrupted_text(
    stack, campaign, tmp_path
) -> None:
    import ray

    from tests.faults.tools import Traffic, longest, mix, outcomes, settle, wait_released, wait_serving

    want, ref_events, _ = _stream(stack.url)
    assert ref_events[-1]["usage"]["completion_tokens"] == TOKENS

    handle = stack.engine_handle(INTENT)
    replica = handle.replica.remote().result()
    actor = ray.get_actor(f"SERVE_REPLICA::tandem#{replica}", namespace="serve")
    killed: dict[str, float] = {}
    lock = threading.Lock()

    def kill_after(n: int) -> None:
        with lock:
            if n >= 20 and "at" not in killed:
                killed["at"] = time.monotonic()
                killed["chunks"] = n
                ray.kill(actor, no_restart=True)

    # Locust traffic on the same replica (intent calls and 2-turn agent sessions) while it dies.
    load = mix(40, rate=1.0, seed=11, reasoning=False)
    traffic = Traffic(stack.url, load, tmp_path)
    time.sleep(8)
    got, events, gap = _stream(stack.url, kill_after)
    records = traffic.records()
    finals = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
    wait_serving(stack.url, INTENT)
    dec = settle(stack, INTENT)
    held = wait_released(stack.url)
    campaign.record(
        "fault", "kill decode replica mid-stream (under traffic)",
        probe="completed" if got == want else "differs", killed_after_chunks=killed.get("chunks"),
        migrations=len(finals[0].get("x_tandem_migrations") or []) if finals else None,
        tokens_lost_or_duplicated=0 if got == want else abs(len(got) - len(want)) or "differs",
        longest_gap_s=round(gap, 1), clients=outcomes(records), longest_request_s=round(longest(records), 1),
        recovered_s=round(time.monotonic() - killed["at"], 1) if "at" in killed else None,
        held=held, engine_running=dec.running,
    )  # fmt: skip
    assert not [r for r in records if r["outcome"] != "ok" and not (r["status"] and r.get("reason"))]
    assert "at" in killed, "the stream ended before the kill"
    finals = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
    assert len(finals) == 1
    migrations = finals[0].get("x_tandem_migrations")
    print(
        f"\ndecode replica killed after {killed['chunks']} chunks: migrations={migrations}, "
        f"longest gap {gap:.1f}s, {events[-1]['usage']['completion_tokens']} tokens"
    )
    assert not any("error" in e for e in events), events[-3:]
    assert migrations and migrations[0]["reason"] == "error" and migrations[0]["model"] == INTENT
    assert got == want  # token for token: nothing repeated, nothing lost
    assert events[-1]["usage"]["completion_tokens"] == TOKENS
    assert events[-1]["usage"]["prompt_tokens"] == ref_events[-1]["usage"]["prompt_tokens"]
    assert gap < 120, "the continuation waited for the replacement replica, within its first-token timeout"
