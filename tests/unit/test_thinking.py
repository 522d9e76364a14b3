"""Reasoning budgets (serving.thinking): a run as a series of engine legs, the closing tag forced when
the budget is spent, resuming from already-generated ids, run-wide counts, errors and aborts.

The engine is a scripted model: its next token is a deterministic function of the whole prefix
(prompt + generated so far), so a leg that re-prefills `prompt + generated` continues exactly where
the previous one stopped, and any wrong prefix (a missing or extra id) changes the output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from serving.replicas.engines.base import Chunk, EngineError, GenerateRequest, SamplingOptions
from serving.replicas.engines.fake import FakeEngine
from serving.thinking import ReasoningState, ThinkingRun, ThinkTags, split_generated

START, END, EOS = 900, 901, 902
TAGS = ThinkTags(start=START, end=END)
PLAIN = [5, 6, 7]  # a prompt that does not open the block
OPEN = [5, 6, 7, START]  # a chat template ending with <think>


# --------------------------------------------------------------------------------------------
# The scripted model
# --------------------------------------------------------------------------------------------


@dataclass
class Leg:
    """One engine call the run made, as the model saw it."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int
    request: GenerateRequest
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    #: The generator's `finally` ran (the stream was closed or ran to its end).
    closed: bool = False
    #: It was closed at a `yield` (GeneratorExit), i.e. by aclose() rather than by running out.
    closed_at_yield: bool = False


class Model:
    """Next token = f(prefix). Positions count generated tokens of the whole run (after the original
    prompt of `prompt_len` ids), so the behaviour does not depend on how the run is cut into legs.

    Args:
        prompt_len: length of the run's original prompt.
        start_at: position where the model emits START (None: never).
        end_at: positions where it emits END (empty: it never closes the block itself).
        eos_at: position where it emits EOS and stops with finish "stop" (None: never).
        per_chunk: tokens per chunk (the last chunk of a leg may hold fewer).
        faults: leg number (1-based) -> (kind, after): after `after` tokens of that leg, "error" sends an
            error chunk, "vanish" ends the stream with no finish reason, "abort" sends finish "abort".
        cached: leg number -> cached_tokens it reports.
    """

    def __init__(
        self,
        prompt_len: int,
        *,
        start_at: int | None = None,
        end_at: tuple[int, ...] = (),
        eos_at: int | None = None,
        per_chunk: int = 1,
        faults: dict[int, tuple[str, int]] | None = None,
        cached: dict[int, int] | None = None,
    ) -> None:
        self.prompt_len = prompt_len
        self.start_at = start_at
        self.end_at = end_at
        self.eos_at = eos_at
        self.per_chunk = per_chunk
        self.faults = faults or {}
        self.cached = cached or {}
        self.legs: list[Leg] = []
        self.errors: list[Chunk] = []

    def next_token(self, prefix: list[int]) -> int:
        p = len(prefix) - self.prompt_len
        if p == self.start_at:
            return START
        if p in self.end_at:
            return END
        if p == self.eos_at:
            return EOS
        h = 0
        for t in prefix:
            h = (h * 31 + t) % 1_000_003
        return 10 + h % 800  # never a tag nor EOS

    async def stream(self, req: GenerateRequest):
        leg = Leg(
            request_id=req.request_id,
            prompt=list(req.prompt_token_ids),
            max_tokens=req.sampling.max_tokens,
            min_tokens=req.sampling.min_tokens,
            request=req,
        )
        self.legs.append(leg)
        number = len(self.legs)
        fault = self.faults.get(number)
        cached = self.cached.get(number, 0)
        prefix = list(req.prompt_token_ids)
        cap = req.sampling.max_tokens
        n = 0
        try:
            while n < cap:
                if fault is not None and n >= fault[1]:
                    kind = fault[0]
                    if kind == "error":
                        err = Chunk(error=EngineError("engine died", 503))
                        self.errors.append(err)
                        yield err
                    elif kind == "abort":
                        leg.finish = "abort"
                        yield Chunk(
                            finish_reason="abort",
                            prompt_tokens=len(prefix) - n,
                            completion_tokens=n,
                            cached_tokens=cached,
                        )
                    return  # "vanish": no finish reason at all
                toks: list[int] = []
                finish = None
                while len(toks) < self.per_chunk and n < cap:
                    if fault is not None and n >= fault[1]:
                        break
                    t = self.next_token(prefix)
                    prefix.append(t)
                    toks.append(t)
                    n += 1
                    if t == EOS:
                        finish = "stop"
                        break
                if finish is None and n >= cap:
                    finish = "length"
                leg.tokens.extend(toks)
                leg.finish = finish
                yield Chunk(
                    text="".join(f" t{t}" for t in toks),
                    token_ids=toks,
                    finish_reason=finish,
                    prompt_tokens=len(req.prompt_token_ids),
                    completion_tokens=n,
                    cached_tokens=cached,
                )
                if finish is not None:
                    return
        except GeneratorExit:
            leg.closed_at_yield = True
            raise
        finally:
            leg.closed = True


