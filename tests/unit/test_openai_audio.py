"""Reading the OpenAI audio API's answers (pipelines/engines/openai_audio.py)."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from pipelines.compute import Priority
from pipelines.engines.openai_audio import (
    PRIORITY_HEADER,
    SESSION_HEADER,
    language_code,
    routing_headers,
    transcription_result,
    wav_bytes,
)
from streaming.errors import EngineError


def test_a_verbose_answer_gives_text_language_and_confidence() -> None:
    result = transcription_result({"text": " Hello there. ", "language": "english", "segments": [
        {"no_speech_prob": 0.1, "avg_logprob": -0.2}, {"no_speech_prob": 0.3, "avg_logprob": -0.4}]})
    assert result.text == "Hello there." and result.language == "en"
    assert result.no_speech_prob == 0.3 and result.avg_logprob == pytest.approx(-0.3)
    plain = transcription_result({"text": "你好"})
    assert plain.language is None and plain.no_speech_prob == 0.0


def test_languages_as_codes() -> None:
    assert [language_code(x) for x in ("zh", "Chinese", "EN", "klingon", None, 3)] == [
        "zh", "zh", "en", None, None, None]


@pytest.mark.parametrize("body", [{"error": "x"}, [], "text", {"text": 3}])
def test_an_answer_without_text_is_an_engine_error(body: object) -> None:
    with pytest.raises(EngineError):
        transcription_result(body)


def test_the_upload_is_a_16_bit_wav_and_the_headers_say_what_the_work_is() -> None:
    audio = np.sin(np.linspace(0, 100, 16_000)).astype(np.float32) * 0.5
    with wave.open(io.BytesIO(wav_bytes(audio, 16_000))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            1, 2, 16_000, 16_000)
    headers = routing_headers(Priority.ASR_PARTIAL, "s1", ("partial", "s1"))
    assert headers[PRIORITY_HEADER] == "asr_partial" and headers[SESSION_HEADER] == "s1"
    assert routing_headers(Priority.TTS_FIRST, None) == {PRIORITY_HEADER: "tts_first"}
