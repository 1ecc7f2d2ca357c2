"""Reading and writing 16-bit PCM WAV files (mono out, any channel count in)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from streaming.audio import Float32Array, float_to_pcm16, pcm16_to_float


def read_wav(path: str | Path) -> tuple[Float32Array, int]:
    """(mono float32 samples, sample rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        data = w.readframes(w.getnframes())
        return pcm16_to_float(data, w.getnchannels()), w.getframerate()


def write_wav(path: str | Path, audio: Float32Array | bytes, rate: int) -> None:
    pcm = audio if isinstance(audio, bytes) else float_to_pcm16(audio)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def last_voiced_sample(audio: Float32Array, rate: int, level: float = 0.01) -> int:
    """Index just after the last 10 ms window whose RMS exceeds ``level`` (-40 dBFS); 0 if none."""
    win = max(1, rate // 100)
    n = audio.size // win
    if n == 0:
        return 0
    rms = np.sqrt(np.mean(audio[: n * win].reshape(n, win) ** 2, axis=1))
    voiced = np.nonzero(rms > level)[0]
    return 0 if voiced.size == 0 else int((voiced[-1] + 1) * win)
