"""Chat completions of a reasoning model: the budget, the split usage, and the reasoning text kept
out of `content` (returned in `reasoning_content` only with include_reasoning), streamed or not."""

from __future__ import annotations

import json

import httpx
import pytest

from serving.backends import EngineBackend
from serving.http.api import build_api
from serving.http.pipeline import ServedModel
from serving.replicas.engines.fake import FakeEngine
from serving.thinking import ThinkTags

START, END = 4000, 100  # apart: the fake engine never emits END by itself here
BUDGET = 5


class _Feed:
    def __init__(self) -> None:
        self.fed: list[int] = []

    def feed(self, ids: list[int]) -> str:
        self.fed += ids
        return "".join(f" t{i}" for i in ids)


class _Tok:
    """Prompts end with START (the template opens the block); ids decode to " t<id>"."""

    vocab_size = 8192

    def encode_chat(self, messages: list) -> list[int]:
        return [1, 2, 3, START]

    def encode(self, text: str) -> list[int]:
        return [1, 2]

    def decode_stream(self) -> _Feed:
        return _Feed()


def _app() -> object:
    served = ServedModel("r", 4096, _Tok(), EngineBackend(FakeEngine("r")), tags=ThinkTags(START, END))
    return build_api({"r": served})


def _body(**kw: object) -> dict:
    return {"model": "r", "messages": [{"role": "user", "content": "q"}], "max_tokens": 12, **kw}


# FakeEngine: token i of a leg = last prompt token + i + 1. Leg 1 (prompt ends with START) gives
# START+1 … START+BUDGET; then END is forced; leg 2 continues from END: END+1, END+2, …
REASONING = "".join(f" t{START + i}" for i in range(1, BUDGET + 1))
ANSWER = "".join(f" t{END + i}" for i in range(1, 12 - BUDGET))


async def _post(app: object, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("include", [False, True])
async def test_answer_only_in_content_and_reasoning_on_request(include: bool) -> None:
    r = await _post(_app(), _body(max_reasoning_tokens=BUDGET, include_reasoning=include))
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg["content"] == ANSWER
    assert ("reasoning_content" in msg) is include
    if include:
        assert msg["reasoning_content"] == REASONING
    u = body["usage"]
    assert u["completion_tokens"] == 12
    assert u["completion_tokens_details"]["reasoning_tokens"] == BUDGET


async def test_streamed_deltas_split_the_same_way() -> None:
    r = await _post(_app(), _body(max_reasoning_tokens=BUDGET, include_reasoning=True, stream=True))
    assert r.status_code == 200
    content = reasoning = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
    assert content == ANSWER and reasoning == REASONING


async def test_without_a_budget_the_unclosed_block_leaves_no_answer() -> None:
    r = await _post(_app(), _body())
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12


def test_text_stream_equals_whole_decode() -> None:
    """The real tokenizer's incremental decoder gives the same text as decoding all ids at once,
    whatever the split (multi-byte characters cut between feeds are held back)."""
    import os

    from serving.config import default_model_dir
    from serving.tokenizer import PromptTokenizer

    path = os.path.join(os.path.expanduser(default_model_dir()), "tiny-reasoning")
    assert os.path.isdir(path), f"tiny-reasoning is not built at {path}: run `make models` first"
    tok = PromptTokenizer(path)
    ids = tok.encode("Plan: café, naïve, 日本 — then rest.")
    for size in (1, 2, 3, 7):
        feed = tok.decode_stream()
        text = "".join(feed.feed(ids[i : i + size]) for i in range(0, len(ids), size))
        assert text == tok.decode(ids)
