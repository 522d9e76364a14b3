"""Reasoning budgets: one generation run as a series of engine calls ("legs").

A reasoning model thinks inside `<think>…</think>` (both tags single tokens, see
`config.ReasoningSpec`). `ThinkingRun` generates a request so that the reasoning never exceeds its
budget and an answer still follows:

- a leg asks the engine for at most `budget - reasoning so far` tokens while the block is open, so
  the engine itself stops at the budget (no abort race, no token generated past it);
- when a leg stops there with the block still open, the run appends the closing tag as a token
  (a "forced" token, sent as a chunk with no text) and starts the next leg with
  `prompt + generated` as its prompt, which continues with the answer;
- a leg that stops on its length cap for any other reason (the model closed the block itself
  partway) is simply continued the same way until `max_tokens`.

The same mechanism resumes a generation from a checkpoint: `generated` given at construction is
replayed as prompt (re-prefill) and the run continues from there (serving.sessions.worker).

Token-level rule: the block ends at the **first** closing tag after it opens. Text already sent to
a client (or stored as a resumable event) cannot be taken back, so a later `</think>` belongs to
the answer. Whether the block is open at the start follows `prompt_ids` (a chat template that ends
with `<think>`, as tiny-reasoning's and DeepSeek-R1's do) and, if not, whether the model's first
token is the opening tag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from serving.replicas.engines.base import Chunk, GenerateRequest


@dataclass(frozen=True, slots=True)
class ThinkTags:
    """Token ids of a model's reasoning tags."""

    start: int
    end: int


class ReasoningState:
    """Where a generation is with respect to its reasoning block, token by token.

    States: `before` (the block may still open: nothing generated yet and no block open), `reasoning`,
    `answer`. `reasoning_tokens` counts tokens inside the block, tags excluded.
    """

    def __init__(self, prompt_ids: list[int], tags: ThinkTags | None) -> None:
        self.tags = tags
        self.reasoning_tokens = 0
        if tags is None:
            self.state = "answer"
        elif _last_index(prompt_ids, tags.start) > _last_index(prompt_ids, tags.end):
            self.state = "reasoning"
        else:
            self.state = "before"

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"

    def feed(self, token: int) -> None:
        """Advance over one generated token."""
        tags = self.tags
        if tags is None:
            return
        if self.state == "before":
            self.state = "reasoning" if token == tags.start else "answer"
        elif self.state == "reasoning":
            if token == tags.end:
                self.state = "answer"
            else:
                self.reasoning_tokens += 1


def split_generated(prompt_ids: list[int], generated: list[int], tags: ThinkTags | None) -> tuple[int, int]:
    """(r, a): the reasoning is `generated[r:a]` less its closing tag, the answer `generated[a:]`.

    For a model without tags, or a generation that never opened a block: (0, 0), all answer. A
    block that never closed: a == len(generated), no answer.
    """
    state = ReasoningState(prompt_ids, tags)
    if tags is None or state.state == "before" and (not generated or generated[0] != tags.start):
        return 0, 0
    r = 0 if state.state == "reasoning" else 1
    try:
        end = generated.index(tags.end, r)
    except ValueError:
        return r, len(generated)
    return r, end + 1


def reasoning_tags(spec: Any, model: str, tokenizer: Any) -> ThinkTags | None:
    """Token ids of `model`'s reasoning tags from the deployment spec (None: not a reasoning model).
    `tokenizer.token_id` raises ValueError when a tag is not a single token."""
    r = spec.model(model).reasoning
    if r is None:
        return None
    return ThinkTags(tokenizer.token_id(r.start_tag), tokenizer.token_id(r.end_tag))


