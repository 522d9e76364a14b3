"""Context overflow: which turns truncation drops (router.truncation), the 400 when nothing can be
dropped, max_tokens clamping, and both on the request path (chat completions with the opt-in header,
/v1/responses with `truncation: "auto"`, the session record)."""

from __future__ import annotations

from typing import Any

import pytest

from router.truncation import NothingToDrop, fewest_to_drop, plan_units
from serving.sessions.request import SessionRequest
from tests.unit.test_gateway_api import CountingTokenizer, WordTokenizer, route, stack
from tests.unit.test_responses_api import rig

# -- which turns (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "turns", "kept"),
    [
        # instructions, three turns, the last turn: the oldest turns are whole user+assistant pairs
        (["system", "user", "assistant", "user", "assistant", "user"], [(1, 2), (3, 4)], (0, 5)),
        # the last turn is the last user message and everything after it
        (["user", "assistant", "user", "assistant", "tool"], [(0, 1)], (2, 3, 4)),
        # a system message in the middle is never dropped; a leading reply is its own turn
        (["assistant", "user", "system", "assistant", "user"], [(0,), (1, 3)], (2, 4)),
        # nothing before the last turn: nothing to drop
        (["system", "developer", "user"], [], (0, 1, 2)),
        # no user message at all: only the last message is the last turn
        (["assistant", "assistant"], [(0,)], (1,)),
    ],
)
def test_plan_units_keeps_instructions_and_the_last_turn(
    roles: list[str], turns: list[tuple[int, ...]], kept: tuple[int, ...]
) -> None:
    u = plan_units(roles)
    assert list(u.turns) == turns and u.kept == kept
    assert u.without(0) == list(range(len(roles)))
    if turns:
        assert u.without(1) == [i for i in range(len(roles)) if i not in turns[0]]
        assert u.dropped(1) == len(turns[0])


def test_fewest_to_drop_is_the_least_k_and_searches_in_log_steps() -> None:
    calls: list[int] = []

    def fits(k: int) -> bool:
        calls.append(k)
        return k >= 37

    assert fewest_to_drop(100, fits) == 37
    assert len(calls) <= 2 + 7  # fits(0), fits(100), then a binary search over 100
    assert fewest_to_drop(5, lambda k: True) == 0
    with pytest.raises(NothingToDrop):
        fewest_to_drop(5, lambda k: False)
    with pytest.raises(NothingToDrop):
        fewest_to_drop(0, lambda k: False)


# -- chat completions -------------------------------------------------------------------------------


def _conversation(turns: int, words: int = 10) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        msgs.append({"role": "user", "content": " ".join(f"q{i}w{j}" for j in range(words))})
        msgs.append({"role": "assistant", "content": " ".join(f"a{i}w{j}" for j in range(words))})
    msgs.append({"role": "user", "content": "and now the last question"})
    return msgs


def _tokens(msgs: list[dict[str, str]]) -> int:
    """WordTokenizer's length of a chat prompt: [1], per message [2] + words + [3], then [2]."""
    return 1 + sum(len(m["content"].split()) + 2 for m in msgs) + 1


async def test_chat_over_the_context_is_400_unless_truncation_is_asked_for() -> None:
    msgs = _conversation(20)  # 20 turns of 2 x 12 tokens: about 500 tokens, the context is 256
    async with stack() as s:
        body = {"model": "small", "messages": msgs, "max_tokens": 16}
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages" and "x-tandem-truncation: auto" in err["message"]

        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-truncation": "auto"})
        assert r.status_code == 200, r.text
        header = dict(p.split("=") for p in r.headers["x-tandem-truncated"].split("; "))
        dropped, dropped_tokens = int(header["dropped_items"]), int(header["dropped_tokens"])
        assert dropped % 2 == 0 and dropped > 0  # whole user/assistant turns
        kept = [msgs[0], *msgs[1 + dropped :]]  # the instructions, then the newest turns
        prompt = r.json()["usage"]["prompt_tokens"]
        assert prompt == _tokens(kept) and dropped_tokens == _tokens(msgs) - prompt
        assert prompt + 16 <= 256 < _tokens([msgs[0], *msgs[1 + dropped - 2 :]]) + 16  # the fewest dropped
        labels = {"model": "small", "kind": "items"}
        assert s.sample("tandem_truncations_total", **labels) == 1
        assert s.sample("tandem_truncated_tokens_total", model="small") == dropped_tokens


async def test_a_conversation_that_fits_is_left_alone_and_has_no_header() -> None:
    async with stack() as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "small", "messages": _conversation(2), "max_tokens": 4},
            headers={"x-tandem-truncation": "auto"},
        )
        assert r.status_code == 200 and "x-tandem-truncated" not in r.headers


async def test_400_when_the_instructions_and_last_turn_alone_do_not_fit() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w " * 300}]
    async with stack() as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "small", "messages": msgs, "max_tokens": 8},
            headers={"x-tandem-truncation": "auto"},
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages"
        assert "dropped all 0 earlier turns" in err["message"] and "Shorten the last turn" in err["message"]
        # With earlier turns that are not enough either, the message says how many went.
        msgs = _conversation(3) + [{"role": "user", "content": "w " * 300}]
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "small", "messages": msgs, "max_tokens": 8},
            headers={"x-tandem-truncation": "auto"},
        )
        assert (
            r.status_code == 400
            and "dropped all 4 earlier turns (7 messages)" in r.json()["error"]["message"]
        )


