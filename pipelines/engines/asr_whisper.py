"""Whisper ASR through faster-whisper's CTranslate2 model, with a short encoder window.

Whisper encodes a fixed 30 s window however short the speech, and that fixed
cost dominates a 1-3 s utterance (bench/README.md). CTranslate2's encoder also
takes shorter inputs, so an utterance is encoded in the smallest window of
``window_s`` steps (at least ``min_window_s``) that holds it plus a margin: a
15 s window costs about a third of a 30 s one and gave the same transcripts
on our test speech, while 10 s windows started to make mistakes (measured,
bench/README.md). ``min_window_s = 30`` restores Whisper's stock behaviour.

Mandarin comes out of Whisper in traditional or simplified characters, whichever
it picks: the decoder is prompted with a sentence in ``zh_script`` (simplified by
default) and what still slips through is converted with OpenCC.

Decoding is greedy (or beam search) and timestamp-free. Utterances of several
sessions that wait on the lane together, with the same window, are encoded
and decoded as one batch.
With no language given, the language is detected from the same encoder
output, so detection costs no second encoder pass.

This uses faster-whisper's building blocks (feature extractor, tokenizer,
prompt) below ``WhisperModel.transcribe``; the version is pinned in pyproject.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from pipelines.compute import Compute, Priority
from pipelines.engines.base import AsrResult
from pipelines.text import ZH_PROMPT, ZhScript, zh_script
from streaming.audio import MODEL_RATE, Float32Array
from streaming.errors import EngineError

FRAMES_PER_S = 100  # Whisper's mel frames per second
MAX_WINDOW_S = 30


class WhisperAsr:
    def __init__(
        self,
        model: str,
        compute: Compute,
        *,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 2,
        beam_size: int = 1,
        min_window_s: int = 10,
        zh_script: ZhScript = "simplified",
        name: str | None = None,
    ) -> None:
        self.name = name or f"faster-whisper:{model}"
        self._compute = compute
        self._beam_size = beam_size
        self._min_window_s = max(1, min(min_window_s, MAX_WINDOW_S))
        self.zh_script: ZhScript = zh_script
        # a local directory loads as is; any other name is resolved by faster-whisper (hub)
        self._model = WhisperModel(model, device=device, compute_type=compute_type,
                                   cpu_threads=cpu_threads, local_files_only=Path(model).is_dir())
        self.multilingual = bool(self._model.model.is_multilingual)
        self._tokenizers: dict[str | None, Tokenizer] = {}

    @property
    def whisper(self) -> WhisperModel:
        """The loaded faster-whisper model (whole-file transcription uses it directly)."""
        return self._model

    async def transcribe(
        self, audio: Float32Array, *, language: str | None, priority: Priority,
        session: str | None = None, key: Hashable | None = None,
    ) -> AsrResult:
        """Transcribe on the ``asr`` lane, batched with other sessions' utterances of the same
        window size that are queued at the same priority. Cancelling drops queued work."""
        window = self._window_s(audio.size / MODEL_RATE)
        return await self._compute.call_batch(
            "asr", priority, (audio, language), self._run, batch_key=("whisper", window),
            session=session, key=key)

    def warm_up(self) -> None:
        """One decode, so the first user does not pay for lazy initialisation."""
        self._run([(np.zeros(MODEL_RATE, dtype=np.float32), "en")])

    def _window_s(self, seconds: float) -> int:
        step = 5
        need = math.ceil((seconds + 1.0) / step) * step  # at least 1 s of silence after speech
        return min(MAX_WINDOW_S, max(self._min_window_s, need))

    def _tokenizer(self, language: str | None) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(self._model.hf_tokenizer, self.multilingual,
                                                   task="transcribe", language=language)
        return self._tokenizers[language]

    def _previous(self, tokenizer: Tokenizer, language: str | None) -> list[int]:
        """Text the decoder takes as what came before: for Mandarin, a sentence in the wanted
        script (Whisper follows the script of its context)."""
        if language != "zh":
            return []
        return list(tokenizer.encode(ZH_PROMPT[self.zh_script]))

    def _run(self, items: list[tuple[Float32Array, str | None]]) -> list[AsrResult]:
        try:
            return self._decode(items)
        except Exception as e:
            raise EngineError(f"whisper failed: {e}") from e

    def _decode(self, items: list[tuple[Float32Array, str | None]]) -> list[AsrResult]:
        """One encoder pass and one decoding call for a batch of utterances."""
        model = self._model
        seconds = max(audio.size for audio, _ in items) / MODEL_RATE
        window = self._window_s(seconds)
        batch = []
        for audio, _ in items:
            padded = np.zeros(window * MODEL_RATE, dtype=np.float32)
            n = min(audio.size, padded.size)
            padded[:n] = audio[:n]
            batch.append(model.feature_extractor(padded)[:, : window * FRAMES_PER_S])
        encoded = model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(batch))),
            to_cpu=False)
        languages = [lang if self.multilingual else "en" for _, lang in items]
        if any(lang is None for lang in languages):
            ranked = model.model.detect_language(encoded)
            languages = [lang or r[0][0][2:-2] for lang, r in zip(languages, ranked, strict=True)]
        tokenizers = [self._tokenizer(lang) for lang in languages]
        prompts = [model.get_prompt(t, self._previous(t, lang), without_timestamps=True)
                   for t, lang in zip(tokenizers, languages, strict=True)]
        results = model.model.generate(
            encoded, prompts, beam_size=self._beam_size, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizers[0], [-1]),
            max_length=max(len(p) for p in prompts) + int(12 * seconds) + 16,  # < 6 tokens/s
        )
        out = []
        for result, tokenizer, language in zip(results, tokenizers, languages, strict=True):
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            text = tokenizer.decode(tokens).strip()
            if language == "zh":  # Whisper writes Mandarin in either script, mostly traditional
                text = zh_script(text, self.zh_script)
            avg = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else -10.0
            out.append(AsrResult(text, language, float(result.no_speech_prob), float(avg)))
        return out
