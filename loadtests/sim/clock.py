"""An asyncio event loop on a simulated clock.

The simulator runs Tandem's own asyncio code (the admission controller's queues, fan-out semaphores
and their `asyncio.wait_for` deadlines) unchanged: on this loop `loop.time()` is simulated seconds,
and instead of waiting for I/O the loop jumps straight to its next timer. A simulated hour of a
thousand replicas then takes as long as its events take to process, and every run is repeatable.

Nothing does real I/O on it: a wait with no timer pending means the simulation can make no more
progress, which is an error (`SimulationStalled`), not a hang.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class SimulationStalled(RuntimeError):
    """The simulation waits for something no scheduled event will ever bring."""


class _NoIOSelector(selectors.BaseSelector):
    """A selector that never polls: `select(timeout)` advances the loop's clock by `timeout`."""

    def __init__(self) -> None:
        self._map: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list:
        assert self.loop is not None
        if timeout is None:
            raise SimulationStalled(
                "the simulation is waiting with no event scheduled (a request waits on something that "
                "never happens)"
            )
        if timeout > 0:
            self.loop._now += timeout
        return []

    def get_map(self) -> dict[int, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`asyncio.SelectorEventLoop` whose clock is simulated seconds from 0 (see the module docstring)."""

    def __init__(self) -> None:
        selector = _NoIOSelector()
        self._now = 0.0
        super().__init__(selector)
        selector.loop = self
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now
