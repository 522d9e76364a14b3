"""Rendezvous of a vLLM data-parallel group whose ranks are the replicas of one Ray Serve gang.

Rank 0 picks the group's address (its node IP and a free port) and publishes it on a small named
actor keyed by the gang id; the other ranks wait for it. A gang restarts as a unit (Serve's
RESTART_GANG policy) and gets a new gang id, so a stale address is never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ray

#: How long a rank waits for rank 0 to publish the group address.
RENDEZVOUS_TIMEOUT_S = 600.0


@ray.remote(num_cpus=0)
class _Rendezvous:
    def __init__(self) -> None:
        self._address: tuple[str, int] | None = None
        self._ready = asyncio.Event()

    def publish(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._ready.set()

    async def wait(self) -> tuple[str, int]:
        await self._ready.wait()
        assert self._address is not None
        return self._address


async def rendezvous(
    gang_id: str, rank: int, node_ip: Callable[[], str], free_port: Callable[[], int]
) -> tuple[tuple[str, int], Any]:
    """The (address, rpc port) of the DP group of `gang_id` (rank 0 chooses and publishes it), and
    the rendezvous actor's handle. Keep the handle for the replica's lifetime: the actor lives as
    long as its creator holds a reference, and ranks that start later still need to read it."""
    actor = _Rendezvous.options(name=f"tandem-dp-{gang_id}", get_if_exists=True).remote()
    if rank == 0:
        address = (node_ip(), free_port())
        await actor.publish.remote(*address)
        return address, actor
    host, port = await asyncio.wait_for(actor.wait.remote(), timeout=RENDEZVOUS_TIMEOUT_S)
    return (host, port), actor
