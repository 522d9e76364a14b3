"""Shared test set-up: tests never touch the machine-wide Ray temp dir or a hub."""

from __future__ import annotations

import os
from pathlib import Path

from serving.replicas.ports import listen_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    """A TCP port free right now, for a server started later: outside the ephemeral range, where an
    outgoing connection could take it first (serving.replicas.ports)."""
    return listen_port()


# The live stack (one per session, started by the first test that asks for it).
from tests.stack import stack  # noqa: E402,F401

#: Where the tests that break the shared stack on purpose live (they kill replicas, stall engines).
FAULTS = Path(__file__).resolve().parent / "faults"


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ARG001
    """Run tests/faults after every other test (a stable sort: the order is kept otherwise), so no
    other test sees a stack that is still recovering from an injected fault."""
    items.sort(key=lambda item: item.path.is_relative_to(FAULTS))
