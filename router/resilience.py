"""Error classes, the retry policy and its next-step decision, retry budget, and the health state
machine of each target (pure).

What happens after a failed attempt is one function, `RetryPolicy.next_step`, used by every retry
loop: the ingress (per target of a degradation chain, before the first token reaches the client), the
session workers (engine legs), the webhook sender (deliveries) and the decode replica (remote
prefills). Each configures its own `RetryPolicy` from its section of the spec. By error class:

- ``rate_limited`` (429): wait what Retry-After says (at most ``backoff_max_s``; full-jitter backoff
  without one), then retry on the same target; out of attempts or budget, fail with the Retry-After.
- ``server`` (5xx) and ``timeout`` (no first token in time): full-jitter exponential backoff and retry
  on the same target while it is usable and attempts and budget allow; then the next target.
- ``engine_fault`` (a plain 500 ``engine_error``: the engine raised on this request, e.g. an input that
  overflows a kernel or a serializer): never retried on the same target, which would fail the same way
  and spend the shared retry budget; the next target (another model) is tried.
- ``client`` (other 4xx): never retried; failed as is.

Health of a target (a model's serving pool) as one ingress replica sees it::

    healthy --strike--> sticky_retry --success--> healthy
                        sticky_retry --`terminal_after` strikes in a row--> terminal
    terminal --probe ok--> healthy         (a probe every `probe_interval_s`)
    any --pool down--> terminal

In ``sticky_retry`` requests still go to the target (and a failed one is retried there); in
``terminal`` they go down the tier's degradation chain until a probe succeeds.

NOTE(strikes): health is shared by every tenant, so what counts against it must be the target's
fault, not one request's:

1. One strike per *distinct* key (`strike_key`) between two successes: the attempts of one request
   count once, whatever `max_attempts` is, so `terminal_after` counts requests, not attempts.
2. An engine fault is keyed by tenant, not request: one tenant resending a poison prompt strikes
   once; `terminal_after` tenants failing in a row take the target down.
3. A timeout while the target's pool is saturated (`overloaded`: others hold every admission slot or
   wait for one) is no strike: a busy pool is slow, not dead, and declaring it terminal exactly when
   it is busiest cascades the load onto the fallbacks. A pool that hangs with requests queued is
   caught by the pool status (no running replica), the replicas' health checks and the stream stall
   timeout instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class ErrorClass(StrEnum):
    """How a failed attempt is handled."""

    RATE_LIMITED = "rate_limited"
    SERVER = "server"
    TIMEOUT = "timeout"
    ENGINE_FAULT = "engine_fault"
    CLIENT = "client"

    @property
    def strikes(self) -> bool:
        """Whether a failure of this class counts against the target's health (`TargetHealth`)."""
        return self in (ErrorClass.SERVER, ErrorClass.TIMEOUT, ErrorClass.ENGINE_FAULT)


#: The error type of an engine's catch-all 500 (serving.replicas.engines: an exception on this
#: request that is neither the client's fault, nor overload, nor a dead engine or replica).
ENGINE_FAULT_TYPE = "engine_error"


def classify(status: int | None, timed_out: bool = False, error_type: str | None = None) -> ErrorClass:
    """The class of a failed attempt: its HTTP status (and error type, when known), or a timeout.

    A 500 of type `ENGINE_FAULT_TYPE` is an engine fault; every other 5xx (502/503/504: transport, a
    dead engine or replica, a KV transfer) is a server error, worth a retry on the same target."""
    if timed_out:
        return ErrorClass.TIMEOUT
    if status == 429:
        return ErrorClass.RATE_LIMITED
    if status is not None and 400 <= status < 500:
        return ErrorClass.CLIENT
    if status == 500 and error_type == ENGINE_FAULT_TYPE:
        return ErrorClass.ENGINE_FAULT
    return ErrorClass.SERVER


def strike_key(failure: ErrorClass, request_id: str, tenant: str) -> str:
    """What one strike against a target is counted per (see NOTE(strikes) above): the tenant for an
    engine fault (one tenant's poison prompt, however often resent, is one strike), else the request
    (its retries are not new evidence)."""
    if failure is ErrorClass.ENGINE_FAULT:
        return f"tenant:{tenant}"
    return f"request:{request_id}"


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1 = the first retry)."""
    ceiling = min(max_s, base_s * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the same target again after `delay_s`."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class NextTarget:
    """Give this target up: try the next one along the caller's chain (or fail if there is none)."""


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the error now; `retry_after_s` is what to tell the client (rate limited), if anything."""

    retry_after_s: float | None = None


Step = Retry | NextTarget | Fail


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per target and the full-jitter exponential backoff between them.

    Args:
        max_attempts: attempts on one target, the first included (1: never retry).
        backoff_base_s: ceiling of the first retry's jittered wait; it doubles per retry...
        backoff_max_s: ...up to this. A Retry-After is honoured up to this too.
    """

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff times must not be negative")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered wait after failed attempt number `attempt` (1 = the first)."""
        return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, rng)

    def next_step(
        self,
        failure: ErrorClass,
        attempt: int,
        *,
        retry_after_s: float | None = None,
        usable: bool = True,
        budget: RetryBudget | None = None,
        rng: random.Random | None = None,
    ) -> Step:
        """What to do after attempt number `attempt` (1 = the first) on one target failed.

        Args:
            failure: the attempt's error class (`classify`).
            retry_after_s: what the target asked for (Retry-After), if anything.
            usable: whether the target may still be sent requests (not terminal; see `TargetHealth`).
            budget: spent (one retry) only when the answer is `Retry`; None: unbounded.
        """
        if failure is ErrorClass.CLIENT:
            return Fail()
        if failure is ErrorClass.ENGINE_FAULT:
            return NextTarget()  # the same input fails the same way here; no retry is spent
        if retry_after_s is not None:
            delay = min(max(retry_after_s, 0.0), self.backoff_max_s)
        else:
            delay = self.backoff_s(attempt, rng)
        if failure is ErrorClass.RATE_LIMITED:
            if attempt < self.max_attempts and (budget is None or budget.try_retry()):
                return Retry(delay)
            return Fail(retry_after_s if retry_after_s is not None else delay)
        if usable and attempt < self.max_attempts and (budget is None or budget.try_retry()):
            return Retry(delay)
        return NextTarget()


