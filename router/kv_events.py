"""The precise feed of the block index: vLLM KV events (`kv_events_config`, ZMQ publisher).

Each engine publishes `KVEventBatch`es of `BlockStored` (block hashes now cached),
`BlockRemoved` (evicted) and `AllBlocksCleared` on a ZMQ PUB socket as multipart messages
`(topic, sequence number, msgpack payload)`. `apply_event` mirrors one event into a `BlockIndex`
(pure; events are matched by class name so tests can build them without vLLM). `KVEventSubscriber`
reads one engine's socket in a daemon thread and hands decoded events over a queue; the router
drains the queue on its own event loop (`drain`), so the index is only ever touched by one thread.
A gap in sequence numbers means events were lost: the replica's entries are cleared, since the
approximate feed refills them and a stale "held" block is worse than a missing one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

from router.hashing import event_key
from router.index import BlockIndex

logger = logging.getLogger(__name__)

#: Marker put on the queue when events were lost (sequence gap): clear the replica.
LOST = object()


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
        self._stop.set()
        self._thread.join(timeout=2)

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
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        sock.setsockopt(zmq.RCVTIMEO, 200)
        sock.connect(self.endpoint)
        last_seq: int | None = None
        try:
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
                batch = decoder.decode(payload)
                for ev in batch.events:
                    self._put(ev)
                    self.received += 1
        except Exception:  # noqa: BLE001 - a dead subscriber degrades to the approximate feed
            logger.exception("KV event subscriber for %s stopped", self.replica)
        finally:
            sock.close(linger=0)
