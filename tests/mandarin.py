"""How the tests compare Mandarin text: characters only, and toneless syllables."""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np
from faster_whisper import WhisperModel
from pypinyin import lazy_pinyin

from client.common.wavio import read_wav
from pipelines.text import HAN, ZH_PROMPT, main_script, zh_script
from streaming.audio import Float32Array, resample


def han(text: str) -> str:
    """The Chinese characters of a text (no punctuation, digits, Latin or spaces)."""
    return "".join(HAN.findall(text))


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over the Chinese characters."""
    return float(jiwer.cer(han(reference), han(hypothesis) or "-"))


def syllables(text: str) -> list[str]:
    """Toneless pinyin of the Chinese characters: what was *said*, whatever characters
    Whisper picked for it (写代码 and 鞋带码 sound the same)."""
    return lazy_pinyin(han(text))


def hear(whisper: WhisperModel, audio: Float32Array, rate: int, language: str | None) -> str:
    """What Whisper base hears in reply audio, read as the server reads Mandarin (prompted
    for simplified characters, then converted)."""
    prompt = ZH_PROMPT["simplified"] if language == "zh" else None
    segments, _ = whisper.transcribe(resample(audio, rate, 16_000), language=language,
                                     beam_size=1, initial_prompt=prompt)
    return zh_script(" ".join(s.text.strip() for s in segments))


def pcm_audio(pcm: bytes) -> Float32Array:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768


def check_mandarin_turn(whisper: WhisperModel, said: str, transcript: str, reply: str,
                        recording: Path) -> None:
    """Heard as said, in simplified characters; answered mostly in Chinese; and the reply
    the speaker played (recorded) is that answer spoken in Mandarin."""
    assert transcript == zh_script(transcript) and HAN.search(transcript), transcript
    assert cer(said, transcript) <= 0.2, transcript
    assert main_script(reply) == "han", reply
    audio, rate = read_wav(recording)
    # from just before the first sound: the speaker records silence while the question is
    # said, and seconds of silence before speech throw Whisper base off
    sounding = np.flatnonzero(np.abs(audio) > 0.01)
    assert sounding.size, "the recording is silent"
    heard_zh = hear(whisper, audio[max(0, sounding[0] - rate * 3 // 10):], rate, "zh")
    assert cer(reply, heard_zh) <= 0.3, (reply, heard_zh)
