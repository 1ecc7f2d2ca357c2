"""A simulated room for tests and benchmarks: a loudspeaker that plays the reply as it arrives
and a microphone that hears it back (delayed, quieter, with reflections and room noise) mixed
with whatever the person says. It is how a speaker or a laptop without headphones sounds to
the server, reproducibly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import soxr

from client.common.eventlog import EventLog
from client.common.events import JsonEvent, ReplyInterrupted, decode_event
from client.common.ws_client import VoxlensClient
from streaming.audio import MODEL_RATE, Float32Array, float_to_pcm16, pcm16_to_float

TICK = MODEL_RATE // 50  # 20 ms


def room_response(seed: int = 0) -> Float32Array:
    """A small room's impulse response at 16 kHz: the direct path and a few decaying reflections."""
    rng = np.random.default_rng(seed)
    h = np.zeros(1600, dtype=np.float32)
    h[0] = 1.0
    for delay, gain in ((120, 0.35), (333, 0.22), (700, 0.12), (1100, 0.06)):
        h[delay] = gain
    h += (rng.normal(0, 0.01, h.size) * np.exp(-np.arange(h.size) / 400)).astype(np.float32)
    return h


def heard_in_room(reply: Float32Array, echo_after_ms: float, gain_db: float,
                  noise_db: float = -50, seed: int = 0) -> Float32Array:
    """What a microphone picks up (16 kHz) from a loudspeaker that plays ``reply`` (16 kHz)
    ``echo_after_ms`` after its schedule, sample 0 being the scheduled start (negative: that
    much before it), through ``room_response``, with room noise; the same length."""
    echo = np.convolve(reply, room_response(seed), mode="full")[:reply.size]
    echo *= np.float32(10 ** (gain_db / 20))
    shift = round(echo_after_ms * MODEL_RATE / 1000)
    out = np.zeros_like(echo)
    if shift >= 0:
        out[shift:] = echo[:echo.size - shift]
    else:
        out[:shift] = echo[-shift:]
    rng = np.random.default_rng(seed)
    return (out + rng.normal(0, 10 ** (noise_db / 20), out.size)).astype(np.float32)


@dataclass
class EchoRoom:
    out_rate: int
    delay_ms: float = 80.0
    gain_db: float = -6.0
    noise_db: float = -55.0  # room noise level (dBFS RMS)
    seed: int = 0
    speaker_on: list[tuple[float, bool]] = field(default_factory=list)  # (time, playing sound)
    voice_at: float | None = None  # when the person's latest line first went out loud

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._h = room_response(self.seed) * np.float32(10 ** (self.gain_db / 20))
        self._to_model = soxr.ResampleStream(self.out_rate, MODEL_RATE, 1, dtype="float32")
        self._speaker = np.zeros(0, dtype=np.float32)  # queued, not yet played
        delay = round(self.delay_ms * MODEL_RATE / 1000)
        self._line = np.zeros(delay + self._h.size, dtype=np.float32)  # played audio, recent first
        self._speech = np.zeros(0, dtype=np.float32)
        self._delay = delay

    def hear(self, pcm: bytes) -> None:
        """Reply audio arrived at the client: the loudspeaker will play it."""
        x = np.asarray(self._to_model.resample_chunk(pcm16_to_float(pcm)), dtype=np.float32)
        self._speaker = np.concatenate([self._speaker, x])

    def stop_speaker(self) -> None:
        self._speaker = np.zeros(0, dtype=np.float32)

    def say(self, audio: Float32Array) -> None:
        """The person starts saying this (16 kHz) now."""
        self._speech = np.concatenate([self._speech, audio])
        self.voice_at = None

    @property
    def speaking(self) -> bool:
        return self._speech.size > 0

    def tick(self) -> Float32Array:
        """20 ms pass: the loudspeaker plays, the microphone returns what it picked up."""
        out = self._speaker[:TICK]
        self._speaker = self._speaker[TICK:]
        out = np.pad(out, (0, TICK - out.size))
        self.speaker_on.append((time.monotonic(), bool(np.abs(out).max() > 1e-3)))
        self._line = np.concatenate([self._line, out])
        start = self._line.size - TICK - self._delay - self._h.size + 1
        segment = self._line[start:start + TICK + self._h.size - 1]
        echo = np.convolve(segment, self._h, mode="valid").astype(np.float32)
        self._line = self._line[-(self._delay + self._h.size + TICK):]
        noise = self._rng.normal(0, 10 ** (self.noise_db / 20), TICK).astype(np.float32)
        speech = self._speech[:TICK]
        self._speech = self._speech[TICK:]
        if self.voice_at is None and speech.size and np.abs(speech).max() > 0.02:
            self.voice_at = time.monotonic()
        mic = echo + noise
        mic[:speech.size] += speech
        return mic


async def live_microphone(client: EventLog, room: EchoRoom,
                          send: Callable[[bytes], Awaitable[None]] | None = None) -> None:
    """Stream the room's microphone to the server in real time, 20 ms per message (with
    ``send``, else the WebSocket client's), and play the reply into the room; runs until
    cancelled. The speaker stops at ``reply.interrupted``."""
    if send is None:
        assert isinstance(client, VoxlensClient)
        send = client.send_raw
    client.on_audio = room.hear
    previous = client.on_event

    def on_event(ev: JsonEvent) -> None:
        if isinstance(decode_event(ev), ReplyInterrupted):
            room.stop_speaker()
        if previous is not None:
            previous(ev)

    client.on_event = on_event
    start = time.monotonic()
    k = 0
    while True:
        await send(float_to_pcm16(room.tick()))
        k += 1
        delay = start + k * TICK / MODEL_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
