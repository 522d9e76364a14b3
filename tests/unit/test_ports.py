"""The ports a replica picks for its engine to bind later (serving.replicas.ports)."""

from __future__ import annotations

import socket

from serving.replicas.ports import LOWEST, ephemeral_range, listen_port


def test_a_port_is_picked_below_the_ephemeral_range_and_is_bindable() -> None:
    lo, _ = ephemeral_range()
    for _ in range(20):
        port = listen_port()
        assert LOWEST <= port < lo
        with socket.socket() as s:
            s.bind(("", port))  # free when picked


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket() as held:
        held.bind(("", 0))
        taken = held.getsockname()[1]
        held.listen()
        draws = iter([taken, 23456])
        port = listen_port(pick=lambda a, b: next(draws), ephemeral=(taken + 1, 60999))
        assert port == 23456


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernel() -> None:
    def never(a: int, b: int) -> int:
        raise AssertionError("nothing to draw from")

    port = listen_port(pick=never, ephemeral=(LOWEST + 10, 60999))
    assert port > 0


def test_every_draw_taken_falls_back_to_the_kernel() -> None:
    draws: list[int] = []

    def pick(a: int, b: int) -> int:
        draws.append(a)
        return 25000

    port = listen_port(pick=pick, bindable=lambda p: False, ephemeral=(32768, 60999))
    assert port != 25000 and len(draws) == 64 and draws[0] == LOWEST


def test_the_range_file_is_read_and_a_missing_one_gives_linuxs_default(tmp_path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "nope")) == (32768, 60999)
