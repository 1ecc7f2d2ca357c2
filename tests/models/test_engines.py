"""Each real engine through its interface, with the packaged models."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from pathlib import Path

import jiwer
import numpy as np
import pytest

from client.common.wavio import read_wav
from pipelines import models
from pipelines.compute import Compute, Priority
from pipelines.engines.asr_whisper import WhisperAsr
from pipelines.engines.base import ChatMessage
from pipelines.engines.llm_llama import LlamaLlm
from pipelines.engines.tts_piper import PiperTts
from pipelines.engines.vad_silero import SileroVad
from streaming.audio import resample
from streaming.errors import ModelNotFound

JFK = ("and so my fellow americans ask not what your country can do for you "
       "ask what you can do for your country")
CACHE = models.default_cache_dir()


@pytest.fixture(scope="module")
def jfk(testdata: Path) -> np.ndarray:
    audio, rate = read_wav(testdata / "jfk.wav")
    return resample(audio, rate, 16000)


def test_silero_vad_separates_speech_from_silence(jfk: np.ndarray) -> None:
    vad = SileroVad(models.silero_vad_path())
    stream = vad.new_stream()
    speech = [stream(jfk[i:i + 512]) for i in range(0, 16000 * 3 - 512, 512)]
    quiet = vad.new_stream()
    rng = np.random.default_rng(0)
    silence = [quiet((rng.standard_normal(512) * 0.001).astype(np.float32)) for _ in range(60)]
    assert max(speech) > 0.9
    assert np.mean(np.array(speech) > 0.5) > 0.5
    assert max(silence) < 0.2
    # state is per stream: a fresh stream over the same audio gives the same answers
    again = vad.new_stream()
    assert [again(jfk[i:i + 512]) for i in range(0, 512 * 10, 512)] == pytest.approx(speech[:10])


@pytest.mark.parametrize("name", ["base", "tiny.en"])
async def test_whisper_transcribes_real_speech(name: str, jfk: np.ndarray, compute: Compute) -> None:
    asr = WhisperAsr(models.whisper_model(name, CACHE), compute, cpu_threads=2)
    result = await asr.transcribe(jfk, language=None, priority=Priority.ASR_FINAL)
    text = jiwer.RemovePunctuation()(result.text.lower())
    assert jiwer.wer(JFK, text) <= 0.15, result.text
    assert result.language == "en"
    assert result.no_speech_prob < 0.5


async def test_whisper_on_silence_says_nothing_worth_a_turn(compute: Compute) -> None:
    from pipelines.listener import is_hallucination
    asr = WhisperAsr(models.whisper_model("base", CACHE), compute)
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal(16000) * 0.003).astype(np.float32)
    result = await asr.transcribe(noise, language="en", priority=Priority.ASR_FINAL)
    assert is_hallucination(result, voiced_ms=300), result


async def test_piper_speech_is_understood_by_whisper(compute: Compute) -> None:
    model, config = models.piper_voice("joe")
    tts = PiperTts(model, config, compute)
    audio = await tts.synthesize("The quick brown fox jumps over the lazy dog.",
                                 priority=Priority.TTS_FIRST)
    assert tts.sample_rate == 22050 and audio.dtype == np.float32 and audio.size > 22050
    asr = WhisperAsr(models.whisper_model("base", CACHE), compute)
    heard = await asr.transcribe(resample(audio, 22050, 16000), language="en",
                                 priority=Priority.ASR_FINAL)
    assert jiwer.wer("the quick brown fox jumps over the lazy dog",
                     jiwer.RemovePunctuation()(heard.text.lower())) <= 0.15


@pytest.fixture(scope="module")
def smollm(compute: Compute) -> LlamaLlm:
    return LlamaLlm(models.llm_model("smollm2-135m", CACHE), compute, threads=2)


async def test_llama_streams_a_reply(smollm: LlamaLlm) -> None:
    msgs = [ChatMessage("system", "You are helpful."), ChatMessage("user", "Say hello.")]
    deltas = [d async for d in smollm.stream(msgs, max_tokens=20)]
    assert len(deltas) > 1 and "".join(deltas).strip()
    assert smollm.count_tokens("hello world") >= 2


async def test_closing_the_llm_stream_stops_generation(smollm: LlamaLlm, compute: Compute) -> None:
    msgs = [ChatMessage("user", "Count from one to two hundred, one number per line.")]
    async with contextlib.aclosing(smollm.stream(msgs, max_tokens=400)) as deltas:
        n = 0
        async for _ in deltas:
            n += 1
            if n == 3:
                break
    # the lane is free again long before 400 tokens could have been generated
    free = threading.Event()
    await asyncio.wait_for(compute.call("llm", Priority.LLM, free.set), timeout=10)
    assert free.is_set()


def test_assembled_models_are_verified(tmp_path: Path) -> None:
    target = models.WHISPER_BASE.path(tmp_path)
    target.parent.mkdir(parents=True)
    shutil.copyfile(models.WHISPER_BASE.path(CACHE), target)
    models.verify(models.WHISPER_BASE, tmp_path, full=True)
    with target.open("r+b") as f:  # one flipped byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ModelNotFound, match="sha256"):
        models.verify(models.WHISPER_BASE, tmp_path, full=True)
    target.write_bytes(b"short")
    with pytest.raises(ModelNotFound, match="bytes"):
        models.verify(models.WHISPER_BASE, tmp_path, full=False)
    with pytest.raises(ModelNotFound, match="not prepared"):
        models.verify(models.QWEN_05B, tmp_path, full=False)


async def test_moonshine_transcribes_real_english_speech(jfk: np.ndarray, compute: Compute,
                                                         voice) -> None:  # type: ignore[no-untyped-def]
    """Moonshine tiny, the English engine beside Whisper: recorded speech and the spoken
    questions the benchmarks ask."""
    from pipelines.engines.asr_moonshine import MoonshineAsr
    from tests.conftest import speak

    asr = MoonshineAsr(models.moonshine_tiny(CACHE), compute)
    result = await asr.transcribe(jfk, language="en", priority=Priority.ASR_FINAL)
    assert jiwer.wer(JFK, jiwer.RemovePunctuation()(result.text.lower())) <= 0.1, result.text
    assert result.language == "en" and result.avg_logprob > -0.5
    for question in ["What is the capital of France?", "How many legs does a spider have?"]:
        audio, rate = speak(voice, question)
        heard = await asr.transcribe(resample(audio, rate, 16000), language="en",
                                     priority=Priority.ASR_FINAL)
        assert heard.text == question
    silence = await asr.transcribe(np.zeros(1600, dtype=np.float32), language="en",
                                   priority=Priority.ASR_FINAL)  # shorter than its encoder's
    assert isinstance(silence.text, str)  # window: padded, no error


async def test_english_goes_to_moonshine_and_mandarin_to_whisper(
        compute: Compute, testdata: Path) -> None:
    from pipelines.engines.asr_moonshine import MoonshineAsr
    from pipelines.engines.asr_routed import EnglishFirstAsr

    class Counted:  # the real engine, remembering the languages it was asked in
        def __init__(self, asr) -> None:  # type: ignore[no-untyped-def]
            self.asr, self.name, self.asked = asr, asr.name, []

        async def transcribe(self, audio, **kwargs):  # type: ignore[no-untyped-def]
            self.asked.append(kwargs["language"])
            return await self.asr.transcribe(audio, **kwargs)

    whisper = Counted(WhisperAsr(models.whisper_model("base", CACHE), compute, cpu_threads=2))
    moonshine = Counted(MoonshineAsr(models.moonshine_tiny(CACHE), compute))
    routed = EnglishFirstAsr(moonshine, whisper)
    zh, rate = read_wav(sorted((testdata / "zh").glob("*.wav"))[0])
    detected = await routed.transcribe(resample(zh, rate, 16000), language=None,
                                       priority=Priority.ASR_FINAL)
    assert detected.language == "zh" and detected.text  # undetected: Whisper, which detects
    jfk, rate = read_wav(testdata / "jfk.wav")
    english = await routed.transcribe(resample(jfk, rate, 16000), language="en",
                                      priority=Priority.ASR_FINAL)
    assert "fellow americans" in english.text.lower()
    assert whisper.asked == [None] and moonshine.asked == ["en"]