def request(prompt: list[int], **sampling) -> GenerateRequest:
    sampling.setdefault("max_tokens", 1)
    return GenerateRequest(
        request_id="req", prompt_token_ids=list(prompt), sampling=SamplingOptions(**sampling)
    )


async def collect(run: ThinkingRun) -> list[Chunk]:
    return [c async for c in run.chunks()]


def ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def run_model(
    model: Model,
    prompt: list[int],
    max_tokens: int,
    budget: int | None,
    tags: ThinkTags | None = TAGS,
    generated: list[int] | None = None,
    **sampling,
) -> tuple[ThinkingRun, list[Chunk]]:
    run = ThinkingRun(model.stream, request(prompt, **sampling), max_tokens, budget, tags, generated)
    return run, await collect(run)


def expected(
    model: Model, prompt: list[int], max_tokens: int, budget: int | None, generated: list[int] | None = None
) -> tuple[list[int], int, int, str]:
    """An independent, token-by-token oracle: (full output, reasoning tokens, forced, finish)."""
    out = list(generated or [])
    last_start = max((i for i, t in enumerate(prompt) if t == START), default=-1)
    last_end = max((i for i, t in enumerate(prompt) if t == END), default=-1)
    state = "reasoning" if last_start > last_end else "before"
    reasoning = forced = 0

    def advance(t: int) -> None:
        nonlocal state, reasoning
        if state == "before":
            state = "reasoning" if t == START else "answer"
        elif state == "reasoning":
            if t == END:
                state = "answer"
            else:
                reasoning += 1

    for t in out:
        advance(t)
    finish = "length"
    while len(out) < max_tokens:
        if state == "reasoning" and budget is not None and reasoning >= budget:
            t = END
            forced += 1
        else:
            t = model.next_token(prompt + out)
        out.append(t)
        advance(t)
        if t == EOS:
            finish = "stop"
            break
    return out, reasoning, forced, finish


def check_counts(chunks: list[Chunk], run: ThinkingRun, prompt: list[int], resumed: int = 0) -> None:
    """Every chunk carries run-wide counts; only the last one a finish reason."""
    assert chunks
    total = resumed
    last_reasoning = -1
    for i, c in enumerate(chunks):
        total += len(c.token_ids)
        assert c.prompt_tokens == len(prompt)
        assert c.completion_tokens == total
        assert c.reasoning_tokens >= last_reasoning
        last_reasoning = c.reasoning_tokens
        if run.budget is not None:
            assert c.reasoning_tokens <= run.budget
        if i < len(chunks) - 1:
            assert c.finish_reason is None
    assert chunks[-1].finish_reason == run.finish_reason is not None
    assert chunks[-1].completion_tokens == len(run.generated)
    assert chunks[-1].reasoning_tokens == run.reasoning_tokens


def forced_chunks(chunks: list[Chunk]) -> list[Chunk]:
    return [c for c in chunks if c.token_ids == [END] and c.text == ""]


# --------------------------------------------------------------------------------------------
# The model never closes the block: the budget closes it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_chunk", [1, 2, 3])
async def test_budget_forces_the_closing_tag_and_the_answer_follows(per_chunk: int) -> None:
    b, m = 5, 12
    model = Model(len(OPEN), per_chunk=per_chunk)
    run, chunks = await run_model(model, OPEN, m, b)
    gen = ids(chunks)

    assert gen == run.generated
    assert run.reasoning_tokens == b
    assert gen.count(END) == 1 and gen.index(END) == b
    assert run.forced == 1
    forced = forced_chunks(chunks)
    assert len(forced) == 1
    assert forced[0].completion_tokens == b + 1 and forced[0].reasoning_tokens == b
    assert forced[0].finish_reason is None
    assert len(gen[b + 1 :]) == m - b - 1 and END not in gen[b + 1 :]  # the answer
    assert chunks[-1].completion_tokens == m
    assert chunks[-1].finish_reason == "length" and run.finish_reason == "length"

    assert run.legs == 2 and len(model.legs) == 2
    first, second = model.legs
    assert first.prompt == OPEN and first.max_tokens == b and first.request_id == "req"
    assert second.prompt == OPEN + gen[:b] + [END]
    assert second.max_tokens == m - b - 1 and second.request_id == "req.2"
    assert gen == first.tokens + [END] + second.tokens
    assert (gen, b, 1, "length") == expected(model, OPEN, m, b)
    check_counts(chunks, run, OPEN)


