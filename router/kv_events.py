"""The precise feed of the block index: vLLM KV events (`kv_events_config`, ZMQ publisher).

Each engine publishes `KVEventBatch`es of `BlockStored` (block hashes now cached),
`BlockRemoved` (evicted) and `AllBlocksCleared` on a ZMQ PUB socket as multipart messages
`(topic, sequence number, msgpack payload)`. `apply_event` mirrors one event into a `BlockIndex`
(pure; events are matched by class name so tests can build them without vLLM). `KVEventSubscriber`
reads one engine's socket in a daemon thread and hands decoded events (`decode_batch`, no vLLM
import) over a queue; the router
drains the queue on its own event loop (`drain`), so the index is only ever touched by one thread.
A gap in sequence numbers means events were lost: the replica's entries are cleared, since the
approximate feed refills them and a stale "held" block is worse than a missing one. A subscriber
whose thread dies (a payload it cannot decode, a socket error) queues the same `LOST` marker as
its last item: no `BlockRemoved` will ever come from it, so the replica's entries must not outlive it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from router.hashing import event_key
from router.index import BlockIndex

logger = logging.getLogger(__name__)

#: Marker put on the queue when events were lost (sequence gap, or the subscriber died): clear the replica.
LOST = object()


@dataclass(slots=True)
class BlockStored:
    """Blocks now cached on the engine (vLLM `BlockStored`, the fields the index needs)."""

    block_hashes: list[Any]


@dataclass(slots=True)
class BlockRemoved:
    """Blocks evicted from the engine (vLLM `BlockRemoved`)."""

    block_hashes: list[Any]


@dataclass(slots=True)
class AllBlocksCleared:
    """The engine's prefix cache was reset (vLLM `AllBlocksCleared`)."""


_EVENT_TYPES = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved}


def decode_batch(payload: bytes) -> tuple[int | None, list[Any]]:
    """The events of one msgpack-encoded vLLM `KVEventBatch`, and its data-parallel rank.

    NOTE(why): vLLM's own decoder (`vllm.distributed.kv_events.KVEventBatch`) would import vLLM,
    and with it torch, into the ingress (where Ray Serve runs the request router): seconds of CPU
    holding the GIL on the router's first stats, which stalled the first requests' TTFT by ~3 s.
    The wire format is msgspec's: the batch is an array `[ts, events, data_parallel_rank?]`
    (`array_like=True`), each event a map tagged by its class name under "type" (`tag=True`).
    Event kinds the index does not use are skipped. `tests/unit/test_kv_events.py` checks this
    against payloads encoded by vLLM's own publisher types.
    """
    import msgspec

    raw = msgspec.msgpack.decode(payload)
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError("not a KVEventBatch: expected [ts, events, ...]")
    rank = raw[2] if len(raw) > 2 else None
    events: list[Any] = []
    for ev in raw[1]:
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind == "AllBlocksCleared":
            events.append(AllBlocksCleared())
        elif kind in _EVENT_TYPES:
            events.append(_EVENT_TYPES[kind](list(ev.get("block_hashes") or ())))
    return rank, events


def apply_event(index: BlockIndex, replica: str, event: Any) -> None:
    """Mirror one vLLM KV event of `replica` into `index`."""
    kind = type(event).__name__
    if kind == "BlockStored":
        index.add(replica, [event_key(h) for h in event.block_hashes])
    elif kind == "BlockRemoved":
        index.remove(replica, [event_key(h) for h in event.block_hashes])
    elif kind == "AllBlocksCleared":
        index.clear(replica)


def apply_events(index: BlockIndex, replica: str, events: Iterable[Any]) -> int:
    """Apply `events` in order; returns how many were applied. `LOST` clears the replica."""
    n = 0
    for ev in events:
        if ev is LOST:
            index.clear(replica)
        else:
            apply_event(index, replica, ev)
        n += 1
    return n


class KVEventSubscriber:
    """Subscribes to one engine's KV-event endpoint in a daemon thread.

    Args:
        replica: the replica id the events belong to.
        endpoint: the engine's ZMQ PUB address, e.g. tcp://10.0.0.5:5557.
        topic: the publisher's topic ("" = all).
        max_pending: events buffered before the oldest are dropped (then the replica is cleared).
    """

    def __init__(self, replica: str, endpoint: str, topic: str = "", max_pending: int = 100_000) -> None:
        self.replica = replica
        self.endpoint = endpoint
        self._topic = topic.encode()
        self.events: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{replica}", daemon=True)
        self.received = 0

    def start(self) -> KVEventSubscriber:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to stop; it closes its socket within one receive timeout (200 ms).

        Never blocks: the router calls this on its event loop. `join` waits, for tests.
        """
        self._stop.set()

    def join(self, timeout: float = 2.0) -> None:
        """Wait for the thread to end (after `stop`)."""
        self._thread.join(timeout=timeout)

    def drain(self, limit: int = 10_000) -> list[Any]:
        """Events received so far (up to `limit`), in order; never blocks."""
        out = []
        while len(out) < limit:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        return out

    def _put(self, item: Any) -> None:
        try:
            self.events.put_nowait(item)
        except queue.Full:
            # The router is not keeping up: drop what is queued and start over from a cleared
            # replica rather than apply a partial history.
            self.drain(self.events.maxsize)
            self.events.put_nowait(LOST)

    def _run(self) -> None:
        import zmq

        sock = None
        last_seq: int | None = None
        try:
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, self._topic)
            sock.setsockopt(zmq.RCVTIMEO, 200)
            sock.connect(self.endpoint)
            while not self._stop.is_set():
                try:
                    _topic, seq_bytes, payload = sock.recv_multipart()
                except zmq.Again:
                    continue
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if last_seq is not None and seq != last_seq + 1:
                    logger.warning("KV events from %s: lost %d batches", self.replica, seq - last_seq - 1)
                    self._put(LOST)
                last_seq = seq
                _rank, events = decode_batch(payload)
                for ev in events:
                    self._put(ev)
                    self.received += 1
        except Exception:  # noqa: BLE001 - a dead subscriber degrades to the approximate feed
            logger.exception("KV event subscriber for %s died; dropping its replica's blocks", self.replica)
            # NOTE: what it applied so far will never be evicted by a BlockRemoved: clear it.
            self._put(LOST)
        finally:
            if sock is not None:
                sock.close(linger=0)
