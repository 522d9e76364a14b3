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


def test_decoder_matches_vllms_own_encoding() -> None:
    """`decode_batch` (no vLLM import) reads what vLLM's publisher encodes: every kind, DP rank,
    int and bytes hashes, and the optional fields vLLM adds."""
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    from router.kv_events import decode_batch

    digests = BlockHasher(16).digests(list(range(48)), cache_salt="t")
    stored = BlockStored(
        block_hashes=digests, parent_block_hash=None, token_ids=list(range(48)), block_size=16,
        lora_id=None, medium="GPU", lora_name=None, group_idx=1, session_id="s",
    )  # fmt: skip
    events = [stored, BlockRemoved(block_hashes=[7, 9], medium="CPU"), AllBlocksCleared()]
    for rank in (None, 3):
        payload = msgspec.msgpack.Encoder().encode(
            KVEventBatch(ts=1.5, events=events, data_parallel_rank=rank)
        )
        got_rank, got = decode_batch(payload)
        assert got_rank == rank
        assert [type(e).__name__ for e in got] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
        assert got[0].block_hashes == digests and got[1].block_hashes == [7, 9]
        # The decoded events feed the index exactly as vLLM's own objects do.
        mine, theirs = BlockIndex(100), BlockIndex(100)
        apply_events(mine, "r", got[:1])
        apply_events(theirs, "r", events[:1])
        keys = BlockHasher(16).keys(list(range(48)), cache_salt="t")
        assert mine.match(keys) == theirs.match(keys) == {"r": 3}


def test_decoder_rejects_what_is_not_a_batch() -> None:
    import msgspec
    import pytest

    from router.kv_events import decode_batch

    with pytest.raises(ValueError, match="KVEventBatch"):
        decode_batch(msgspec.msgpack.encode({"ts": 1}))
    # Unknown event kinds (a newer vLLM) are skipped, not fatal.
    assert decode_batch(msgspec.msgpack.encode([1.0, [{"type": "Future", "x": 1}]])) == (None, [])


def test_subscriber_process_never_imports_vllm() -> None:
    """The router runs in the ingress: reading events must not pull in vLLM (and torch)."""
    import subprocess
    import sys

    code = (
        "import sys, msgspec\n"
        "from router.kv_events import decode_batch\n"
        "decode_batch(msgspec.msgpack.encode([1.0, [{'type': 'BlockStored', 'block_hashes': [1]}]]))\n"
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_subscriber_that_dies_queues_lost_so_its_replica_is_cleared() -> None:
    """A payload the decoder rejects kills the thread: the index must not keep the replica's blocks
    (no BlockRemoved will ever arrive from a dead subscriber)."""
    import msgspec
    import zmq

    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    sub = KVEventSubscriber("r1", f"tcp://127.0.0.1:{port}").start()
    idx = BlockIndex(100)
    idx.add("r1", [1, 2, 3])  # what the replica's events had stored so far
    try:
        deadline = time.monotonic() + 10
        got: list = []
        while LOST not in got:
            assert time.monotonic() < deadline, "no LOST marker after the subscriber died"
            # PUB drops what is sent before the subscription is live: send until the thread dies.
            if sub._thread.is_alive():
                pub.send_multipart([b"", (1).to_bytes(8, "big"), msgspec.msgpack.encode({"not": "a batch"})])
            time.sleep(0.05)
            got += sub.drain()
        sub.join(2.0)
        assert not sub._thread.is_alive()
        apply_events(idx, "r1", got)
        assert idx.blocks("r1") == 0
    finally:
        sub.stop()
        pub.close(linger=0)


def test_forgetting_a_replica_never_waits_for_its_subscriber_thread(monkeypatch) -> None:  # noqa: ANN001
    """`update_replicas` runs on the router's event loop: dropping a replica must not join the
    subscriber's thread, even one that ignores its stop flag for a while."""
    import threading

    from ray.serve.request_router import RequestRouter

    from router.serve_adapter import TandemRequestRouter

    release = threading.Event()

    class Stuck(KVEventSubscriber):
        def _run(self) -> None:
            release.wait(5.0)  # ignores stop()

    monkeypatch.setattr(RequestRouter, "update_replicas", lambda self, replicas: None)
    router = TandemRequestRouter.__new__(TandemRequestRouter)
    router.initialize_state(
        policy="cache_aware", block_budget=100, stale_after_s=5.0, sessions=10,
        weights={"prefix": 2.0, "load": 1.0, "kv": 0.5, "session": 1.0}, gate={"ratio": 1.25, "slack": 3.0},
    )  # fmt: skip
    router._known = {"r1"}
    router._subscribers["r1"] = sub = Stuck("r1", "tcp://127.0.0.1:1").start()
    try:
        t0 = time.perf_counter()
        router.update_replicas([])
        assert time.perf_counter() - t0 < 0.05
        assert "r1" not in router._subscribers and sub._thread.is_alive()  # asked to stop, not waited for
    finally:
        release.set()
        sub.join(2.0)
