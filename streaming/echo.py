"""Server-side echo cancellation for clients that have none (speakers, cars, desktops).

The server knows exactly which reply audio it sent, so it can remove that audio
from what the client's microphone sends back. The canceller is WebRTC's AEC3,
the one browsers use, through livekit's ``AudioProcessingModule`` (a maintained
binding with manylinux wheels; speexdsp and the webrtc-audio-processing
bindings ship no wheels for this Python). AEC3 estimates the echo path and its
delay itself, so the reference and the microphone only have to be stepped
together in the right order: the sent reply audio goes into a render FIFO, and
each 10 ms microphone frame takes one 10 ms render frame (silence when the FIFO
is empty). The FIFO's depth plus AEC3's delay estimator absorb the playout,
acoustic and network delay. That lockstep holds while the microphone streams; a
client that sends audio only while the person talks (push-to-talk, a device with
its own VAD, or the first words after a typed turn) leaves the FIFO holding reply
audio that finished playing long ago. So when the microphone stream (re)starts,
the reply audio that had finished playing by then is dropped first: paired with the
person's words, AEC3 takes them for echo and erases them (-25 dB, no voice left).
Measured (bench/README.md): ~27 dB echo removed at
80 ms / -6 dB with room reflections, the person's own speech kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import soxr
from livekit import rtc

from streaming.audio import MODEL_RATE, Float32Array, float_to_pcm16, pcm16_to_float

FRAME = MODEL_RATE // 100  # AEC3 works on 10 ms frames
IDLE_AFTER_FRAMES = 200  # 2 s without reply audio: the echo tail is gone, pass audio through
# Microphone audio this much later than the stream's own pace is a restart (the client sent
# nothing meanwhile), not network jitter, which the FIFO absorbs.
RESTART_S = 0.25
# On a restart, reply audio that finished playing this long before the microphone audio
# arrived is kept: the client's capture and network latency, and the room's echo tail.
ECHO_TAIL_S = 0.25


class EchoCanceller:
    def __init__(self, output_rate: int, *, max_lead_ms: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True)
        self._to_model = (None if output_rate == MODEL_RATE else
                          soxr.ResampleStream(output_rate, MODEL_RATE, 1, dtype="float32"))
        self._max_render = MODEL_RATE * max_lead_ms // 1000
        self._render = np.zeros(0, dtype=np.float32)
        self._mic = np.zeros(0, dtype=np.float32)
        self._idle = IDLE_AFTER_FRAMES  # frames since the last reply audio
        self._render_end = 0.0  # wall time when the reply audio sent so far has played
        self._mic_at: float | None = None  # wall time the microphone stream has reached

    def played(self, pcm: bytes) -> None:
        """Reply audio (s16le mono at the output rate) as it leaves for the client."""
        x = pcm16_to_float(pcm)
        if self._to_model is not None:
            x = np.asarray(self._to_model.resample_chunk(x), dtype=np.float32)
        self._render = np.concatenate([self._render, x])[-self._max_render:]
        self._render_end = max(self._render_end, self._clock()) + x.size / MODEL_RATE
        self._idle = 0

    def forget_unplayed(self) -> None:
        """The client dropped the reply audio it had not played yet (a cut): that audio never
        reaches the room, so it must not stay in the reference either (it would misalign the
        next reply's echo by as much)."""
        self._render = np.zeros(0, dtype=np.float32)
        self._render_end = min(self._render_end, self._clock())

    def capture(self, mic: Float32Array) -> Float32Array:
        """16 kHz mono microphone audio with the reply's echo removed (≤ 10 ms held back)."""
        now = self._clock()
        if self._mic_at is None or now - self._mic_at > RESTART_S:
            self._drop_played(now)
            self._mic_at = now
        # a client sending faster than real time is not ahead of the wall clock by more than
        # this message, else a real pause after it would go unnoticed
        self._mic_at = min(self._mic_at, now) + mic.size / MODEL_RATE
        self._mic = np.concatenate([self._mic, mic]) if self._mic.size else mic
        n = self._mic.size // FRAME
        out = [self._frame(self._mic[k * FRAME:(k + 1) * FRAME]) for k in range(n)]
        self._mic = self._mic[n * FRAME:]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _drop_played(self, now: float) -> None:
        """The microphone stream (re)starts now: reply audio that had finished playing
        before it began cannot be in it."""
        head = self._render_end - self._render.size / MODEL_RATE  # when the FIFO's head played
        stale = int((now - ECHO_TAIL_S - head) * MODEL_RATE)
        if stale > 0:
            self._render = self._render[stale:]

    def _frame(self, mic: Float32Array) -> Float32Array:
        if self._render.size == 0 and self._idle >= IDLE_AFTER_FRAMES:
            return mic
        ref = self._render[:FRAME]
        self._render = self._render[FRAME:]
        if ref.size == FRAME:
            self._idle = 0
        else:
            ref = np.pad(ref, (0, FRAME - ref.size))
            self._idle += 1
        self._apm.process_reverse_stream(rtc.AudioFrame(float_to_pcm16(ref), MODEL_RATE, 1, FRAME))
        frame = rtc.AudioFrame(float_to_pcm16(mic), MODEL_RATE, 1, FRAME)
        self._apm.process_stream(frame)
        return pcm16_to_float(bytes(frame.data))
