"""The precise index feed: vLLM's own KV event structs and ZMQ publisher into the block index."""

from __future__ import annotations

import time

from router.hashing import BlockHasher
from router.index import BlockIndex
from router.kv_events import LOST, KVEventSubscriber, apply_events
from tests.conftest import free_port


def _stored(digests: list[bytes]):
    from vllm.distributed.kv_events import BlockStored

    return BlockStored(
        block_hashes=digests, parent_block_hash=None, token_ids=[], block_size=16,
        lora_id=None, medium="GPU", lora_name=None,
    )  # fmt: skip


def test_events_mirror_into_the_index() -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved

    h = BlockHasher(16)
    digests = h.digests(list(range(64)), cache_salt="t")
    keys = h.keys(list(range(64)), cache_salt="t")
    idx = BlockIndex(100)
    apply_events(idx, "r1", [_stored(digests)])
    assert idx.match(keys) == {"r1": 4}  # keys the ingress computes == keys from the engine's events
    apply_events(idx, "r1", [BlockRemoved(block_hashes=[digests[2]], medium="GPU")])
    assert idx.match(keys) == {"r1": 2}
    apply_events(idx, "r1", [AllBlocksCleared()])
    assert idx.match(keys) == {}
    apply_events(idx, "r1", [_stored(digests), LOST])  # lost events: the replica starts over
    assert idx.blocks("r1") == 0


def test_subscriber_reads_vllms_zmq_publisher() -> None:
    from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

    port = free_port()
    pub = ZmqEventPublisher(data_parallel_rank=0, endpoint=f"tcp://*:{port}")  # "*": vLLM binds
    sub = KVEventSubscriber("r1", f"tcp://127.0.0.1:{port}").start()
    try:
        digests = BlockHasher(16).digests(list(range(32)))
        idx = BlockIndex(100)
        deadline = time.monotonic() + 10
        # PUB/SUB drops messages sent before the subscription is live: publish until one lands.
        while idx.blocks("r1") == 0:
            assert time.monotonic() < deadline, "no KV event arrived"
            pub.publish(KVEventBatch(ts=time.time(), events=[_stored(digests)]))
            time.sleep(0.1)
            apply_events(idx, "r1", [e for e in sub.drain() if e is not LOST])
        assert idx.blocks("r1") == 2 and sub.received >= 1
    finally:
        sub.stop()
        pub.shutdown()
