"""A request's record as Locust request events, so that token metrics appear in Locust's own web UI,
CSV and HTML report (Locust itself measures only the HTTP round trip: its issue #3076).

Rows (Locust's `Type` / `Name` columns) for each request of workload `name`:

| Type | Name | "response time" column | a failure when |
|---|---|---|---|
| `chat` / `completions` / `responses` | `name` | E2E (ms) | it failed (not for a 429) |
| `429` | `name reason` | time to the rejection (ms) | never: rejections are counted apart |
| `TTFT`, `TPOT` | `name` | milliseconds | never |
| `ITL` | `name` | each gap between output events (ms) | never |
| `SLO` | `name` | E2E (ms) | the request missed an SLO (so the failure % is 1 − attainment) |
| `TOKENS` | `name input` / `cached` / `output` / `reasoning` | **a token count, not a time** | never |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loadtests.summary import TOKEN_KINDS

_ENDPOINT = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


class RequestFailed(Exception):
    """A failed request (its reason is the message)."""


class SloMissed(Exception):
    """A request that completed but missed one of its SLOs."""


def endpoint_label(path: str) -> str:
    return _ENDPOINT.get(path, path)


def events_of(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The keyword arguments of each `events.request.fire(...)` for one record."""
    name, label = record["name"], endpoint_label(record.get("endpoint", ""))
    ms = lambda s: 1000.0 * (s or 0.0)  # noqa: E731

    def ev(type_: str, row: str, value: float, exc: Exception | None = None, length: int = 0) -> dict:
        return {
            "request_type": type_,
            "name": row,
            "response_time": value,
            "response_length": length,
            "exception": exc,
            "context": {},
        }

    if record["outcome"] == "rejected":
        return [ev("429", f"{name} {record.get('reason') or 'unknown'}", ms(record.get("e2e")))]
    if record["outcome"] == "failed":
        reason = f"{record.get('status')} {record.get('reason')}"
        return [
            ev(label, name, ms(record.get("e2e")), RequestFailed(reason)),
            ev("SLO", name, ms(record.get("e2e")), SloMissed("failed")),
        ]
    out = [ev(label, name, ms(record.get("e2e")), length=int(record.get("output") or 0))]
    for key, row in (("ttft", "TTFT"), ("tpot", "TPOT")):
        if record.get(key) is not None:
            out.append(ev(row, name, ms(record[key])))
    out.extend(ev("ITL", name, ms(g)) for g in record.get("itl") or ())
    missed = None if record.get("slo_met") else SloMissed("missed its SLO")
    out.append(ev("SLO", name, ms(record.get("e2e")), missed))
    out.extend(ev("TOKENS", f"{name} {k}", float(record.get(k) or 0)) for k in TOKEN_KINDS)
    return out
