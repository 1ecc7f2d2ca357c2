"""Barge-in and turn-taking logic: fake engines, a real Playout drained by a fake speaker in
20 ms ticks, on a virtual clock (looptime)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from pipelines.bargein import (
    CUT_MARK,
    BargeInConfig,
    endpoint_silence_ms,
    heard_text,
    is_backchannel,
    is_echo,
    said_between,
)
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeTurn, FakeVad
from pipelines.session import Engines, Session, SessionConfig
from pipelines.turn import SpokenChunk
from streaming.audio import Float32Array
from streaming.events import (
    Event,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    SpeechStarted,
    SpeechStopped,
    Transcript,
)

pytestmark = pytest.mark.looptime

RATE = 16_000
CHUNK = 320  # 20 ms
REPLY = ("Paris is the capital of France. It has many museums and a famous iron tower. "
         "People love its food and its cafes.")
SCRIPT = {200: "What is the capital of France?", 300: "Wait, tell me about Spain instead.",
          400: "Yeah.", 500: "Paris is the capital", 600: "I want to go to the",
          800: "the amp.", 900: ""}


def tone(hz: int, ms: int) -> Float32Array:
    t = np.arange(16 * ms) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def silence(ms: int) -> Float32Array:
    return np.zeros(16 * ms, dtype=np.float32)


def transcribe(audio: Float32Array) -> str:
    """The script's line for the utterance's tone (its dominant frequency)."""
    spectrum = np.abs(np.fft.rfft(audio))
    hz = int(round(np.argmax(spectrum) * RATE / audio.size / 100) * 100)
    return SCRIPT.get(hz, "")


@dataclass
class Played:
    t: float
    turn_id: int | None
    nbytes: int


class Room:
    """A session, its transport (events out) and a speaker taking 20 ms of its playout per
    tick."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.playout = session.playout
        self.events: list[tuple[float, Event]] = []
        self.played: list[Played] = []
        self.loop = asyncio.get_running_loop()
        self.echo: Echo | None = None  # when the server cancels the client's echo

    async def transport(self) -> None:
        async for ev in self.session.events:
            self.events.append((self.loop.time(), ev))

    async def speaker(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            turn = self.playout._queue[0].turn_id if self.playout._queue else None
            chunk = self.playout.take(RATE * 2 // 50)
            if chunk:
                self.played.append(Played(self.loop.time(), turn, len(chunk)))

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for _, e in self.events if isinstance(e, kind)]

    def played_ms(self, turn_id: int, until: float | None = None) -> float:
        n = sum(p.nbytes for p in self.played
                if p.turn_id == turn_id and (until is None or p.t <= until))
        return n / 2 * 1000 / RATE

    async def speak(self, *parts: Float32Array) -> float:
        """Stream audio in virtual real time; returns when its first sample went in."""
        audio = np.concatenate(parts)
        start = self.loop.time()
        for i in range(0, audio.size, CHUNK):
            await self.session.push_audio(audio[i:i + CHUNK])
            await asyncio.sleep(0.02)
        return start

    async def until(self, predicate, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
        for _ in range(int(timeout_s / 0.02)):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")


class Echo:
    """The microphone side of a client whose echo the server cancels, whose canceller finds
    this much voice beyond the reply's echo in the microphone (streaming/echo.py measures it
    on real audio: tests/e2e/test_echo.py)."""

    position_ms = 0.0

    def __init__(self, beyond_ms: int) -> None:
        self.beyond_ms = beyond_ms
        self.asked: list[tuple[float, float]] = []

    def played(self, pcm: bytes) -> None:
        pass

    def forget_unplayed(self) -> None:
        pass

    def voice_beyond_echo_ms(self, start_ms: float, end_ms: float) -> int | None:
        self.asked.append((start_ms, end_ms))
        return self.beyond_ms


@contextlib.asynccontextmanager
async def open_room(beyond_echo_ms: int | None = None,
                    turn: FakeTurn | None = None) -> AsyncIterator[Room]:
    """Opened inside each test: a fixture's timers would run on the real clock, not looptime."""
    loop = asyncio.get_running_loop()
    engines = Engines(FakeVad(), FakeAsr(transcribe, latency_s=0.2),
                      FakeLlm(REPLY, first_token_s=0.1, token_s=0.03), FakeTts(RATE, ms_per_char=60),
                      turn=turn)
    config = SessionConfig(output_rate=RATE, bargein=BargeInConfig(client_buffer_ms=0))
    session = Session("b1", engines, config, clock=loop.time)
    r = Room(session)
    if beyond_echo_ms is not None:
        r.echo = Echo(beyond_echo_ms)
        session.playout.reference = r.echo
        session.attach_echo(r.echo)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(r.transport())
        speaker = tg.create_task(r.speaker())
        yield r
        session.close()
        speaker.cancel()


async def ask_and_wait_for_audio(room: Room, ms: float) -> None:
    await room.speak(tone(200, 1200), silence(700))
    await room.until(lambda: room.played_ms(1) >= ms)


# ---- pure rules ------------------------------------------------------------------------

def test_heard_text_follows_the_chunk_timing() -> None:
    spoken = [SpokenChunk("Paris is the capital", 1000), SpokenChunk("of France.", 500)]
    assert heard_text(spoken, 0) == ""
    assert heard_text(spoken, 500) == "Paris is"  # cut at a word, never inside one
    assert heard_text(spoken, 1000) == "Paris is the capital"
    assert heard_text(spoken, 1300) == "Paris is the capital of"
    assert heard_text(spoken, 5000) == "Paris is the capital of France."


def test_said_between_gives_the_words_playing_in_a_stretch() -> None:
    spoken = [SpokenChunk("Paris is the capital", 1000), SpokenChunk("of France.", 500)]
    assert said_between(spoken, 0, 300) == "Paris is"  # "is" starts at 300 ms
    assert said_between(spoken, 400, 700) == "is the capital"
    assert said_between(spoken, 1100, 5000) == "of France."
    assert said_between(spoken, -2000, 0) == "Paris"
    assert said_between(spoken, 2000, 3000) == ""


def test_backchannels_echo_and_endpoint_rules() -> None:
    cfg = BargeInConfig()
    for text, lang in [("Yeah.", "en"), ("Uh-huh.", "en"), ("Oh, okay.", "en"), ("嗯嗯", "zh"),
                       ("Ja, genau.", "de"), ("Mm-hmm", None)]:
        assert is_backchannel(text, lang, cfg), text
    for text, lang in [("Stop.", "en"), ("No, wait.", "en"), ("What about Spain?", "en"),
                       ("不对", "zh")]:
        assert not is_backchannel(text, lang, cfg), text
    assert is_echo("the capital of France", REPLY, cfg)
    assert not is_echo("tell me about Spain instead", REPLY, cfg)
    # the person's question shares common words with the reply, but not its word order
    assert not is_echo("What do you see?", "I see a cat. Do you want to know more?", cfg)
    times = {"question_ms": 350, "normal_ms": 500, "incomplete_ms": 1100}
    assert endpoint_silence_ms("What is the capital of France?", **times) == 350
    assert endpoint_silence_ms("Paris is nice.", **times) == 500
    for trailing in ["I want to go to the", "I was thinking, um", "Tell me about Paris and",
                     "So I went there,", "Well..."]:
        assert endpoint_silence_ms(trailing, **times) == 1100, trailing


# ---- the session -----------------------------------------------------------------------

async def test_speaking_over_the_reply_interrupts_it_and_history_keeps_the_heard_part() -> None:
    async with open_room() as room:
        await ask_and_wait_for_audio(room, 1500)
        onset = await room.speak(tone(300, 1500), silence(800))
        await room.until(lambda: len(room.of(ReplyDone)) >= 1 and room.of(ReplyInterrupted))
        (cut,) = room.of(ReplyInterrupted)
        assert cut.turn_id == 1
        t_cut = next(t for t, e in room.events if isinstance(e, ReplyInterrupted))
        last_audio = max(p.t for p in room.played if p.turn_id == 1)
        assert last_audio - onset <= 0.3  # the reply went silent within 300 ms of the onset
        assert last_audio <= t_cut  # and nothing of it after the event
        assert cut.played_ms == pytest.approx(room.played_ms(1), abs=1)
        assert cut.heard_text and REPLY.startswith(cut.heard_text) and len(cut.heard_text) < len(REPLY)
        (done,) = room.of(ReplyDone)
        assert done.turn_id != 1  # the new turn was answered
        finals = [t.text for t in room.of(Transcript) if t.final]
        assert finals == [SCRIPT[200], SCRIPT[300]]
        history = list(room.session.history.pairs())
        assert history[1] == ("assistant", cut.heard_text + CUT_MARK)
        assert history[2:] == [("user", SCRIPT[300]), ("assistant", REPLY)]


@pytest.mark.parametrize("sound", ["backchannel", "noise", "echo"])
async def test_backchannel_noise_and_echo_do_not_interrupt(sound: str) -> None:
    async with open_room() as room:
        await ask_and_wait_for_audio(room, 1000)
        parts = {"backchannel": [tone(400, 450), silence(900)],
                 "noise": [tone(700, 150), silence(900)],
                 "echo": [tone(500, 1000), silence(900)]}[sound]
        start = await room.speak(*parts)
        await room.until(lambda: bool(room.of(ReplyDone)))
        await room.until(lambda: not room.playout.queued_ms())
        assert not room.of(ReplyInterrupted)
        assert [t.text for t in room.of(Transcript) if t.final] == [SCRIPT[200]]  # no new turn
        assert len(room.of(ReplyStarted)) == 1
        gaps = [b.t - a.t for a, b in zip(room.played, room.played[1:], strict=False) if b.t > start]
        assert max(gaps) > 0.05  # it did pause while the sound was judged ...
        emitted = sum(c.duration_ms for c in room.session._current.turn.spoken)  # type: ignore[union-attr]
        assert room.played_ms(1) == pytest.approx(emitted, abs=1)  # ... and then played all of it
        assert [k for k, _ in room.session.history.pairs()] == ["user", "assistant"]
        assert room.session.history.items[1].text == REPLY


@pytest.mark.parametrize("beyond_ms", [0, 400], ids=["only echo", "a voice beyond it"])
async def test_a_long_sound_without_words_cuts_the_reply_unless_it_is_only_echo(
        beyond_ms: int) -> None:
    """A sound over the reply with no words to judge it by (residual echo Whisper makes
    nothing of) cuts the reply after interrupt_after_ms, unless the microphone held nothing
    louder than the reply's echo can be. Either way it is no turn."""
    async with open_room(beyond_echo_ms=beyond_ms) as room:
        await ask_and_wait_for_audio(room, 1000)
        await room.speak(tone(900, 2000), silence(900))
        if not beyond_ms:
            await room.until(lambda: bool(room.of(ReplyDone)))
            await room.until(lambda: not room.playout.queued_ms())
            assert not room.of(ReplyInterrupted)
            assert room.played_ms(1) == pytest.approx(
                sum(c.duration_ms for c in room.session._current.turn.spoken), abs=1)  # type: ignore[union-attr]
        else:
            await room.until(lambda: bool(room.of(ReplyInterrupted)))
        assert [t.text for t in room.of(Transcript) if t.final] == [SCRIPT[200]]
        assert room.echo is not None
        # judged in the microphone's stream, from a little before the sound (it began after
        # 1.9 s of question and silence) to its latest voiced frame
        start, end = room.echo.asked[0]
        assert 1900 - 400 <= start <= 1900 - 200 and end >= 1900 + 1000


@pytest.mark.parametrize("beyond_ms", [0, 400], ids=["only echo", "a voice beyond it"])
async def test_words_over_the_reply_cut_it_only_when_louder_than_its_echo(beyond_ms: int) -> None:
    """Garbled echo is transcribed as words the reply never said ("the amp."): with the
    server cancelling the echo, words cut the reply only when the microphone held more than
    its echo could; else they are no turn."""
    async with open_room(beyond_echo_ms=beyond_ms) as room:
        await ask_and_wait_for_audio(room, 1000)
        await room.speak(tone(800, 600), silence(900))
        if beyond_ms:
            await room.until(lambda: bool(room.of(ReplyInterrupted)))
            await room.until(lambda: len(room.of(ReplyDone)) >= 1)
            assert [t.text for t in room.of(Transcript) if t.final] == [SCRIPT[200], SCRIPT[800]]
        else:
            await room.until(lambda: bool(room.of(ReplyDone)))
            await room.until(lambda: not room.playout.queued_ms())
            assert not room.of(ReplyInterrupted)
            assert [t.text for t in room.of(Transcript) if t.final] == [SCRIPT[200]]


@pytest.mark.parametrize("beyond_ms", [0, 400], ids=["only echo", "a voice beyond it"])
async def test_the_echo_of_the_reply_s_last_words_is_no_turn(beyond_ms: int) -> None:
    """Just after the reply has played its echo can still come back (room, microphone path,
    voice detection): words then are judged as over the reply. Echo is no turn; a person
    answering at once is, and nothing is cut: the whole reply was heard."""
    async with open_room(beyond_echo_ms=beyond_ms) as room:
        await room.speak(tone(200, 1200), silence(700))
        await room.until(lambda: bool(room.of(ReplyDone)))
        await room.until(lambda: not room.playout.audible(1))
        await room.speak(tone(800, 600), silence(900))
        await room.until(lambda: len(room.of(SpeechStopped)) >= 2)
        await asyncio.sleep(3)  # the endpoint, the final transcript and a reply if any
        finals = [t.text for t in room.of(Transcript) if t.final]
        assert finals == ([SCRIPT[200], SCRIPT[800]] if beyond_ms else [SCRIPT[200]])
        assert not room.of(ReplyInterrupted)
        assert room.session.history.items[1].text == REPLY


async def test_words_the_reply_said_long_before_are_the_persons_not_echo() -> None:
    """Echo is of what played just before and while the person spoke: repeating words of
    the reply's first sentence seconds later ("Paris is the capital?") interrupts."""
    async with open_room() as room:
        await ask_and_wait_for_audio(room, 4500)  # the first sentence ended at 1.9 s
        await room.speak(tone(500, 1000), silence(900))
        await room.until(lambda: bool(room.of(ReplyInterrupted)))
        await room.until(lambda: len(room.of(ReplyStarted)) == 2)
        assert [t.text for t in room.of(Transcript) if t.final] == [SCRIPT[200], SCRIPT[500]]


async def test_manual_interrupt_and_typed_turn_over_a_reply() -> None:
    async with open_room() as room:
        room.session.submit_text("tell me about Paris")
        await room.until(lambda: room.played_ms(1) >= 800)
        room.session.interrupt()
        await room.until(lambda: bool(room.of(ReplyInterrupted)))
        (cut,) = room.of(ReplyInterrupted)
        assert cut.turn_id == 1 and 700 <= cut.played_ms < 2000  # sent minus the last frame
        sent = room.played_ms(1)
        room.session.submit_text("and Spain?")
        await room.until(lambda: room.played_ms(2) >= 500)
        room.session.submit_text("and Italy?")  # typing over a reply interrupts it too
        await room.until(lambda: len(room.of(ReplyInterrupted)) == 2)
        assert room.played_ms(1) == sent
        assert [e.turn_id for e in room.of(ReplyInterrupted)] == [1, 2]


async def test_interrupt_while_the_first_chunk_is_synthesized() -> None:
    loop = asyncio.get_running_loop()
    tts = FakeTts(RATE, latency_s=3.0)
    session = Session("b2", Engines(FakeVad(), FakeAsr(), FakeLlm(REPLY), tts),
                      SessionConfig(output_rate=RATE), clock=loop.time)
    playout = session.playout
    r = Room(session)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(r.transport())
        session.submit_text("tell me about Paris")
        await r.until(lambda: len(tts.calls) >= 1)
        session.interrupt()
        await r.until(lambda: bool(r.of(ReplyInterrupted)))
        await asyncio.sleep(5)
        session.close()
    (cut,) = r.of(ReplyInterrupted)
    assert (cut.played_ms, cut.heard_text) == (0, "")
    assert playout.sent_ms(1) == 0 and not playout.queued_ms()
    assert session.history.items[1].text == ""  # nothing was heard: nothing said


async def test_interrupt_at_the_very_end_and_after_the_end() -> None:
    async with open_room() as room:
        room.session.submit_text("tell me about Paris")
        def generated() -> bool:
            reply = room.session._current
            return reply is not None and not reply.making
        await room.until(lambda: generated() and 0 < room.playout.queued_ms() <= 300)
        room.session.interrupt()  # generation is over, the last words are still playing
        await room.until(lambda: bool(room.of(ReplyInterrupted)))
        (cut,) = room.of(ReplyInterrupted)
        assert len(cut.heard_text) > len(REPLY) // 2
        assert room.session.history.items[1].text == cut.heard_text + CUT_MARK
        room.session.submit_text("and Spain?")
        await room.until(lambda: bool(room.of(ReplyDone)))
        assert [d.turn_id for d in room.of(ReplyDone)] == [2]  # reply.done waits for the audio
        await room.until(lambda: not room.playout.audible(2))
        room.session.interrupt()  # nothing is playing: nothing to interrupt
        await asyncio.sleep(1)
        assert len(room.of(ReplyInterrupted)) == 1


async def test_the_clients_playback_report_decides_what_was_heard() -> None:
    async with open_room() as room:
        room.session.submit_text("tell me about Paris")
        await room.until(lambda: room.played_ms(1) >= 3000)
        room.session.playback(1800, 1)  # a client whose speaker lags behind what was sent
        room.session.interrupt()
        await room.until(lambda: bool(room.of(ReplyInterrupted)))
        (cut,) = room.of(ReplyInterrupted)
        assert cut.played_ms == 1800
        assert cut.heard_text == heard_text(room.session._current.turn.spoken, 1800)  # type: ignore[union-attr]


async def test_endpoint_waits_longer_when_the_person_trails_off() -> None:
    async with open_room() as room:
        start = await room.speak(tone(600, 1200), silence(1600))
        (t_stop, _), = [(t, e) for t, e in room.events if isinstance(e, SpeechStopped)]
        assert t_stop - (start + 1.2) >= 1.1  # "… go to the": 1.1 s of silence, not 0.5
        assert [t for t, e in room.events if isinstance(e, SpeechStarted)]
        room.events.clear()
        start = await room.speak(tone(200, 1200), silence(1000))
        (t_stop, _), = [(t, e) for t, e in room.events if isinstance(e, SpeechStopped)]
        assert t_stop - (start + 1.2) < 0.5  # a complete question: 0.35 s


@pytest.mark.parametrize("probability", [0.9, 0.1], ids=["sounds finished", "does not"])
async def test_a_turn_that_sounds_finished_ends_after_a_short_silence(probability: float) -> None:
    """The end-of-turn model is asked at the first silent frame: a turn it finds finished
    ends after complete_ms (0.2 s), unless its words trail off ("… go to the": 1.1 s, the two
    disagree); one it does not find finished waits by the transcript's rules."""
    turn = FakeTurn(probability)
    async with open_room(turn=turn) as room:
        start = await room.speak(tone(200, 1200), silence(1000))
        (t_stop, _), = [(t, e) for t, e in room.events if isinstance(e, SpeechStopped)]
        waited = t_stop - (start + 1.2)
        if probability > 0.5:
            assert waited < 0.3  # 0.2 s of silence, not the question's 0.35 s
        else:
            assert 0.35 <= waited < 0.5
        assert turn.calls and turn.calls[0] >= 16 * 1200  # the utterance so far
        listener = room.session._listener
        assert listener is not None and listener._seg.silence_ms == 500  # the next starts anew
        room.events.clear()
        start = await room.speak(tone(600, 1200), silence(1600))
        (t_stop, _), = [(t, e) for t, e in room.events if isinstance(e, SpeechStopped)]
        assert t_stop - (start + 1.2) >= 1.1
