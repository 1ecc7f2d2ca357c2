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

Alignment. AEC3 only cancels echo that comes *after* its reference, by at most about
half a second (bench/echo.py: an echo in the same 10 ms frame as its reference, or earlier,
keeps all but 2-5 dB; 5-400 ms later loses 25-30 dB; 600 ms and more fails again). The FIFO
hands each frame over when the server expects it to play, and a client that plays on
arrival with no latency plays it right then: so each microphone frame is processed one
frame late, with the reference of the next (10 ms of latency), and such a client's echo
comes 10 ms after its reference. (Handing 100 ms of reference over ahead when reply audio
starts widened the window further, but each pause of the reply loses that lead and
handing it over again shifts AEC3's alignment: it failed within a few barge-in pauses.)
The stream-delay hint (``set_stream_delay_ms``) does not widen AEC3's reach.

Evidence. Whatever is left (a client outside that window, AEC3 still converging), what
remains of echo follows the reply: louder where the reply was loud, in the same bands, at
the echo's lag. ``similarity`` measures that from per-band log-energy envelopes of the
input, the output and the reference: near 1 for residual echo however garbled, low for a
person's sentence, so barge-in can tell one from the other without trusting the words.
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
# Envelope history kept for ``similarity``, and the lags searched (echo after its schedule).
HISTORY_FRAMES = 800  # 8 s
MAX_LAG_FRAMES = 100  # 1 s: past AEC3's own reach (~500 ms), where echo passes it whole
MIN_LAG_FRAMES = -20  # a client playing on arrival: up to the 200 ms lead before schedule
# The echo's lag is measured every second of playback over the last 1.5 s of input and
# trusted when the input follows the reference this well; a sound is judged at it +- 30 ms.
LAG_EVERY_FRAMES = 100
LAG_WINDOW_FRAMES = 150
LAG_MIN_CORRELATION = 0.5
LAG_SLACK_FRAMES = 3
# rfft bins of a 10 ms frame (100 Hz each) grouped into bands for the envelopes: 100 Hz to
# 4 kHz, where speech has its energy (above it, room noise would dilute the measure)
BAND_EDGES = np.array([1, 3, 5, 8, 12, 17, 24, 32, 40])
FLOOR = 1e-6  # band power of silence
SOUNDING = 1e-2  # reference power (100 Hz-4 kHz, summed over bands) of a sounding frame
IN, OUT, REF = 0, 1, 2  # the recorded streams: microphone in, AEC3's output, the reference


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
        self._held = np.zeros(FRAME, dtype=np.float32)  # the microphone frame held back
        self._render_end = 0.0  # wall time when the reply audio sent so far has played
        self._mic_at: float | None = None  # wall time the microphone stream has reached
        # per 10 ms output frame: band log-energies of the output and of its reference
        # the last frames as they were (microphone in, out, reference on schedule), their
        # envelopes computed in batches when needed (one FFT call for many frames)
        self._raw = np.zeros((3, HISTORY_FRAMES, FRAME), dtype=np.float32)
        self._env = np.zeros((3, HISTORY_FRAMES, BAND_EDGES.size - 1), dtype=np.float32)
        self._env_upto = 0  # frames whose envelopes are computed
        self._active = np.zeros(HISTORY_FRAMES, dtype=bool)  # the frame had a reference
        self.frames = 0  # output frames so far (position of the output stream, 10 ms each)
        self.echo_lag: int | None = None  # frames from the schedule to the echo, once measured

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
        """16 kHz mono microphone audio with the reply's echo removed (10-20 ms held back)."""
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
        """One 10 ms frame through AEC3: the reference frame due now, with the microphone frame
        before this one (held back one frame: the reference leads the echo by 10 ms more)."""
        mic, self._held = self._held, mic
        k = self.frames % HISTORY_FRAMES
        self.frames += 1
        self._raw[IN, k] = mic
        if self._render.size == 0 and self._idle >= IDLE_AFTER_FRAMES:
            self._raw[OUT, k] = mic
            self._raw[REF, k] = 0.0
            self._active[k] = False
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
        out = pcm16_to_float(bytes(frame.data))
        self._raw[OUT, k] = out
        self._raw[REF, k] = ref
        self._active[k] = True
        if self.frames % LAG_EVERY_FRAMES == 0:
            self._measure_lag()
        return out

    def similarity(self, start: int, end: int) -> float | None:
        """How much the microphone frames ``start``..``end`` (positions in ``frames``) follow
        the reference, as echo does: the correlation of per-band log-energy envelopes (each
        band's own mean and spread removed) with the reference's at the echo's lag, for the
        input (is the reply's echo in it?) and for the output (is what AEC3 left of it still
        the reply?), averaged. Near 1 for echo however garbled, low for a person, also for
        one speaking when the reply had paused. None when there was no reference to echo (no
        reply audio) or the stretch is too short to tell."""
        self._update_envelopes()
        end = min(end, self.frames)
        start = max(start, self.frames - HISTORY_FRAMES + MAX_LAG_FRAMES, 0)
        if self.echo_lag is None:  # not measured yet: the best lag within reach
            lags = range(MIN_LAG_FRAMES, MAX_LAG_FRAMES + 1)
        else:
            lags = range(self.echo_lag - LAG_SLACK_FRAMES, self.echo_lag + LAG_SLACK_FRAMES + 1)
        best: tuple[float, int] | None = None
        for lag in lags:
            corr = [self._correlation(env, start, end, lag)
                    for env in (self._env[IN], self._env[OUT])]
            if corr[0] is not None and corr[1] is not None:
                best = max(best or (-1.0, lag), ((corr[0] + corr[1]) / 2, lag))
        if best is None:
            return None
        return best[0] * self._while_sounding(start, end, best[1])

    def _while_sounding(self, start: int, end: int, lag: int) -> float:
        """The share of the output's energy in frames whose reference, ``lag`` frames
        earlier, was sounding: echo can only be where the reply was (a person who goes on
        talking after the reply paused is not)."""
        stop = min(end, self.frames + lag)
        power = np.sum(10.0 ** self._env[OUT, np.arange(start, stop) % HISTORY_FRAMES], axis=1)
        ref = np.sum(10.0 ** self._env[REF, np.arange(start - lag, stop - lag) % HISTORY_FRAMES],
                     axis=1)
        total = float(power.sum())
        return float(power[ref > SOUNDING].sum()) / total if total > 0 else 0.0

    def _correlation(self, env: Float32Array, start: int, end: int, lag: int) -> float | None:
        """Correlation of ``env`` over frames start..end with the reference ``lag`` frames
        earlier (None: no reference then, or too short a stretch)."""
        stop = min(end, self.frames + lag)  # an early echo's reference is not here yet
        if stop - start < 20 or start - lag < 0:  # 200 ms: too short to tell
            return None
        ref_idx = np.arange(start - lag, stop - lag) % HISTORY_FRAMES
        if not self._active[ref_idx].any():
            return None
        heard = _standardise(env[np.arange(start, stop) % HISTORY_FRAMES])
        return float(np.mean(heard * _standardise(self._env[REF, ref_idx])))

    def _update_envelopes(self) -> None:
        """Compute the envelopes of the frames recorded since the last call."""
        first = max(self._env_upto, self.frames - HISTORY_FRAMES)
        if first < self.frames:
            idx = np.arange(first, self.frames) % HISTORY_FRAMES
            self._env[:, idx] = _bands(self._raw[:, idx])
        self._env_upto = self.frames

    def _measure_lag(self) -> None:
        """Where the reply's echo is in the input (its lag after the schedule), from the last
        while of playback: the lag the input follows the reference best at, when it clearly
        does. Judging a sound at that lag only, a person speaking while the reply has paused
        cannot look like echo of the reply's earlier words."""
        end = self.frames + MIN_LAG_FRAMES
        start = end - LAG_WINDOW_FRAMES
        if start - MAX_LAG_FRAMES < max(0, self.frames - HISTORY_FRAMES):
            return  # not enough history yet
        self._update_envelopes()
        heard = _standardise(self._env[IN, np.arange(start, end) % HISTORY_FRAMES])
        lags = np.arange(MIN_LAG_FRAMES, MAX_LAG_FRAMES + 1)
        idx = (np.arange(start, end)[None, :] - lags[:, None]) % HISTORY_FRAMES  # lag × frame
        refs = _standardise(self._env[REF, idx], axis=1)
        corr = np.einsum("lfb,fb->l", refs, heard) / heard.size
        corr[~self._active[idx].any(axis=1)] = -1.0
        best = int(np.argmax(corr))
        if corr[best] >= LAG_MIN_CORRELATION:
            self.echo_lag = int(lags[best])

def _bands(frames: Float32Array) -> Float32Array:
    """Log10 power per band (100 Hz to 4 kHz) of 10 ms frames (the last axis)."""
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    bands = np.add.reduceat(power, BAND_EDGES, axis=-1)[..., :-1]
    out: Float32Array = np.log10(bands + FLOOR).astype(np.float32)
    return out


def _standardise(env: Float32Array, axis: int = 0) -> Float32Array:
    """Each band's envelope with its mean over ``axis`` (time) removed and scaled to unit
    spread (flat: zero)."""
    centred = env - env.mean(axis=axis, keepdims=True)
    spread = centred.std(axis=axis, keepdims=True)
    out: Float32Array = np.divide(centred, spread, out=np.zeros_like(centred),
                                  where=spread > 1e-3)
    return out
