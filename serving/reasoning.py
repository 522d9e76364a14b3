"""`<think>…</think>` reasoning, split from the answer (Qwen3 / DeepSeek-R1 styles).

Two ways a reasoning block starts: the model writes `<think>` itself, or the chat template puts it
at the end of the prompt (tiny-reasoning's and DeepSeek-R1's templates do), so the output starts
inside the block and only `</think>` appears in it. `prompt_opens_reasoning` tells which.

- `split_reasoning(text, ...)`: a whole output. The reasoning ends at the **last** `</think>` (a
  model may quote the tag inside its reasoning); without one, all of it is reasoning if the block
  was open, else all of it is the answer.
- `ReasoningStream`: the same split for a stream of text deltas. A stream cannot know whether a
  later `</think>` will come, so it switches to the answer at the first `</think>` after the block
  opened (as vLLM's streaming reasoning parsers do); text that might be the start of a tag is
  held back until the next delta settles it.

Pure string handling; token budgets are counted by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_reasoning(prompt_text: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """Whether the rendered prompt ends inside an open reasoning block (the template added `<think>`)."""
    return prompt_text.rfind(start) > prompt_text.rfind(end)


def split_reasoning(
    text: str, opened: bool, start: str = THINK_START, end: str = THINK_END
) -> tuple[str, str]:
    """(reasoning, answer) of a whole output; `opened`: the prompt left a block open."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            return "", text
        text = stripped[len(start) :]
    cut = text.rfind(end)
    if cut < 0:
        return text, ""
    return text[:cut], text[cut + len(end) :]


@dataclass(slots=True)
class Delta:
    """What one input delta adds to the reasoning and to the answer."""

    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """Splits streamed text deltas into reasoning and answer deltas.

    Args:
        opened: the prompt left a reasoning block open (the output starts inside it).
    """

    def __init__(self, opened: bool, start: str = THINK_START, end: str = THINK_END) -> None:
        self._start, self._end = start, end
        # before: may still open a block; reasoning: inside it; answer: after it (or never opened).
        self.state = "reasoning" if opened else "before"
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """Whether the next text belongs to the reasoning block."""
        return self.state == "reasoning"

    def feed(self, text: str) -> Delta:
        """Split the next delta."""
        out = Delta()
        buf = self._held + text
        self._held = ""
        while buf:
            if self.state == "answer":
                out.content += buf
                return out
            if self.state == "before":
                lead = buf.lstrip()
                if lead.startswith(self._start):
                    buf = lead[len(self._start) :]
                    self.state = "reasoning"
                    continue
                if lead and self._start.startswith(lead):
                    self._held = buf  # could still be "<think>": wait for more
                    return out
                if not lead:
                    self._held = buf  # only whitespace so far
                    return out
                self.state = "answer"
                continue
            # reasoning
            i = buf.find(self._end)
            if i >= 0:
                out.reasoning += buf[:i]
                buf = buf[i + len(self._end) :]
                self.state = "answer"
                continue
            keep = _partial_suffix(buf, self._end)
            out.reasoning += buf[: len(buf) - keep]
            self._held = buf[len(buf) - keep :]
            return out
        return out

    def finish(self) -> Delta:
        """Flush what was held back at the end of the stream."""
        held, self._held = self._held, ""
        if not held:
            return Delta()
        if self.state == "reasoning":
            return Delta(reasoning=held)
        return Delta(content=held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