async def test_truncation_makes_room_for_max_tokens_and_clamping_is_separate_and_opt_in() -> None:
    msgs = _conversation(3)  # ~90 tokens
    async with stack() as s:
        # max_tokens 200 does not fit next to ~90 prompt tokens in 256: 400 by default...
        body = {"model": "small", "messages": msgs, "max_tokens": 200}
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "x-tandem-max-tokens: clamp" in r.json()["error"]["message"]
        # ... clamped to what fits when asked ...
        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-max-tokens": "clamp"})
        assert r.status_code == 200, r.text
        prompt = _tokens(msgs)
        assert r.headers["x-tandem-truncated"] == f"max_tokens=200->{256 - prompt}"
        assert "dropped_items" not in r.headers["x-tandem-truncated"]
        # ... or turns are dropped until all 200 fit, when truncation is asked for instead.
        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-truncation": "auto"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] + 200 <= 256
        assert r.headers["x-tandem-truncated"].startswith("dropped_items=")
        # Bad header values are a 400 naming the header.
        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-truncation": "yes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-tandem-truncation"
        text = {"model": "small", "prompt": "a b", "max_tokens": 9999}
        r = await s.client.post("/v1/completions", json=text, headers={"x-tandem-max-tokens": "clamp"})
        assert r.status_code == 200 and r.headers["x-tandem-truncated"] == "max_tokens=9999->253"


async def test_a_fallback_model_must_still_fit_the_truncated_conversation() -> None:
    msgs = _conversation(20)
    from tests.unit.test_gateway_api import FlakyBackend

    async with stack({"big": FlakyBackend()}, max_len={"small": 64}) as s:
        r = await s.client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": msgs, "max_tokens": 16},
            headers={"x-tandem-truncation": "auto", "x-tandem-task": "reasoning"},
        )
        # Truncated to fit big (256); small's 64 cannot hold it, so it is skipped, not overfilled.
        assert r.status_code == 503, r.text
        assert "context window 64 cannot hold" in r.json()["error"]["message"]


# -- /v1/responses ----------------------------------------------------------------------------------


def _items(turns: int, words: int = 12) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(turns):
        out.append({"role": "user", "content": " ".join(f"q{i}x{j}" for j in range(words))})
        out.append({"role": "assistant", "content": " ".join(f"a{i}x{j}" for j in range(words))})
    out.append({"role": "user", "content": "last question"})
    return out


async def test_responses_truncation_auto_completes_and_says_what_it_dropped(tmp_path) -> None:
    async with rig(tmp_path) as s:
        items = _items(30)  # 30 turns of 2 x 14 tokens: ~840 tokens, the context is 512
        r = await s.post(model="plain", input=items, instructions="answer", max_output_tokens=20)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = await s.post(
            model="plain", input=items, instructions="answer", max_output_tokens=20, truncation="auto"
        )
        assert r.status_code == 200, r.text
        obj = r.json()
        # The fake engine never stops on its own: the session ends at its output limit, with no error.
        assert obj["status"] == "incomplete" and obj["error"] is None and obj["truncation"] == "auto"
        assert obj["incomplete_details"] == {"reason": "max_output_tokens"}
        header = dict(p.split("=") for p in r.headers["x-tandem-truncated"].split("; "))
        dropped = int(header["dropped_items"])
        assert dropped > 0 and dropped % 2 == 0
        assert obj["usage"]["input_tokens"] + 20 <= 512
        rec = s.store.get(obj["id"], "a")
        req = SessionRequest.from_dict(rec.request)
        assert req.truncation == {"mode": "auto", "dropped_items": dropped,
                                  "dropped_tokens": int(header["dropped_tokens"])}  # fmt: skip
        # The stored conversation is the client's, whole: a follow-up turn is truncated afresh.
        assert len(req.messages) == len(items)
        assert r.headers["x-tandem-route"].endswith("mode=session")


async def test_responses_clamp_header_lowers_max_output_tokens_and_records_it(tmp_path) -> None:
    async with rig(tmp_path) as s:
        r = await s.client.post(
            "/v1/responses",
            json={"model": "plain", "input": "hello there", "max_output_tokens": 5000},
            headers={"x-tandem-tenant": "a", "x-tandem-max-tokens": "clamp"},
        )
        assert r.status_code == 200, r.text
        clamped = int(r.headers["x-tandem-truncated"].split("->")[1])
        req = SessionRequest.from_dict(s.store.get(r.json()["id"], "a").request)
        assert req.max_output_tokens_clamped_from == 5000 and req.max_output_tokens == clamped < 512


def test_route_helper_parses_headers() -> None:
    class R:
        headers = {"x-tandem-route": "tier=a; model=b"}

    assert route(R()) == {"tier": "a", "model": "b"}  # type: ignore[arg-type]


async def test_a_conversation_past_the_truncation_bound_is_a_400_before_it_is_tokenized() -> None:
    """Truncation tokenizes the turns it drops: a conversation more than http.max_truncated_contexts
    contexts long (in characters) is refused before any of it is tokenized, with the bound named."""
    msgs = _conversation(200)  # ~20,000 characters; the context is 256 tokens: 2,048 x 4 = 8,192
    tok = CountingTokenizer(WordTokenizer())
    async with stack(tokenizers={"small": tok}) as s:
        body = {"model": "small", "messages": msgs, "max_tokens": 16}
        r = await s.client.post("/v1/chat/completions", json=body, headers={"x-tandem-truncation": "auto"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "http.max_truncated_contexts" in err["message"]
        assert tok.calls == 0
        # Without truncation the same conversation gets no truncation hint (it could not be served).
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "x-tandem-truncation" not in r.json()["error"]["message"]
