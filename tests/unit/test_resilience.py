"""Error classes, full-jitter backoff, the retry budget and every transition of a target's health
state machine (router.resilience). Pure: time is passed in."""

from __future__ import annotations

import random

import pytest

from router.resilience import (
    ErrorClass,
    Fail,
    HealthState,
    NextTarget,
    Retry,
    RetryBudget,
    RetryPolicy,
    TargetHealth,
    backoff_s,
    classify,
    strike_key,
)
from serving.config import parse_spec


@pytest.mark.parametrize(
    ("status", "timed_out", "cls"),
    [
        (429, False, ErrorClass.RATE_LIMITED),
        (400, False, ErrorClass.CLIENT),
        (404, False, ErrorClass.CLIENT),
        (422, False, ErrorClass.CLIENT),
        (499, False, ErrorClass.CLIENT),
        (500, False, ErrorClass.SERVER),
        (502, False, ErrorClass.SERVER),
        (503, False, ErrorClass.SERVER),
        (None, False, ErrorClass.SERVER),
        (None, True, ErrorClass.TIMEOUT),
        (503, True, ErrorClass.TIMEOUT),
        (400, True, ErrorClass.TIMEOUT),
    ],
)
def test_classify(status: int | None, timed_out: bool, cls: ErrorClass) -> None:
    assert classify(status, timed_out) is cls


@pytest.mark.parametrize(
    ("status", "error_type", "cls"),
    [
        # The engine's catch-all 500 (it raised on this request): an engine fault.
        (500, "engine_error", ErrorClass.ENGINE_FAULT),
        # A 500 of another type, or no type known (sessions, webhooks): a server error as before.
        (500, None, ErrorClass.SERVER),
        (500, "kv_transfer", ErrorClass.SERVER),
        # Transport, a dead engine or replica, an upstream: retried on the same target.
        (502, "engine_error", ErrorClass.SERVER),
        (503, "engine_unavailable", ErrorClass.SERVER),
        (502, "backend_error", ErrorClass.SERVER),
        (429, "engine_error", ErrorClass.RATE_LIMITED),
        (400, "engine_error", ErrorClass.CLIENT),
    ],
)
def test_classify_engine_faults_by_type(status: int, error_type: str | None, cls: ErrorClass) -> None:
    assert classify(status, False, error_type) is cls
    assert classify(status, True, error_type) is ErrorClass.TIMEOUT


def test_which_error_classes_strike_against_health() -> None:
    assert {c for c in ErrorClass if c.strikes} == {
        ErrorClass.SERVER,
        ErrorClass.TIMEOUT,
        ErrorClass.ENGINE_FAULT,
    }


def test_strike_key_is_the_tenant_for_an_engine_fault_else_the_request() -> None:
    fault = ErrorClass.ENGINE_FAULT
    assert strike_key(fault, "r1", "acme") == strike_key(fault, "r2", "acme")
    assert strike_key(fault, "r1", "acme") != strike_key(fault, "r1", "b")
    for cls in (ErrorClass.SERVER, ErrorClass.TIMEOUT):
        assert strike_key(cls, "r1", "acme") != strike_key(cls, "r2", "acme")
        assert strike_key(cls, "r1", "acme") == strike_key(cls, "r1", "other")
    # A request id can never collide with a tenant key.
    assert strike_key(ErrorClass.SERVER, "tenant:x", "t") != strike_key(ErrorClass.ENGINE_FAULT, "r", "x")


def test_backoff_is_full_jitter_under_a_capped_exponential_ceiling() -> None:
    rng = random.Random(1234)
    base, cap = 0.1, 1.0
    for attempt in range(1, 12):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        samples = [backoff_s(attempt, base, cap, rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples), attempt
        # Full jitter: spread over the whole range, not bunched at the top or the bottom.
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling
    assert max(backoff_s(30, base, cap, rng) for _ in range(200)) <= cap
    # attempt 0 (or less) is treated as the first retry.
    assert all(backoff_s(0, base, cap, rng) <= base for _ in range(100))


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff_s(n, 0.05, 2.0, random.Random(7)) for n in range(1, 6)]
    b = [backoff_s(n, 0.05, 2.0, random.Random(7)) for n in range(1, 6)]
    assert a == b