async def test_forced_tag_is_the_last_token_when_max_tokens_leaves_room_for_it_only() -> None:
    b = 4
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, b + 1, b)
    assert run.generated[-1] == END and run.generated.index(END) == b
    assert run.forced == 1 and run.legs == 1
    assert run.finish_reason == "length" and chunks[-1].completion_tokens == b + 1
    check_counts(chunks, run, OPEN)


async def test_no_room_to_close_when_max_tokens_equals_the_budget() -> None:
    b = 4
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, b, b)
    assert END not in run.generated and len(run.generated) == b
    assert run.forced == 0 and run.legs == 1 and run.reasoning_tokens == b
    assert run.finish_reason == "length"
    check_counts(chunks, run, OPEN)


async def test_zero_budget_closes_an_open_block_before_any_token() -> None:
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, 6, 0)
    assert chunks[0].token_ids == [END] and chunks[0].text == ""
    assert run.generated[0] == END and run.generated.count(END) == 1
    assert run.reasoning_tokens == 0 and run.forced == 1
    assert run.legs == 1 and model.legs[0].prompt == OPEN + [END] and model.legs[0].max_tokens == 5
    assert (run.generated, 0, 1, "length") == expected(model, OPEN, 6, 0)
    check_counts(chunks, run, OPEN)


async def test_a_later_closing_tag_belongs_to_the_answer() -> None:
    # The model would close at position 7, but the budget closed the block at 3 already.
    b, m = 3, 12
    model = Model(len(OPEN), end_at=(7,))
    run, chunks = await run_model(model, OPEN, m, b)
    assert run.generated.count(END) == 2
    assert run.generated.index(END) == b and run.generated[7] == END
    assert run.reasoning_tokens == b and run.forced == 1
    assert chunks[-1].reasoning_tokens == b
    assert split_generated(OPEN, run.generated, TAGS) == (0, b + 1)
    check_counts(chunks, run, OPEN)


# --------------------------------------------------------------------------------------------
# The model closes the block itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_chunk", [1, 4])
async def test_model_closing_before_the_budget_forces_nothing(per_chunk: int) -> None:
    b, m, end = 6, 15, 3
    model = Model(len(OPEN), end_at=(end,), per_chunk=per_chunk)
    run, chunks = await run_model(model, OPEN, m, b)

    ref_model = Model(len(OPEN), end_at=(end,))
    ref, ref_chunks = await run_model(ref_model, OPEN, m, None)
    assert ref.legs == 1  # no budget: one uninterrupted generation

    assert ids(chunks) == run.generated == ids(ref_chunks)
    assert run.forced == 0 and not forced_chunks(chunks)
    assert run.reasoning_tokens == end == ref.reasoning_tokens
    assert run.generated.index(END) == end and run.generated.count(END) == 1
    assert run.finish_reason == "length" and chunks[-1].completion_tokens == m
    # The first leg stopped at the budget's cap and was simply continued.
    assert [leg.max_tokens for leg in model.legs] == [b, m - b]
    assert model.legs[1].prompt == OPEN + run.generated[:b]
    check_counts(chunks, run, OPEN)


async def test_model_closing_on_the_last_budget_token_forces_nothing() -> None:
    b, m = 4, 10
    model = Model(len(OPEN), end_at=(b - 1,))
    run, chunks = await run_model(model, OPEN, m, b)
    assert run.generated.count(END) == 1 and run.generated.index(END) == b - 1
    assert run.forced == 0 and run.reasoning_tokens == b - 1
    assert (run.generated, b - 1, 0, "length") == expected(model, OPEN, m, b)
    check_counts(chunks, run, OPEN)


# --------------------------------------------------------------------------------------------
# Prompt does not open the block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_chunk", [1, 3])
async def test_first_generated_start_tag_opens_the_block(per_chunk: int) -> None:
    b, m = 4, 12
    model = Model(len(PLAIN), start_at=0, per_chunk=per_chunk)
    run, chunks = await run_model(model, PLAIN, m, b)
    gen = run.generated
    assert gen[0] == START
    assert run.reasoning_tokens == b  # START itself is not counted
    assert gen.count(END) == 1 and gen.index(END) == b + 1
    assert run.forced == 1 and len(forced_chunks(chunks)) == 1
    assert model.legs[0].max_tokens == b + 1  # room for the tag and the whole budget
    assert model.legs[1].prompt == PLAIN + gen[: b + 1] + [END]
    assert run.finish_reason == "length" and len(gen) == m
    assert (gen, b, 1, "length") == expected(model, PLAIN, m, b)
    check_counts(chunks, run, PLAIN)


async def test_first_generated_start_tag_then_model_closes_itself() -> None:
    b, m = 5, 12
    model = Model(len(PLAIN), start_at=0, end_at=(3,))
    run, chunks = await run_model(model, PLAIN, m, b)
    assert run.generated[0] == START and run.generated.index(END) == 3
    assert run.reasoning_tokens == 2 and run.forced == 0
    assert (run.generated, 2, 0, "length") == expected(model, PLAIN, m, b)
    check_counts(chunks, run, PLAIN)


