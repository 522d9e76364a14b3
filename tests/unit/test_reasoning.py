"""The <think> parser: whole outputs and streamed deltas split into reasoning and answer."""

from __future__ import annotations

import random

import pytest

from serving.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning


@pytest.mark.parametrize(
    ("prompt", "opened"),
    [
        ("<|user|>hi<|assistant|><think>\n", True),
        ("<|user|>hi<|assistant|>", False),
        ("<think>old</think> answer <|assistant|>", False),
        ("<think>a</think><|assistant|><think>", True),
    ],
)
def test_prompt_opens_reasoning(prompt: str, opened: bool) -> None:
    assert prompt_opens_reasoning(prompt) is opened


@pytest.mark.parametrize(
    ("text", "opened", "reasoning", "answer"),
    [
        ("step 1, step 2</think>The answer is 4.", True, "step 1, step 2", "The answer is 4."),
        ("<think>plan</think>Done.", False, "plan", "Done."),
        ("  <think>plan</think>Done.", False, "plan", "Done."),
        ("No thinking here.", False, "", "No thinking here."),
        ("never closed, all reasoning", True, "never closed, all reasoning", ""),
        # The last </think> ends the block: a quoted tag inside the reasoning stays reasoning.
        ("I should write </think> later</think>ok", True, "I should write </think> later", "ok"),
        ("</think>", True, "", ""),
    ],
)
def test_split_whole_output(text: str, opened: bool, reasoning: str, answer: str) -> None:
    assert split_reasoning(text, opened) == (reasoning, answer)


def _stream(text: str, opened: bool, cuts: list[int]) -> tuple[str, str]:
    s = ReasoningStream(opened)
    r = c = ""
    prev = 0
    for cut in [*cuts, len(text)]:
        d = s.feed(text[prev:cut])
        r, c = r + d.reasoning, c + d.content
        prev = cut
    d = s.finish()
    return r + d.reasoning, c + d.content


@pytest.mark.parametrize(
    ("text", "opened"),
    [
        ("step 1, step 2</think>The answer is 4.", True),
        ("<think>plan it</think>Done.", False),
        ("\n<think>plan</think>\nDone.", False),
        ("No thinking here at all.", False),
        ("<thin is not a tag", False),
        ("reasoning that never ends <", True),
        ("reasoning with </thi partial tag text</think>answer", True),
    ],
)
def test_stream_equals_whole_split_for_every_cut(text: str, opened: bool) -> None:
    expected = split_reasoning(text, opened)
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(8, len(text) - 1))))
        assert _stream(text, opened, cuts) == expected, cuts
    # One character at a time, too.
    assert _stream(text, opened, list(range(1, len(text)))) == expected


def test_stream_holds_back_a_possible_tag_and_reports_state() -> None:
    s = ReasoningStream(opened=True)
    assert s.in_reasoning
    d = s.feed("thinking </th")
    assert d.reasoning == "thinking " and d.content == ""
    d = s.feed("ink>answer")
    assert d.reasoning == "" and d.content == "answer" and not s.in_reasoning


def test_stream_switches_at_the_first_end_tag() -> None:
    # A stream cannot wait for a later </think>: it switches at the first one.
    assert _stream("a</think>b</think>c", True, [3, 9]) == ("a", "b</think>c")
