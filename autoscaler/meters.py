"""Windowed meters the engine replicas and the ingress keep for the autoscaler (pure; clock injected).

`ReplicaMeter` follows one replica's requests (start, first token, end) and its engine's cumulative
prompt-token counter; `snapshot()` is the dict a replica's `record_autoscaling_stats` returns
(autoscaler.signals.REPLICA_FIELDS). `IngressMeter` counts, per model, what arrives at the ingress,
what is rejected for capacity and how long requests waited for a pool slot
(autoscaler.signals.INGRESS_FIELDS, prefixed `<model>:`). Both hold a bounded window of events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from autoscaler.signals import NO_VALUE, p90

#: Rejection reasons that mean "not enough capacity" (a tenant's own rate limit is not one).
CAPACITY_REJECTIONS = frozenset({"queue_full", "predicted_wait", "queue_timeout", "engine_overloaded"})
#: Events a window keeps at most (a p90 over the newest of them).
MAX_EVENTS = 4096


class Window:
    """Timestamped values of the last `window_s` (at most MAX_EVENTS of them)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=MAX_EVENTS)

    def add(self, value: float, now: float) -> None:
        self._items.append((now, value))

    def _trim(self, now: float) -> None:
        while self._items and now - self._items[0][0] > self.window_s:
            self._items.popleft()

    def values(self, now: float) -> list[float]:
        self._trim(now)
        return [v for _, v in self._items]

    def rate(self, now: float) -> float:
        """Sum of the values per second over the window."""
        return sum(self.values(now)) / self.window_s

    def p90(self, now: float) -> float:
        """90th percentile of the values in the window (NO_VALUE when empty)."""
        p = p90(self.values(now))
        return NO_VALUE if p is None else p


class ReplicaMeter:
    """One engine replica's requests, as the autoscaler samples them.

    Args:
        clock: seconds (monotonic).
        window_s: how far back rates and percentiles look.
    """

    def __init__(self, clock: Callable[[], float], window_s: float = 30.0) -> None:
        self._clock = clock
        self._born = clock()
        self._pending: dict[str, tuple[float, int]] = {}  # request id -> (start, prompt tokens)
        self._first: dict[str, float] = {}
        self._ttft = Window(window_s)
        self._tpot = Window(window_s)
        self._out = Window(window_s)
        self._counter: deque[tuple[float, int]] = deque(maxlen=MAX_EVENTS)
        self.window_s = window_s

    def started(self, request_id: str, prompt_tokens: int) -> None:
        self._pending[request_id] = (self._clock(), prompt_tokens)

    def first_token(self, request_id: str) -> None:
        p = self._pending.pop(request_id, None)
        if p is None:
            return
        now = self._clock()
        self._ttft.add(now - p[0], now)
        self._first[request_id] = now

    def finished(self, request_id: str, output_tokens: int) -> None:
        """The request ended (any way); `output_tokens` it generated."""
        self._pending.pop(request_id, None)
        now = self._clock()
        first = self._first.pop(request_id, None)
        if output_tokens > 0:
            self._out.add(float(output_tokens), now)
        if first is not None and output_tokens > 1:
            self._tpot.add((now - first) / (output_tokens - 1), now)

    def snapshot(
        self, running: int, waiting: int, kv_usage: float, prompt_tokens_computed: int
    ) -> dict[str, float]:
        """The replica's `record_autoscaling_stats` dict (autoscaler.signals.REPLICA_FIELDS)."""
        now = self._clock()
        c = self._counter
        c.append((now, prompt_tokens_computed))
        while len(c) > 1 and now - c[0][0] > self.window_s:
            c.popleft()
        span = now - c[0][0]
        inp = (c[-1][1] - c[0][1]) / span if span > 0 else 0.0
        return {
            "uptime_s": now - self._born,
            "running": float(running),
            "waiting": float(waiting),
            "prefill_tokens_queued": float(sum(n for _, n in self._pending.values())),
            "kv_usage": float(kv_usage),
            "input_tokens_per_s": max(0.0, inp),
            "output_tokens_per_s": self._out.rate(now),
            "ttft_s": self._ttft.p90(now),
            "tpot_s": self._tpot.p90(now),
        }


class IngressMeter:
    """Per model: arrivals, their tokens, capacity rejections and pool-queue waits at one ingress replica."""

    def __init__(self, clock: Callable[[], float], window_s: float = 30.0) -> None:
        self._clock = clock
        self.window_s = window_s
        self._models: dict[str, dict[str, Window]] = {}

    def _w(self, model: str) -> dict[str, Window]:
        w = self._models.get(model)
        if w is None:
            w = self._models[model] = {
                k: Window(self.window_s) for k in ("arrivals", "input", "output", "rejected", "wait")
            }
        return w

    def arrived(self, model: str, prompt_tokens: int, reserved_output_tokens: int) -> None:
        now = self._clock()
        w = self._w(model)
        w["arrivals"].add(1.0, now)
        w["input"].add(float(prompt_tokens), now)
        w["output"].add(float(reserved_output_tokens), now)

    def rejected(self, model: str, reason: str) -> None:
        if reason in CAPACITY_REJECTIONS:
            self._w(model)["rejected"].add(1.0, self._clock())

    def waited(self, model: str, seconds: float) -> None:
        self._w(model)["wait"].add(seconds, self._clock())

    def snapshot(self, queued: dict[str, int]) -> dict[str, float]:
        """`<model>:<field>` for every model seen or queued (autoscaler.signals.INGRESS_FIELDS)."""
        now = self._clock()
        out: dict[str, float] = {}
        for model in sorted(set(self._models) | set(queued)):
            w = self._w(model)
            wait = w["wait"].p90(now)
            out[f"{model}:queued"] = float(queued.get(model, 0))
            out[f"{model}:queue_wait_s"] = max(0.0, wait)
            out[f"{model}:rejected_per_s"] = w["rejected"].rate(now)
            out[f"{model}:arrivals_per_s"] = w["arrivals"].rate(now)
            out[f"{model}:input_tokens_per_s"] = w["input"].rate(now)
            out[f"{model}:output_tokens_per_s"] = w["output"].rate(now)
        return out