async def test_zero_budget_with_a_generated_start_tag() -> None:
    model = Model(len(PLAIN), start_at=0)
    run, chunks = await run_model(model, PLAIN, 6, 0)
    assert run.generated[:2] == [START, END]
    assert run.reasoning_tokens == 0 and run.forced == 1
    assert model.legs[0].max_tokens == 1
    check_counts(chunks, run, PLAIN)


@pytest.mark.parametrize(("budget", "m"), [(None, 12), (11, 12), (20, 12)])
async def test_no_block_opened_is_one_plain_leg(budget: int | None, m: int) -> None:
    # A START or END later in the output is just answer text.
    model = Model(len(PLAIN), start_at=3, end_at=(5,))
    run, chunks = await run_model(model, PLAIN, m, budget)
    assert run.generated[0] not in (START, END)
    assert run.reasoning_tokens == 0 and all(c.reasoning_tokens == 0 for c in chunks)
    assert run.forced == 0 and not forced_chunks(chunks)
    assert run.legs == 1 and model.legs[0].prompt == PLAIN and model.legs[0].max_tokens == m
    assert run.finish_reason == "length" and len(run.generated) == m
    assert run.generated[3] == START and run.generated[5] == END
    check_counts(chunks, run, PLAIN)


async def test_no_block_opened_with_a_small_budget_gives_the_unbudgeted_output() -> None:
    # The first leg cannot know whether the block will open, so it is capped at budget + 1 and then
    # continued (documented: a leg stopping on its cap for another reason is simply continued).
    b, m = 3, 12
    model = Model(len(PLAIN), start_at=6, end_at=(8,))
    run, chunks = await run_model(model, PLAIN, m, b)
    ref, ref_chunks = await run_model(Model(len(PLAIN), start_at=6, end_at=(8,)), PLAIN, m, None)
    assert run.generated == ids(chunks) == ids(ref_chunks) == ref.generated
    assert run.reasoning_tokens == 0 and run.forced == 0
    assert model.legs[0].max_tokens == b + 1
    assert run.legs == 2 and model.legs[1].prompt == PLAIN + run.generated[: b + 1]
    check_counts(chunks, run, PLAIN)


# --------------------------------------------------------------------------------------------
# Stop inside the block
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "start_at", "eos_at"), [(OPEN, None, 2), (OPEN, None, 4), (PLAIN, 0, 3)])
async def test_eos_inside_the_block_before_the_budget_stops_the_run(
    prompt: list[int], start_at: int | None, eos_at: int
) -> None:
    b, m = 5, 20
    model = Model(len(prompt), start_at=start_at, eos_at=eos_at)
    run, chunks = await run_model(model, prompt, m, b)
    assert run.finish_reason == "stop" and chunks[-1].finish_reason == "stop"
    assert run.generated[-1] == EOS and len(run.generated) == eos_at + 1
    assert run.forced == 0 and END not in run.generated
    assert run.legs == 1
    # Every generated token is inside the (never closed) block, the opening tag excepted.
    assert run.reasoning_tokens == eos_at + 1 - (1 if start_at == 0 else 0)
    assert (run.generated, run.reasoning_tokens, 0, "stop") == expected(model, prompt, m, b)
    check_counts(chunks, run, prompt)


async def test_eos_in_the_answer_after_a_forced_close() -> None:
    b, m = 3, 20
    model = Model(len(OPEN), eos_at=7)
    run, chunks = await run_model(model, OPEN, m, b)
    assert run.forced == 1 and run.generated.index(END) == b
    assert run.finish_reason == "stop" and run.generated[-1] == EOS and len(run.generated) == 8
    assert run.legs == 2
    check_counts(chunks, run, OPEN)


# --------------------------------------------------------------------------------------------
# Not a reasoning model
# --------------------------------------------------------------------------------------------


async def test_no_tags_no_budget_is_a_plain_passthrough() -> None:
    m = 9
    model = Model(len(OPEN), end_at=(2,), per_chunk=2, cached={1: 3})
    direct = [
        c
        async for c in Model(len(OPEN), end_at=(2,), per_chunk=2, cached={1: 3}).stream(
            request(OPEN, max_tokens=m)
        )
    ]
    run, chunks = await run_model(model, OPEN, m, None, tags=None)
    assert run.legs == 1 and model.legs[0].prompt == OPEN and model.legs[0].max_tokens == m
    assert [(c.token_ids, c.text, c.finish_reason, c.completion_tokens, c.cached_tokens) for c in chunks] == [
        (c.token_ids, c.text, c.finish_reason, c.completion_tokens, c.cached_tokens) for c in direct
    ]
    assert run.reasoning_tokens == 0 and all(c.reasoning_tokens == 0 for c in chunks)
    assert run.forced == 0 and run.finish_reason == "length"
    check_counts(chunks, run, OPEN)


