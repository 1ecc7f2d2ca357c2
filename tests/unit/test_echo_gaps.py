"""The server's echo canceller (streaming/echo.py) when the server itself runs late.

An overloaded server's event loop is held up (0.1-0.8 s, measured in a failing run of
tests/e2e/test_mqtt.py's speaker without echo cancellation) just as TTS finishes a chunk of
the reply: the microphone audio waits in the transport meanwhile and comes in a burst after,
and the chunk goes out at the same wake-up. A smart speaker without echo cancellation streams
its microphone all along and plays each chunk as it arrives (after a TTS gap of seconds) into
a small room, loud and late (client/acoustics.py: -3 dB, 120 ms). Whatever the backlog, the
reply's echo alone never counts as a person's voice over it (barge-in would cut the reply),
and a person's word over it still does. Time is virtual (1 ms steps): each run is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from client.common.acoustics import EchoRoom
from pipelines.bargein import BargeInConfig
from streaming.audio import MODEL_RATE, Float32Array, float_to_pcm16, resample
from streaming.echo import FRAME, EchoCanceller
from tests.conftest import speak

pytestmark = pytest.mark.models  # piper speaks the reply

RATE = 24_000  # the reply audio's rate (the MQTT test's)
MESSAGE_MS = 20  # microphone audio per message
PIECE_BYTES = 2 * RATE * 40 // 1000  # reply audio per message (MQTT: 40 ms)
LEAD_S = 0.2  # reply audio sent ahead of its playing (MQTT)
TURN_MS = 5  # how often the server's event loop takes a turn while it is not held up
GAP_MS = 2500  # TTS time between chunks: the reply stops meanwhile
QUIET_FRAMES = 30  # silence before a sound that is noticed as a new voice
ONSET_FRAMES = 30  # barge-in judges from 300 ms before a voice was noticed (pipelines/session.py)
JUDGED_AFTER = (50, 80, 120)  # ... when its words come, and when it went on for 1.2 s
VOICED_DB = -45.0  # a 10 ms microphone frame this loud holds voice (or echo)
SENTENCES = [
    "Rome was a city in ancient Italy.",
    "It was the capital of the Roman Republic, and it was the largest city in the world.",
    "Rome was divided into several regions, including the Roman province of Italy.",
    "The city was also known for its architecture and its roads.",
]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Judged:
    start: int  # canceller frames
    end: int
    beyond_ms: int | None = None

    @property
    def echo_only(self) -> bool:
        """Whether barge-in takes the sound for the reply's echo (pipelines/session.py)."""
        limit = max(BargeInConfig().voice_beyond_echo_ms, 0.04 * (self.end - self.start) * 10)
        return self.beyond_ms is not None and self.beyond_ms < limit