def test_retry_budget_initial_balance_and_deposits() -> None:
    budget = RetryBudget(ratio=0.5, initial=2)
    assert budget.balance == 2.0
    assert budget.try_retry() and budget.try_retry()
    assert budget.retries == 2 and budget.balance == 0.0
    assert not budget.try_retry()
    assert budget.denied == 1
    budget.on_request()
    assert not budget.try_retry()  # 0.5 is not a whole retry
    assert budget.denied == 2
    budget.on_request()
    assert budget.balance == pytest.approx(1.0)
    assert budget.try_retry()
    assert (budget.requests, budget.retries, budget.denied) == (2, 3, 2)


def test_retry_budget_is_capped() -> None:
    budget = RetryBudget(ratio=0.1, initial=3, window=100)
    for _ in range(10_000):
        budget.on_request()
    assert budget.balance == pytest.approx(3 + 0.1 * 100)


@pytest.mark.parametrize(("ratio", "initial"), [(0.1, 3), (0.2, 0), (0.05, 10), (1.0, 1)])
def test_retry_budget_bounds_retries_by_requests(ratio: float, initial: float) -> None:
    rng = random.Random(99)
    budget = RetryBudget(ratio=ratio, initial=initial)
    granted = 0
    for n in range(1, 2001):
        budget.on_request()
        # Every request fails a few times and asks to retry each time.
        for _ in range(rng.randrange(4)):
            granted += budget.try_retry()
        assert granted <= initial + ratio * n + 1e-9
    assert granted == budget.retries
    assert budget.denied > 0
    # Under a steady failure storm the budget is used, not hoarded.
    assert granted >= ratio * 2000 - 1


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, HealthState, HealthState, str]] = []

    def __call__(self, name: str, old: HealthState, new: HealthState, reason: str) -> None:
        self.calls.append((name, old, new, reason))


H, S, T = HealthState.HEALTHY, HealthState.STICKY_RETRY, HealthState.TERMINAL


def test_health_levels() -> None:
    assert [H.level, S.level, T.level] == [0, 1, 2]


def test_failure_then_success_goes_sticky_and_back() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=3, probe_interval_s=5.0, on_transition=rec)
    assert h.state is H and h.usable
    h.on_success(1.0)
    assert rec.calls == []  # no change, no callback
    h.on_failure("503 down", 1.0)
    assert h.state is S and h.usable and h.failures == 1 and h.reason == "503 down"
    h.on_failure("503 down", 2.0)
    assert h.state is S and h.failures == 2
    h.on_success(3.0)
    assert h.state is H and h.failures == 0 and h.reason == "success"
    assert rec.calls == [("m", H, S, "503 down"), ("m", S, H, "success")]


def test_consecutive_failures_make_it_terminal_and_more_failures_change_nothing() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=2, probe_interval_s=5.0, on_transition=rec)
    h.on_failure("a", 1.0)
    h.on_failure("b", 2.0)
    assert h.state is T and not h.usable and h.reason == "b"
    h.on_failure("c", 3.0)
    h.on_failure("d", 4.0)
    assert h.state is T and h.reason == "b"
    assert rec.calls == [("m", H, S, "a"), ("m", S, T, "b")]


def test_success_in_between_resets_the_count() -> None:
    h = TargetHealth("m", terminal_after=2, probe_interval_s=5.0)
    h.on_failure("a", 1.0)
    h.on_success(2.0)
    h.on_failure("b", 3.0)
    assert h.state is S  # not terminal: the failures were not consecutive


def test_terminal_after_one_goes_straight_to_terminal() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=1, probe_interval_s=5.0, on_transition=rec)
    h.on_failure("timeout after 1s", 10.0)
    assert h.state is T
    assert rec.calls == [("m", H, T, "timeout after 1s")]


def test_probes_are_due_every_interval_and_a_good_one_heals() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=1, probe_interval_s=5.0, on_transition=rec)
    assert not h.probe_due(1000.0)  # healthy targets are not probed
    h.on_failure("down", 100.0)
    assert not h.probe_due(100.0)
    assert not h.probe_due(104.9)
    assert h.probe_due(105.0)
    h.on_probe(False, 105.0)  # a failed probe restarts the interval
    assert h.state is T
    assert not h.probe_due(109.9)
    assert h.probe_due(110.0)
    h.on_probe(True, 110.0)
    assert h.state is H and h.usable and h.failures == 0 and h.reason == "probe"
    assert not h.probe_due(200.0)
    assert rec.calls == [("m", H, T, "down"), ("m", T, H, "probe")]