async def test_no_tags_over_the_fake_engine() -> None:
    engine = FakeEngine("tiny")
    run = ThinkingRun(engine.generate, request([1, 2, 40], max_tokens=2), 5)
    chunks = await collect(run)
    assert ids(chunks) == [41, 42, 43, 44, 45]
    assert "".join(c.text for c in chunks) == " t41 t42 t43 t44 t45"
    assert run.legs == 1 and run.finish_reason == "length"
    check_counts(chunks, run, [1, 2, 40])


async def test_budget_over_the_fake_engine() -> None:
    # FakeEngine: token i = last prompt token + i + 1. The prompt ends with START=100.
    tags = ThinkTags(start=100, end=4000)
    engine = FakeEngine("tiny")
    run = ThinkingRun(engine.generate, request([1, 100], max_tokens=50), 8, budget=3, tags=tags)
    chunks = await collect(run)
    assert ids(chunks) == [101, 102, 103, 4000, 4001, 4002, 4003, 4004]
    assert run.reasoning_tokens == 3 and run.forced == 1 and run.legs == 2
    assert chunks[3].token_ids == [4000] and chunks[3].text == ""
    check_counts(chunks, run, [1, 100])


def test_budget_without_tags_is_refused() -> None:
    with pytest.raises(ValueError):
        ThinkingRun(Model(3).stream, request(PLAIN), 10, budget=5, tags=None)
    ThinkingRun(Model(3).stream, request(PLAIN), 10, budget=None, tags=None)  # fine


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------

SCENARIOS = {
    "open-never-closes": (OPEN, dict(), 4, 10),
    "open-never-closes-chunks": (OPEN, dict(per_chunk=3), 4, 10),
    "open-closes-itself": (OPEN, dict(end_at=(2,)), 5, 10),
    "open-later-end-in-answer": (OPEN, dict(end_at=(6,)), 3, 10),
    "start-first-forced": (PLAIN, dict(start_at=0, per_chunk=2), 3, 9),
    "start-first-closes": (PLAIN, dict(start_at=0, end_at=(4,)), 6, 10),
    "no-block": (PLAIN, dict(start_at=2, end_at=(4,)), 3, 9),
    "open-eos-in-reasoning": (OPEN, dict(eos_at=2), 4, 10),
    "open-eos-in-answer": (OPEN, dict(eos_at=6, per_chunk=2), 3, 10),
    "zero-budget": (OPEN, dict(), 0, 5),
    "no-budget": (OPEN, dict(end_at=(3,)), None, 8),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_resume_from_every_cut_gives_the_uninterrupted_output(name: str) -> None:
    prompt, behaviour, b, m = SCENARIOS[name]
    full_run, full_chunks = await run_model(Model(len(prompt), **behaviour), prompt, m, b)
    full = full_run.generated
    assert (full, full_run.reasoning_tokens, full_run.forced, full_run.finish_reason) == expected(
        Model(len(prompt), **behaviour), prompt, m, b
    )

    # A finished "stop" run is not resumed: its last cut is right before the EOS.
    cuts = range(len(full) + 1) if full_run.finish_reason == "length" else range(len(full))
    for cut in cuts:
        model = Model(len(prompt), **behaviour)
        run, chunks = await run_model(model, prompt, m, b, generated=full[:cut])
        assert full[:cut] + ids(chunks) == run.generated == full, cut
        assert chunks[-1].completion_tokens == full_chunks[-1].completion_tokens, cut
        assert run.reasoning_tokens == full_run.reasoning_tokens, cut
        assert chunks[-1].reasoning_tokens == full_chunks[-1].reasoning_tokens, cut
        if cut < len(full):
            assert run.finish_reason == full_run.finish_reason, cut
        check_counts(chunks, run, prompt, resumed=cut)
        if model.legs:
            # The already-generated ids are replayed as prompt.
            assert model.legs[0].prompt[: len(prompt) + cut] == prompt + full[:cut]
            assert model.legs[0].request_id == "req"


async def test_resume_right_before_and_after_the_forced_tag() -> None:
    b, m = 4, 10
    full_run, _ = await run_model(Model(len(OPEN)), OPEN, m, b)
    full = full_run.generated
    assert full[b] == END

    # Cut before the forced tag: the resumed run forces it itself, before any leg.
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, m, b, generated=full[:b])
    assert chunks[0].token_ids == [END] and chunks[0].text == ""
    assert chunks[0].completion_tokens == b + 1 and chunks[0].reasoning_tokens == b
    assert run.forced == 1 and run.legs == 1
    assert model.legs[0].prompt == OPEN + full[:b] + [END] and model.legs[0].max_tokens == m - b - 1
    assert run.generated == full

    # Cut right after it: no forcing, the answer simply continues.
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, m, b, generated=full[: b + 1])
    assert run.forced == 0 and not forced_chunks(chunks) and run.legs == 1
    assert model.legs[0].prompt == OPEN + full[: b + 1]
    assert run.generated == full and run.reasoning_tokens == b

    # Cut in the middle of the reasoning: the leg asks only for the rest of the budget.
    model = Model(len(OPEN))
    run, _ = await run_model(model, OPEN, m, b, generated=full[:1])
    assert model.legs[0].max_tokens == b - 1
    assert run.generated == full and run.forced == 1