@dataclass
class Speaker:
    """The room, the canceller and the server's event loop on one virtual clock."""

    chunks: list[bytes]
    stall_ms: list[int]  # how long the server is held up when each chunk is ready
    holds: dict[int, int] = field(default_factory=dict)  # more hold-ups: at ms, for ms
    seed: int = 0
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.aec = EchoCanceller(RATE, clock=self.clock)
        self.room = EchoRoom(RATE, delay_ms=120, gain_db=-3, noise_db=-50, seed=self.seed)
        self.judged: list[Judged] = []  # the sounds barge-in would judge
        self.said: Judged | None = None  # the person's words
        self._rng = np.random.default_rng(self.seed)
        self._inbox: list[tuple[int, Float32Array]] = []  # (arrival ms, message)
        self._mic_frames = 0  # 10 ms frames the client sent
        self._quiet = QUIET_FRAMES  # frames since the microphone last heard a sound
        self._queued = b""  # reply audio from TTS not sent yet
        self._play_end = 0.0  # when the client has played what was sent
        self._next_chunk = 0
        self._ready_at = 1000  # ms when TTS has the next chunk
        self._held_until = -1  # ms: the event loop is held up until then
        self._end: int | None = None

    def run(self, person: Float32Array | None = None, person_in_chunk: int = 0,
            person_after_ms: int = 300) -> None:
        """Speak the whole reply; the person says ``person`` (16 kHz) ``person_after_ms``
        after chunk ``person_in_chunk`` went out."""
        say_at: int | None = None
        t = 0
        while self._end is None or t < self._end:
            if t == self._ready_at:  # TTS has a chunk: the event loop is held up as it goes out
                self._queued += self.chunks[self._next_chunk]
                self._held_until = t + self.stall_ms[self._next_chunk]
                if self._next_chunk == person_in_chunk:
                    say_at = self._held_until + person_after_ms
                self._next_chunk += 1
            if t % MESSAGE_MS == 0:
                if person is not None and say_at is not None and t >= say_at:
                    self._say(person)
                    person = None
                self._send(t)
            self._held_until = max(self._held_until, t + self.holds.get(t, 0))
            if t % TURN_MS == 0 and t >= self._held_until:
                self._serve(t)
            t += 1

    def _say(self, person: Float32Array) -> None:
        """The person starts speaking with the next 20 ms: their words are judged."""
        self.room.say(person)
        start = self._mic_frames + 1  # the canceller holds a frame back
        self.said = Judged(start - ONSET_FRAMES, start + person.size // FRAME)
        self.judged.append(self.said)

    def _serve(self, t: int) -> None:
        """A turn of the server's event loop: reply audio out (LEAD_S ahead of its playing),
        the microphone audio that came in, and barge-in's judgements now due."""
        self.clock.t = t / 1000
        while self._queued and self._play_end - self.clock.t < LEAD_S:
            piece, self._queued = self._queued[:PIECE_BYTES], self._queued[PIECE_BYTES:]
            self.aec.played(piece)
            self.room.hear(piece)
            self._play_end = max(self._play_end, self.clock.t) + len(piece) / 2 / RATE
            if not self._queued and self._next_chunk < len(self.chunks):
                self._ready_at = t + GAP_MS
            elif not self._queued:
                self._end = t + 3000  # the echo's tail, and the judgements still due
        while self._inbox and self._inbox[0][0] <= t:
            self.aec.capture(self._inbox.pop(0)[1])
        for j in self.judged:
            if j.beyond_ms is None and j.end <= self.aec.frames:
                j.beyond_ms = self.aec.voice_beyond_echo_ms(j.start, j.end)

    def _send(self, t: int) -> None:
        """The client's 20 ms: the loudspeaker plays, the microphone's audio leaves (arriving
        1-8 ms later, in order); each sound after a silence is judged as barge-in would."""
        mic = self.room.tick()
        arrival = max(t + 1 + int(self._rng.integers(0, 8)),
                      self._inbox[-1][0] if self._inbox else 0)
        self._inbox.append((arrival, mic))
        for k in range(mic.size // FRAME):
            frame = mic[k * FRAME:(k + 1) * FRAME].astype(np.float64)
            loud = 10 * np.log10(np.mean(frame ** 2) + 1e-12) > VOICED_DB
            self._mic_frames += 1
            if loud and self._quiet >= QUIET_FRAMES:
                at = self._mic_frames + 1  # the canceller holds a frame back
                self.judged += [Judged(at - ONSET_FRAMES, at + n) for n in JUDGED_AFTER]
            self._quiet = 0 if loud else self._quiet + 1


@pytest.fixture(scope="module")
def chunks(voice) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The reply, a sentence per TTS chunk, at the reply rate."""
    out = []
    for text in SENTENCES:
        audio, rate = speak(voice, text)
        out.append(float_to_pcm16(resample(audio, rate, RATE)))
    return out


# hold-ups while the reply plays too (the loop is slow for a while), at ms: for ms
HOLDS = {4100: 200, 7300: 350, 9050: 120, 12_600: 300, 16_200: 500, 19_700: 250}


@pytest.mark.parametrize("stall_ms", [
    [0, 0, 0, 0],  # each chunk sent on time (the loop is still held up while it plays)
    [150, 300, 100, 200],  # backlogs shorter and longer than a restart's 250 ms
    [800, 500, 300, 800],  # the longest seen
])
def test_the_echo_alone_never_counts_as_voice_however_late_the_server_takes_it_in(
        chunks: list[bytes], stall_ms: list[int]) -> None:
    speaker = Speaker(chunks, stall_ms, HOLDS)
    speaker.run()
    judged = [j for j in speaker.judged if j.beyond_ms is not None]
    assert len(judged) >= 3 * len(chunks)  # every chunk's echo was judged, and more
    assert all(j.echo_only for j in judged), [(j.start, j.end, j.beyond_ms) for j in judged
                                             if not j.echo_only]


@pytest.mark.parametrize("words", ["No.", "Stop."])
def test_a_word_over_the_echo_of_a_chunk_sent_after_a_backlog_still_counts(  # type: ignore[no-untyped-def]
        voice, chunks: list[bytes], words: str) -> None:
    audio, rate = speak(voice, words)
    person = resample(audio, rate, MODEL_RATE)
    speaker = Speaker(chunks, [800, 500, 300, 800], HOLDS)
    speaker.run(person, person_in_chunk=1)
    assert speaker.said is not None and speaker.said.beyond_ms is not None
    assert not speaker.said.echo_only, speaker.said
