"""The Playout on a virtual clock: pacing ahead of real time, pause/resume/cut, events after a
turn's audio, and the heard estimate."""

from __future__ import annotations

import asyncio

import pytest

from streaming.events import Event, ReplyDone
from streaming.playout import Playout

pytestmark = pytest.mark.looptime

RATE = 16_000


def ms(n: float) -> bytes:
    return bytes(int(RATE * n / 1000) * 2)


async def test_paced_sends_the_first_chunk_at_once_then_stays_lead_ms_ahead() -> None:
    loop = asyncio.get_running_loop()
    playout = Playout(RATE, release=lambda event: None, client_buffer_ms=0, clock=loop.time)
    playout.put(1, ms(1000))
    t0 = loop.time()
    sent: list[tuple[float, int]] = []

    async def pump() -> None:
        async for chunk in playout.paced(40, 200):
            sent.append((loop.time() - t0, len(chunk)))

    task = asyncio.create_task(pump())
    await asyncio.sleep(2)
    task.cancel()
    assert sent[0][0] == 0  # no waiting for the first audio
    assert sum(n for _, n in sent) == len(ms(1000))
    for k, (t, _) in enumerate(sent):  # never more than 200 ms (+ one chunk) ahead
        assert (k + 1) * 0.04 - t <= 0.2 + 0.04 + 1e-6
    assert sent[-1][0] == pytest.approx(1.0 - 0.2 - 0.04, abs=0.021)
    assert playout.sent_ms(1) == pytest.approx(1000)


async def test_pause_holds_audio_resume_goes_on_cut_drops_it_and_later_audio() -> None:
    loop = asyncio.get_running_loop()
    playout = Playout(RATE, release=lambda event: None, clock=loop.time)
    playout.put(1, ms(100))
    assert len(playout.take(640)) == 640  # 20 ms
    playout.pause()
    assert playout.take(640) == b"" and playout.audible(1)
    playout.resume()
    assert len(playout.take(640)) == 640
    playout.cut(1)
    assert playout.take(640) == b"" and playout.queued_ms() == 0 and not playout.paused
    playout.put(1, ms(100))  # audio of a cut turn that was already on its way
    assert playout.queued_ms() == 0
    playout.put(2, ms(40))  # the next turn plays
    assert playout.take(10_000) == ms(40)
    assert playout.sent_ms(1) == pytest.approx(40) and playout.sent_ms(2) == pytest.approx(40)


async def test_reply_done_waits_for_the_last_audio_and_is_dropped_with_a_cut_turn() -> None:
    loop = asyncio.get_running_loop()
    released: list[Event] = []
    playout = Playout(RATE, release=released.append, clock=loop.time)
    assert not playout.after_audio(1, ReplyDone(1, "hi"))  # nothing queued: send it now
    playout.put(2, ms(40))
    assert playout.after_audio(2, ReplyDone(2, "hello"))
    playout.take(640)
    assert released == []
    playout.take(640)
    assert released == [ReplyDone(2, "hello")]  # as the last audio is taken
    playout.put(3, ms(40))
    assert playout.after_audio(3, ReplyDone(3, "cut"))
    playout.cut(3)
    playout.put(4, ms(20))
    playout.take(640)
    assert released == [ReplyDone(2, "hello")]


async def test_heard_is_what_was_sent_minus_what_the_client_still_holds() -> None:
    loop = asyncio.get_running_loop()
    playout = Playout(RATE, release=lambda event: None, client_buffer_ms=100, clock=loop.time)
    playout.put(1, ms(1000))
    playout.take(len(ms(500)))  # 500 ms sent at once: the client holds all of it
    assert playout.heard_ms(1) == 0
    await asyncio.sleep(0.3)
    assert playout.heard_ms(1) == pytest.approx(300 - 100)
    await asyncio.sleep(1)
    assert playout.heard_ms(1) == pytest.approx(500 - 100)  # its jitter buffer is never known
    assert playout.audible(1)  # still queued
