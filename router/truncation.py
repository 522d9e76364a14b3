"""Context overflow: which turns of a conversation to drop so that it fits the model's context.

OpenAI's `truncation: "auto"` (Responses API) drops input items from the middle of a conversation
when it would not fit the context window; agent clients with long histories rely on it. Here:

- the leading system/developer messages (the instructions, a prompt template) and every other
  system/developer message are never dropped;
- the last turn (the last user message and everything after it) is never dropped;
- what lies between is cut into turns (a user message and the replies that follow it; replies with
  no user message before them are a turn of their own), and the OLDEST turns go first, whole, so the
  conversation still alternates user / assistant.

`plan_units` splits the conversation; `fewest_to_drop` finds the fewest oldest turns whose removal
makes the prompt fit, with a monotone `fits(k)` (more turns dropped never makes the prompt longer),
in O(log n) calls, each of which tokenizes the whole candidate conversation once, so the result is
exact for the model's own chat template. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SYSTEM_ROLES = ("system", "developer")


class NothingToDrop(ValueError):
    """Even with every droppable turn dropped, the prompt does not fit."""


@dataclass(frozen=True, slots=True)
class Units:
    """A conversation split for truncation: droppable turns (message indices, oldest first) and the
    messages always kept."""

    turns: tuple[tuple[int, ...], ...]
    kept: tuple[int, ...]

    def without(self, k: int) -> list[int]:
        """Message indices left, in order, after dropping the `k` oldest turns."""
        gone = {i for turn in self.turns[:k] for i in turn}
        total = sorted({*self.kept, *(i for t in self.turns for i in t)})
        return [i for i in total if i not in gone]

    def dropped(self, k: int) -> int:
        """Messages in the `k` oldest turns."""
        return sum(len(t) for t in self.turns[:k])


def plan_units(roles: Sequence[str]) -> Units:
    """Split messages (by role) into droppable turns and kept messages."""
    kept = [i for i, r in enumerate(roles) if r in SYSTEM_ROLES]
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=None)
    body = [i for i, r in enumerate(roles) if r not in SYSTEM_ROLES]
    if last_user is None:  # no user message: only the last message counts as the last turn
        tail = body[-1:]
    else:
        tail = [i for i in body if i >= last_user]
    kept += tail
    turns: list[list[int]] = []
    for i in body:
        if i in tail:
            break
        if roles[i] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return Units(tuple(tuple(t) for t in turns), tuple(sorted(kept)))


def fewest_to_drop(n_turns: int, fits: Callable[[int], bool]) -> int:
    """The least k in [0, n_turns] with `fits(k)` (monotone in k); NothingToDrop if not even n_turns."""
    if fits(0):
        return 0
    if n_turns == 0 or not fits(n_turns):
        raise NothingToDrop(f"dropping all {n_turns} earlier turns is not enough")
    lo, hi = 0, n_turns  # fits(lo) is False, fits(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