def _last_index(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


StreamFn = Callable[[GenerateRequest], AsyncIterator[Chunk]]


class TextFeed(Protocol):
    """An incremental decoder (serving.tokenizer.TextStream)."""

    def feed(self, ids: list[int]) -> str: ...


class ThinkingRun:
    """Generates `request` (prompt + already `generated` ids) up to `max_tokens` generated tokens in all,
    with at most `budget` reasoning tokens.

    Chunks are yielded as the engine sends them, with counts for the whole run: `completion_tokens`
    and `reasoning_tokens` are cumulative (including `generated`), `prompt_tokens` is the original
    prompt's, `cached_tokens` the first leg's. Only the run's last chunk carries a finish reason. An
    error chunk ends the run (the caller may resume from `generated`).

    Args:
        stream: opens an engine stream for one leg (closing it aborts that leg).
        request: the original request; its `sampling.max_tokens` is ignored (see `max_tokens`).
        max_tokens: generated tokens allowed in all (`generated` included).
        budget: reasoning tokens allowed (None: no budget).
        tags: the model's reasoning tags (None: not a reasoning model; budget must then be None).
        generated: ids already generated (a resumed run); they are replayed as prompt.
        text: makes an incremental decoder. When given, each chunk's `text` is the answer text of
            its tokens and `reasoning_text` the reasoning text, split exactly at the tag tokens
            (decoded here from the ids, not taken from the engine). Without it, `text` is the
            engine's, reasoning and answer alike.
    """

    def __init__(
        self,
        stream: StreamFn,
        request: GenerateRequest,
        max_tokens: int,
        budget: int | None = None,
        tags: ThinkTags | None = None,
        generated: list[int] | None = None,
        text: Callable[[], TextFeed] | None = None,
    ) -> None:
        if budget is not None and tags is None:
            raise ValueError("a reasoning budget needs the model's reasoning tags")
        self._stream = stream
        self._request = request
        self.max_tokens = max_tokens
        self.budget = budget
        self.tags = tags
        self.generated: list[int] = list(generated or [])
        self.state = ReasoningState(request.prompt_token_ids, tags)
        for t in self.generated:
            self.state.feed(t)
        self.legs = 0
        #: Closing tags this run appended itself (the budget ran out).
        self.forced = 0
        self.finish_reason: str | None = None
        self._cached: int | None = None
        self._answer_text = text() if text is not None else None
        self._reasoning_text = text() if text is not None else None

    @property
    def reasoning_tokens(self) -> int:
        return self.state.reasoning_tokens

    def _chunk(self, base: Chunk, finish: str | None) -> Chunk:
        return dataclasses.replace(
            base,
            finish_reason=finish,
            prompt_tokens=len(self._request.prompt_token_ids),
            completion_tokens=len(self.generated),
            cached_tokens=self._cached or 0,
            reasoning_tokens=self.state.reasoning_tokens,
        )

    def _feed(self, chunk: Chunk) -> Chunk:
        """Advance the reasoning state over the chunk's tokens (and split its text, if decoding)."""
        if self._answer_text is None or self._reasoning_text is None:
            for t in chunk.token_ids:
                self.state.feed(t)
            return chunk
        tags = self.tags
        reasoning: list[int] = []
        answer: list[int] = []
        for t in chunk.token_ids:
            inside = self.state.state == "reasoning"
            self.state.feed(t)
            if tags is not None and t in (tags.start, tags.end):
                continue
            (reasoning if inside else answer).append(t)
        return dataclasses.replace(
            chunk, text=self._answer_text.feed(answer), reasoning_text=self._reasoning_text.feed(reasoning)
        )

    def _leg_cap(self) -> int:
        remaining = self.max_tokens - len(self.generated)
        if self.budget is None:
            return remaining
        if self.state.state == "reasoning":
            return min(remaining, self.budget - self.state.reasoning_tokens)
        if self.state.state == "before":
            # The first token may open the block: room for the tag and the whole budget.
            return min(remaining, self.budget + 1)
        return remaining

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The run's chunks (see the class docstring)."""
        req = self._request
        while True:
            if len(self.generated) >= self.max_tokens:
                self.finish_reason = "length"
                yield self._chunk(Chunk(), "length")
                return
            cap = self._leg_cap()
            if cap <= 0:
                # The budget is spent inside the block: close it ourselves.
                assert self.tags is not None
                self.generated.append(self.tags.end)
                self.state.feed(self.tags.end)
                self.forced += 1
                yield self._chunk(Chunk(token_ids=[self.tags.end]), None)
                continue
            self.legs += 1
            sampling = dataclasses.replace(
                req.sampling,
                max_tokens=cap,
                min_tokens=min(cap, max(0, req.sampling.min_tokens - len(self.generated))),
            )
            leg = dataclasses.replace(
                req,
                request_id=req.request_id if self.legs == 1 else f"{req.request_id}.{self.legs}",
                prompt_token_ids=req.prompt_token_ids + self.generated,
                sampling=sampling,
            )
            leg_finish: str | None = None
            before = len(self.generated)
            stream = self._stream(leg)
            try:
                async for chunk in stream:
                    if chunk.error is not None:
                        self.finish_reason = "error"
                        yield chunk
                        return
                    if self._cached is None:
                        self._cached = chunk.cached_tokens
                    chunk = self._feed(chunk)
                    self.generated.extend(chunk.token_ids)
                    leg_finish = chunk.finish_reason
                    # A leg cut short that made progress is continued (an engine that stops a leg
                    # with nothing generated, e.g. at its context limit, ends the run).
                    go_on = leg_finish == "length" and before < len(self.generated) < self.max_tokens
                    if leg_finish is not None and not go_on:
                        self.finish_reason = leg_finish
                        yield self._chunk(chunk, leg_finish)
                        return
                    yield self._chunk(chunk, None)
                    if leg_finish is not None:
                        break
            finally:
                await stream.aclose()
            if leg_finish is None:
                # The engine ended the stream without a finish reason (aborted under us).
                self.finish_reason = "abort"
                yield self._chunk(Chunk(), "abort")
                return