async def test_resume_with_everything_generated_ends_at_once() -> None:
    b, m = 4, 10
    full_run, _ = await run_model(Model(len(OPEN)), OPEN, m, b)
    model = Model(len(OPEN))
    run, chunks = await run_model(model, OPEN, m, b, generated=full_run.generated)
    assert not model.legs and run.legs == 0
    assert len(chunks) == 1 and chunks[0].token_ids == [] and chunks[0].finish_reason == "length"
    assert chunks[0].completion_tokens == m and chunks[0].reasoning_tokens == b
    assert chunks[0].prompt_tokens == len(OPEN)


async def test_resume_after_an_error_continues_the_same_output() -> None:
    b, m = 4, 12
    behaviour = dict(per_chunk=2)
    full_run, _ = await run_model(Model(len(OPEN), **behaviour), OPEN, m, b)
    broken = Model(len(OPEN), faults={2: ("error", 3)}, **behaviour)
    run, _ = await run_model(broken, OPEN, m, b)
    assert run.finish_reason == "error"
    assert run.generated == full_run.generated[: len(run.generated)]
    resumed, _ = await run_model(Model(len(OPEN), **behaviour), OPEN, m, b, generated=run.generated)
    assert resumed.generated == full_run.generated
    assert resumed.reasoning_tokens == full_run.reasoning_tokens


# --------------------------------------------------------------------------------------------
# Counts and the oracle over a grid
# --------------------------------------------------------------------------------------------


def grid():
    for prompt in (OPEN, PLAIN, [START, 5, END, 6]):
        for start_at in (None, 0, 2):
            for end_at in ((), (1,), (3,), (3, 5)):
                for eos_at in (None, 2, 6):
                    for per_chunk in (1, 3):
                        for b in (None, 0, 1, 3):
                            for m in (1, 4, 8):
                                yield (
                                    prompt,
                                    dict(
                                        start_at=start_at, end_at=end_at, eos_at=eos_at, per_chunk=per_chunk
                                    ),
                                    b,
                                    m,
                                )


async def test_grid_matches_the_token_by_token_oracle() -> None:
    n = 0
    for prompt, behaviour, b, m in grid():
        model = Model(len(prompt), **behaviour)
        run, chunks = await run_model(model, prompt, m, b)
        case = (prompt, behaviour, b, m)
        assert ids(chunks) == run.generated, case
        assert (run.generated, run.reasoning_tokens, run.forced, run.finish_reason) == expected(
            model, prompt, m, b
        ), case
        assert len(forced_chunks(chunks)) == run.forced, case
        check_counts(chunks, run, prompt)
        assert all(leg.closed for leg in model.legs), case
        assert sum(leg.max_tokens for leg in model.legs) + run.forced >= len(run.generated), case
        # Each leg's prompt is the original prompt plus everything generated before it.
        done: list[int] = []
        for leg in model.legs:
            assert leg.prompt[: len(prompt)] == prompt, case
            tail = leg.prompt[len(prompt) :]
            assert run.generated[: len(tail)] == tail and len(tail) >= len(done), case
            done = tail + leg.tokens
        n += 1
    assert n == 3 * 3 * 4 * 3 * 2 * 4 * 3


async def test_cached_tokens_are_the_first_legs() -> None:
    model = Model(len(OPEN), cached={1: 16, 2: 32})
    run, chunks = await run_model(model, OPEN, 10, 3)
    assert run.legs == 2
    assert {c.cached_tokens for c in chunks} == {16}


async def test_request_is_left_alone_and_its_max_tokens_ignored() -> None:
    req = GenerateRequest(
        request_id="abc",
        prompt_token_ids=list(OPEN),
        sampling=SamplingOptions(max_tokens=2, temperature=0.3, seed=7, stop_token_ids=[EOS]),
        cache_salt="salt",
        tenant="t1",
        session_id="s1",
    )
    before = dataclasses.replace(req, prompt_token_ids=list(req.prompt_token_ids))
    model = Model(len(OPEN))
    run = ThinkingRun(model.stream, req, 12, budget=4, tags=TAGS)
    chunks = await collect(run)
    assert len(run.generated) == 12 and run.legs == 2
    assert req == before  # nothing mutated
    assert [leg.request_id for leg in model.legs] == ["abc", "abc.2"]
    for leg in model.legs:
        r = leg.request
        assert (r.sampling.temperature, r.sampling.seed, r.sampling.stop_token_ids) == (0.3, 7, [EOS])
        assert (r.cache_salt, r.tenant, r.session_id) == ("salt", "t1", "s1")
    check_counts(chunks, run, OPEN)


