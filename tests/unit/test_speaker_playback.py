"""The speaker client's jitter buffer, on a scripted clock."""

from __future__ import annotations

from client.playback import JitterBuffer

RATE = 16_000
MS = RATE * 2 // 1000  # bytes per ms


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tone(ms: int, level: int = 1) -> bytes:
    return bytes([level, 0]) * (ms * MS // 2)


def played(buf: JitterBuffer, clock: Clock, ms: int) -> bytes:
    """Run the speaker for ``ms`` in 20 ms reads."""
    out = b""
    for _ in range(ms // 20):
        out += buf.read(20 * MS)
        clock.t += 0.02
    return out


def test_a_reply_waits_for_the_prebuffer_then_plays_and_counts() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=100, clock=clock)
    assert buf.read(20 * MS) == bytes(20 * MS)  # idle: silence
    buf.start_turn(1)
    buf.write(tone(60))
    assert buf.read(20 * MS) == bytes(20 * MS)  # 60 ms < prebuffer: still waiting
    buf.write(tone(60))
    out = played(buf, clock, 120)
    assert out == tone(120)
    assert buf.played_ms(1) == 120 and buf.last_turn == 1


def test_the_tail_of_a_reply_plays_once_nothing_more_comes() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=100, clock=clock)
    buf.start_turn(1)
    buf.write(tone(40))
    assert played(buf, clock, 80) == bytes(80 * MS)  # waiting for more
    assert played(buf, clock, 60) == bytes(20 * MS) + tone(40)  # 100 ms without news: play
    assert buf.played_ms(1) == 40


def test_an_underrun_buffers_again() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=60, clock=clock)
    buf.start_turn(1)
    buf.write(tone(60))
    assert played(buf, clock, 80) == tone(60) + bytes(20 * MS)
    assert buf.dry == 1
    buf.write(tone(20))
    assert played(buf, clock, 20) == bytes(20 * MS)  # waits for the prebuffer again
    buf.write(tone(40))
    assert played(buf, clock, 60) == tone(60)


def test_flush_drops_a_turn_and_its_late_audio_but_not_the_next() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=40, clock=clock)
    buf.start_turn(1)
    buf.write(tone(200, level=1))
    played(buf, clock, 60)
    buf.flush(1)
    assert buf.last_turn is None and buf.queued_ms() == 0
    buf.write(tone(100, level=1))  # still arriving for the interrupted turn: dropped
    assert buf.queued_ms() == 0
    assert played(buf, clock, 40) == bytes(40 * MS)
    buf.start_turn(2)
    buf.write(tone(40, level=2))
    assert played(buf, clock, 40) == tone(40, level=2)
    assert buf.played_ms(1) == 60 and buf.played_ms(2) == 40


def test_turns_play_in_order() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=20, clock=clock)
    buf.start_turn(1)
    buf.write(tone(40, level=1))
    buf.start_turn(2)
    buf.write(tone(40, level=2))
    assert played(buf, clock, 80) == tone(40, level=1) + tone(40, level=2)


def test_played_discounts_what_is_still_inside_the_sound_device() -> None:
    clock = Clock()
    buf = JitterBuffer(RATE, prebuffer_ms=20, clock=clock)
    buf.start_turn(1)
    buf.write(tone(200))
    played(buf, clock, 200)
    clock.t -= 0.02  # just after the last read
    assert buf.played_ms(1, latency_ms=100) == 100
    clock.t += 0.5  # long after: the device has played it all
    assert buf.played_ms(1, latency_ms=100) == 200
