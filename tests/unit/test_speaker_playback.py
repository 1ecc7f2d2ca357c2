"""The clients' playback buffer as the speaker client sets it up (a prebuffer against network
jitter), on a scripted clock; and the playback reporter every client runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from client.common.playback import PlaybackBuffer, PlaybackReporter

RATE = 16_000
MS = RATE * 2 // 1000  # bytes per ms


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tone(ms: int, level: int = 1) -> bytes:
    return bytes([level, 0]) * (ms * MS // 2)


def played(buf: PlaybackBuffer, clock: Clock, ms: int) -> bytes:
    """Run the speaker for ``ms`` in 20 ms reads."""
    out = b""
    for _ in range(ms // 20):
        out += buf.fill(20 * MS)
        clock.t += 0.02
    return out


def test_a_reply_waits_for_the_prebuffer_then_plays_and_counts() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=100, clock=clock)
    assert buf.fill(20 * MS) == bytes(20 * MS)  # idle: silence
    buf.write(1, tone(60))
    assert buf.fill(20 * MS) == bytes(20 * MS)  # 60 ms < prebuffer: still waiting
    buf.write(1, tone(60))
    out = played(buf, clock, 120)
    assert out == tone(120)
    assert buf.played_ms(1) == 120 and buf.last_turn == 1


def test_the_tail_of_a_reply_plays_once_nothing_more_comes() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=100, clock=clock)
    buf.write(1, tone(40))
    assert played(buf, clock, 80) == bytes(80 * MS)  # waiting for more
    assert played(buf, clock, 60) == bytes(20 * MS) + tone(40)  # 100 ms without news: play
    assert buf.played_ms(1) == 40


def test_an_underrun_buffers_again() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=60, clock=clock)
    buf.write(1, tone(60))
    assert played(buf, clock, 80) == tone(60) + bytes(20 * MS)
    assert buf.dry == 1
    buf.write(1, tone(20))
    assert played(buf, clock, 20) == bytes(20 * MS)  # waits for the prebuffer again
    buf.write(1, tone(40))
    assert played(buf, clock, 60) == tone(60)


def test_a_cut_drops_a_turn_and_its_late_audio_but_not_the_next() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=40, clock=clock)
    buf.write(1, tone(200, level=1))
    played(buf, clock, 60)
    buf.cut(1)
    assert buf.last_turn is None and buf.queued_ms() == 0
    buf.write(1, tone(100, level=1))  # still arriving for the interrupted turn: dropped
    assert buf.queued_ms() == 0
    assert played(buf, clock, 40) == bytes(40 * MS)
    buf.write(2, tone(40, level=2))
    assert played(buf, clock, 40) == tone(40, level=2)
    assert buf.played_ms(1) == 60 and buf.played_ms(2) == 40


def test_turns_play_in_order() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=20, clock=clock)
    buf.write(1, tone(40, level=1))
    buf.write(2, tone(40, level=2))
    assert played(buf, clock, 80) == tone(40, level=1) + tone(40, level=2)


def test_played_discounts_what_is_still_inside_the_sound_device() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=20, clock=clock)
    buf.write(1, tone(200))
    played(buf, clock, 200)
    clock.t -= 0.02  # just after the last read
    assert buf.played_ms(1, latency_ms=100) == 100
    clock.t += 0.5  # long after: the device has played it all
    assert buf.played_ms(1, latency_ms=100) == 200


def test_a_stalled_output_loses_the_oldest_audio() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=20, max_ms=100, clock=clock)
    buf.write(1, tone(60, level=1))
    buf.write(2, tone(80, level=2))  # 140 ms into 100: the oldest 40 ms go
    assert buf.queued_ms() == 100 and buf.overflow == 40 * MS
    assert played(buf, clock, 100) == tone(20, level=1) + tone(80, level=2)


def test_a_new_session_forgets_the_turns_of_the_last() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=20, clock=clock)
    buf.write(1, tone(100))
    played(buf, clock, 40)
    buf.cut(1)
    buf.write(2, tone(100))
    buf.clear()  # the next session numbers its turns afresh
    assert buf.queued_ms() == 0 and buf.played_ms(1) == 0 and buf.last_turn is None
    buf.write(1, tone(40))  # its turn 1 is not the one cut before
    assert played(buf, clock, 40) == tone(40)


def test_read_hands_out_one_turn_at_a_time_and_nothing_before_the_prebuffer() -> None:
    clock = Clock()
    buf = PlaybackBuffer(RATE, prebuffer_ms=40, clock=clock)
    buf.write(1, tone(20, level=1))
    assert buf.read(100 * MS) == b""  # 20 ms < prebuffer, and it just came
    buf.write(1, tone(20, level=1))
    buf.write(2, tone(60, level=2))
    assert buf.read(100 * MS) == tone(40, level=1)
    assert buf.read(100 * MS) == tone(60, level=2)


class Wire:
    """The reporter's scripted view: what plays (set by the test) and what it sent."""

    def __init__(self) -> None:
        self.now: tuple[int, int] | None = None
        self.sent: list[dict[str, Any]] = []
        self.down = False  # sends fail as on a connection that is going

    def playing(self) -> tuple[int, int] | None:
        return self.now

    async def send(self, message: dict[str, Any]) -> None:
        if self.down:
            raise ConnectionError("gone")
        self.sent.append(message)


async def test_the_reporter_sends_changes_only_and_the_count_at_the_end() -> None:
    wire = Wire()
    reporter = PlaybackReporter(wire.playing, wire.send)
    await reporter.report()  # nothing plays: nothing to say
    for now in [(3, 200), (3, 400), (3, 400), (3, 560), (3, 560)]:  # played out at 560 ms
        wire.now = now
        await reporter.report()
    assert wire.sent == [{"type": "playback", "turn_id": 3, "played_ms": ms}
                         for ms in (200, 400, 560)]
    wire.now = None  # that reply is over; the next one is reported afresh
    await reporter.report()
    wire.now = (4, 0)
    await reporter.report()
    assert wire.sent[-1] == {"type": "playback", "turn_id": 4, "played_ms": 0}


async def test_a_report_that_could_not_go_out_goes_at_the_next_tick() -> None:
    wire = Wire()
    reporter = PlaybackReporter(wire.playing, wire.send)
    wire.now, wire.down = (1, 200), True
    await reporter.report()
    assert wire.sent == [] and reporter.last is None
    wire.down = False
    await reporter.report()
    assert wire.sent == [{"type": "playback", "turn_id": 1, "played_ms": 200}]


@pytest.mark.looptime
async def test_the_reporter_ticks_every_200_ms_until_cancelled() -> None:
    wire = Wire()
    reporter = PlaybackReporter(wire.playing, wire.send)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.05)  # the count moves every 100 ms, between the 200 ms ticks
    for ms in range(0, 1000, 100):
        wire.now = (1, ms)
        await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert [m["played_ms"] for m in wire.sent] == [100, 300, 500, 700, 900]