async def test_min_tokens_is_spread_over_the_legs() -> None:
    b, m = 4, 12
    model = Model(len(OPEN))
    run, _ = await run_model(model, OPEN, m, b, min_tokens=9)
    assert [(leg.max_tokens, leg.min_tokens) for leg in model.legs] == [(4, 4), (7, 4)]
    model = Model(len(OPEN))
    await run_model(model, OPEN, m, b, min_tokens=2)
    assert [(leg.max_tokens, leg.min_tokens) for leg in model.legs] == [(4, 2), (7, 0)]


# --------------------------------------------------------------------------------------------
# Errors, aborts, closing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("leg", "after"), [(1, 0), (1, 2), (2, 0), (2, 3)])
async def test_an_error_chunk_ends_the_run(leg: int, after: int) -> None:
    b, m = 4, 12
    model = Model(len(OPEN), faults={leg: ("error", after)})
    run, chunks = await run_model(model, OPEN, m, b)
    assert chunks[-1] is model.errors[0]  # passed on as the engine sent it
    assert chunks[-1].error is not None and chunks[-1].error.status == 503
    assert run.finish_reason == "error"
    assert len(model.legs) == leg and run.legs == leg
    assert all(leg.closed for leg in model.legs)
    before = chunks[:-1]
    assert all(c.finish_reason is None and c.error is None for c in before)
    assert ids(before) == run.generated
    assert len(run.generated) == (after if leg == 1 else b + 1 + after)


@pytest.mark.parametrize(("leg", "after"), [(1, 0), (1, 2), (2, 3)])
async def test_a_leg_ending_without_a_finish_reason_is_an_abort(leg: int, after: int) -> None:
    b, m = 4, 12
    model = Model(len(OPEN), per_chunk=2, faults={leg: ("vanish", after)})
    run, chunks = await run_model(model, OPEN, m, b)
    assert run.finish_reason == "abort"
    assert chunks[-1].finish_reason == "abort" and chunks[-1].token_ids == []
    assert chunks[-1].completion_tokens == len(run.generated)
    assert len(model.legs) == leg and all(leg.closed for leg in model.legs)
    check_counts(chunks, run, OPEN)


async def test_an_engine_abort_ends_the_run() -> None:
    model = Model(len(OPEN), faults={2: ("abort", 1)})
    run, chunks = await run_model(model, OPEN, 12, 4)
    assert run.finish_reason == "abort" and chunks[-1].finish_reason == "abort"
    assert len(run.generated) == 4 + 1 + 1 and len(model.legs) == 2
    check_counts(chunks, run, OPEN)


async def test_every_leg_stream_is_closed_as_soon_as_the_run_ends() -> None:
    # The final chunk of a "stop" leg leaves the engine generator suspended at its yield: the run must
    # close it itself (not leave it to garbage collection).
    model = Model(len(OPEN), eos_at=7)
    run, _ = await run_model(model, OPEN, 20, 3)
    assert run.finish_reason == "stop" and len(model.legs) == 2
    assert all(leg.closed for leg in model.legs)
    assert model.legs[-1].closed_at_yield


@pytest.mark.parametrize("stop_after", [1, 3, 6])
async def test_closing_the_run_closes_the_current_leg(stop_after: int) -> None:
    b, m = 4, 12
    model = Model(len(OPEN))
    run = ThinkingRun(model.stream, request(OPEN), m, b, TAGS)
    it = run.chunks()
    got = []
    async for c in it:
        got.append(c)
        if len(got) == stop_after:
            break
    await it.aclose()
    current = 1 if stop_after <= b else 2
    assert len(model.legs) == current  # no further leg started
    assert all(leg.closed for leg in model.legs)
    assert model.legs[-1].closed_at_yield and model.legs[-1].finish is None  # cut off mid-leg
    assert run.finish_reason is None


async def test_closing_the_run_at_the_forced_chunk_starts_no_leg() -> None:
    b = 3
    model = Model(len(OPEN))
    run = ThinkingRun(model.stream, request(OPEN), 12, b, TAGS)
    it = run.chunks()
    async for c in it:
        if c.token_ids == [END]:
            break
    await it.aclose()
    assert len(model.legs) == 1 and model.legs[0].closed
    assert run.generated[-1] == END and run.forced == 1


