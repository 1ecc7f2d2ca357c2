"""English to a fast English-only recogniser, everything else to Whisper.

Moonshine tiny transcribes a short English question in a third of Whisper base's time,
but speaks only English and cannot tell which language it hears. So an utterance whose
language is known to be English (the session's language, or the one Whisper detected
on the utterance's first partial transcript: the listener passes it on) goes to the
English engine; an undetected or other language goes to Whisper, which also detects it.
"""

from __future__ import annotations

from collections.abc import Hashable

from pipelines.compute import Priority
from pipelines.engines.base import Asr, AsrResult
from streaming.audio import Float32Array


class EnglishFirstAsr:
    def __init__(self, english: Asr, other: Asr) -> None:
        self.english = english
        self.other = other
        self.name = f"{english.name} (en) + {other.name}"

    async def transcribe(self, audio: Float32Array, *, language: str | None,
                         priority: Priority, session: str | None = None,
                         key: Hashable | None = None) -> AsrResult:
        engine = self.english if language == "en" else self.other
        return await engine.transcribe(audio, language=language, priority=priority,
                                       session=session, key=key)
