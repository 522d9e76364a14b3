"""A finished session's status and token counts reach the session worker's Ray metrics."""

from __future__ import annotations

from types import SimpleNamespace

from serving.sessions.server import _SessionMetrics


class _Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append((value, tags))


def test_finished_session_counts_its_status_and_each_kind_of_token() -> None:
    m = _SessionMetrics()
    m._finished, m._tokens = _Counter(), _Counter()  # record instead of exporting
    usage = {
        "input_tokens": 47,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 100,
        "output_tokens_details": {"reasoning_tokens": 40},
    }
    m(SimpleNamespace(model="tiny-reasoning"), {"status": "incomplete", "usage": usage})
    m(SimpleNamespace(model="tiny-reasoning"), {"status": "failed", "usage": None})
    assert m._finished.calls == [
        (1, {"model": "tiny-reasoning", "status": "incomplete"}),
        (1, {"model": "tiny-reasoning", "status": "failed"}),
    ]
    assert sorted((t["kind"], v) for v, t in m._tokens.calls) == [
        ("input", 47),
        ("output", 100),
        ("reasoning", 40),
    ]
