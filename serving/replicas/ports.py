"""Ports a replica picks for its engine to bind later: the KV-event publisher, the NIXL side channel
and SGLang's bootstrap server.

NOTE(why not bind port 0): the replica only picks the port; the engine (another process, seconds
later) binds it. A port from `bind(("", 0))` comes from the kernel's ephemeral range, which is also
where every outgoing connection on the node takes its local port (Ray's workers, raylets and GCS
clients open many), so by the time the engine binds, one of them may hold it: vLLM's EngineCore then
fails to start with `ZMQError: Address already in use (addr='tcp://*:35573')` and Serve restarts the
replica. Picking below the ephemeral range (`net.ipv4.ip_local_port_range`) and above Ray's worker
ports (10002-19999 unless `--min-worker-port`/`--max-worker-port` move them) leaves only other
explicit binders to race with, and those pick here the same way, at random.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path

#: The lowest port picked: above Ray's default worker ports (`--max-worker-port` 19999).
LOWEST = 20000
#: Fewer free ports than this below the ephemeral range: fall back to the kernel's choice.
_MIN_SPAN = 1000
_TRIES = 64
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range(path: str = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where the file cannot be read)."""
    try:
        lo, hi = (int(x) for x in Path(path).read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def listen_port(
    pick: Callable[[int, int], int] = random.randint,
    bindable: Callable[[int], bool] = _bindable,
    ephemeral: tuple[int, int] | None = None,
) -> int:
    """A port free now, outside the ephemeral range when there is room below it (see the module
    docstring); the kernel's choice otherwise. `pick(a, b)` draws a port in [a, b]."""
    lo, _ = ephemeral or ephemeral_range()
    top = lo - 1
    if top - LOWEST >= _MIN_SPAN:
        for _ in range(_TRIES):
            port = pick(LOWEST, top)
            if bindable(port):
                return port
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