class RetryBudget:
    """Retries allowed as a fraction of requests (Finagle's retry budget).

    Every request deposits `ratio`; a retry withdraws 1. The balance starts at `initial` and is capped
    at `initial` + `ratio` x `window` requests, so after N requests at most initial + ratio x N
    retries have been made.
    """

    def __init__(self, ratio: float, initial: float, window: int = 100) -> None:
        self.ratio = ratio
        self.cap = initial + ratio * window
        self.balance = float(initial)
        self.requests = 0
        self.retries = 0
        self.denied = 0

    def on_request(self) -> None:
        """A new request (not a retry) was sent."""
        self.requests += 1
        self.balance = min(self.cap, self.balance + self.ratio)

    def try_retry(self) -> bool:
        """Spend one retry if the budget has one."""
        if self.balance >= 1.0:
            self.balance -= 1.0
            self.retries += 1
            return True
        self.denied += 1
        return False


class HealthState(StrEnum):
    """Health of one target."""

    HEALTHY = "healthy"
    STICKY_RETRY = "sticky_retry"
    TERMINAL = "terminal"

    @property
    def level(self) -> int:
        """0 healthy, 1 sticky_retry, 2 terminal (the metric's value)."""
        return list(HealthState).index(self)


class TargetHealth:
    """The health state machine of one target.

    Args:
        name: the target (model name).
        terminal_after: strikes in a row (distinct keys, no success in between) that make it terminal.
        probe_interval_s: time between recovery probes while terminal.
        on_transition: called with (name, old, new, reason) on every change of state.
    """

    def __init__(
        self,
        name: str,
        terminal_after: int,
        probe_interval_s: float,
        on_transition: Callable[[str, HealthState, HealthState, str], None] | None = None,
    ) -> None:
        if terminal_after < 1:
            raise ValueError(f"terminal_after must be at least 1, not {terminal_after}")
        self.name = name
        self.terminal_after = terminal_after
        self.probe_interval_s = probe_interval_s
        self.state = HealthState.HEALTHY
        #: Strikes since the last success (or recovery).
        self.failures = 0
        self.reason = ""
        self._last_probe = 0.0
        self._on_transition = on_transition
        #: Keys struck since the last success: at most `terminal_after` (none are added once terminal).
        self._struck: set[str] = set()

    def _to(self, new: HealthState, reason: str, now: float) -> None:
        old = self.state
        if new is HealthState.TERMINAL and old is not HealthState.TERMINAL:
            self._last_probe = now  # first probe one interval after going terminal
        self.state = new
        self.reason = reason
        if old is not new and self._on_transition is not None:
            self._on_transition(self.name, old, new, reason)

    @property
    def usable(self) -> bool:
        """Whether requests may be sent to this target."""
        return self.state is not HealthState.TERMINAL

    def _reset(self) -> None:
        self.failures = 0
        self._struck.clear()

    def on_success(self, now: float) -> None:
        """An attempt got its first token."""
        self._reset()
        if self.state is not HealthState.HEALTHY:
            self._to(HealthState.HEALTHY, "success", now)

    def on_failure(
        self, reason: str, now: float, *, key: str | None = None, overloaded: bool = False
    ) -> None:
        """An attempt failed with a server error, an engine fault or a timeout.

        Args:
            key: what the strike is counted per (`strike_key`): a key already struck since the last
                success adds nothing. None: a strike of its own (a caller with no request identity).
            overloaded: the attempt timed out while its pool was saturated: no strike (overload is
                not death; see NOTE(strikes)).
        """
        if overloaded or self.state is HealthState.TERMINAL:
            return
        if key is not None:
            if key in self._struck:
                return
            self._struck.add(key)
        self.failures += 1
        if self.failures >= self.terminal_after:
            self._struck.clear()  # not needed while terminal; recovery starts from none
            self._to(HealthState.TERMINAL, reason, now)
        elif self.state is HealthState.HEALTHY:
            self._to(HealthState.STICKY_RETRY, reason, now)

    def on_down(self, reason: str, now: float) -> None:
        """The target is known to be down (no replica)."""
        self.failures = max(self.failures, self.terminal_after)
        self._struck.clear()
        if self.state is not HealthState.TERMINAL:
            self._to(HealthState.TERMINAL, reason, now)

    def probe_in(self, now: float) -> float:
        """Seconds until the next recovery probe is due (0: now)."""
        return max(0.0, self.probe_interval_s - (now - self._last_probe))

    def probe_due(self, now: float) -> bool:
        """Whether a recovery probe should be sent now (terminal, and one interval since the last)."""
        return self.state is HealthState.TERMINAL and self.probe_in(now) == 0.0

    def on_probe(self, ok: bool, now: float) -> None:
        """The result of a recovery probe."""
        self._last_probe = now
        if ok and self.state is HealthState.TERMINAL:
            self._reset()
            self._to(HealthState.HEALTHY, "probe", now)


def retry_after_seconds(value: str | None) -> float | None:
    """A numeric (delta-seconds) Retry-After header value, or None when absent or not a finite
    non-negative number (the HTTP-date form is the caller's choice: see serving.replicas.engines)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
