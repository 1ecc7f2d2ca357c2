"""The microphone side: the client's audio converted for the session, with the reply's echo
removed when the server cancels it, the canceller fed by the playout's sent audio, and the
barge-in question asked in the microphone stream's positions."""

from __future__ import annotations

import numpy as np

from streaming.audio import Float32Array
from streaming.microphone import EchoMeter, Microphone
from streaming.playout import Playout

RATE = 16_000


class Listening:
    """The parts of a session a microphone talks to."""

    def __init__(self) -> None:
        self.playout = Playout(RATE, release=lambda event: None)  # (no turn's events are held here)
        self.heard: list[Float32Array] = []
        self.echo: EchoMeter | None = None

    def attach_echo(self, meter: EchoMeter | None) -> None:
        self.echo = meter

    async def push_audio(self, audio: Float32Array) -> None:
        self.heard.append(audio)


async def test_without_echo_cancellation_the_audio_passes_as_it_is() -> None:
    session = Listening()
    mic = Microphone(session, channels=2, cancel_echo=False)
    assert session.echo is None and session.playout.reference is None
    stereo = np.stack([np.full(1600, 1000), np.full(1600, -1000)], axis=1)  # 100 ms
    await mic.push(stereo.astype("<i2").tobytes())
    assert mic.position_ms == 100 and [a.size for a in session.heard] == [1600]
    assert np.allclose(session.heard[0], 0)  # mixed down to mono
    assert mic.voice_beyond_echo_ms(0, 100) is None  # the client cancels its own echo


async def test_the_canceller_hears_the_playout_and_is_asked_in_the_streams_positions() -> None:
    """The microphone stream's position runs on across a new echo canceller (session.start
    again on a resumed session): a stretch is found where its audio went through."""
    rng = np.random.default_rng(0)
    session = Listening()
    mic = Microphone(session, cancel_echo=True)
    assert session.echo is mic and session.playout.reference is mic.echo
    assert mic.voice_beyond_echo_ms(0, 1000) is None  # nothing heard yet
    await mic.push_samples(np.zeros(RATE, dtype=np.float32))  # 1 s of silence, no reply audio
    assert mic.position_ms == 1000
    assert mic.voice_beyond_echo_ms(0, 1000) is None  # no reply played: nothing to echo
    mic.cancel_echo(True)
    reply = (0.3 * rng.standard_normal(2 * RATE) * np.repeat(rng.random(100), 320)
             ).astype(np.float32)
    session.playout.put(1, (reply * 32767).astype("<i2").tobytes())
    # the reply comes back 100 ms before its time, where AEC3 cannot remove it; in the
    # second second a voice much louder than it joins (a 300 Hz tone, 0.4 s)
    audio = 0.5 * np.concatenate([reply[1600:], np.zeros(1600, dtype=np.float32)])
    voice = RATE + np.arange(RATE * 4 // 10)
    audio[voice] += 0.9 * np.sin(2 * np.pi * 300 * voice / RATE).astype(np.float32)
    for k in range(100):
        session.playout.take(640)  # sent: the canceller's reference
        await mic.push_samples(audio[k * 320:(k + 1) * 320])
    assert mic.position_ms == 3000
    assert mic.echo is not None
    first = mic.voice_beyond_echo_ms(1000, 2000)  # the first second of this canceller ...
    assert first is not None and first == mic.echo.voice_beyond_echo_ms(0, 101)  # ... is this
    second = mic.voice_beyond_echo_ms(2000, 3000)
    assert first < 50 and second is not None and second >= 200  # echo alone; the voice
    assert mic.voice_beyond_echo_ms(0, 900) is None  # before this canceller: unknown
    mic.cancel_echo(False)  # the client said it cancels its own echo
    assert session.echo is None and session.playout.reference is None
