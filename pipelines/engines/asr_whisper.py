"""Whisper ASR through faster-whisper's CTranslate2 model, with a short encoder window.

Whisper encodes a fixed 30 s window however short the speech, and that fixed
cost dominates a 1-3 s utterance (bench/README.md). CTranslate2's encoder also
takes shorter inputs, so an utterance is encoded in the smallest window of
``window_s`` steps (at least ``min_window_s``) that holds it plus a margin: a
15 s window costs about a third of a 30 s one and gave the same transcripts
on our test speech, while 10 s windows started to make mistakes (measured,
bench/README.md). ``min_window_s = 30`` restores Whisper's stock behaviour.

Decoding is greedy (or beam search), timestamp-free, one utterance per call.
With no language given, the language is detected from the same encoder
output, so detection costs no second encoder pass.

This uses faster-whisper's building blocks (feature extractor, tokenizer,
prompt) below ``WhisperModel.transcribe``; the version is pinned in pyproject.
"""

from __future__ import annotations

import math
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from pipelines.compute import Compute, Priority
from pipelines.engines.base import AsrResult
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
        name: str | None = None,
    ) -> None:
        self.name = name or f"faster-whisper:{model}"
        self._compute = compute
        self._beam_size = beam_size
        self._min_window_s = max(1, min(min_window_s, MAX_WINDOW_S))
        # a local directory loads as is; any other name is resolved by faster-whisper (hub)
        self._model = WhisperModel(model, device=device, compute_type=compute_type,
                                   cpu_threads=cpu_threads, local_files_only=Path(model).is_dir())
        self.multilingual = bool(self._model.model.is_multilingual)
        self._tokenizers: dict[str | None, Tokenizer] = {}

    async def transcribe(
        self, audio: Float32Array, *, language: str | None, priority: Priority
    ) -> AsrResult:
        """Transcribe on the ``asr`` lane. Cancelling drops a request that has not started."""
        return await self._compute.call("asr", priority, self._run, audio, language)

    def warm_up(self) -> None:
        """One decode, so the first user does not pay for lazy initialisation."""
        self._run(np.zeros(MODEL_RATE, dtype=np.float32), "en")

    def _window_s(self, seconds: float) -> int:
        step = 5
        need = math.ceil((seconds + 1.0) / step) * step  # at least 1 s of silence after speech
        return min(MAX_WINDOW_S, max(self._min_window_s, need))

    def _tokenizer(self, language: str | None) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(self._model.hf_tokenizer, self.multilingual,
                                                   task="transcribe", language=language)
        return self._tokenizers[language]

    def _run(self, audio: Float32Array, language: str | None) -> AsrResult:
        try:
            return self._decode(audio, language)
        except Exception as e:
            raise EngineError(f"whisper failed: {e}") from e

    def _decode(self, audio: Float32Array, language: str | None) -> AsrResult:
        model = self._model
        seconds = audio.size / MODEL_RATE
        window = self._window_s(seconds)
        padded = np.zeros(window * MODEL_RATE, dtype=np.float32)
        n = min(audio.size, padded.size)
        padded[:n] = audio[:n]
        features = model.feature_extractor(padded)[:, : window * FRAMES_PER_S]
        encoded = model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])),
            to_cpu=False)
        if not self.multilingual:
            language = "en"
        elif language is None:
            ranked = model.model.detect_language(encoded)[0]
            language = ranked[0][0][2:-2]  # "<|en|>" → "en"
        tokenizer = self._tokenizer(language)
        prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
        result = model.model.generate(
            encoded, [prompt], beam_size=self._beam_size, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            max_length=len(prompt) + int(12 * seconds) + 16,  # speech runs < 6 tokens/s
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else -10.0
        return AsrResult(text, language, float(result.no_speech_prob), float(avg_logprob))
