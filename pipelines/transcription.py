"""Whole-file transcription: timed segments from faster-whisper, in the wanted Chinese script.

The live assistant decodes short utterances below ``WhisperModel.transcribe``
(``pipelines/engines/asr_whisper.py``); a file of any length goes through
faster-whisper's own long-form loop instead: 30 s windows, timestamp tokens,
conditioning on the previous text, temperature fallback, and optionally its
silero VAD filter (its ONNX model ships inside the faster-whisper wheel, so it
works offline). ``task="translate"`` is Whisper's translation into English.

Audio arrives already decoded (16 kHz mono float32): reading containers is the
caller's business (``server/transcribe.py``), as this layer never imports av.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from faster_whisper import WhisperModel

from pipelines.engines.asr_whisper import WhisperAsr
from pipelines.text import ZH_PROMPT, ZhScript, zh_script
from streaming.audio import MODEL_RATE, Float32Array
from streaming.errors import EngineError

Task = Literal["transcribe", "translate"]
Progress = Callable[[float, float], None]  # (seconds of audio done, seconds in all)

CHINESE = frozenset({"zh"})  # languages whose text is put into the wanted Chinese script


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: seconds from the start of the audio, and its text."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    language: str  # detected (or given) spoken language
    language_probability: float
    duration: float  # seconds of audio
    task: Task
    segments: list[Segment]

    @property
    def text(self) -> str:
        joiner = "" if self.language in CHINESE and self.task == "transcribe" else " "
        return joiner.join(s.text for s in self.segments)


def load_model(model: str, *, device: str = "cpu", compute_type: str = "int8",
               threads: int = 2) -> WhisperModel:
    """A faster-whisper model, loaded as ``WhisperAsr`` does: a local directory as it is, any
    other name resolved by faster-whisper."""
    return WhisperModel(model, device=device, compute_type=compute_type, cpu_threads=threads,
                        local_files_only=Path(model).is_dir())


class Transcriber:
    """Transcribes (or translates) whole recordings with one Whisper model.

    Give it a ``WhisperModel`` or the assistant's ``WhisperAsr`` engine (its model is then
    used directly, outside the compute lanes: do not share one with a busy server)."""

    def __init__(self, model: WhisperModel | WhisperAsr, *, beam_size: int = 1,
                 vad_filter: bool = False, zh_script: ZhScript = "simplified") -> None:
        self.model = model.whisper if isinstance(model, WhisperAsr) else model
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self.zh_script = zh_script

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def check(self, language: str | None, task: Task = "transcribe") -> None:
        """Raise EngineError unless this model can do ``task`` in ``language``."""
        if not self.multilingual and (task == "translate" or language not in (None, "en")):
            what = "translate" if task == "translate" else f"transcribe language {language!r}"
            raise EngineError(f"this Whisper model is English-only and cannot {what}; use a "
                              "multilingual one (asr.model = 'base')")
        if language is not None and language not in self.model.supported_languages:
            raise EngineError(f"unknown language {language!r}; Whisper's codes are "
                              + ", ".join(self.model.supported_languages))

    def transcribe(self, audio: Float32Array, *, language: str | None = None,
                   task: Task = "transcribe", progress: Progress | None = None) -> Transcript:
        """All segments of ``audio`` (16 kHz mono float32). ``language`` None detects it from
        the first 30 s. ``progress`` is told the seconds done after each segment, and once
        more at the end."""
        self.check(language, task)
        duration = audio.size / MODEL_RATE
        try:
            pieces, info = self.model.transcribe(
                audio, language=language, task=task, beam_size=self.beam_size,
                vad_filter=self.vad_filter,
                # Whisper keeps to the script of its context (see WhisperAsr)
                initial_prompt=ZH_PROMPT[self.zh_script]
                if language == "zh" and task == "transcribe" else None)
            segments = list(self._segments(pieces, info.language, task, duration, progress))
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"whisper failed: {e}") from e
        if progress:
            progress(duration, duration)
        return Transcript(language=info.language,
                          language_probability=float(info.language_probability),
                          duration=duration, task=task, segments=segments)

    def _segments(self, pieces: Any, language: str, task: Task, duration: float,
                  progress: Progress | None) -> Iterator[Segment]:
        """Clean segments: text stripped and in the wanted script, empty ones dropped, and
        times within the audio and never going back (each starts where the one before ended,
        or later)."""
        convert = language in CHINESE and task == "transcribe"
        last_end = 0.0
        for piece in pieces:
            start = min(max(float(piece.start), last_end), duration)
            end = min(max(float(piece.end), start), duration)
            text = str(piece.text).strip()
            if convert:
                text = zh_script(text, self.zh_script)
            if progress:
                progress(end, duration)
            if not text:
                continue
            last_end = end
            yield Segment(round(start, 3), round(end, 3), text)
