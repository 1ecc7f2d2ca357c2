"""A client's microphone on its way into its session, with the reply's echo removed.

The client's audio arrives in the format it declared; the session listens at 16 kHz
mono. A client with no echo canceller of its own (a smart speaker, a car, a desktop app
on loudspeakers) sends the reply back mixed with the person's voice: the server removes
it here, before the session hears it, using the reply audio as it leaves the session's
``Playout`` as the reference (``streaming/echo.py``). The session asks this side one
question, for barge-in: how much of a sound was more than the reply's echo can be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from streaming.audio import MODEL_RATE, Float32Array, InputConverter
from streaming.echo import FRAME, EchoCanceller
from streaming.playout import Playout


class EchoMeter(Protocol):
    """What the session may ask the microphone side that cancels a client's echo."""

    @property
    def position_ms(self) -> float:
        """Audio handed to the session so far (the position of this microphone's stream)."""
        ...

    def voice_beyond_echo_ms(self, start_ms: float, end_ms: float) -> int | None:
        """How long the audio between these positions of this stream held more than the
        reply's echo can be; None when no reply audio was sounding then."""
        ...


class Listening(Protocol):
    """The session as its microphone sees it (a part of ``SessionPort``)."""

    playout: Playout

    def attach_echo(self, meter: EchoMeter | None) -> None: ...

    async def push_audio(self, audio: Float32Array) -> None: ...


class Microphone:
    """One connection's microphone audio into its session: converted to 16 kHz mono and, when
    the server cancels the client's echo, cleaned of the reply (an ``EchoMeter`` then)."""

    def __init__(self, session: Listening, *, rate: int = MODEL_RATE, channels: int = 1,
                 cancel_echo: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._clock = clock
        self.converter = InputConverter(rate, channels)
        self.samples = 0  # 16 kHz samples handed to the session
        self.echo: EchoCanceller | None = None
        self._echo_from = 0  # the echo canceller's first sample in this stream
        self.cancel_echo(cancel_echo)

    def cancel_echo(self, on: bool) -> None:
        """Start (afresh, at the playout's current rate) or stop cancelling the reply's echo."""
        playout = self._session.playout
        self.echo = EchoCanceller(playout.rate, clock=self._clock) if on else None
        self._echo_from = self.samples
        playout.reference = self.echo
        self._session.attach_echo(self if on else None)

    @property
    def position_ms(self) -> float:
        return self.samples * 1000 / MODEL_RATE

    async def push(self, pcm: bytes) -> None:
        """Microphone PCM in the declared format; waits while the session is behind."""
        await self.push_samples(self.converter.convert(pcm))

    async def push_samples(self, audio: Float32Array) -> None:
        """16 kHz mono microphone audio; waits while the session is behind."""
        out = audio if self.echo is None else self.echo.capture(audio)
        self.samples += out.size
        if out.size:
            await self._session.push_audio(out)

    def voice_beyond_echo_ms(self, start_ms: float, end_ms: float) -> int | None:
        if self.echo is None:
            return None
        frame_ms = 1000 * FRAME / MODEL_RATE
        base = self._echo_from * 1000 / MODEL_RATE
        return self.echo.voice_beyond_echo_ms(int((start_ms - base) // frame_ms),
                                              int((end_ms - base) // frame_ms) + 1)
