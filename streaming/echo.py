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

Late microphone audio. Lockstep pairs each reply chunk with the microphone audio *processed*
after it was sent, which is the audio *captured* after it played only while the server takes
the microphone in on time. An overloaded server's loop is held up 0.1-0.8 s, often as TTS
finishes a chunk; the microphone audio then comes in a burst, and the chunk sent at that
wake-up was paired with a backlog captured before it played: the echo's lag grew by the
backlog each time (150 -> 290 ms, once 1.06 s), the burst looked like a restart, AEC3 lost the
echo and barge-in counted its onsets as a voice (docs/ARCHITECTURE.md). So the reference keeps
to the wall clock: reply audio sent after the client ran out of it is paired only with
microphone audio captured after it was sent (the stream's own clock, ``_mic_at``, behind the
wall clock while a backlog lasts), after as much silence as the reference still queued. A gap
in the microphone stream is a restart only when the server sent reply audio during it or when
the stream has not caught up after ``STALL_S``; otherwise it is a backlog, in lockstep with the
reference (tests/unit/test_echo_gaps.py).

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

No echo at all (headphones, a client that plays nothing). AEC3, finding no echo to remove,
still bends a voice said over the reply (bench/echo.py: Moonshine heard "What your country can
do for you." as "You're not."). So at each lag measurement the canceller judges whether the
microphone carries the reply: *absent* after ``ABSENT_WINDOWS`` in a row where the reference
sounded through most of the window and the input stayed flat (room noise within ``FLAT_DB``)
and ``BELOW_REF_DB`` under it: the audio then passes as it came (AEC3 runs on beside it).
*Found* when the lag is measured (once absent, at ``FOUND_CORRELATION``: a person's words
follow the reply by chance up to ~0.5, its echo 0.8+): AEC3's output again. The first reply
of a session is always cancelled; echo that appears later passes until its lag is measured
(about a second); barge-in's evidence reads the input either way.

Evidence. Whatever AEC3 leaves (a client outside that window, AEC3 still converging or
thrown off by a change of the echo's delay) can be transcribed as words, so barge-in does
not trust words alone over a reply. Echo can only be as loud as the reply made it: the
echo's lag is measured from per-band log-energy envelopes (100 Hz-4 kHz, 10 ms) of the
input and the reference, the echo path's gain per band is fitted, and
``voice_beyond_echo_ms`` counts the frames where the microphone held clearly more than
that predicts: a person's voice over the echo, between its words or after it; none for
echo however garbled. It reads the input, not AEC3's output, so it holds whatever AEC3 did.
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
# Microphone audio this much later than the stream's own pace comes after a gap, not network
# jitter (which the FIFO absorbs): a restart (the client sent nothing meanwhile) when reply
# audio went out at least QUIET_S after the audio before the gap and QUIET_S before the audio
# after it, or when the stream has not caught up with the wall clock after STALL_S; else a
# backlog (this server took the audio in late).
RESTART_S = 0.25
QUIET_S = 0.1
STALL_S = 1.0
# On a restart, reply audio that finished playing this long before the microphone audio
# arrived is kept: the client's capture and network latency, and the room's echo tail.
ECHO_TAIL_S = 0.25
# Envelope history kept for ``voice_beyond_echo_ms``, and the lags searched (echo after its
# schedule).
HISTORY_FRAMES = 800  # 8 s
MAX_LAG_FRAMES = 100  # 1 s: past AEC3's own reach (~500 ms), where echo passes it whole
MIN_LAG_FRAMES = -20  # a client playing on arrival: up to the 200 ms lead before schedule
# The echo's lag is measured every second of playback over the last 1.5 s of input and
# trusted when the input follows the reference this well (or over at least LAG_MIN_FRAMES of
# the sound being judged, before the first measurement).
LAG_EVERY_FRAMES = 100
LAG_WINDOW_FRAMES = 150
LAG_MIN_FRAMES = 50
LAG_MIN_CORRELATION = 0.5
# No echo: the input flat (loud frames within FLAT_DB of quiet ones) and BELOW_REF_DB under the
# reference sounding through at least SOUNDING_SHARE of a measurement's window, ABSENT_WINDOWS
# measurements in a row (about 2.5 s of a reply).
ABSENT_WINDOWS = 2
FLAT_DB = 6.0
BELOW_REF_DB = 20.0
SOUNDING_SHARE = 0.5
FOUND_CORRELATION = 0.7  # the lag measured again, once the echo was judged absent
# The echo a frame can hold: the reference from SMEAR_PRE frames after the echo's lag (the lag
# jitters) to SMEAR_FRAMES before it, each frame further back weighed down by SMEAR_DECAY
# (the room's reflections and reverberation), times the echo path's gain per band, fitted
# over up to FIT_FRAMES before the sound and the sound itself (at least MIN_FIT_FRAMES where
# the reference sounded). Input EXCESS_DB above that is more than echo (bench/echo.py:
# echo alone 0-30 ms of it in any second, from -12 to 0 dB, on time to 700 ms late; a
# person's "No." or "Stop." over it 60-250 ms).
SMEAR_PRE = 2
SMEAR_FRAMES = 12
SMEAR_DECAY = 0.5
FIT_FRAMES = 200
MIN_FIT_FRAMES = 20
EXCESS_DB = 8.0
_SMEAR_WEIGHTS = np.concatenate([np.ones(SMEAR_PRE), SMEAR_DECAY ** np.arange(SMEAR_FRAMES)])
# rfft bins of a 10 ms frame (100 Hz each) grouped into bands for the envelopes: 100 Hz to
# 4 kHz, where speech has its energy (above it, room noise would dilute the measure)
BAND_EDGES = np.array([1, 3, 5, 8, 12, 17, 24, 32, 40])
FLOOR = 1e-6  # band power of silence
SOUNDING = 1e-2  # reference power (100 Hz-4 kHz, summed over bands) of a sounding frame
IN, REF = 0, 1  # the recorded streams: microphone in, the reference


class EchoCanceller:
    def __init__(self, output_rate: int, *, max_lead_ms: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True)
        self._to_model = (None if output_rate == MODEL_RATE else
                          soxr.ResampleStream(output_rate, MODEL_RATE, 1, dtype="float32"))
        # the reply audio sent ahead, and the microphone audio a backlog keeps it waiting for
        self._max_render = MODEL_RATE * max_lead_ms // 1000 + round(STALL_S * MODEL_RATE)
        self._render = np.zeros(0, dtype=np.float32)
        # wall time the FIFO's head plays, until microphone audio captured then takes it
        self._render_from: float | None = None
        self._mic = np.zeros(0, dtype=np.float32)
        self._idle = IDLE_AFTER_FRAMES  # frames since the last reply audio
        self._held = np.zeros(FRAME, dtype=np.float32)  # the microphone frame held back
        self._render_end = 0.0  # wall time when the reply audio sent so far has played
        self._mic_at: float | None = None  # wall time the microphone stream has reached
        self._heard_at = 0.0  # wall time the latest microphone audio came
        self._sent_at: float | None = None  # reply audio sent QUIET_S after that, first
        self._behind_since: float | None = None  # the stream behind by RESTART_S since then
        # the last 10 ms frames as they were (microphone in, reference on schedule), their
        # band log-energies computed in batches when needed (one FFT call for many frames)
        self._raw = np.zeros((2, HISTORY_FRAMES, FRAME), dtype=np.float32)
        self._env = np.zeros((2, HISTORY_FRAMES, BAND_EDGES.size - 1), dtype=np.float32)
        self._env_upto = 0  # frames whose envelopes are computed
        self._active = np.zeros(HISTORY_FRAMES, dtype=bool)  # the frame had a reference
        self.frames = 0  # output frames so far (position of the output stream, 10 ms each)
        self.echo_lag: int | None = None  # frames from the schedule to the echo, once measured
        self.echo_absent = False  # the microphone carries no echo of the reply: it passes as is
        self._absent_windows = 0  # lag measurements in a row that found input with no echo

    def played(self, pcm: bytes) -> None:
        """Reply audio (s16le mono at the output rate) as it leaves for the client."""
        now = self._clock()
        x = pcm16_to_float(pcm)
        if self._to_model is not None:
            x = np.asarray(self._to_model.resample_chunk(x), dtype=np.float32)
        if self._mic_at is not None and self._sent_at is None and now - self._heard_at >= QUIET_S:
            self._sent_at = now
        queued = x
        if now > self._render_end:  # the client ran out of reply audio before this came
            if self._render.size:  # the microphone audio of then is still to come: silence
                silence = np.zeros(round((now - self._render_end) * MODEL_RATE), np.float32)
                queued = np.concatenate([silence, x])
            else:  # it plays from now on: not in microphone audio captured before
                self._render_from = now
        self._render = np.concatenate([self._render, queued])
        excess = self._render.size - self._max_render
        if excess > 0:
            self._render = self._render[excess:]
            if self._render_from is not None:
                self._render_from += excess / MODEL_RATE
        self._render_end = max(self._render_end, now) + x.size / MODEL_RATE
        self._idle = 0

    def forget_unplayed(self) -> None:
        """The client dropped the reply audio it had not played yet (a cut): that audio never
        reaches the room, so it must not stay in the reference either (it would misalign the
        next reply's echo by as much)."""
        self._render = np.zeros(0, dtype=np.float32)
        self._render_from = None
        self._render_end = min(self._render_end, self._clock())

    def capture(self, mic: Float32Array) -> Float32Array:
        """16 kHz mono microphone audio with the reply's echo removed (10-20 ms held back)."""
        now = self._clock()
        if self._restarts(now):
            self._drop_played(now)
            self._mic_at = now
            self._behind_since = None
        assert self._mic_at is not None
        self._heard_at, self._sent_at = now, None
        # a client sending faster than real time is not ahead of the wall clock by more than
        # this message, else a real pause after it would go unnoticed
        at = min(self._mic_at, now)  # when this audio was captured, on the stream's clock
        self._mic_at = at + mic.size / MODEL_RATE
        at -= self._mic.size / MODEL_RATE  # the part of a frame held from the last message
        self._mic = np.concatenate([self._mic, mic]) if self._mic.size else mic
        n = self._mic.size // FRAME
        out = [self._frame(self._mic[k * FRAME:(k + 1) * FRAME], at + k * FRAME / MODEL_RATE)
               for k in range(n)]
        self._mic = self._mic[n * FRAME:]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _restarts(self, now: float) -> bool:
        """Whether the microphone stream (re)starts now: its first audio, or audio after a gap
        in which the client sent none. Not audio this server takes in late (its event loop was
        held up: the audio waited in the transport and comes in a burst), which was captured
        while the reply audio then due played (module docstring, "Late microphone audio")."""
        if self._mic_at is None:
            return True
        if now - self._mic_at <= RESTART_S:
            self._behind_since = None
            return False
        if self._behind_since is None:
            self._behind_since = now
        sent_meanwhile = self._sent_at is not None and now - self._sent_at >= QUIET_S
        return sent_meanwhile or now - self._behind_since > STALL_S

    def _drop_played(self, now: float) -> None:
        """The microphone stream (re)starts now: reply audio that had finished playing
        before it began cannot be in it."""
        head = self._render_end - self._render.size / MODEL_RATE  # when the FIFO's head played
        stale = int((now - ECHO_TAIL_S - head) * MODEL_RATE)
        if stale > 0:
            self._render = self._render[stale:]

    def _frame(self, mic: Float32Array, at: float) -> Float32Array:
        """One 10 ms frame through AEC3: the reference frame due now, with the microphone frame
        before this one (held back one frame: the reference leads the echo by 10 ms more).
        ``at``: when the new frame was captured (the FIFO's head waits for its wall time)."""
        mic, self._held = self._held, mic
        k = self.frames % HISTORY_FRAMES
        self.frames += 1
        self._raw[IN, k] = mic
        if self._render.size == 0 and self._idle >= IDLE_AFTER_FRAMES:
            self._raw[REF, k] = 0.0
            self._active[k] = False
            return mic
        if self._render_from is not None and at < self._render_from:
            ref = np.zeros(0, dtype=np.float32)  # captured before the queued reply audio played
        else:
            self._render_from = None
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
        self._raw[REF, k] = ref
        self._active[k] = True
        if self.frames % LAG_EVERY_FRAMES == 0:
            self._measure_lag()
        return mic if self.echo_absent else out

    def voice_beyond_echo_ms(self, start: int, end: int) -> int | None:
        """How long, in the microphone frames ``start``..``end`` (positions in ``frames``),
        the input held clearly more sound than the reply's echo can account for: a person's
        voice over it (or after it), not what is left of the echo however garbled. The echo
        each frame can hold is predicted from the reference at the echo's lag (its peaks
        smeared over the room's reflections) through the echo path's gain per band, fitted
        on the frames around it where the reference was loud; a frame counts when the input
        is ``EXCESS_DB`` above that prediction plus the room's noise. It uses the input, not
        AEC3's output, so it holds whether or not AEC3 could cancel the echo. None when no
        reply audio was sounding there (nothing to tell apart).

        The lag is the one last measured, or the one the input follows best over these frames
        where that leaves less beyond the echo: the lag moves by a frame or two where the reply
        resumes after a pause (the client plays in 20 ms steps), the last measurement can be
        from before, and 20 ms off the echo's onsets count (tests/unit/test_echo_gaps.py)."""
        self._update_envelopes()
        end = min(end, self.frames)
        oldest = max(self.frames - HISTORY_FRAMES + MAX_LAG_FRAMES + SMEAR_FRAMES, 0)
        start = max(start, oldest)
        first = max(start - FIT_FRAMES, oldest)  # the fit also sees the echo before the sound
        if end - start < 1:
            return None
        lags = {self.echo_lag, self._best_lag(first, min(end, self.frames + MIN_LAG_FRAMES))}
        found = [n for lag in lags if lag is not None
                 and (n := self._beyond_ms(first, start, end, lag)) is not None]
        return min(found) if found else None

    def _beyond_ms(self, first: int, start: int, end: int, lag: int) -> int | None:
        """``voice_beyond_echo_ms`` over ``start``..``end`` at this lag, its echo path fitted
        from ``first`` on."""
        frames = np.arange(first, end)
        heard = 10.0 ** self._env[IN, frames % HISTORY_FRAMES]  # frame x band power
        # the reference that can be echoed in each frame: from SMEAR_PRE frames after the
        # lag (jitter) to SMEAR_FRAMES before it (reflections), later ones weighed down
        offsets = np.arange(-SMEAR_PRE, SMEAR_FRAMES)
        at = frames[:, None] - lag - offsets[None, :]
        ref = 10.0 ** self._env[REF, at % HISTORY_FRAMES] * _SMEAR_WEIGHTS[None, :, None]
        ref[~self._kept(at)] = 0.0  # before the history, or an early echo's not here yet
        echo = ref.max(axis=1)
        total = echo.sum(axis=1)
        sounding = total > SOUNDING
        if not sounding[start - first:].any() or sounding.sum() < MIN_FIT_FRAMES:
            return None
        loud = sounding & (total >= np.median(total[sounding]))
        gain = np.median(heard[loud] / echo[loud], axis=0)  # the echo path per band
        power = heard.sum(axis=1)
        live = power > 10 * FLOOR * heard.shape[1]  # the room's noise, not digital silence
        noise = np.percentile(heard[live] if live.sum() >= MIN_FIT_FRAMES else heard, 10, axis=0)
        predicted = (gain * echo + noise).sum(axis=1)
        beyond = (power > predicted * 10 ** (EXCESS_DB / 10)) & (power > 10 * noise.sum())
        return int(beyond[start - first:].sum()) * 1000 * FRAME // MODEL_RATE

    def _best_lag(self, start: int, end: int,
                  min_correlation: float = LAG_MIN_CORRELATION) -> int | None:
        """The lag the input follows the reference best at over these frames (before the
        first measurement), when it does (by ``min_correlation``)."""
        if end - start < LAG_MIN_FRAMES:
            return None
        corr = self._lag_correlations(start, end)
        best = int(np.argmax(corr))
        return int(MIN_LAG_FRAMES + best) if corr[best] >= min_correlation else None

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
        does."""
        end = self.frames + MIN_LAG_FRAMES
        start = end - LAG_WINDOW_FRAMES
        if start - MAX_LAG_FRAMES < max(0, self.frames - HISTORY_FRAMES):
            return  # not enough history yet
        self._update_envelopes()
        lag = self._best_lag(start, end, FOUND_CORRELATION if self.echo_absent else
                             LAG_MIN_CORRELATION)
        if lag is not None:
            self.echo_lag = lag
            self.echo_absent, self._absent_windows = False, 0
        elif self._no_echo(start, end):
            self._absent_windows += 1
            self.echo_absent = self.echo_absent or self._absent_windows >= ABSENT_WINDOWS
        else:
            self._absent_windows = 0

    def _no_echo(self, start: int, end: int) -> bool:
        """Whether the reference sounded through these frames and the input held nothing but
        steady room noise, far under it (module docstring, "No echo at all")."""
        idx = np.arange(start, end) % HISTORY_FRAMES
        ref = (10.0 ** self._env[REF, idx]).sum(axis=1)
        sounding = ref > SOUNDING
        if sounding.mean() < SOUNDING_SHARE:
            return False
        heard = (10.0 ** self._env[IN, idx]).sum(axis=1)
        quiet, loud = np.percentile(heard, [10, 90])
        return bool(loud <= quiet * 10 ** (FLAT_DB / 10)
                    and loud <= np.median(ref[sounding]) * 10 ** (-BELOW_REF_DB / 10))

    def _lag_correlations(self, start: int, end: int) -> Float32Array:
        """Per lag (MIN_LAG_FRAMES..MAX_LAG_FRAMES), how the input's band envelopes over these
        frames follow the reference's (-1 where there was no reference)."""
        heard = _standardise(self._env[IN, np.arange(start, end) % HISTORY_FRAMES])
        lags = np.arange(MIN_LAG_FRAMES, MAX_LAG_FRAMES + 1)
        at = np.arange(start, end)[None, :] - lags[:, None]  # lag × frame
        kept = self._kept(at)
        env = np.where(kept[..., None], self._env[REF, at % HISTORY_FRAMES], np.log10(FLOOR))
        refs = _standardise(env, axis=1)
        corr: Float32Array = np.einsum("lfb,fb->l", refs, heard) / max(heard.size, 1)
        corr[~(self._active[at % HISTORY_FRAMES] & kept).any(axis=1)] = -1.0
        return corr

    def _kept(self, at: np.ndarray) -> np.ndarray:
        """Which frame positions the history holds."""
        return (at >= max(0, self.frames - HISTORY_FRAMES)) & (at < self.frames)


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
