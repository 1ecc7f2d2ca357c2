"""VAD-gated utterance segmentation: pure logic over (frame, speech probability) pairs.

Times are positions in the input stream (ms since the session's first sample),
so the segmenter needs no clock and is tested on plain arrays.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from streaming.audio import MODEL_RATE, Float32Array


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    threshold: float = 0.5  # a frame at or above this is voiced
    neg_threshold: float = 0.35  # a frame below this is silent (in between: keeps the state)
    min_speech_ms: int = 250  # voiced time needed before an utterance counts
    voice_ms: int = 96  # voiced time that may be speech starting (barge-in pauses the reply)
    silence_ms: int = 500  # silence after the last voiced frame that ends an utterance
    pad_ms: int = 200  # audio kept before the first and after the last voiced frame
    max_utterance_ms: int = 30_000  # an utterance is cut here (Whisper's window)


@dataclass(frozen=True, slots=True)
class Voice:
    """``voice_ms`` of voiced frames since ``t_ms``: speech may be starting (not confirmed)."""

    t_ms: int


@dataclass(frozen=True, slots=True)
class Noise:
    """What began at ``t_ms`` was too short to be speech (a click, a cough): dropped."""

    t_ms: int


@dataclass(frozen=True, slots=True)
class Onset:
    """Speech confirmed: ``t_ms`` is where it began."""

    t_ms: int


@dataclass(frozen=True, slots=True)
class Pause:
    """The first silent frame after speech: the utterance *may* be over (speculate now)."""

    t_ms: int
    audio: Float32Array
    voiced_ms: int


@dataclass(frozen=True, slots=True)
class Resume:
    """Speech came back before the endpoint: whatever was speculated at the pause is void."""

    t_ms: int


@dataclass(frozen=True, slots=True)
class End:
    """The endpoint: ``t_ms`` is the end of the last voiced frame; ``audio`` is padded."""

    t_ms: int
    audio: Float32Array
    voiced_ms: int


SegmentEvent = Voice | Noise | Onset | Pause | Resume | End


class Segmenter:
    def __init__(self, config: SegmenterConfig = SegmenterConfig(), frame_samples: int = 512) -> None:
        self.config = config
        self.frame_samples = frame_samples
        self.frame_ms = frame_samples * 1000 / MODEL_RATE
        self.silence_ms = config.silence_ms  # the endpoint silence; the listener adapts it
        pre = max(1, round(config.pad_ms / self.frame_ms))
        self._preroll: collections.deque[Float32Array] = collections.deque(maxlen=pre)
        self._frames: list[Float32Array] = []
        self._pos = 0  # frames seen
        self._reset()

    def reconfigure(self, config: SegmenterConfig) -> None:
        """New thresholds, silence and padding; the stream's positions go on."""
        self.config = config
        self.silence_ms = config.silence_ms
        pre = max(1, round(config.pad_ms / self.frame_ms))
        self._preroll = collections.deque(self._preroll, maxlen=pre)

    def _reset(self) -> None:
        self._state = "idle"  # idle | candidate | speech
        self._frames = []
        self._start_frame = 0  # first frame of self._frames
        self._speech_start = 0  # first voiced frame
        self._voiced = 0  # voiced frames in this utterance
        self._last_voiced = 0  # index after the last voiced frame
        self._paused = False
        self._voice_told = False

    @property
    def speaking(self) -> bool:
        """True between Onset and End (including a pause)."""
        return self._state == "speech"

    @property
    def paused(self) -> bool:
        return self._state == "speech" and self._paused

    def _ms(self, frame_index: int) -> int:
        return round(frame_index * self.frame_ms)

    def audio(self) -> Float32Array:
        """The current utterance so far (pre-roll included)."""
        if not self._frames:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._frames)

    def push(self, frame: Float32Array, prob: float) -> list[SegmentEvent]:
        cfg = self.config
        i = self._pos
        self._pos += 1
        voiced = prob >= cfg.threshold
        silent = prob < cfg.neg_threshold
        events: list[SegmentEvent] = []

        if self._state == "idle":
            if voiced:
                self._state = "candidate"
                self._frames = [*self._preroll, frame]
                self._start_frame = i - len(self._preroll)
                self._speech_start = i
                self._voiced = 1
                self._last_voiced = i + 1
            else:
                self._preroll.append(frame)
                return events
        else:
            self._frames.append(frame)
            if voiced or (not silent and not self._paused):
                self._voiced += voiced
                self._last_voiced = i + 1
                if self._paused and voiced:
                    self._paused = False
                    events.append(Resume(self._ms(i)))
            elif silent and self._state == "speech" and not self._paused:
                self._paused = True
                events.append(Pause(self._ms(i), self.audio(), round(self._voiced * self.frame_ms)))

        silence_ms = (self._pos - self._last_voiced) * self.frame_ms
        if self._state == "candidate":
            voiced_ms = self._voiced * self.frame_ms
            if voiced_ms >= cfg.voice_ms and not self._voice_told:
                self._voice_told = True
                events.append(Voice(self._ms(self._speech_start)))
            if voiced_ms >= cfg.min_speech_ms:
                self._state = "speech"
                events.append(Onset(self._ms(self._speech_start)))
            elif silence_ms >= cfg.silence_ms:  # too short to be speech: a click, a cough
                if self._voice_told:
                    events.append(Noise(self._ms(self._speech_start)))
                self._drop_to_idle()
            return events

        length_ms = (self._pos - self._start_frame) * self.frame_ms
        if silence_ms >= self.silence_ms or length_ms >= cfg.max_utterance_ms:
            keep = min(len(self._frames),
                       self._last_voiced - self._start_frame + round(cfg.pad_ms / self.frame_ms))
            audio = np.concatenate(self._frames[:keep])
            events.append(End(self._ms(self._last_voiced), audio, round(self._voiced * self.frame_ms)))
            self._drop_to_idle()
            self.silence_ms = cfg.silence_ms
        return events

    def _drop_to_idle(self) -> None:
        tail = self._frames[-self._preroll.maxlen:] if self._preroll.maxlen else []
        self._reset()
        self._preroll.clear()
        self._preroll.extend(tail)
