"""Mid-stream migration: when may a stream that already sent tokens be continued elsewhere, and as what.

A chat or text completion whose engine stream fails after its first token (the replica died, the
stream was cut, the engine stalled, or it ended without a finish reason) is continued on another
replica of the model, or on the next target of the tier's chain whose vocabulary is the same, from
the prompt plus the tokens already sent. Greedy decoding then gives, token for token, what the
uninterrupted run would have (Dynamo's `migration_limit` is the same idea). An error that is the
request's own doing is not migrated: a 4xx, or an engine fault (a 500 `engine_error`: the engine raised
on this input, and the continuation replays it), which ends the stream with its error as it would
without migration.

This module is pure: the decision (`MigrationPolicy.decide`) and the arithmetic of the resumed
request (`resume_sampling`). The glue that opens streams is serving.http.migration.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol, TypeVar

from router.resilience import ErrorClass, classify


class Failure(StrEnum):
    """Why a stream broke after its first token."""

    ERROR = "error"  # an error chunk with a 5xx status (replica death is a 503)
    STALLED = "stalled"  # nothing arrived within the stall timeout
    CUT = "cut"  # the stream ended without a finish reason (or with an engine "abort")


class Budget(Protocol):
    """The ingress's retry budget (router.resilience.RetryBudget)."""

    def try_retry(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """Continue the stream elsewhere (`migrate`), or end it with an error, and why."""

    migrate: bool
    reason: str


@dataclass(frozen=True, slots=True)
class MigrationPolicy:
    """When a broken stream is continued.

    Args:
        limit: migrations one request may make (0: never migrate).
    """

    limit: int

    def decide(
        self,
        failure: Failure,
        status: int | None,
        migrations: int,
        ids_known: bool,
        remaining: int,
        budget: Budget | None,
        error_type: str | None = None,
        progressed: bool = True,
    ) -> Decision:
        """Whether a stream that broke with `failure` is continued.

        Args:
            failure: how it broke.
            status: the error chunk's status (ERROR only). A 4xx is the request's own fault: never migrated.
            migrations: migrations this request already made.
            ids_known: every token sent so far came with its id (a stream whose ids are unknown cannot
                be continued exactly).
            remaining: output tokens the request may still generate.
            budget: the retry budget; a migration spends one retry (checked last, so nothing is
                spent on a stream that would not migrate anyway).
            error_type: the error chunk's type (ERROR only). A 500 `engine_error` is an engine fault
                (`router.resilience.classify`): the engine raised on this very input, so a continuation
                (the same prompt plus the tokens sent) would fail the same way: never migrated.
            progressed: the stream that broke sent a token since it (re)started. A continuation that
                stalled before its first chunk found the model not serving at all (an engine alive but
                stuck, and no other replica took it): another one would wait as long again, so the
                client gets its error now (`no_progress`).
        """
        if failure is Failure.ERROR and (status is None or status < 500):
            return Decision(False, "client_error")
        if failure is Failure.ERROR and classify(status, error_type=error_type) is ErrorClass.ENGINE_FAULT:
            return Decision(False, "engine_fault")
        if failure is Failure.STALLED and not progressed:
            return Decision(False, "no_progress")
        if self.limit <= 0:
            return Decision(False, "disabled")
        if migrations >= self.limit:
            return Decision(False, "limit")
        if not ids_known:
            return Decision(False, "ids_unknown")
        if remaining <= 0:
            return Decision(False, "nothing_left")
        if budget is not None and not budget.try_retry():
            return Decision(False, "budget")
        return Decision(True, failure.value)


class _Sampling(Protocol):
    max_tokens: int
    min_tokens: int


S = TypeVar("S", bound=_Sampling)


def resume_sampling(sampling: S, sent: int) -> S:
    """The sampling options of the continuation after `sent` tokens: the output limits lowered by them."""
    return replace(  # type: ignore[type-var]  # a dataclass
        sampling,
        max_tokens=sampling.max_tokens - sent,
        min_tokens=max(0, sampling.min_tokens - sent),
    )