# --------------------------------------------------------------------------------------------
# split_generated and ReasoningState
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "generated", "tags", "split"),
    [
        (OPEN, [10, 11, END, 12], None, (0, 0)),  # not a reasoning model
        (OPEN, [], TAGS, (0, 0)),
        (OPEN, [10, 11, 12], TAGS, (0, 3)),  # never closed: all reasoning
        (OPEN, [10, 11, END, 12, 13], TAGS, (0, 3)),
        (OPEN, [END, 12], TAGS, (0, 1)),
        (OPEN, [10, END, 12, END, 13], TAGS, (0, 2)),  # the first closing tag ends the block
        (OPEN, [START, 10, END], TAGS, (0, 3)),  # a START inside the block is reasoning
        (PLAIN, [], TAGS, (0, 0)),
        (PLAIN, [10, 11, 12], TAGS, (0, 0)),  # never opened: all answer
        (PLAIN, [10, START, 11, END, 12], TAGS, (0, 0)),  # a later START opens nothing
        (PLAIN, [START], TAGS, (1, 1)),
        (PLAIN, [START, 10, 11], TAGS, (1, 3)),
        (PLAIN, [START, END], TAGS, (1, 2)),
        (PLAIN, [START, 10, END, 12, END], TAGS, (1, 3)),
        ([START, 5, END, 6], [10, END], TAGS, (0, 0)),  # the prompt's block is closed
        ([START, 5, END, 6], [START, 10, END, 11], TAGS, (1, 3)),
        ([START, 5, END, START], [10, END, 11], TAGS, (0, 2)),
    ],
)
def test_split_generated(prompt: list[int], generated: list[int], tags: ThinkTags | None, split) -> None:
    assert split_generated(prompt, generated, tags) == split
    # Consistent with the token-by-token state's count.
    state = ReasoningState(prompt, tags)
    for t in generated:
        state.feed(t)
    r, a = split
    closed = a > r and generated[a - 1] == END and tags is not None
    assert state.reasoning_tokens == a - r - (1 if closed else 0)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_split_generated_on_run_outputs(name: str) -> None:
    prompt, behaviour, b, m = SCENARIOS[name]
    run, _ = await run_model(Model(len(prompt), **behaviour), prompt, m, b)
    gen = run.generated
    r, a = split_generated(prompt, gen, TAGS)
    reasoning = gen[r:a]
    if reasoning and reasoning[-1] == END:
        reasoning = reasoning[:-1]
        assert END not in reasoning
    assert len(reasoning) == run.reasoning_tokens
    if r == 1:
        assert gen[0] == START
    if run.forced:
        assert gen[a - 1] == END and a - r - 1 == b


async def test_split_generated_for_the_forced_case() -> None:
    b = 5
    run, _ = await run_model(Model(len(OPEN)), OPEN, 12, b)
    assert split_generated(OPEN, run.generated, TAGS) == (0, b + 1)
    run, _ = await run_model(Model(len(PLAIN), start_at=0), PLAIN, 12, b)
    assert split_generated(PLAIN, run.generated, TAGS) == (1, b + 2)
    run, _ = await run_model(Model(len(PLAIN)), PLAIN, 12, b)
    assert split_generated(PLAIN, run.generated, TAGS) == (0, 0)


@pytest.mark.parametrize(
    ("prompt", "tags", "state"),
    [
        (OPEN, TAGS, "reasoning"),
        (PLAIN, TAGS, "before"),
        ([], TAGS, "before"),
        ([START, 5, END], TAGS, "before"),  # opened then closed
        ([START, 5, END, 6], TAGS, "before"),
        ([END, START], TAGS, "reasoning"),
        ([START, END, START, 5], TAGS, "reasoning"),
        ([5, END], TAGS, "before"),
        (OPEN, None, "answer"),
    ],
)
def test_reasoning_state_at_the_start(prompt: list[int], tags: ThinkTags | None, state: str) -> None:
    s = ReasoningState(prompt, tags)
    assert s.state == state
    assert s.in_reasoning is (state == "reasoning")
    assert s.reasoning_tokens == 0


def test_reasoning_state_feed() -> None:
    s = ReasoningState([START, 5, END], TAGS)
    s.feed(START)
    assert s.state == "reasoning"
    for t in (10, START, 11):
        s.feed(t)
    assert s.reasoning_tokens == 3 and s.in_reasoning
    s.feed(END)
    assert s.state == "answer" and s.reasoning_tokens == 3
    for t in (START, 12, END, 13):
        s.feed(t)
    assert s.state == "answer" and s.reasoning_tokens == 3

    s = ReasoningState(PLAIN, TAGS)
    s.feed(10)
    s.feed(START)
    assert s.state == "answer" and s.reasoning_tokens == 0

    s = ReasoningState(OPEN, None)
    for t in (START, 10, END):
        s.feed(t)
    assert s.state == "answer" and s.reasoning_tokens == 0