def test_on_down_from_every_state() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=3, probe_interval_s=2.0, on_transition=rec)
    h.on_down("no replicas", 50.0)
    assert h.state is T and h.failures == 3 and h.reason == "no replicas"
    assert not h.probe_due(51.0) and h.probe_due(52.0)
    h.on_down("still none", 60.0)  # already terminal: no callback, probe timer untouched
    assert h.reason == "no replicas"
    assert h.probe_due(60.0)
    h.on_probe(True, 61.0)
    h.on_failure("503", 62.0)
    assert h.state is S
    h.on_down("gone", 63.0)
    assert h.state is T
    assert rec.calls == [
        ("m", H, T, "no replicas"),
        ("m", T, H, "probe"),
        ("m", H, S, "503"),
        ("m", S, T, "gone"),
    ]


def test_a_failure_after_recovery_starts_from_healthy() -> None:
    h = TargetHealth("m", terminal_after=2, probe_interval_s=1.0)
    h.on_failure("a", 0.0)
    h.on_failure("b", 0.0)
    h.on_probe(True, 5.0)
    h.on_failure("c", 6.0)
    assert h.state is S  # one failure after the probe, not three


def test_probe_result_while_not_terminal_changes_nothing() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=2, probe_interval_s=1.0, on_transition=rec)
    h.on_failure("a", 0.0)
    h.on_probe(True, 1.0)
    assert h.state is S and h.failures == 1
    assert rec.calls == [("m", H, S, "a")]


def test_the_attempts_of_one_request_are_one_strike() -> None:
    # max_attempts 3 > terminal_after 2: one request failing all its attempts must not be enough.
    rec = Recorder()
    h = TargetHealth("m", terminal_after=2, probe_interval_s=5.0, on_transition=rec)
    for now in (1.0, 2.0, 3.0):
        h.on_failure("500 engine_error", now, key="request:r1")
    assert h.state is S and h.usable and h.failures == 1
    # A second distinct request failing in a row does it.
    h.on_failure("503 engine_unavailable", 4.0, key="request:r2")
    assert h.state is T and h.reason == "503 engine_unavailable"
    assert rec.calls == [("m", H, S, "500 engine_error"), ("m", S, T, "503 engine_unavailable")]


def test_a_success_forgets_the_struck_keys() -> None:
    h = TargetHealth("m", terminal_after=2, probe_interval_s=5.0)
    h.on_failure("x", 1.0, key="tenant:a")
    h.on_success(2.0)
    h.on_failure("x", 3.0, key="tenant:b")
    assert h.state is S and h.failures == 1  # not consecutive
    h.on_failure("x", 4.0, key="tenant:a")  # a again: a new strike, since a success came between
    assert h.state is T
    # Recovery forgets them too.
    h.on_probe(True, 10.0)
    h.on_failure("x", 11.0, key="tenant:a")
    assert h.state is S and h.failures == 1


def test_keyless_failures_each_strike() -> None:
    h = TargetHealth("m", terminal_after=2, probe_interval_s=5.0)
    h.on_failure("x", 1.0)
    h.on_failure("x", 2.0)
    assert h.state is T


def test_an_overloaded_timeout_is_no_strike() -> None:
    rec = Recorder()
    h = TargetHealth("m", terminal_after=1, probe_interval_s=5.0, on_transition=rec)
    for i in range(5):
        h.on_failure("timeout after 90s", float(i), key=f"request:r{i}", overloaded=True)
    assert h.state is H and h.failures == 0 and rec.calls == []
    h.on_failure("timeout after 90s", 9.0, key="request:idle")  # the pool was idle: a strike
    assert h.state is T


def test_struck_keys_stay_bounded_by_terminal_after() -> None:
    h = TargetHealth("m", terminal_after=3, probe_interval_s=5.0)
    for i in range(1000):
        h.on_failure("x", float(i), key=f"request:{i}")
        assert len(h._struck) <= 3
    assert h.state is T and not h._struck


def test_terminal_after_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="terminal_after"):
        TargetHealth("m", terminal_after=0, probe_interval_s=5.0)


@pytest.mark.parametrize(("state", "usable"), [(H, True), (S, True), (T, False)])
def test_usable_per_state(state: HealthState, usable: bool) -> None:
    h = TargetHealth("m", terminal_after=2, probe_interval_s=1.0)
    if state is not H:
        h.on_failure("x", 0.0)
    if state is T:
        h.on_failure("x", 0.0)
    assert h.state is state
    assert h.usable is usable


# -- the next-step decision ------------------------------------------------------------------------


