"""The MQTT wire format: topics, device ids, the sequence header and the reorder buffer."""

from __future__ import annotations

import random

import pytest

from streaming.errors import ProtocolError
from streaming.mqtt import (
    SEQ_MOD,
    DeviceTopic,
    Reorderer,
    check_prefix,
    pack_frame,
    parse_topic,
    subscriptions,
    topic,
    unpack_frame,
    valid_device_id,
)


def test_topics_round_trip_under_any_prefix() -> None:
    for prefix in ("voxlens", "home/voxlens", "a/b/c"):
        for kind in ("control", "audio/in", "events", "audio/out"):
            name = topic(prefix, "kitchen-1", kind)
            assert parse_topic(prefix, name) == DeviceTopic("kitchen-1", kind)
    assert subscriptions("home/vx") == [("home/vx/+/control", 1), ("home/vx/+/audio/in", 0)]
    assert parse_topic("voxlens", "voxlens/kitchen/status") is None
    assert parse_topic("voxlens", "voxlens/kitchen/audio") is None
    assert parse_topic("voxlens", "other/kitchen/control") is None
    assert parse_topic("voxlens", "voxlensx/kitchen/control") is None
    assert parse_topic("voxlens", "voxlens/a/b/control") is None  # 'a/b' is no device id


@pytest.mark.parametrize("device_id", ["kitchen", "car-42", "spk_1.living:room", "a@b", "0"])
def test_valid_device_ids(device_id: str) -> None:
    assert valid_device_id(device_id)


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "a#", "$SYS", "-x", ".x", "a b", "é",
                                       "x" * 65])
def test_invalid_device_ids(device_id: str) -> None:
    assert not valid_device_id(device_id)


def test_prefixes() -> None:
    assert check_prefix("home/voxlens") == "home/voxlens"
    for bad in ("", "/voxlens", "voxlens/", "a//b", "vx/+", "vx/#", "$SYS"):
        with pytest.raises(ValueError, match="prefix"):
            check_prefix(bad)


def test_sequence_header() -> None:
    assert pack_frame(1, b"\x01\x02") == b"\x00\x00\x00\x01\x01\x02"
    assert unpack_frame(pack_frame(SEQ_MOD + 5, b"ab")) == (5, b"ab")  # wraps at 2**32
    assert unpack_frame(pack_frame(7, b"")) == (7, b"")
    with pytest.raises(ProtocolError, match="header") as e:
        unpack_frame(b"\x00\x01")
    assert e.value.code == "bad_audio"


def deliver(r: Reorderer[int], order: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for seq in order:
        out += r.push(seq, seq)
    return out


def test_the_first_frames_wait_for_the_window_then_frames_pass_straight_through() -> None:
    r: Reorderer[int] = Reorderer(window=4)
    assert deliver(r, [11, 10, 12]) == []  # the stream's start is not known yet
    assert r.push(13, 13) == [(0, 10), (0, 11), (0, 12), (0, 13)]
    assert deliver(r, [14, 15]) == [(0, 14), (0, 15)]
    assert r.pending == 0 and (r.dropped, r.lost) == (0, 0)


def started(window: int = 4) -> Reorderer[int]:
    """A reorderer past its start, with 0 delivered."""
    r: Reorderer[int] = Reorderer(window=window)
    r.push(0, 0)
    assert r.flush() == [(0, 0)]
    return r


def test_swapped_frames_are_put_back_in_order() -> None:
    r = started()
    assert deliver(r, [2, 1, 3, 5, 4]) == [(0, k) for k in range(1, 6)]


def test_duplicates_and_late_frames_are_dropped() -> None:
    r = started()
    assert deliver(r, [1, 1, 3, 3, 0, 2]) == [(0, 1), (0, 2), (0, 3)]
    assert r.dropped == 3


def test_a_gap_the_window_cannot_bridge_is_given_up_and_reported() -> None:
    r = started()
    assert deliver(r, [2, 3, 4]) == []  # 1 may still come
    assert r.push(5, 5) == [(1, 2), (0, 3), (0, 4), (0, 5)]  # 5 is 4 past 1: give up on 1
    assert r.lost == 1
    assert r.push(1, 1) == [] and r.dropped == 1  # too late now
    assert r.push(30, 30) == [] and r.lost == 22  # a long gap: 6…26 given up at once
    assert r.flush() == [(24, 30)] and r.lost == 25  # 27…29 too, once nothing follows


def test_flush_plays_what_is_held_when_the_sender_goes_quiet() -> None:
    r = started(window=8)
    assert deliver(r, [3, 2, 6]) == []
    assert r.pending == 3
    assert r.flush() == [(1, 2), (0, 3), (2, 6)]
    assert r.pending == 0
    assert r.push(7, 7) == [(0, 7)]
    fresh: Reorderer[int] = Reorderer(window=8)
    assert deliver(fresh, [5, 4]) == [] and fresh.flush() == [(0, 4), (0, 5)]


def test_sequence_numbers_wrap() -> None:
    r: Reorderer[int] = Reorderer(window=4)
    top = SEQ_MOD - 2
    assert deliver(r, [top, 0, SEQ_MOD - 1, 1]) == [(0, top), (0, SEQ_MOD - 1), (0, 0), (0, 1)]
    assert r.push(2, 2) == [(0, 2)]


def test_a_sender_that_restarts_its_counter_is_followed() -> None:
    r: Reorderer[int] = Reorderer(window=2, resync=100)
    assert deliver(r, [5000, 5001]) == [(0, 5000), (0, 5001)]
    assert r.push(0, 0) == [(0, 0)] and r.restarts == 1  # far behind: a new stream
    assert r.push(1, 1) == [(0, 1)]
    assert r.push(90_000, 9) == [(0, 9)] and r.restarts == 2  # far ahead: likewise


def test_random_shuffles_and_duplicates_within_the_window_lose_nothing() -> None:
    rng = random.Random(3)
    for _ in range(50):
        order = list(range(200))
        for k in range(0, 200, 4):  # shuffled in blocks of 4: displaced by at most 3 places
            block = order[k:k + 4]
            rng.shuffle(block)
            order[k:k + 4] = block
        for k in sorted(rng.sample(range(200), 20), reverse=True):
            order.insert(k + 1, order[k])
        r: Reorderer[int] = Reorderer(window=8)
        out = deliver(r, order) + r.flush()
        assert out == [(0, k) for k in range(200)]
        assert r.dropped == 20 and r.lost == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Reorderer(window=0)
    with pytest.raises(ValueError):
        Reorderer(window=10, resync=5)