class _Top(random.Random):
    """Jitter at the top of its range, so the backoff ceiling is the delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


POLICY = RetryPolicy(max_attempts=3, backoff_base_s=0.1, backoff_max_s=1.0)
SRV, TMO, RL, CLI = ErrorClass.SERVER, ErrorClass.TIMEOUT, ErrorClass.RATE_LIMITED, ErrorClass.CLIENT


@pytest.mark.parametrize(
    ("failure", "attempt", "retry_after", "usable", "step"),
    [
        # A client error is the client's: never retried, on any attempt.
        (CLI, 1, None, True, Fail()),
        (CLI, 1, 2.0, True, Fail()),
        # Server errors and timeouts: backoff (ceiling base x 2^(attempt-1), capped) while attempts last.
        (SRV, 1, None, True, Retry(0.1)),
        (TMO, 2, None, True, Retry(0.2)),
        (SRV, 3, None, True, NextTarget()),
        # A target that went terminal is left at once, whatever attempts are left.
        (SRV, 1, None, False, NextTarget()),
        (TMO, 1, None, False, NextTarget()),
        # A Retry-After is honoured, up to backoff_max_s.
        (SRV, 1, 0.5, True, Retry(0.5)),
        (SRV, 1, 9.0, True, Retry(1.0)),
        # Rate limited: the same target again (health untouched); out of attempts, fail with the delay.
        (RL, 1, 0.3, True, Retry(0.3)),
        (RL, 1, None, True, Retry(0.1)),
        (RL, 3, 7.0, True, Fail(7.0)),
        (RL, 3, None, True, Fail(0.4)),
        (RL, 1, 0.3, False, Retry(0.3)),
    ],
)
def test_next_step_table(
    failure: ErrorClass, attempt: int, retry_after: float | None, usable: bool, step: object
) -> None:
    got = POLICY.next_step(failure, attempt, retry_after_s=retry_after, usable=usable, rng=_Top())
    assert got == step


def test_an_engine_fault_moves_on_without_a_retry_or_the_budget() -> None:
    budget = RetryBudget(ratio=0.0, initial=5.0)
    for attempt in (1, 2, 3):
        step = POLICY.next_step(ErrorClass.ENGINE_FAULT, attempt, retry_after_s=0.1, budget=budget)
        assert step == NextTarget()
    assert budget.balance == 5.0 and budget.retries == 0


def test_next_step_spends_the_budget_only_on_a_retry() -> None:
    budget = RetryBudget(ratio=0.0, initial=1.0)
    assert POLICY.next_step(CLI, 1, budget=budget) == Fail() and budget.balance == 1.0
    assert POLICY.next_step(SRV, 3, budget=budget) == NextTarget() and budget.balance == 1.0
    assert isinstance(POLICY.next_step(SRV, 1, budget=budget), Retry) and budget.balance == 0.0
    # The budget is spent: a server error moves on, a rate limit fails with its delay.
    assert POLICY.next_step(SRV, 1, budget=budget) == NextTarget()
    assert POLICY.next_step(RL, 1, retry_after_s=0.2, budget=budget) == Fail(0.2)
    assert budget.retries == 1 and budget.denied == 2


def test_one_attempt_never_retries_and_bad_policies_are_refused() -> None:
    once = RetryPolicy(1, 0.0, 0.0)
    assert once.next_step(SRV, 1) == NextTarget() and once.next_step(RL, 1) == Fail(0.0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(2, -1.0, 1.0)


def test_every_retry_loop_takes_its_policy_from_its_own_spec_section() -> None:
    spec = parse_spec(
        {
            "models": [{"name": "m", "source": "none", "pools": [{}]}],
            "auth": {"enabled": False},
            "resilience": {"max_attempts": 4, "backoff_base_s": 0.2, "backoff_max_s": 2.0},
            "sessions": {"max_attempts": 6, "backoff_base_s": 0.3, "backoff_max_s": 3.0,
                         "webhook_retry": {"max_attempts": 2, "backoff_base_s": 1.0, "backoff_max_s": 9.0}},
        }
    )  # fmt: skip
    assert spec.resilience.retry_policy() == RetryPolicy(4, 0.2, 2.0)
    assert spec.sessions.retry_policy() == RetryPolicy(6, 0.3, 3.0)
    assert spec.sessions.webhook_retry.policy() == RetryPolicy(2, 1.0, 9.0)
    assert spec.models[0].disaggregation.prefill_retry_policy() == RetryPolicy(2, 0.0, 0.0)
